//! Finding a message of the embedded store by its `mid` in the B-trees, without an index row per
//! message. A mid starts with its message's timestamp (11 hex digits of milliseconds,
//! [`crate::new_mid`]) and the embedded store never lets a conversation's timestamps decrease
//! as its seq grows, so a binary search over the conversation's seqs by timestamp, then a scan of
//! the messages of that millisecond, finds the message in O(log n) reads. Lookups by mid are
//! rare (recall, edit, reactions, pins, a reply's quote), appends are not: a checkpoint used to
//! insert every message into [`MIDS`] as well, a fifth of its B-tree work.
//!
//! [`MIDS`] is still read first: it holds the messages that earlier versions stored (they wrote a
//! row per message), and a database from before it existed is filled once when opened.

use std::borrow::Cow;

use redb::{ReadableTable, TableDefinition};
use serde::Deserialize;

use crate::embedded_keys::Utf8;
use crate::Result;

/// (conv, mid) -> seq: the mid index of the messages stored before mids were found by
/// timestamp. Only read (and filled for a database older than it).
pub(crate) const MIDS: TableDefinition<(Utf8, Utf8), u64> = TableDefinition::new("mids.v2");

/// What a lookup reads of a stored message.
#[derive(Deserialize)]
struct Stamp<'a> {
    #[serde(borrow)]
    mid: Cow<'a, str>,
    ts: u64,
}

/// The timestamp a mid starts with, if it has one.
pub(crate) fn ts_of(mid: &str) -> Option<u64> {
    let hex = mid.get(..11)?;
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// The seq of message `mid` of `conv`: from the legacy index, else by its timestamp in
/// `messages` (a write transaction's table sees the rows it inserted itself).
pub(crate) fn seq_of_mid(
    mids: &impl ReadableTable<(Utf8, Utf8), u64>,
    messages: &impl ReadableTable<(Utf8, u64), &'static [u8]>,
    conv: &str,
    mid: &str,
) -> Result<Option<u64>> {
    if let Some(seq) = mids.get((conv, mid))? {
        return Ok(Some(seq.value()));
    }
    let Some(ts) = ts_of(mid) else { return Ok(None) };
    // The first stored message at or after `seq`, as (seq, stamp).
    let first_from = |seq: u64| -> Result<Option<(u64, u64)>> {
        match messages.range((conv, seq)..=(conv, u64::MAX))?.next() {
            Some(row) => {
                let (k, v) = row?;
                let stamp: Stamp = serde_json::from_slice(v.value())?;
                Ok(Some((k.value().1, stamp.ts)))
            }
            None => Ok(None),
        }
    };
    let Some(last) = messages.range((conv, 0)..=(conv, u64::MAX))?.next_back() else { return Ok(None) };
    let from = first_seq_at(ts, last?.0.value().1, first_from)?;
    for row in messages.range((conv, from)..=(conv, u64::MAX))? {
        let (k, v) = row?;
        let stamp: Stamp = serde_json::from_slice(v.value())?;
        if stamp.ts != ts {
            break;
        }
        if stamp.mid == mid {
            return Ok(Some(k.value().1));
        }
    }
    Ok(None)
}

/// The smallest seq at or after which every message of a conversation has a timestamp of at
/// least `ts`, given its last seq and `first_from(seq)`: the first message at or after `seq`, as
/// (seq, ts). Timestamps never decrease with seq, so a binary search over seqs (holes allowed).
pub(crate) fn first_seq_at<E>(
    ts: u64,
    last: u64,
    mut first_from: impl FnMut(u64) -> std::result::Result<Option<(u64, u64)>, E>,
) -> std::result::Result<u64, E> {
    let (mut lo, mut hi) = (0u64, last.saturating_add(1));
    while lo < hi {
        let probe = lo + (hi - lo) / 2;
        match first_from(probe)? {
            Some((seq, at)) if at < ts => lo = seq + 1,
            _ => hi = probe,
        }
    }
    Ok(lo)
}

#[cfg(test)]
mod tests {
    use redb::Database;

    use super::*;
    use crate::contract::text;
    use crate::embedded::MESSAGES;
    use crate::Message;

    fn message(conv: &str, seq: u64, ts: u64, mid: &str) -> Vec<u8> {
        let stored = text(conv, "a", &format!("c{seq}"), "hi").stored_as(seq, ts);
        serde_json::to_vec(&Message { mid: mid.into(), ..stored }).unwrap()
    }

    #[test]
    fn finds_mids_by_timestamp_and_the_legacy_index() {
        let dir = std::env::temp_dir().join(format!("sb-mid-ts-{}", crate::contract::prefix()));
        std::fs::create_dir_all(&dir).unwrap();
        let db = Database::create(dir.join("t.redb")).unwrap();
        // conv "c": seqs 1..=40 with holes (every 7th missing), several per millisecond; a
        // neighbouring conversation on both sides; one message whose mid is only in the legacy
        // index (its mid's timestamp is not its own).
        let mut expected = Vec::new();
        let tx = db.begin_write().unwrap();
        {
            let mut messages = tx.open_table(MESSAGES).unwrap();
            let mut mids = tx.open_table(MIDS).unwrap();
            for conv in ["b", "d"] {
                for seq in 1..=5 {
                    let mid = format!("{:011x}{seq:016x}", 1_000 + seq);
                    messages.insert((conv, seq), &message(conv, seq, 1_000 + seq, &mid)[..]).unwrap();
                }
            }
            for seq in (1..=40u64).filter(|s| s % 7 != 0) {
                let ts = 5_000 + seq / 3;
                let mid = format!("{ts:011x}{:016x}", seq * 31);
                messages.insert(("c", seq), &message("c", seq, ts, &mid)[..]).unwrap();
                expected.push((mid, seq));
            }
            let legacy = format!("{:011x}{:016x}", 1u64, 99u64);
            messages.insert(("c", 42), &message("c", 42, 5_100, &legacy)[..]).unwrap();
            mids.insert(("c", legacy.as_str()), 42).unwrap();
            expected.push((legacy, 42));
        }
        tx.commit().unwrap();
        let tx = db.begin_read().unwrap();
        let (messages, mids) = (tx.open_table(MESSAGES).unwrap(), tx.open_table(MIDS).unwrap());
        for (mid, seq) in &expected {
            assert_eq!(seq_of_mid(&mids, &messages, "c", mid).unwrap(), Some(*seq), "{mid}");
        }
        let unknown = [
            format!("{:011x}{:016x}", 5_003, 12_345),  // a millisecond that has messages
            format!("{:011x}{:016x}", 4_000, 1),       // before the first
            format!("{:011x}{:016x}", 9_999_999, 1),   // after the last
            "zz".to_string(),                          // no timestamp
            "0000000138xnot-hex-at-all-x".to_string(), // a malformed timestamp
        ];
        for mid in &unknown {
            assert_eq!(seq_of_mid(&mids, &messages, "c", mid).unwrap(), None, "{mid}");
        }
        assert_eq!(seq_of_mid(&mids, &messages, "e", &expected[0].0).unwrap(), None);
        std::fs::remove_dir_all(&dir).ok();
    }
}
