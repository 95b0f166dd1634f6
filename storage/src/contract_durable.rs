//! The contract of [`DurableLog`] backends, as a reusable async check (see
//! the `contract` module for the conventions: random name prefixes, panics
//! on a broken contract).

use std::sync::Arc;

use crate::contract::{prefix, text};
use crate::{DurableLog, Message, MessageStore, PartitionOffset, SequencedRecord};

fn record(conv: &str, seq: u64, from: &str, cmid: &str, members: &[String]) -> SequencedRecord {
    SequencedRecord {
        msg: Message {
            conv: conv.into(),
            mid: crate::new_mid(1_000 + seq),
            seq,
            from: from.into(),
            cmid: cmid.into(),
            kind: "text".into(),
            body: serde_json::json!(format!("m{seq}")),
            ts: 1_000 + seq,
            reply_to: None,
            mentions: Vec::new(),
        },
        members: members.to_vec(),
        recall: false,
    }
}

/// A body that is hard to store exactly: a NUL inside a string and a
/// number above `i64::MAX`.
fn awkward_body(seq: u64) -> serde_json::Value {
    serde_json::json!({"n": seq, "nul": "a\u{0}b", "big": u64::MAX})
}

/// A record of `from` (its only member) with an [`awkward_body`].
fn awkward_record(conv: &str, seq: u64, from: &str, cmid: &str) -> SequencedRecord {
    let mut r = record(conv, seq, from, cmid, &[from.to_owned()]);
    r.msg.body = awkward_body(seq);
    r
}

/// The record recalling `original` (as the cluster path publishes it).
fn recall_of(original: &SequencedRecord) -> SequencedRecord {
    SequencedRecord {
        msg: Message {
            kind: "recalled".into(),
            body: serde_json::Value::String(String::new()),
            ..original.msg.clone()
        },
        members: Vec::new(),
        recall: true,
    }
}

/// Upserts are idempotent, count only new records, and leave the message
/// store (range, history, last seq, member index, cmid index) in step.
pub async fn durable_log_contract(log: &dyn DurableLog, messages: &dyn MessageStore) {
    let p = prefix();
    let (a, b) = (format!("{p}a"), format!("{p}b"));
    let conv = format!("d:{a}:{b}");
    let members = [a.clone(), b.clone()];
    let batch: Vec<_> = (1..=3).map(|i| record(&conv, i, &a, &format!("u{i}"), &members)).collect();

    assert_eq!(log.upsert_records(&batch).await.unwrap(), 3);
    assert_eq!(log.upsert_records(&batch).await.unwrap(), 0, "redelivery of a batch stores nothing new");
    assert_eq!(log.upsert_records(&[]).await.unwrap(), 0);

    let got = messages.range(&conv, 0, 10).await.unwrap();
    assert_eq!(got, batch.iter().map(|r| r.msg.clone()).collect::<Vec<_>>(), "records are stored as given");
    let seqs = |v: Vec<Message>| v.into_iter().map(|m| m.seq).collect::<Vec<_>>();
    assert_eq!(seqs(messages.history(&conv, None, 10).await.unwrap()), vec![3, 2, 1]);
    assert_eq!(messages.last_seq(&conv).await.unwrap(), 3);
    assert_eq!(messages.user_convs(&a).await.unwrap(), vec![(conv.clone(), 3)]);
    assert_eq!(messages.user_convs(&b).await.unwrap(), vec![(conv.clone(), 3)]);

    let next = messages.append(text(&conv, &b, "n1", "after"), &members).await.unwrap();
    assert!(!next.duplicate);
    assert_eq!(next.msg.seq, 4, "appends continue after upserted seqs");
    assert!(next.msg.ts >= 1_003, "ts does not go back behind upserted messages");

    let dup = messages.append(text(&conv, &a, "u2", "resent"), &members).await.unwrap();
    assert!(dup.duplicate, "upserted records feed the cmid index");
    assert_eq!(dup.msg, batch[1].msg);
    assert_eq!(messages.last_seq(&conv).await.unwrap(), 4);

    // A batch mixing stored and new records (and a second conversation).
    let c = format!("{p}c");
    let other = format!("d:{a}:{c}");
    let mixed = vec![
        batch[2].clone(),
        record(&conv, 5, &a, "u5", &members),
        record(&conv, 6, &b, "u6", &members),
        record(&other, 1, &c, "u1", &[a.clone(), c.clone()]),
    ];
    assert_eq!(log.upsert_records(&mixed).await.unwrap(), 3, "only new records are counted");
    assert_eq!(log.upsert_records(&mixed).await.unwrap(), 0);
    assert_eq!(messages.last_seq(&conv).await.unwrap(), 6);
    assert_eq!(seqs(messages.range(&conv, 3, 10).await.unwrap()), vec![4, 5, 6]);
    let mut convs = messages.user_convs(&a).await.unwrap();
    convs.sort();
    assert_eq!(convs, vec![(conv.clone(), 6), (other.clone(), 1)]);
    assert_eq!(messages.user_convs(&c).await.unwrap(), vec![(other.clone(), 1)]);

    // Records out of order leave last_seq at the highest one.
    let only_c = std::slice::from_ref(&c);
    let late = vec![record(&other, 3, &c, "u3", only_c), record(&other, 2, &c, "u2", only_c)];
    assert_eq!(log.upsert_records(&late).await.unwrap(), 2);
    assert_eq!(messages.last_seq(&other).await.unwrap(), 3);
    assert_eq!(seqs(messages.range(&other, 0, 10).await.unwrap()), vec![1, 2, 3]);

    recall_records(log, messages).await;
    first_record_of_a_seq_wins(log, messages).await;
}

/// Of several records with one (conv, seq), in one batch or in several,
/// the first is stored and the others skipped: the cluster relies on it to
/// let a message published before its seq's void win over the void, and the
/// void over a message published after it.
async fn first_record_of_a_seq_wins(log: &dyn DurableLog, messages: &dyn MessageStore) {
    let p = prefix();
    let a = format!("{p}a");
    let convs = [format!("d:{a}:{p}v"), format!("d:{a}:{p}w")];
    let members = std::slice::from_ref(&a);
    let void_of = |conv: &str, seq: u64| SequencedRecord {
        msg: crate::cluster::void_message(conv, seq, 1_000 + seq),
        members: Vec::new(),
        recall: false,
    };
    // two conversations interleaved (as in a partition), seqs descending in
    // one of them: the batch is far from the store's own order
    let (mut batch, mut first) = (Vec::new(), vec![Vec::new(), Vec::new()]);
    for i in 1..=64u64 {
        for (c, conv) in convs.iter().enumerate() {
            let seq = if c == 0 { i } else { 65 - i };
            let (m, v) = (record(conv, seq, &a, &format!("v{seq}"), members), void_of(conv, seq));
            let pair = if (seq + c as u64).is_multiple_of(3) { [v, m] } else { [m, v] };
            first[c].push(pair[0].msg.clone());
            batch.extend(pair);
        }
    }
    first[1].reverse();
    assert_eq!(log.upsert_records(&batch).await.unwrap(), 128, "one record per seq");
    for (conv, first) in convs.iter().zip(&first) {
        assert_eq!(&messages.range(conv, 0, 100).await.unwrap(), first, "the first of each seq in the batch");
    }
    // a later batch changes nothing, whichever record it carries
    let again: Vec<_> = batch.chunks(2).map(|pair| pair[1].clone()).collect();
    assert_eq!(log.upsert_records(&again).await.unwrap(), 0);
    assert_eq!(messages.range(&convs[0], 0, 100).await.unwrap(), first[0]);
}

/// Recall records end recalled whatever their order relative to the
/// original, and a redelivered original never un-recalls.
async fn recall_records(log: &dyn DurableLog, messages: &dyn MessageStore) {
    let p = prefix();
    let a = format!("{p}a");
    let conv = format!("d:{a}:{p}r");
    let members = std::slice::from_ref(&a);
    let originals: Vec<_> = (1..=6).map(|i| record(&conv, i, &a, &format!("r{i}"), members)).collect();
    let recalls: Vec<_> = originals.iter().map(recall_of).collect();
    let conv_ref = conv.as_str();
    let stored = move |seq: u64| async move { messages.range(conv_ref, seq - 1, 1).await.unwrap().pop() };

    // recall applied after the original
    assert_eq!(log.upsert_records(&originals[..2]).await.unwrap(), 2);
    assert_eq!(log.upsert_records(&recalls[..1]).await.unwrap(), 0, "a recall of a stored message is not new");
    assert_eq!(stored(1).await, Some(recalls[0].msg.clone()));
    assert_eq!(stored(2).await, Some(originals[1].msg.clone()), "only the recalled seq changes");
    assert_eq!(log.upsert_records(&originals[..2]).await.unwrap(), 0);
    assert_eq!(stored(1).await, Some(recalls[0].msg.clone()), "a redelivered original does not un-recall");
    assert_eq!(log.upsert_records(&recalls[..1]).await.unwrap(), 0, "a redelivered recall is harmless");
    assert_eq!(stored(1).await, Some(recalls[0].msg.clone()));

    // recall applied before its original: stored recalled, the original skipped
    assert_eq!(log.upsert_records(&recalls[2..3]).await.unwrap(), 1);
    assert_eq!(stored(3).await, Some(recalls[2].msg.clone()));
    assert_eq!(messages.last_seq(&conv).await.unwrap(), 3);
    assert_eq!(log.upsert_records(&originals[2..3]).await.unwrap(), 0);
    assert_eq!(stored(3).await, Some(recalls[2].msg.clone()), "the late original does not un-recall");

    // both in one batch, either order (a recall overtaking its original)
    let batch = vec![recalls[3].clone(), originals[3].clone(), originals[4].clone(), recalls[4].clone()];
    assert_eq!(log.upsert_records(&batch).await.unwrap(), 2);
    assert_eq!(stored(4).await, Some(recalls[3].msg.clone()));
    assert_eq!(stored(5).await, Some(recalls[4].msg.clone()));
    assert_eq!(log.upsert_records(&batch).await.unwrap(), 0);
    assert_eq!(stored(4).await, Some(recalls[3].msg.clone()));

    // a recall twice in one batch
    let batch = vec![originals[5].clone(), recalls[5].clone(), recalls[5].clone()];
    assert_eq!(log.upsert_records(&batch).await.unwrap(), 1);
    assert_eq!(stored(6).await, Some(recalls[5].msg.clone()));

    assert_eq!(messages.last_seq(&conv).await.unwrap(), 6);
    assert_eq!(messages.range(&conv, 0, 10).await.unwrap().len(), 6);
    assert_eq!(messages.find_cmid(&conv, &a, "r3").await.unwrap(), Some(recalls[2].msg.clone()));
    assert_eq!(messages.find_mid(&conv, &originals[0].msg.mid).await.unwrap(), Some(recalls[0].msg.clone()));
    assert_eq!(messages.user_convs(&a).await.unwrap(), vec![(conv.clone(), 6)]);
}

/// A record whose (conv, from, cmid) is already stored at another seq is
/// skipped without failing the rest of its batch; bodies round-trip exactly.
pub async fn conflicting_cmid_in_a_batch(log: &dyn DurableLog, messages: &dyn MessageStore) {
    let p = prefix();
    let conv = format!("d:{p}a:{p}b");
    let from = format!("{p}a");
    assert_eq!(log.upsert_records(&[awkward_record(&conv, 1, &from, "k")]).await.unwrap(), 1);
    // The same (conv, from, cmid) at another seq is skipped, and the rest of
    // the batch is still stored.
    let batch = [awkward_record(&conv, 2, &from, "k"), awkward_record(&conv, 3, &from, "k3")];
    assert_eq!(log.upsert_records(&batch).await.unwrap(), 1);
    let got = messages.range(&conv, 0, 10).await.unwrap();
    assert_eq!(got.iter().map(|m| (m.seq, m.cmid.as_str())).collect::<Vec<_>>(), vec![(1, "k"), (3, "k3")]);
    assert_eq!(got[0].body, awkward_body(1), "bodies round-trip exactly");
    assert_eq!(messages.last_seq(&conv).await.unwrap(), 3);
    assert!(messages.range(&conv, 0, 0).await.unwrap().is_empty(), "a limit of 0 returns nothing");
}

/// Batches and appends touching the same conversations in different orders
/// from many tasks neither deadlock nor lose seqs. `log` and `messages` are
/// usually one store.
pub async fn concurrent_batches_and_appends(log: Arc<dyn DurableLog>, messages: Arc<dyn MessageStore>) {
    let p = prefix();
    let (x, y) = (format!("d:{p}a:{p}x"), format!("d:{p}a:{p}y"));
    let from = format!("{p}a");
    let mut tasks = Vec::new();
    for i in 0..8u64 {
        let (log, x, y, from) = (log.clone(), x.clone(), y.clone(), from.clone());
        tasks.push(tokio::spawn(async move {
            let seq = i + 1;
            let mut batch = vec![
                awkward_record(&x, seq, &from, &format!("bx{seq}")),
                awkward_record(&y, seq, &from, &format!("by{seq}")),
            ];
            if i % 2 == 1 {
                batch.reverse();
            }
            log.upsert_records(&batch).await.unwrap()
        }));
    }
    for i in 0..8 {
        let (s, conv, from) = (messages.clone(), if i % 2 == 0 { x.clone() } else { y.clone() }, from.clone());
        tasks.push(tokio::spawn(async move {
            s.append(text(&conv, &from, &format!("ap{i}"), "x"), std::slice::from_ref(&from)).await.unwrap();
            0
        }));
    }
    let mut upserted = 0;
    for t in tasks {
        upserted += t.await.unwrap();
    }
    let mut total = 0;
    for conv in [&x, &y] {
        let stored = messages.range(conv, 0, 100).await.unwrap();
        let seqs: Vec<u64> = stored.iter().map(|m| m.seq).collect();
        assert_eq!(messages.last_seq(conv).await.unwrap(), *seqs.last().unwrap());
        let appended = stored.iter().filter(|m| m.cmid.starts_with("ap")).count();
        assert_eq!(appended, 4, "every append is stored: {conv}: {seqs:?}");
        total += seqs.len() as u64;
    }
    // An upserted record is skipped only where an append already took its
    // seq; every stored message is either counted by an upsert or an append.
    assert_eq!(total, upserted + 8);
}

/// Partition offsets are stored with their records, replace what was stored
/// for their partition (the last one given wins), may come without records,
/// and are kept per topic.
pub async fn partition_offsets_contract(log: &dyn DurableLog, messages: &dyn MessageStore) {
    let p = prefix();
    let (topic, other) = (format!("{p}.messages"), format!("{p}.other"));
    let at = |topic: &str, partition: i32, next_offset: i64| PartitionOffset {
        topic: topic.to_owned(),
        partition,
        next_offset,
    };
    let sorted = |m: std::collections::HashMap<i32, i64>| {
        let mut v: Vec<(i32, i64)> = m.into_iter().collect();
        v.sort();
        v
    };
    assert!(log.partition_offsets(&topic).await.unwrap().is_empty(), "nothing stored for a new topic");

    let a = format!("{p}a");
    let conv = format!("d:{a}:{p}b");
    let members = std::slice::from_ref(&a);
    let batch: Vec<_> = (1..=2).map(|i| record(&conv, i, &a, &format!("o{i}"), members)).collect();
    let stored = log.upsert_records_at(&batch, &[at(&topic, 0, 5), at(&topic, 1, 3)]).await.unwrap();
    assert_eq!(stored, 2);
    assert_eq!(messages.range(&conv, 0, 10).await.unwrap().len(), 2, "records stored with their offsets");
    assert_eq!(sorted(log.partition_offsets(&topic).await.unwrap()), vec![(0, 5), (1, 3)]);

    // offsets alone (past records that were not stored, e.g. dead-lettered)
    assert_eq!(log.upsert_records_at(&[], &[at(&topic, 0, 7)]).await.unwrap(), 0);
    assert_eq!(sorted(log.partition_offsets(&topic).await.unwrap()), vec![(0, 7), (1, 3)]);
    // one partition twice in a call: the last one wins
    log.upsert_records_at(&batch, &[at(&topic, 1, 4), at(&topic, 1, 6)]).await.unwrap();
    assert_eq!(sorted(log.partition_offsets(&topic).await.unwrap()), vec![(0, 7), (1, 6)]);
    // a plain upsert and another topic leave them alone
    log.upsert_records(&batch).await.unwrap();
    log.upsert_records_at(&[], &[at(&other, 0, 1)]).await.unwrap();
    assert_eq!(sorted(log.partition_offsets(&topic).await.unwrap()), vec![(0, 7), (1, 6)]);
    assert_eq!(sorted(log.partition_offsets(&other).await.unwrap()), vec![(0, 1)]);
    assert_eq!(messages.range(&conv, 0, 10).await.unwrap().len(), 2, "redelivered records stored once");
}

/// Records stored by the persist worker index like appends: mentions raise marks, an edit
/// changes its target's searched text (the later edit wins whatever order batches come in), a
/// recall removes it from search.
pub async fn records_index_search(log: &dyn DurableLog, messages: &dyn MessageStore) {
    let p = prefix();
    let (a, b) = (format!("{p}a"), format!("{p}b"));
    let conv = format!("d:{a}:{b}");
    let members = [a.clone(), b.clone()];
    let mut first = record(&conv, 1, &a, "c1", &members);
    first.msg.body = serde_json::json!("quarterly numbers 季度报告");
    let mut second = record(&conv, 2, &b, "c2", &members);
    second.msg.body = serde_json::json!("numbers look fine");
    second.msg.mentions = vec![a.clone()];
    let edit = |seq: u64, text: &str| {
        let mut r = record(&conv, seq, &a, &format!("e{seq}"), &members);
        r.msg.kind = "edit".into();
        r.msg.body = serde_json::json!({"mid": first.msg.mid, "text": text});
        r
    };
    let (e3, e4) = (edit(3, "yearly figures"), edit(4, "yearly numbers final"));
    log.upsert_records(&[first.clone(), second.clone(), e3.clone()]).await.unwrap();
    log.upsert_records(std::slice::from_ref(&e4)).await.unwrap();
    // a redelivered older batch changes nothing
    log.upsert_records(std::slice::from_ref(&e3)).await.unwrap();
    let q = |text: &str| crate::search::SearchQuery {
        convs: vec![conv.clone()],
        terms: crate::search::query_terms(text),
        from: None,
        before_ts: None,
        limit: 10,
    };
    let hits = |found: Vec<crate::search::Found>| found.into_iter().map(|f| (f.msg.seq, f.text)).collect::<Vec<_>>();
    assert_eq!(
        hits(messages.search(&q("numbers")).await.unwrap()),
        vec![(2, "numbers look fine".into()), (1, "yearly numbers final".into())]
    );
    assert!(messages.search(&q("季度")).await.unwrap().is_empty(), "the edited text replaced it");
    assert!(messages.search(&q("figures")).await.unwrap().is_empty(), "the later edit won");
    assert_eq!(messages.mentions(&a).await.unwrap().get(&conv), Some(&2));
    // a mention whose seq a void took first marks nobody
    let void = SequencedRecord {
        msg: crate::cluster::void_message(&conv, 5, 1_005),
        members: members.to_vec(),
        recall: false,
    };
    let mut late = record(&conv, 5, &a, "late", &members);
    late.msg.mentions = vec![b.clone()];
    log.upsert_records(&[void]).await.unwrap();
    log.upsert_records(std::slice::from_ref(&late)).await.unwrap();
    assert!(!messages.mentions(&b).await.unwrap().contains_key(&conv), "the void holds seq 5");
    log.upsert_records(&[recall_of(&second)]).await.unwrap();
    assert_eq!(hits(messages.search(&q("numbers")).await.unwrap()), vec![(1, "yearly numbers final".into())]);
    let stored = messages.find_mid(&conv, &second.msg.mid).await.unwrap().unwrap();
    assert!(stored.mentions.is_empty() && stored.reply_to.is_none(), "a recall keeps no references");
    assert_eq!(messages.mentions(&a).await.unwrap().get(&conv), Some(&2), "a recall does not take a mark back");
}

/// [`crate::PartitionLocks`]: a partition's lock is held by one session at a time (its holder
/// takes it again), per topic; a dropped session's locks are free again within `released`.
pub async fn partition_locks_contract(locks: &dyn crate::PartitionLocks, released: std::time::Duration) {
    let topic = format!("{}.messages", prefix());
    let (mut a, mut b) = (locks.lock_session().await.unwrap(), locks.lock_session().await.unwrap());
    assert!(a.try_lock(&topic, 0).await.unwrap());
    assert!(a.try_lock(&topic, 0).await.unwrap(), "its holder takes it again");
    assert!(!b.try_lock(&topic, 0).await.unwrap(), "held by the other session");
    assert!(b.try_lock(&topic, 1).await.unwrap());
    assert!(!a.try_lock(&topic, 1).await.unwrap());
    assert!(b.try_lock(&format!("{topic}2"), 0).await.unwrap(), "locks are per topic");
    drop(a);
    let deadline = std::time::Instant::now() + released;
    while !b.try_lock(&topic, 0).await.unwrap() {
        assert!(std::time::Instant::now() < deadline, "the lock of a closed session was not released");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(!b.is_closed());
}
