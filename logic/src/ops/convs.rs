//! `convs`: the caller's conversations with their last message, unread count and read seq,
//! newest activity first, in pages bounded by count and bytes. Memory stays bounded whatever
//! the number of conversations: last messages are read in chunks and kept only up to twice the
//! reply's byte budget; the page's entries whose message was let go are read again. Pages are
//! cut by an upper bound of each entry's bytes, so no reply passes the budget.

use serde::{Deserialize, Serialize};
use switchboard_storage::Message;

use super::messages::{json_len, user_convs};
use super::Caller;
use crate::error::ApiError;
use crate::Logic;

/// Conversations whose last messages are read in one call.
const CHUNK: usize = 128;
/// At most what an entry's JSON holds besides its conversation's name and last message: the
/// keys, punctuation and four 20-digit numbers, and the separator before the next entry.
const ENTRY_BYTES: usize = 192;

/// One conversation of `convs.ok`.
#[derive(Debug, Serialize)]
pub struct ConvEntry {
    conv: String,
    last: Message,
    #[serde(skip_serializing_if = "Option::is_none")]
    mention_seq: Option<u64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    mentioned: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    muted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    muted_until: Option<u64>,
    read_seq: u64,
    unread: u64,
}

/// Where a page of `convs` ended: its last entry's `ts` and `conv` (entries are ordered by `ts`
/// descending, then by `conv`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvCursor {
    ts: u64,
    conv: String,
}

/// The fields of `convs.ok`, written straight from the entries (no JSON value built per
/// conversation).
#[derive(Debug)]
pub struct ConvList {
    convs: Vec<ConvEntry>,
    more: bool,
    next_before: Option<ConvCursor>,
}

impl ConvList {
    /// Writes the fields into a reply's map.
    pub(super) fn serialize_entries<M: serde::ser::SerializeMap>(&self, m: &mut M) -> Result<(), M::Error> {
        m.serialize_entry("convs", &self.convs)?;
        m.serialize_entry("more", &self.more)?;
        if let Some(next) = &self.next_before {
            m.serialize_entry("next_before", next)?;
        }
        Ok(())
    }
}

#[derive(Deserialize)]
pub struct Convs {
    /// At most this many entries (as many as the reply's byte budget takes when absent).
    limit: Option<usize>,
    /// The `next_before` of the previous page: the entries after it.
    before: Option<ConvCursor>,
}

/// A conversation with a message, before the page is chosen.
struct Row {
    conv: String,
    last_seq: u64,
    /// Its place in the order (a message read again may be newer).
    ts: u64,
    /// At most the bytes of its entry.
    bytes: usize,
    /// `None` once the rows read so far held more than twice the byte budget.
    last: Option<Message>,
}

impl Row {
    fn after(&self, c: &ConvCursor) -> bool {
        self.ts < c.ts || (self.ts == c.ts && self.conv > c.conv)
    }
}

/// An upper bound of the JSON bytes of `conv`'s entry with this last message.
fn entry_bytes(conv: &str, last: &Message) -> usize {
    json_len(&conv) + json_len(last) + ENTRY_BYTES
}

/// How many of the first `rows` make a page: at most `limit` and `budget` bytes, one at least.
fn page_len(rows: &[Row], limit: usize, budget: usize) -> usize {
    let mut bytes = 0;
    rows.iter()
        .take(limit)
        .take_while(|r| {
            bytes += r.bytes;
            bytes <= budget
        })
        .count()
        .max(1)
        .min(rows.len())
}

/// Conversations with their last message, unread count and read seq, and whether an unread
/// message mentions the caller (`mentioned`, with the last such seq), whether the caller muted it
/// (`muted`, with `muted_until` unless for good), newest activity first. Conversations without
/// messages are left out. A page holds at most `limit` entries and `reply_max_bytes` of them (at
/// least one); `more` says whether entries follow, from `next_before`.
pub async fn convs(logic: &Logic, caller: &Caller, req: Convs) -> Result<ConvList, ApiError> {
    let limit = req.limit.unwrap_or(usize::MAX).max(1);
    let budget = logic.config.reply_max_bytes;
    let store = &logic.stores.messages;
    let (names, seqs): (Vec<String>, Vec<u64>) = user_convs(logic, &caller.user).await?.into_iter().unzip();
    let mut rows = Vec::with_capacity(names.len());
    let mut held = 0usize;
    for (chunk, chunk_seqs) in names.chunks(CHUNK).zip(seqs.chunks(CHUNK)) {
        for ((conv, &last_seq), last) in chunk.iter().zip(chunk_seqs).zip(store.last_messages(chunk).await?) {
            let Some(last) = last else { continue };
            let row = Row { conv: conv.clone(), last_seq, ts: last.ts, bytes: entry_bytes(conv, &last), last: None };
            if req.before.as_ref().is_some_and(|c| !row.after(c)) {
                continue;
            }
            held += row.bytes;
            rows.push(Row { last: (held <= 2 * budget).then_some(last), ..row });
        }
    }
    rows.sort_unstable_by(|a, b| b.ts.cmp(&a.ts).then_with(|| a.conv.cmp(&b.conv)));
    let mut fit = page_len(&rows, limit, budget);
    let mut more = rows.len() > fit;
    rows.truncate(fit);
    // The page's messages that were let go, read again (and measured again: they may have
    // changed since), then the page cut again if they grew.
    let missing: Vec<String> = rows.iter().filter(|r| r.last.is_none()).map(|r| r.conv.clone()).collect();
    if !missing.is_empty() {
        let mut again = store.last_messages(&missing).await?.into_iter();
        for r in rows.iter_mut().filter(|r| r.last.is_none()) {
            r.last = again.next().flatten();
            r.bytes = r.last.as_ref().map_or(0, |m| entry_bytes(&r.conv, m));
        }
        fit = page_len(&rows, limit, budget);
        more |= rows.len() > fit;
        rows.truncate(fit);
    }
    let next_before = rows.last().filter(|_| more).map(|r| ConvCursor { ts: r.ts, conv: r.conv.clone() });
    let reads = logic.cursors.reads(&caller.user).await?;
    let mentions = store.mentions(&caller.user).await?;
    let mutes = logic.stores.accounts.mutes(&caller.user).await?;
    let mut out = Vec::with_capacity(rows.len());
    for Row { conv, last_seq, last, .. } in rows {
        let Some(last) = last else { continue };
        let read_seq = reads.get(&conv).copied().unwrap_or(0).min(last_seq.max(last.seq));
        let unread = last_seq.max(last.seq).saturating_sub(read_seq);
        let mention_seq = mentions.get(&conv).copied().filter(|&seq| seq > read_seq);
        let muted_until = mutes.get(&conv).copied().filter(|&until| super::muted(until));
        out.push(ConvEntry {
            conv,
            last,
            mention_seq,
            mentioned: mention_seq.is_some(),
            muted: muted_until.is_some(),
            muted_until: muted_until.filter(|&until| until != u64::MAX),
            read_seq,
            unread,
        });
    }
    Ok(ConvList { convs: out, more, next_before })
}
