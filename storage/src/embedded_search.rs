//! The embedded store's derived indexes of messages: mention marks and the search index (a
//! term table over each message's current text). Written by checkpoints and by the log's
//! replay, from the messages as they are stored; read together with the tail (see
//! [`crate::embedded`]), whose newer copies win.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use redb::{ReadTransaction, ReadableTable, Table, TableDefinition, TableHandle, WriteTransaction};

use crate::embedded_keys::Utf8;
use crate::search::{change_of, doc_terms, Found, IndexChange, SearchQuery};
use crate::{Message, Result};

/// (user, conv) -> the highest seq of a message of conv that mentions the user.
pub(crate) const MENTIONS: TableDefinition<(Utf8, Utf8), u64> = TableDefinition::new("mentions.v2");
/// (conv, seq) -> (the seq of the latest edit, its text): the current text of an edited message.
pub(crate) const EDITS: TableDefinition<(Utf8, u64), (u64, &str)> = TableDefinition::new("search_edits.v2");
/// (term, conv, seq): a text conv#seq had (its own or an edit's) holds the term. Postings are
/// only added: a reader checks each candidate's current text (a recall or a later edit leaves
/// postings that no longer hold), which keeps a checkpoint to one insert per new term.
pub(crate) const TERMS: TableDefinition<(i64, Utf8, u64), ()> = TableDefinition::new("search_terms.v2");

/// The index tables, opened once per write transaction. Postings are gathered and written in
/// key order by [`IndexTables::finish`] (neighbouring inserts touch the same pages).
pub(crate) struct IndexTables<'t> {
    mentions: Table<'t, (Utf8, Utf8), u64>,
    edits: Table<'t, (Utf8, u64), (u64, &'static str)>,
    terms: Table<'t, (i64, Utf8, u64), ()>,
    postings: Vec<(i64, String, u64)>,
}

impl<'t> IndexTables<'t> {
    pub fn open(tx: &'t WriteTransaction) -> Result<Self> {
        Ok(Self {
            mentions: tx.open_table(MENTIONS)?,
            edits: tx.open_table(EDITS)?,
            terms: tx.open_table(TERMS)?,
            postings: Vec::new(),
        })
    }

    /// Indexes `m` as now stored: `appended` when this is the message's append (the users it
    /// mentioned then, `mentions`, are marked, and its text is indexed), otherwise a change of
    /// a stored message (a recall: nothing to write). `seq_of_mid` finds the target of an edit.
    /// Idempotent: a replay may apply a message twice.
    pub fn message(
        &mut self,
        m: &Message,
        appended: bool,
        mentions: &[String],
        seq_of_mid: impl Fn(&str) -> Result<Option<u64>>,
    ) -> Result<()> {
        if !appended {
            return Ok(());
        }
        let conv = m.conv.as_str();
        for user in mentions {
            let current = self.mentions.get((user.as_str(), conv))?.map_or(0, |v| v.value());
            if m.seq > current {
                self.mentions.insert((user.as_str(), conv), m.seq)?;
            }
        }
        match change_of(m) {
            IndexChange::Add(text) => self.post(conv, m.seq, &text),
            IndexChange::Edit { mid, text } => {
                let Some(target) = seq_of_mid(&mid)? else { return Ok(()) };
                // A later edit may have been applied already (a replay).
                let by = self.edits.get((conv, target))?.map_or(0, |v| v.value().0);
                if by < m.seq {
                    self.edits.insert((conv, target), (m.seq, text.as_str()))?;
                    self.post(conv, target, &text);
                }
            }
            IndexChange::None => {}
        }
        Ok(())
    }

    fn post(&mut self, conv: &str, seq: u64, text: &str) {
        self.postings.extend(doc_terms(text).into_iter().map(|t| (t, conv.to_owned(), seq)));
    }

    /// Writes the gathered postings, in key order.
    pub fn finish(mut self) -> Result<()> {
        self.postings.sort_unstable();
        self.postings.dedup();
        for (t, conv, seq) in &self.postings {
            self.terms.insert((*t, conv.as_str(), *seq), ())?;
        }
        Ok(())
    }
}

/// Creates the tables (a new file, or one written before they existed) and fills them from the
/// stored messages when they are new.
pub(crate) fn create(tx: &WriteTransaction, messages: &impl ReadableTable<(Utf8, u64), &'static [u8]>) -> Result<()> {
    let existed = tx.list_tables()?.any(|t| t.name() == EDITS.name());
    let mut tables = IndexTables::open(tx)?;
    if existed {
        return Ok(());
    }
    let mids = tx.open_table(crate::embedded_mids::MIDS)?;
    for row in messages.iter()? {
        let m: Message = serde_json::from_slice(row?.1.value())?;
        tables.message(&m, true, &m.mentions, |mid| crate::embedded_mids::seq_of_mid(&mids, messages, &m.conv, mid))?;
    }
    tables.finish()
}

/// The mention marks of `user` in the B-trees.
pub(crate) fn mentions(tx: &ReadTransaction, user: &str) -> Result<HashMap<String, u64>> {
    let marks = crate::embedded::rows_under(&tx.open_table(MENTIONS)?, user, |conv, seq| Ok((conv.to_owned(), seq)))?;
    Ok(marks.into_iter().collect())
}

/// Most postings of the query's first term read per conversation (the newest).
const MAX_POSTINGS: usize = 50_000;

/// A candidate of the B-trees, with the seq of what set its text.
pub(crate) struct Indexed {
    pub found: Found,
    pub by: u64,
}

/// The newest `q.limit` matches of `q` in its conversations as the B-trees hold them, found
/// from the postings of the query's first term (newest first in each conversation, each checked
/// for the others); a conversation is read only while its matches are newer than the
/// `q.limit`-th newest found so far.
pub(crate) fn candidates(tx: &ReadTransaction, q: &SearchQuery) -> Result<Vec<Indexed>> {
    let (terms, edits, messages) =
        (tx.open_table(TERMS)?, tx.open_table(EDITS)?, tx.open_table(crate::embedded::MESSAGES)?);
    let Some((&first, rest)) = q.terms.split_first() else { return Ok(Vec::new()) };
    let mut out: Vec<Indexed> = Vec::new();
    // the ts of the limit-th newest match so far, once there are that many
    let mut floor: Option<u64> = None;
    for conv in &q.convs {
        let conv = conv.as_str();
        let mut taken = 0;
        for row in terms.range((first, conv, 0)..=(first, conv, u64::MAX))?.rev().take(MAX_POSTINGS) {
            let seq = row?.0.value().2;
            let mut all = true;
            for &t in rest {
                if terms.get((t, conv, seq))?.is_none() {
                    all = false;
                    break;
                }
            }
            if !all {
                continue;
            }
            let Some(row) = messages.get((conv, seq))? else { continue };
            let msg: Message = serde_json::from_slice(row.value())?;
            if floor.is_some_and(|f| msg.ts < f) {
                break; // the rest of this conversation is older still
            }
            // The current text: the latest edit's, or the message's own (none once recalled).
            let Some(own) = crate::search::searchable(&msg.kind, &msg.body) else { continue };
            let (text, by) = match edits.get((conv, seq))? {
                Some(e) => (e.value().1.to_owned(), e.value().0),
                None => (own, msg.seq),
            };
            if !matches(q, &text) || !passes(q, &msg) {
                continue;
            }
            out.push(Indexed { found: Found { msg, text }, by });
            taken += 1;
            if taken == q.limit {
                break;
            }
        }
        if out.len() >= q.limit {
            out.sort_by_key(|i| std::cmp::Reverse(i.found.msg.ts));
            out.truncate(q.limit);
            floor = out.last().map(|i| i.found.msg.ts);
        }
    }
    Ok(out)
}

/// Whether `m` passes the query's sender and time filters.
pub(crate) fn passes(q: &SearchQuery, m: &Message) -> bool {
    q.from.as_deref().is_none_or(|f| f == m.from) && q.before_ts.is_none_or(|b| m.ts < b)
}

/// Whether `text` holds every term of `q`.
pub(crate) fn matches(q: &SearchQuery, text: &str) -> bool {
    let doc: HashSet<i64> = doc_terms(text).into_iter().collect();
    q.terms.iter().all(|t| doc.contains(t))
}

/// The B-trees' candidates with the tail's newer copies applied: `tail` holds each
/// conversation's messages in the tail (newest copies, seq order); `lookup` finds a message by
/// mid (tail first, then B-trees) for an edit whose target the B-trees did not offer.
pub(crate) async fn merge_tail<F, Fut>(
    q: &SearchQuery,
    stored: Vec<Indexed>,
    tail: Vec<Arc<Message>>,
    lookup: F,
) -> Result<Vec<Found>>
where
    F: Fn(String, String) -> Fut,
    Fut: std::future::Future<Output = Result<Option<Message>>>,
{
    let mut found: BTreeMap<(String, u64), Indexed> =
        stored.into_iter().map(|i| ((i.found.msg.conv.clone(), i.found.msg.seq), i)).collect();
    // (conv, mid) -> (edit seq, text), the latest edit of each target in the tail
    let mut edits: BTreeMap<(String, String), (u64, String)> = BTreeMap::new();
    for m in tail {
        let key = (m.conv.clone(), m.seq);
        match change_of(&m) {
            IndexChange::Add(text) => {
                found.remove(&key);
                if matches(q, &text) && passes(q, &m) {
                    let by = m.seq;
                    found.insert(key, Indexed { found: Found { msg: (*m).clone(), text }, by });
                }
            }
            IndexChange::Edit { mid, text } => {
                let e = edits.entry((m.conv.clone(), mid)).or_insert((0, String::new()));
                if m.seq > e.0 {
                    *e = (m.seq, text);
                }
            }
            IndexChange::None => {
                found.remove(&key);
            }
        }
    }
    let by_mid: HashMap<(String, String), (String, u64)> =
        found.iter().map(|(k, i)| ((k.0.clone(), i.found.msg.mid.clone()), k.clone())).collect();
    for ((conv, mid), (seq, text)) in edits {
        let hit = by_mid.get(&(conv.clone(), mid.clone())).and_then(|k| found.get(k).map(|i| (k.clone(), i.by)));
        match hit {
            Some((key, by)) if by < seq => {
                if matches(q, &text) {
                    let i = found.get_mut(&key).expect("just found");
                    (i.found.text, i.by) = (text, seq);
                } else {
                    found.remove(&key);
                }
            }
            Some(_) => {}
            None => {
                if !matches(q, &text) {
                    continue;
                }
                let Some(target) = lookup(conv, mid).await? else { continue };
                if crate::search::searchable(&target.kind, &target.body).is_some() && passes(q, &target) {
                    let key = (target.conv.clone(), target.seq);
                    found.insert(key, Indexed { found: Found { msg: target, text }, by: seq });
                }
            }
        }
    }
    let mut out: Vec<Found> = found.into_values().map(|i| i.found).collect();
    out.sort_by(|a, b| b.msg.ts.cmp(&a.msg.ts).then(b.msg.seq.cmp(&a.msg.seq)));
    out.truncate(q.limit);
    Ok(out)
}
