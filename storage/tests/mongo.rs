//! The MongoDB backend against a real server: the shared contract suite,
//! the DurableLog contract, restart, racing start-ups, and appends racing
//! with batches. The server comes from SB_TEST_MONGODB_URL (e.g.
//! `mongodb://127.0.0.1:27017/?replicaSet=rs0`); without it every test
//! prints a SKIPPED line and passes. Each test works in a database of its
//! own with a random name, dropped at the end.

use std::io::Write;

use switchboard_storage::contract::{prefix, run_all};
use switchboard_storage::contract_durable::durable_log_contract;
use switchboard_storage::mongo::MongoStore;
use switchboard_storage::{DurableLog, Message, MessageStore, NewMessage, SequencedRecord};

fn url(test: &str) -> Option<String> {
    match std::env::var("SB_TEST_MONGODB_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            let line = format!("SKIPPED: mongodb contract (SB_TEST_MONGODB_URL unset) [{test}]");
            println!("{line}");
            // Straight to the process's stderr: the test harness captures
            // `println!`/`eprintln!` of passing tests, not this.
            let _ = writeln!(std::io::stderr(), "{line}");
            None
        }
    }
}

/// A fresh database name for one test.
fn scratch_db() -> String {
    format!("sb_{}", prefix())
}

fn text(conv: &str, from: &str, cmid: &str) -> NewMessage {
    NewMessage {
        conv: conv.into(),
        from: from.into(),
        cmid: cmid.into(),
        kind: "text".into(),
        body: serde_json::json!("x"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_meets_the_contract() {
    let Some(url) = url("contract") else { return };
    let store = MongoStore::connect(&url, &scratch_db()).await.unwrap();
    println!("mongodb: transactions {}", if store.uses_transactions() { "on" } else { "off" });
    run_all(&store, &store, &store, &store).await;
    store.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_meets_the_durable_log_contract() {
    let Some(url) = url("durable log") else { return };
    let store = MongoStore::connect(&url, &scratch_db()).await.unwrap();
    durable_log_contract(&store, &store).await;
    store.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_survives_reconnect() {
    let Some(url) = url("restart") else { return };
    let db = scratch_db();
    let p = prefix();
    let conv = format!("d:{p}a:{p}b");
    let members = [format!("{p}a"), format!("{p}b")];
    let store = MongoStore::connect(&url, &db).await.unwrap();
    let first = store.append(text(&conv, &members[0], "c1"), &members).await.unwrap();
    store.set_ack(&members[1], "phone", &conv, 1).await.unwrap();
    drop(store);

    // Connecting again re-runs the (idempotent) collection and index creation.
    let store = MongoStore::connect(&url, &db).await.unwrap();
    assert_eq!(store.range(&conv, 0, 10).await.unwrap(), vec![first.msg.clone()]);
    assert_eq!(store.last_seq(&conv).await.unwrap(), 1);
    assert_eq!(store.user_convs(&members[1]).await.unwrap(), vec![(conv.clone(), 1)]);
    assert_eq!(store.acks(&members[1], "phone").await.unwrap().get(&conv), Some(&1));
    let again = store.append(text(&conv, &members[0], "c1"), &members).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.msg, first.msg);
    assert_eq!(store.append(text(&conv, &members[0], "c2"), &members).await.unwrap().msg.seq, 2);
    store.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_startups_all_create_the_schema() {
    let Some(url) = url("racing start-up") else { return };
    // A database that does not exist yet, so that all really race to
    // create every collection and index.
    let db = scratch_db();
    let (a, b, c) =
        tokio::join!(MongoStore::connect(&url, &db), MongoStore::connect(&url, &db), MongoStore::connect(&url, &db));
    let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
    let mut names = a.database().list_collection_names().await.unwrap();
    names.sort();
    assert_eq!(
        names,
        [
            "acks",
            "conv_seq",
            "friends",
            "group_members",
            "groups",
            "messages",
            "reads",
            "refresh_tokens",
            "sessions",
            "user_convs",
            "users"
        ],
        "every collection is created"
    );
    let indexes = a.database().collection::<mongodb::bson::Document>("messages").list_index_names().await.unwrap();
    assert_eq!(indexes.len(), 4, "_id, (conv, seq), (conv, from, cmid) and (conv, mid): {indexes:?}");
    let m = a.append(text("d:x:y", "x", "c1"), &["x".to_string()]).await.unwrap();
    assert_eq!(m.msg.seq, 1);
    assert_eq!(b.last_seq("d:x:y").await.unwrap(), 1);
    assert_eq!(c.user_convs("x").await.unwrap(), vec![("d:x:y".to_string(), 1)]);
    a.drop_database().await.unwrap();
}

fn record(conv: &str, seq: u64, from: &str, cmid: &str) -> SequencedRecord {
    SequencedRecord {
        msg: Message {
            conv: conv.into(),
            mid: switchboard_storage::new_mid(seq),
            seq,
            from: from.into(),
            cmid: cmid.into(),
            kind: "text".into(),
            body: serde_json::json!({"n": seq, "nul": "a\u{0}b", "big": u64::MAX}),
            ts: seq,
        },
        members: vec![from.into()],
        recall: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_cmid_does_not_fail_a_batch() {
    let Some(url) = url("cmid conflict") else { return };
    let store = MongoStore::connect(&url, &scratch_db()).await.unwrap();
    let p = prefix();
    let conv = format!("d:{p}a:{p}b");
    let from = format!("{p}a");
    assert_eq!(store.upsert_records(&[record(&conv, 1, &from, "k")]).await.unwrap(), 1);
    // The same (conv, from, cmid) at another seq is skipped, and the rest of
    // the batch is still stored.
    let batch = [record(&conv, 2, &from, "k"), record(&conv, 3, &from, "k3")];
    assert_eq!(store.upsert_records(&batch).await.unwrap(), 1);
    let got = store.range(&conv, 0, 10).await.unwrap();
    assert_eq!(got.iter().map(|m| (m.seq, m.cmid.as_str())).collect::<Vec<_>>(), vec![(1, "k"), (3, "k3")]);
    assert_eq!(
        got[0].body,
        serde_json::json!({"n": 1, "nul": "a\u{0}b", "big": u64::MAX}),
        "bodies round-trip exactly"
    );
    assert_eq!(store.last_seq(&conv).await.unwrap(), 3);
    assert!(store.range(&conv, 0, 0).await.unwrap().is_empty(), "a limit of 0 returns nothing");
    store.drop_database().await.unwrap();
}

/// Two appends racing with one cmid store it once; both return the same message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_appends_with_one_cmid_store_it_once() {
    let Some(url) = url("racing cmid") else { return };
    let store = MongoStore::connect(&url, &scratch_db()).await.unwrap();
    let p = prefix();
    for round in 0..5 {
        let conv = format!("d:{p}a:{p}b{round}");
        let from = format!("{p}a");
        let members = [from.clone()];
        let (x, y) = tokio::join!(
            store.append(text(&conv, &from, "same"), &members),
            store.append(text(&conv, &from, "same"), &members)
        );
        let (x, y) = (x.unwrap(), y.unwrap());
        assert_eq!(x.msg, y.msg, "both see one message");
        assert!(x.duplicate != y.duplicate, "exactly one of them stored it");
        assert_eq!(store.range(&conv, 0, 10).await.unwrap(), vec![x.msg.clone()]);
        if store.uses_transactions() {
            assert_eq!(x.msg.seq, 1, "no seq is lost to the loser");
            assert_eq!(store.last_seq(&conv).await.unwrap(), 1);
        }
    }
    store.drop_database().await.unwrap();
}

/// Batches and appends touching the same conversations in different orders
/// from many tasks neither deadlock nor lose seqs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batches_and_appends() {
    let Some(url) = url("concurrent batches") else { return };
    let store = MongoStore::connect(&url, &scratch_db()).await.unwrap();
    let p = prefix();
    let (x, y) = (format!("d:{p}a:{p}x"), format!("d:{p}a:{p}y"));
    let from = format!("{p}a");
    let mut tasks = Vec::new();
    for i in 0..8u64 {
        let (s, x, y, from) = (store.clone(), x.clone(), y.clone(), from.clone());
        tasks.push(tokio::spawn(async move {
            let seq = i + 1;
            let mut batch =
                vec![record(&x, seq, &from, &format!("bx{seq}")), record(&y, seq, &from, &format!("by{seq}"))];
            if i % 2 == 1 {
                batch.reverse();
            }
            s.upsert_records(&batch).await.unwrap()
        }));
    }
    for i in 0..8 {
        let (s, conv, from) = (store.clone(), if i % 2 == 0 { x.clone() } else { y.clone() }, from.clone());
        tasks.push(tokio::spawn(async move {
            s.append(text(&conv, &from, &format!("ap{i}")), std::slice::from_ref(&from)).await.unwrap();
            0
        }));
    }
    let mut upserted = 0;
    for t in tasks {
        upserted += t.await.unwrap();
    }
    let mut total = 0;
    for conv in [&x, &y] {
        let seqs: Vec<u64> = store.range(conv, 0, 100).await.unwrap().iter().map(|m| m.seq).collect();
        assert_eq!(store.last_seq(conv).await.unwrap(), *seqs.last().unwrap());
        let appended = store.range(conv, 0, 100).await.unwrap().iter().filter(|m| m.cmid.starts_with("ap")).count();
        assert_eq!(appended, 4, "every append is stored: {conv}: {seqs:?}");
        total += seqs.len() as u64;
    }
    // An upserted record is skipped only where an append already took its
    // seq; every stored message is either counted by an upsert or an append.
    assert_eq!(total, upserted + 8);
    store.drop_database().await.unwrap();
}
