//! The MongoDB backend against a real server: the shared contract suite,
//! the DurableLog contract, restart, racing start-ups, and appends racing
//! with batches. The server comes from SB_TEST_MONGODB_URL (e.g.
//! `mongodb://127.0.0.1:27017/?replicaSet=rs0`); without it every test
//! prints a SKIPPED line and passes. Each test works in a database of its
//! own with a random name, dropped at the end.

use std::io::Write;
use std::sync::Arc;

use switchboard_storage::contract::{self, prefix, run_all, text};
use switchboard_storage::contract_durable::{self, durable_log_contract};
use switchboard_storage::mongo::MongoStore;
use switchboard_storage::MessageStore;

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
    contract_durable::records_index_search(&store, &store).await;
    contract_durable::partition_offsets_contract(&store, &store).await;
    store.drop_database().await.unwrap();
}

/// Files and partition leases, as on PostgreSQL (a dropped session gives its leases back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_keeps_files_and_partition_leases() {
    let Some(url) = url("files and leases") else { return };
    let store = MongoStore::connect(&url, &scratch_db()).await.unwrap();
    contract::files_contract(&store).await;
    contract_durable::partition_locks_contract(&store, std::time::Duration::from_secs(5)).await;
    store.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_survives_reconnect() {
    let Some(url) = url("restart") else { return };
    let db = scratch_db();
    // Connecting again re-runs the (idempotent) collection and index creation.
    let store = contract::data_survives_reconnect(|| MongoStore::connect(&url, &db)).await;
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
            "blocks",
            "conv_seq",
            "file_chunks",
            "files",
            "friends",
            "group_members",
            "groups",
            "mentions",
            "messages",
            "mutes",
            "persist_locks",
            "persist_offsets",
            "push_tokens",
            "reads",
            "refresh_tokens",
            "sessions",
            "user_convs",
            "users"
        ],
        "every collection is created"
    );
    let indexes = a.database().collection::<mongodb::bson::Document>("messages").list_index_names().await.unwrap();
    assert_eq!(indexes.len(), 5, "_id, (conv, seq), (conv, from, cmid), (conv, mid) and terms: {indexes:?}");
    contract::fresh_stores_share_data(&a, &b, &c).await;
    a.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_cmid_does_not_fail_a_batch() {
    let Some(url) = url("cmid conflict") else { return };
    let store = MongoStore::connect(&url, &scratch_db()).await.unwrap();
    contract_durable::conflicting_cmid_in_a_batch(&store, &store).await;
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
            store.append(text(&conv, &from, "same", "x"), &members),
            store.append(text(&conv, &from, "same", "x"), &members)
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
    let store = Arc::new(MongoStore::connect(&url, &scratch_db()).await.unwrap());
    contract_durable::concurrent_batches_and_appends(store.clone(), store.clone()).await;
    store.drop_database().await.unwrap();
}
