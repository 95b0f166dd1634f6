//! The persist worker killed with SIGKILL, again and again, under traffic.
//! Logic, a gateway and a persist worker run as processes on the real
//! engines (Redis, the Kafka-protocol broker, PostgreSQL from
//! scripts/services.sh). A client keeps sending to three friends (three
//! conversations over the topic's partitions) through a real socket while
//! the worker is killed with SIGKILL and restarted three times: each
//! restarted worker must resume storing within seconds, and within seconds
//! of the last restart every acknowledged message is in PostgreSQL, once.
//! The same traffic while the worker's store connections are cut again and
//! again: it rides the breaks out and stores everything acknowledged, once.
//! And a worker whose store keeps failing does not die quietly: it exits
//! non-zero, for its supervisor to restart it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use switchboard_storage::contract::TestEngines;
use switchboard_storage::kafka::{Producer, Topics};
use switchboard_storage::postgres::{partition_lock_key, PgStore};
use switchboard_storage::{Message, MessageStore, SequencedRecord};

/// How long a restarted worker may take to store again, and to catch up.
const RESUME_WITHIN: Duration = Duration::from_secs(10);

/// The seqs stored in PostgreSQL for each of `convs`.
fn stored(rt: &tokio::runtime::Runtime, pg: &PgStore, convs: &[String]) -> BTreeMap<String, BTreeSet<u64>> {
    rt.block_on(async {
        let mut out = BTreeMap::new();
        for conv in convs {
            let seqs = pg.range(conv, 0, 100_000).await.unwrap().into_iter().map(|m| m.seq).collect();
            out.insert(conv.clone(), seqs);
        }
        out
    })
}

fn count(m: &BTreeMap<String, BTreeSet<u64>>) -> usize {
    m.values().map(BTreeSet::len).sum()
}

type Acked = BTreeMap<String, BTreeSet<u64>>;

/// Logic and a gateway as processes, and a client sending round-robin to three friends (three
/// conversations over the topic's partitions) until stopped, recording every acknowledged seq.
struct Traffic {
    _logic: Proc,
    _gw: Proc,
    convs: Vec<String>,
    stop: Arc<AtomicBool>,
    sender: Option<std::thread::JoinHandle<Acked>>,
}

impl Traffic {
    fn start(e: &TestEngines, prefix: &str) -> Traffic {
        // no per-user rate limit: one client sends as fast as its replies come
        let logic = Proc::spawn("logic", e, prefix, &["--user-rate", "0"]);
        let (http, grpc) = (logic.addr("http://"), logic.addr("grpc "));
        let gw = Proc::spawn("gateway", e, prefix, &["--logic-url", &format!("http://{grpc}")]);
        let ws = gw.addr("ws://");
        let alice = format!("{prefix}-alice");
        register(http, &alice);
        let mut a = Client::login(http, ws, &alice, "a1");
        let friends: Vec<String> = (0..3).map(|i| format!("{prefix}-f{i}")).collect();
        for f in &friends {
            register(http, f);
            let mut fc = Client::login(http, ws, f, "f1");
            // Not `befriend`: the friend just authenticated, and the gateway
            // routes a connection only after `auth.ok` (fire and forget), so a
            // push to it right now may be missed. The accept needs no push.
            a.ok("friend.request", json!({ "to": f }));
            fc.ok("friend.accept", json!({ "from": alice }));
            a.push("friend.accepted");
            fc.close();
        }
        // "alice" sorts before "f<i>": the direct conversations' ids
        let convs: Vec<String> = friends.iter().map(|f| format!("d:{alice}:{f}")).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let sender = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut acked = Acked::new();
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let to = &friends[i % friends.len()];
                    let r = send_retrying(&mut a, to, &format!("m{i}"), Duration::from_secs(20));
                    acked.entry(r["conv"].as_str().unwrap().to_owned()).or_default().insert(r["seq"].as_u64().unwrap());
                    i += 1;
                    std::thread::sleep(Duration::from_millis(4));
                }
                acked
            })
        };
        Traffic { _logic: logic, _gw: gw, convs, stop, sender: Some(sender) }
    }

    /// Fails the test if the sender stopped on its own.
    fn check(&mut self) {
        if self.sender.as_ref().is_some_and(|s| s.is_finished()) {
            match self.sender.take().unwrap().join() {
                Err(panic) => std::panic::resume_unwind(panic),
                Ok(_) => panic!("the sender stopped early"),
            }
        }
    }

    /// Waits until `persist` stored more than `floor` rows of the traffic's conversations.
    fn wait_stored(
        &mut self,
        rt: &tokio::runtime::Runtime,
        pg: &PgStore,
        persist: &mut Proc,
        floor: usize,
        what: &str,
    ) {
        let deadline = Instant::now() + RESUME_WITHIN;
        loop {
            self.check();
            assert!(persist.exited().is_none(), "persist worker exited on its own ({what})");
            if count(&stored(rt, pg, &self.convs)) > floor + 20 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: the persist worker stored nothing new within {RESUME_WITHIN:?} ({floor} rows stored before)"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops sending, checks the acknowledged seqs are gap-free, and waits until PostgreSQL
    /// holds exactly them (within [`RESUME_WITHIN`] of `since`). Returns (acknowledged, waited).
    fn finish(mut self, rt: &tokio::runtime::Runtime, pg: &PgStore, since: Instant) -> (usize, Duration) {
        std::thread::sleep(Duration::from_millis(500));
        self.stop.store(true, Ordering::Relaxed);
        let acked = self.sender.take().expect("the sender runs").join().expect("the sender thread");
        let total = count(&acked);
        assert!(total >= 60, "traffic flowed: {total} messages acknowledged");
        for (conv, seqs) in &acked {
            let last = *seqs.iter().next_back().unwrap();
            assert_eq!(*seqs, (1..=last).collect(), "{conv}: seqs are gap-free");
        }
        // every acknowledged message is in PostgreSQL, exactly once, soon
        let deadline = since + RESUME_WITHIN;
        let got = loop {
            let got = stored(rt, pg, &self.convs);
            if acked.iter().all(|(c, seqs)| got.get(c).is_some_and(|g| g.is_superset(seqs))) {
                break got;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {total} acknowledged messages stored {:?} after the last fault",
                count(&got),
                since.elapsed()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(got.iter().filter(|(_, s)| !s.is_empty()).count(), acked.len());
        assert_eq!(count(&got), total, "stored = acknowledged (no record of another run, none twice)");
        (total, since.elapsed())
    }
}

#[test]
fn persist_worker_recovers_from_repeated_sigkill_under_traffic() {
    let Some(e) = TestEngines::from_env("persist SIGKILL test") else { return };
    let started = Instant::now();
    // names unique per run: the engines outlive one test run
    let prefix = format!("pk{:08x}", rand::random::<u32>());
    let health = free_addr();
    let mut persist = Proc::spawn("persist", &e, &prefix, &[]);
    let mut traffic = Traffic::start(&e, &prefix);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let pg = rt.block_on(PgStore::connect(&e.pg, 2)).unwrap();
    let mut floor = 0; // rows stored before the current worker started
    for round in 1..=3 {
        // the current worker stores (after a restart: it resumed)
        traffic.wait_stored(&rt, &pg, &mut persist, floor, &format!("round {round}"));
        std::mem::replace(&mut persist, Proc::placeholder()).kill9();
        floor = count(&stored(&rt, &pg, &traffic.convs));
        // traffic goes on while no worker runs
        std::thread::sleep(Duration::from_millis(300));
        persist = Proc::spawn("persist", &e, &prefix, &["--health-addr", &health.to_string()]);
    }
    let (total, caught_up) = traffic.finish(&rt, &pg, Instant::now());
    assert!(persist.exited().is_none(), "persist worker still running");
    // The last worker's `/metrics` counts what it stored (the backlog it resumed with at least).
    let (st, m) = http(health, "GET", "/metrics", None, None);
    assert_eq!(st, 200);
    let m = m.as_str().unwrap().to_string();
    let value = |name: &str| -> u64 {
        let line = m.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{name}:\n{m}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert!(value("switchboard_persist_stored_total") > 0, "{m}");
    assert!(value("switchboard_persist_batches_total") > 0, "{m}");
    assert!(value("switchboard_persist_partitions") >= 1, "{m}");
    assert!(m.contains("# TYPE switchboard_persist_delay_seconds gauge"), "{m}");
    // The batches' histograms: as many batches written as counted, each of at least one record.
    assert_eq!(value("switchboard_persist_batch_records_count"), value("switchboard_persist_batches_total"), "{m}");
    assert_eq!(value("switchboard_persist_write_seconds_count"), value("switchboard_persist_batches_total"), "{m}");
    // Everything acknowledged is stored: the lag the worker measures (every claim round) is 0.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, m) = http(health, "GET", "/metrics", None, None);
        let m = m.as_str().unwrap().to_string();
        if m.lines().any(|l| l == "switchboard_persist_lag_records 0") {
            break;
        }
        assert!(Instant::now() < deadline, "the lag never reached 0:\n{m}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(http(health, "GET", "/healthz", None, None).0, 200);
    persist.term();
    println!(
        "persist SIGKILL x3: {total} acknowledged, all stored {caught_up:?} after the last restart; test took {:?}",
        started.elapsed()
    );
}

#[test]
fn persist_worker_rides_out_broken_store_connections_under_traffic() {
    let Some(e) = TestEngines::from_env("persist broken-connection test") else { return };
    let prefix = format!("pb{:08x}", rand::random::<u32>());
    // The worker's own connections carry a name, so they can be cut without touching logic's.
    let app = format!("{prefix}persist");
    let sep = if e.pg.contains('?') { '&' } else { '?' };
    let worker_engines = TestEngines { pg: format!("{}{sep}application_name={app}", e.pg), ..e.clone() };
    let mut persist = Proc::spawn("persist", &worker_engines, &prefix, &[]);
    let mut traffic = Traffic::start(&e, &prefix);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let pg = rt.block_on(PgStore::connect(&e.pg, 2)).unwrap();
    let (admin, conn) = rt.block_on(tokio_postgres::connect(&e.pg, tokio_postgres::NoTls)).unwrap();
    rt.spawn(conn);
    let mut floor = 0;
    let mut last_break = Instant::now();
    for round in 1..=3 {
        traffic.wait_stored(&rt, &pg, &mut persist, floor, &format!("round {round}"));
        // A second of outage: every connection the worker opens is cut at once.
        let (mut cut, until) = (0i64, Instant::now() + Duration::from_secs(1));
        while Instant::now() < until {
            let q = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1";
            cut += rt.block_on(admin.query_one(q, &[&app])).unwrap().get::<_, i64>(0);
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(cut >= 1, "round {round}: the worker had store connections to cut");
        last_break = Instant::now();
        floor = count(&stored(&rt, &pg, &traffic.convs));
    }
    traffic.wait_stored(&rt, &pg, &mut persist, floor, "after the last break");
    let (total, caught_up) = traffic.finish(&rt, &pg, last_break);
    assert!(persist.exited().is_none(), "the worker rode the breaks out");
    persist.term();
    println!("persist store cut x3: {total} acknowledged, all stored {caught_up:?} after the last cut");
}

#[test]
fn persist_exits_non_zero_when_its_store_keeps_failing() {
    let Some(mut e) = TestEngines::from_env("persist give-up test") else { return };
    let prefix = format!("pg{:08x}", rand::random::<u32>());
    let topics = Topics::with_prefix(&format!("{prefix}."));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    // the worker's tables live in a schema of their own, dropped under it
    let schema = format!("sb_{prefix}");
    let (admin, conn) = rt.block_on(tokio_postgres::connect(&e.pg, tokio_postgres::NoTls)).unwrap();
    rt.spawn(conn);
    rt.block_on(admin.batch_execute(&format!("CREATE SCHEMA {schema}"))).unwrap();
    let sep = if e.pg.contains('?') { '&' } else { '?' };
    e.pg = format!("{}{sep}options=-csearch_path%3D{schema}", e.pg);
    let mut persist = Proc::spawn("persist", &e, &prefix, &["--persist-give-up-secs", "2"]);

    // it owns the partitions: its lock is held
    let key = partition_lock_key(&topics.messages, 0) as u64;
    let (hi, lo) = ((key >> 32) as i64, (key & 0xffff_ffff) as i64);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let held = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 \
                    AND classid::int8 = $1 AND objid::int8 = $2";
        if rt.block_on(admin.query_one(held, &[&hi, &lo])).unwrap().get::<_, i64>(0) == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the worker never took its partitions");
        std::thread::sleep(Duration::from_millis(50));
    }
    rt.block_on(admin.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))).unwrap();
    let msg = Message {
        conv: format!("d:{prefix}a:{prefix}b"),
        seq: 1,
        mid: switchboard_storage::new_mid(1),
        from: format!("{prefix}a"),
        cmid: "c1".into(),
        kind: "text".into(),
        body: json!("x"),
        ts: 1,
        reply_to: None,
        mentions: Vec::new(),
    };
    let record = serde_json::to_vec(&SequencedRecord { msg, members: Vec::new(), recall: false }).unwrap();
    let producer = rt.block_on(async { Producer::new(&e.brokers, Duration::from_secs(10)) }).unwrap();
    rt.block_on(producer.send(&topics.messages, "k", &record)).unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = persist.exited() {
            break status;
        }
        assert!(Instant::now() < deadline, "the worker neither stored nor exited");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(1), "a worker that cannot go on exits non-zero: {status:?}");
}
