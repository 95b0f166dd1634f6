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
/// (term, conv, seq) in the layout before [`TERM_BLOCKS`]: one row per posting. Carried into
/// the blocks when a database that has it is opened ([`carry_postings`]).
pub(crate) const TERMS: TableDefinition<(i64, Utf8, u64), ()> = TableDefinition::new("search_terms.v2");
/// (conv, block) -> the terms of the block's texts, each with a bit per seq of the block: bit
/// `seq % 64` of a term's bits in block `seq / 64` says a text conv#seq had (its own or an
/// edit's) holds the term. The value is a run of (term `i64`, bits `u64`) pairs, little endian,
/// sorted by term. Postings are only added: a reader checks each candidate's current text (a
/// recall or a later edit leaves postings that no longer hold). One row per conversation and 64
/// messages: a checkpoint rewrites each conversation's newest row once, whatever number of
/// terms and messages it adds (a row per posting, keyed by term first as before, cost a B-tree
/// insert each, on pages spread over the whole index).
pub(crate) const TERM_BLOCKS: TableDefinition<(Utf8, u64), &[u8]> = TableDefinition::new("search_block_terms.v2");

/// Bytes of one (term, bits) pair of a [`TERM_BLOCKS`] value.
const PAIR: usize = 16;

/// One (term, bits) pair of a block's value.
fn pair(p: &[u8; PAIR]) -> (i64, u64) {
    (i64::from_le_bytes(p[..8].try_into().expect("8 bytes")), u64::from_le_bytes(p[8..].try_into().expect("8 bytes")))
}

/// The (term, bits) pairs of a block's value, in term order.
fn pairs(value: &[u8]) -> impl Iterator<Item = (i64, u64)> + '_ {
    value.as_chunks::<PAIR>().0.iter().map(pair)
}

/// The bits of `term` in a block's value (0 if the block has none).
pub(crate) fn bits_of(value: &[u8], term: i64) -> u64 {
    let pairs = value.as_chunks::<PAIR>().0;
    pairs.binary_search_by_key(&term, |p| pair(p).0).map_or(0, |i| pair(&pairs[i]).1)
}

/// Adds the posting conv#seq of term `t` to `postings`.
fn add_posting(postings: &mut Postings, conv: &str, seq: u64, t: i64) {
    let (block, bit) = block_of(seq);
    *postings.entry((conv.to_owned(), block)).or_default().entry(t).or_insert(0) |= bit;
}

/// Seqs per row of [`TERM_BLOCKS`].
const BLOCK: u64 = 64;

/// The row and bit of `seq`.
fn block_of(seq: u64) -> (u64, u64) {
    (seq / BLOCK, 1 << (seq % BLOCK))
}

/// The seqs of a block row's bits, newest first.
fn seqs_of(block: u64, bits: u64) -> impl Iterator<Item = u64> {
    (0..BLOCK).rev().filter(move |i| bits >> i & 1 == 1).map(move |i| block * BLOCK + i)
}

/// The index tables, opened once per write transaction. Postings are gathered and written in
/// key order by [`IndexTables::finish`] (neighbouring inserts touch the same pages).
pub(crate) struct IndexTables<'t> {
    mentions: Table<'t, (Utf8, Utf8), u64>,
    edits: Table<'t, (Utf8, u64), (u64, &'static str)>,
    terms: Table<'t, (Utf8, u64), &'static [u8]>,
    /// (conv, block) -> term -> the bits to add.
    postings: Postings,
}

impl<'t> IndexTables<'t> {
    pub fn open(tx: &'t WriteTransaction) -> Result<Self> {
        Ok(Self {
            mentions: tx.open_table(MENTIONS)?,
            edits: tx.open_table(EDITS)?,
            terms: tx.open_table(TERM_BLOCKS)?,
            postings: BTreeMap::new(),
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
        for t in doc_terms(text) {
            add_posting(&mut self.postings, conv, seq, t);
        }
    }

    /// Writes the gathered postings, in key order, each block's bits added to those it has.
    pub fn finish(self) -> Result<()> {
        let Self { mut terms, postings, .. } = self;
        add_bits(&mut terms, postings)
    }
}

/// Postings gathered for [`TERM_BLOCKS`]: (conv, block) -> term -> bits.
type Postings = BTreeMap<(String, u64), BTreeMap<i64, u64>>;

/// Adds `postings` to the bits the blocks have: one read and at most one write per block.
fn add_bits(blocks: &mut Table<'_, (Utf8, u64), &'static [u8]>, postings: Postings) -> Result<()> {
    let mut value = Vec::new();
    for ((conv, block), mut terms) in postings {
        let key = (conv.as_str(), block);
        let had = blocks.get(key)?.map(|v| v.value().to_vec()).unwrap_or_default();
        for (t, bits) in pairs(&had) {
            *terms.entry(t).or_insert(0) |= bits;
        }
        value.clear();
        for (t, bits) in terms {
            value.extend_from_slice(&t.to_le_bytes());
            value.extend_from_slice(&bits.to_le_bytes());
        }
        if value == had {
            continue; // a replay: nothing new
        }
        blocks.insert(key, &value[..])?;
    }
    Ok(())
}

/// Moves the one-row-per-posting index of an older database into [`TERM_BLOCKS`] and deletes
/// it, a million postings at a time. Nothing to do if there is none.
pub(crate) fn carry_postings(tx: &WriteTransaction) -> Result<()> {
    if !tx.list_tables()?.any(|t| t.name() == TERMS.name()) {
        return Ok(());
    }
    {
        let old = tx.open_table(TERMS)?;
        let mut blocks = tx.open_table(TERM_BLOCKS)?;
        let (mut pending, mut gathered): (Postings, usize) = (BTreeMap::new(), 0);
        for row in old.iter()? {
            let (key, _) = row?;
            let (t, conv, seq) = key.value();
            add_posting(&mut pending, conv, seq, t);
            gathered += 1;
            if gathered == 1 << 20 {
                gathered = 0;
                add_bits(&mut blocks, std::mem::take(&mut pending))?;
            }
        }
        add_bits(&mut blocks, pending)?;
    }
    tx.delete_table(TERMS)?;
    Ok(())
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

/// Most blocks read per conversation (the newest): 3.2 million messages.
const MAX_BLOCKS: usize = 50_000;

/// A candidate of the B-trees, with the seq of what set its text.
pub(crate) struct Indexed {
    pub found: Found,
    pub by: u64,
}

/// The newest `q.limit` matches of `q` in its conversations as the B-trees hold them, found
/// block by block from each conversation's newest (the bits of every query term in the block
/// together), each candidate checked against its current text; a conversation is read only
/// while its matches are newer than the `q.limit`-th newest found so far.
pub(crate) fn candidates(tx: &ReadTransaction, q: &SearchQuery) -> Result<Vec<Indexed>> {
    let (terms, edits, messages) =
        (tx.open_table(TERM_BLOCKS)?, tx.open_table(EDITS)?, tx.open_table(crate::embedded::MESSAGES)?);
    if q.terms.is_empty() {
        return Ok(Vec::new());
    }
    let mut out: Vec<Indexed> = Vec::new();
    // the ts of the limit-th newest match so far, once there are that many
    let mut floor: Option<u64> = None;
    for conv in &q.convs {
        let conv = conv.as_str();
        let mut taken = 0;
        // The conversation's blocks, newest first.
        'blocks: for row in terms.range((conv, 0)..=(conv, u64::MAX))?.rev().take(MAX_BLOCKS) {
            let (key, value) = row?;
            let (block, value) = (key.value().1, value.value());
            // The seqs of the block whose texts had every term.
            let bits = q.terms.iter().fold(u64::MAX, |bits, &t| bits & bits_of(value, t));
            if bits == 0 {
                continue;
            }
            for seq in seqs_of(block, bits) {
                let Some(row) = messages.get((conv, seq))? else { continue };
                let msg: Message = serde_json::from_slice(row.value())?;
                if floor.is_some_and(|f| msg.ts < f) {
                    break 'blocks; // the rest of this conversation is older still
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
                    break 'blocks;
                }
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

#[cfg(test)]
mod tests {
    use redb::{Database, ReadableTableMetadata};

    use super::*;
    use crate::search::{query_terms, SearchQuery};

    fn db(name: &str) -> (Database, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("sb-postings-{name}-{}", crate::contract::prefix()));
        std::fs::create_dir_all(&dir).unwrap();
        (Database::create(dir.join("t.redb")).unwrap(), dir)
    }

    /// Seqs `from..=to` of conversation `c`: every text holds "alpha", every third "beta" too.
    fn checkpoint(db: &Database, from: u64, to: u64) {
        let tx = db.begin_write().unwrap();
        {
            let mut messages = tx.open_table(crate::embedded::MESSAGES).unwrap();
            let mut index = IndexTables::open(&tx).unwrap();
            for seq in from..=to {
                let body = if seq % 3 == 0 { "alpha and beta" } else { "alpha alone" };
                let m = crate::contract::text("c", "a", &format!("m{seq}"), body).stored_as(seq, 1_000 + seq);
                messages.insert(("c", seq), &serde_json::to_vec(&m).unwrap()[..]).unwrap();
                index.message(&m, true, &[], |_| Ok(None)).unwrap();
            }
            index.finish().unwrap();
        }
        tx.commit().unwrap();
    }

    fn search(db: &Database, q: &str, limit: usize) -> Vec<u64> {
        let q = SearchQuery { convs: vec!["c".into()], terms: query_terms(q), from: None, before_ts: None, limit };
        candidates(&db.begin_read().unwrap(), &q).unwrap().into_iter().map(|i| i.found.msg.seq).collect()
    }

    /// 200 messages over four blocks, written by two checkpoints (the second adds bits to the
    /// block the first began): one row per block with its terms in order, and a search reads
    /// them newest first across the blocks' edges.
    #[test]
    fn postings_are_a_row_per_block_and_read_newest_first() {
        let (db, dir) = db("blocks");
        checkpoint(&db, 1, 100);
        checkpoint(&db, 101, 200);
        let tx = db.begin_read().unwrap();
        let blocks = tx.open_table(TERM_BLOCKS).unwrap();
        let alpha = query_terms("alpha")[0];
        let bits = |b: u64| bits_of(blocks.get(("c", b)).unwrap().unwrap().value(), alpha);
        assert_eq!(bits(0), !1); // seqs 1..=63
        assert_eq!(bits(1), u64::MAX); // 64..=127, from both checkpoints
        assert_eq!(bits(3), (1 << 9) - 1); // 192..=200
                                           // one row per block, each with alpha, and, beta, alone in term order
        assert_eq!(blocks.len().unwrap(), 4);
        let terms: Vec<i64> = pairs(blocks.get(("c", 2)).unwrap().unwrap().value()).map(|p| p.0).collect();
        let mut expected = query_terms("alpha and beta alone");
        expected.sort_unstable();
        assert_eq!(terms, expected);
        assert_eq!(bits_of(blocks.get(("c", 2)).unwrap().unwrap().value(), query_terms("gamma")[0]), 0);
        drop((blocks, tx));
        assert_eq!(search(&db, "alpha beta", 5), [198, 195, 192, 189, 186]);
        let every_third: Vec<u64> = (1..=66).rev().map(|n| n * 3).collect();
        assert_eq!(search(&db, "beta", 100), every_third);
        assert_eq!(search(&db, "alpha", 200), (1..=200).rev().collect::<Vec<_>>());
        assert!(search(&db, "gamma", 10).is_empty());
        drop(db);
        std::fs::remove_dir_all(dir).ok();
    }

    /// A database with one row per posting has them moved into blocks, the old table deleted.
    #[test]
    fn older_postings_are_carried_into_blocks() {
        let (db, dir) = db("carry");
        let tx = db.begin_write().unwrap();
        {
            let mut old = tx.open_table(TERMS).unwrap();
            for seq in 1..=130 {
                old.insert((7, "c", seq), ()).unwrap();
            }
            old.insert((8, "c", 5), ()).unwrap();
            old.insert((8, "d", 64), ()).unwrap();
        }
        carry_postings(&tx).unwrap();
        assert!(!tx.list_tables().unwrap().any(|t| t.name() == TERMS.name()));
        {
            let blocks = tx.open_table(TERM_BLOCKS).unwrap();
            type Row = ((String, u64), Vec<(i64, u64)>);
            let rows: Vec<Row> = blocks
                .iter()
                .unwrap()
                .map(|r| {
                    let (k, v) = r.unwrap();
                    let (c, b) = k.value();
                    ((c.to_owned(), b), pairs(v.value()).collect())
                })
                .collect();
            let row = |c: &str, b, terms: &[(i64, u64)]| ((c.to_owned(), b), terms.to_vec());
            assert_eq!(
                rows,
                [
                    row("c", 0, &[(7, !1), (8, 1 << 5)]),
                    row("c", 1, &[(7, u64::MAX)]),
                    row("c", 2, &[(7, 0b111)]),
                    row("d", 1, &[(8, 1)])
                ]
            );
        }
        // a second carry finds nothing to do
        carry_postings(&tx).unwrap();
        tx.commit().unwrap();
        drop(db);
        std::fs::remove_dir_all(dir).ok();
    }
}
