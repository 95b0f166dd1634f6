//! The PostgreSQL backend against a real server: the shared contract suite,
//! the DurableLog contract, restart, and racing start-ups. The server comes
//! from SB_TEST_POSTGRES_URL (scripts/test.sh sets it); without it every
//! test prints a SKIPPED line and passes.

use switchboard_storage::contract::{prefix, run_all};
use switchboard_storage::contract_durable::durable_log_contract;
use switchboard_storage::postgres::PgStore;
use switchboard_storage::{DurableLog, Message, MessageStore, NewMessage, SequencedRecord};

fn url(test: &str) -> Option<String> {
    match std::env::var("SB_TEST_POSTGRES_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            println!("SKIPPED: postgres contract (SB_TEST_POSTGRES_URL unset) [{test}]");
            eprintln!("SKIPPED: postgres contract (SB_TEST_POSTGRES_URL unset) [{test}]");
            None
        }
    }
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

/// A fresh, empty schema on the server (the caller drops it).
async fn scratch_schema(url: &str) -> (tokio_postgres::Client, String) {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let schema = format!("sb_{}", prefix());
    client.batch_execute(&format!("CREATE SCHEMA {schema}")).await.unwrap();
    (client, schema)
}

fn with_search_path(url: &str, schema: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-csearch_path%3D{schema}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_meets_the_contract() {
    let Some(url) = url("contract") else { return };
    let store = PgStore::connect(&url, 8).await.unwrap();
    run_all(&store, &store, &store, &store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_meets_the_durable_log_contract() {
    let Some(url) = url("durable log") else { return };
    let store = PgStore::connect(&url, 4).await.unwrap();
    durable_log_contract(&store, &store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_survives_reconnect() {
    let Some(url) = url("restart") else { return };
    let p = prefix();
    let conv = format!("d:{p}a:{p}b");
    let members = [format!("{p}a"), format!("{p}b")];
    let store = PgStore::connect(&url, 2).await.unwrap();
    let first = store.append(text(&conv, &members[0], "c1"), &members).await.unwrap();
    store.set_ack(&members[1], "phone", &conv, 1).await.unwrap();
    drop(store);

    // Connecting again re-runs the (idempotent) schema creation.
    let store = PgStore::connect(&url, 2).await.unwrap();
    assert_eq!(store.range(&conv, 0, 10).await.unwrap(), vec![first.msg.clone()]);
    assert_eq!(store.last_seq(&conv).await.unwrap(), 1);
    assert_eq!(store.user_convs(&members[1]).await.unwrap(), vec![(conv.clone(), 1)]);
    assert_eq!(store.acks(&members[1], "phone").await.unwrap().get(&conv), Some(&1));
    let again = store.append(text(&conv, &members[0], "c1"), &members).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.msg, first.msg);
    assert_eq!(store.append(text(&conv, &members[0], "c2"), &members).await.unwrap().msg.seq, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_startups_both_create_the_schema() {
    let Some(url) = url("racing start-up") else { return };
    // An empty schema, so that both really race to create every table.
    let (admin, schema) = scratch_schema(&url).await;
    let scoped = with_search_path(&url, &schema);
    let (a, b, c) =
        tokio::join!(PgStore::connect(&scoped, 2), PgStore::connect(&scoped, 2), PgStore::connect(&scoped, 2));
    let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
    let tables: i64 = admin
        .query_one("SELECT count(*) FROM information_schema.tables WHERE table_schema = $1", &[&schema])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 11, "every table is created in the scratch schema");
    let m = a.append(text("d:x:y", "x", "c1"), &["x".to_string()]).await.unwrap();
    assert_eq!(m.msg.seq, 1);
    assert_eq!(b.last_seq("d:x:y").await.unwrap(), 1);
    assert_eq!(c.user_convs("x").await.unwrap(), vec![("d:x:y".to_string(), 1)]);
    drop((a, b, c));
    admin.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.unwrap();
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
            body: serde_json::json!({"n": seq, "nul": "a\u{0}b"}),
            ts: seq,
        },
        members: vec![from.into()],
        recall: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_cmid_does_not_fail_a_batch() {
    let Some(url) = url("cmid conflict") else { return };
    let store = PgStore::connect(&url, 2).await.unwrap();
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
    assert_eq!(got[0].body, serde_json::json!({"n": 1, "nul": "a\u{0}b"}), "bodies round-trip exactly");
    assert_eq!(store.last_seq(&conv).await.unwrap(), 3);
}

/// Batches and appends touching the same conversations in different orders
/// from many connections neither deadlock nor lose seqs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batches_and_appends() {
    let Some(url) = url("concurrent batches") else { return };
    let store = PgStore::connect(&url, 8).await.unwrap();
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
    // seq; every stored row is either counted by an upsert or an append.
    assert_eq!(total, upserted + 8);
}
