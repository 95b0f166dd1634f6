//! A logic instance killed mid-send, on the real engines (Redis, the
//! Kafka-protocol broker, PostgreSQL from scripts/services.sh): the send is
//! stopped at each point where SIGKILL can land, then retried with the same
//! cmid through another instance (a fresh `ClusterMessages`), which must
//! complete it at the reserved seq, leaving no hole. A reservation nobody
//! retries is voided after the timeout, and a void never replaces a message
//! the broker already had. Records left by the version before content was
//! reserved with the seq are written here as that version wrote them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchboard_storage::cluster::{ClusterMessages, CrashPoint, VOID};
use switchboard_storage::contract::{self, TestEngines};
use switchboard_storage::kafka::{ensure_topics, Producer, Topics};
use switchboard_storage::persist::{PersistConfig, PersistWorker};
use switchboard_storage::postgres::PgStore;
use switchboard_storage::redis::{Completion, RedisStore};
use switchboard_storage::{Message, MessageStore, NewMessage, SequencedRecord};
use tokio::sync::oneshot;

/// One test's engines, under names of its own.
struct Rig {
    env: TestEngines,
    prefix: String,
    topics: Topics,
    pg: PgStore,
    conv: String,
    members: Vec<String>,
    worker: Option<(oneshot::Sender<()>, tokio::task::JoinHandle<()>)>,
}

impl Rig {
    async fn new() -> Option<Rig> {
        let env = TestEngines::from_env("seq hole tests")?;
        let prefix = contract::prefix();
        let topics = Topics::with_prefix(&format!("{prefix}."));
        ensure_topics(&env.brokers, &topics).await.unwrap();
        let pg = PgStore::connect(&env.pg, 4).await.unwrap();
        let conv = format!("d:{prefix}ann:{prefix}bob");
        let members = vec![format!("{prefix}ann"), format!("{prefix}bob")];
        Some(Rig { env, prefix, topics, pg, conv, members, worker: None })
    }

    async fn redis(&self) -> RedisStore {
        RedisStore::connect(&self.env.redis, &format!("{}:", self.prefix)).await.unwrap()
    }

    /// A logic instance's message store, with connections of its own.
    async fn instance(&self) -> ClusterMessages {
        let producer = Producer::new(&self.env.brokers, Duration::from_secs(10)).unwrap();
        ClusterMessages::new(self.redis().await, producer, self.topics.clone(), Arc::new(self.pg.clone()))
    }

    fn msg(&self, cmid: &str) -> NewMessage {
        NewMessage {
            conv: self.conv.clone(),
            from: self.members[0].clone(),
            cmid: cmid.into(),
            kind: "text".into(),
            body: serde_json::json!(format!("body of {cmid}")),
            reply_to: None,
            mentions: Vec::new(),
        }
    }

    fn start_persist(&mut self) {
        let config = PersistConfig { max_batch: 100, ..PersistConfig::default() };
        let pg = Arc::new(self.pg.clone());
        let worker = PersistWorker::new(&self.env.brokers, self.topics.clone(), pg.clone(), pg, config).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            worker
                .run(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap()
        });
        self.worker = Some((stop, task));
    }

    async fn stop_persist(&mut self) {
        if let Some((stop, task)) = self.worker.take() {
            let _ = stop.send(());
            task.await.unwrap();
        }
    }

    /// The conversation in PostgreSQL once it holds `n` messages (or after 30 s).
    async fn durable(&self, n: usize) -> Vec<Message> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let msgs = self.pg.range(&self.conv, 0, 10_000).await.unwrap();
            if msgs.len() >= n || Instant::now() > deadline {
                return msgs;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The raw Redis connection, for writing records as an older version did.
    async fn raw(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.env.redis.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap()
    }

    fn cmid_key(&self, cmid: &str) -> String {
        let from = &self.members[0];
        format!("{}:cmid:{}:{}:{from}:{cmid}", self.prefix, self.conv, from.len())
    }
}

fn seqs(msgs: &[Message]) -> Vec<u64> {
    msgs.iter().map(|m| m.seq).collect()
}

/// The send killed at `at`, retried through another instance: same seq, same
/// message, no hole, and the next send gets the next seq.
async fn killed_then_retried(at: CrashPoint) {
    let Some(mut rig) = Rig::new().await else { return };
    let dying = rig.instance().await;
    let first = dying.append(rig.msg("m1"), &rig.members).await.unwrap();
    assert_eq!(first.msg.seq, 1);
    let reserved = dying.append_then_crash(rig.msg("m2"), &rig.members, at).await.unwrap();
    assert_eq!(reserved.seq, 2);
    drop(dying);

    let other = rig.instance().await;
    let retried = other.append(rig.msg("m2"), &rig.members).await.expect("the retry completes the reserved seq");
    assert_eq!(retried.msg, reserved, "the very message the killed instance reserved (mid, ts, seq)");
    assert!(!retried.duplicate, "the first completion is the send");
    let again = other.append(rig.msg("m2"), &rig.members).await.unwrap();
    assert_eq!((again.msg, again.duplicate), (reserved.clone(), true));
    let next = other.append(rig.msg("m3"), &rig.members).await.unwrap();
    assert_eq!(next.msg.seq, 3, "the next send gets seq + 1");
    assert_eq!(seqs(&other.range(&rig.conv, 0, 100).await.unwrap()), vec![1, 2, 3], "readable at once, no hole");
    assert_eq!(other.find_cmid(&rig.conv, &rig.members[0], "m2").await.unwrap(), Some(reserved.clone()));

    rig.start_persist();
    let stored = rig.durable(3).await;
    assert_eq!(seqs(&stored), vec![1, 2, 3], "stored gapless, each seq once");
    assert_eq!(stored[1], reserved);
    // nothing is left for the sweeper: the reservation is complete
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(other.sweep(Duration::from_millis(100)).await.unwrap(), 0);
    rig.stop_persist().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_killed_after_reserving_completes_on_retry() {
    killed_then_retried(CrashPoint::AfterReserve).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_killed_after_publishing_completes_on_retry() {
    killed_then_retried(CrashPoint::AfterPublish).await;
}

/// The defect as reported, against records as the previous version left
/// them: it allocated the seq (record `seq:ts:p`, no content), then stashed
/// the message in a second step; SIGKILL between the two made the cmid
/// unsendable ("pending … was not stashed"). A retry now completes it with
/// its own content (same cmid, same message), or with the stash if there is
/// one, at the same seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_seq_of_the_previous_version_completes_on_retry() {
    let Some(mut rig) = Rig::new().await else { return };
    let store = rig.instance().await;
    assert_eq!(store.append(rig.msg("m1"), &rig.members).await.unwrap().msg.seq, 1);

    // killed after allocating seq 2, before stashing
    let mut raw = rig.raw().await;
    let seq_key = format!("{}:seq:{}", rig.prefix, rig.conv);
    let ts = switchboard_storage::now_ms();
    let seq: u64 = redis::cmd("INCR").arg(&seq_key).query_async(&mut raw).await.unwrap();
    assert_eq!(seq, 2);
    let _: () = redis::cmd("SET")
        .arg(rig.cmid_key("m2"))
        .arg(format!("{seq}:{ts}:p"))
        .arg("EX")
        .arg(3600)
        .query_async(&mut raw)
        .await
        .unwrap();
    // killed after allocating seq 3 and stashing its message
    let seq: u64 = redis::cmd("INCR").arg(&seq_key).query_async(&mut raw).await.unwrap();
    assert_eq!(seq, 3);
    let stashed = rig.msg("m3").stored_as(3, ts);
    let _: () = redis::cmd("SET").arg(rig.cmid_key("m3")).arg(format!("3:{ts}:p")).query_async(&mut raw).await.unwrap();
    let _: () = redis::cmd("SET")
        .arg(format!("{}:pending:{}:3", rig.prefix, rig.conv))
        .arg(serde_json::to_string(&stashed).unwrap())
        .query_async(&mut raw)
        .await
        .unwrap();

    let other = rig.instance().await;
    let m2 = other.append(rig.msg("m2"), &rig.members).await.expect("the cmid is sendable");
    assert_eq!((m2.msg.seq, m2.msg.ts, m2.msg.body.clone()), (2, ts, rig.msg("m2").body));
    assert!(!m2.duplicate);
    assert_eq!(other.append(rig.msg("m2"), &rig.members).await.unwrap().msg, m2.msg, "a second retry: same message");
    let m3 = other.append(rig.msg("m3"), &rig.members).await.unwrap();
    assert_eq!(m3.msg, stashed, "the stashed message, mid included");
    assert_eq!(other.append(rig.msg("m4"), &rig.members).await.unwrap().msg.seq, 4);

    rig.start_persist();
    assert_eq!(seqs(&rig.durable(4).await), vec![1, 2, 3, 4]);
    rig.stop_persist().await;
}

/// Retries of one killed send through two instances at once: both succeed
/// with the same message, one of them as the send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_retries_agree() {
    let Some(mut rig) = Rig::new().await else { return };
    let dying = rig.instance().await;
    let reserved = dying.append_then_crash(rig.msg("m1"), &rig.members, CrashPoint::AfterReserve).await.unwrap();
    let (a, b) = (rig.instance().await, rig.instance().await);
    let (ra, rb) = tokio::join!(a.append(rig.msg("m1"), &rig.members), b.append(rig.msg("m1"), &rig.members));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!((&ra.msg, &rb.msg), (&reserved, &reserved));
    assert!(ra.duplicate != rb.duplicate, "exactly one is the send: {ra:?} {rb:?}");
    rig.start_persist();
    assert_eq!(rig.durable(1).await, vec![reserved]);
    rig.stop_persist().await;
}

/// A reservation nobody completes is voided after the timeout (by one of
/// two racing sweepers); the conversation has no hole; a late retry of the
/// cmid gets a fresh seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_reservation_is_voided() {
    let Some(mut rig) = Rig::new().await else { return };
    rig.start_persist();
    let dying = rig.instance().await;
    dying.append(rig.msg("m1"), &rig.members).await.unwrap();
    let reserved = dying.append_then_crash(rig.msg("m2"), &rig.members, CrashPoint::AfterReserve).await.unwrap();
    drop(dying);
    let (a, b) = (rig.instance().await, rig.instance().await);
    assert_eq!(a.append(rig.msg("m3"), &rig.members).await.unwrap().msg.seq, 3);
    assert_eq!(a.sweep(Duration::from_secs(60)).await.unwrap(), 0, "not overdue yet");

    tokio::time::sleep(Duration::from_millis(400)).await;
    let after = Duration::from_millis(300);
    let (va, vb) = tokio::join!(a.sweep(after), b.sweep(after));
    assert_eq!(va.unwrap() + vb.unwrap(), 1, "one void, whoever sweeps");
    assert_eq!(a.sweep(after).await.unwrap(), 0, "and only once");

    let stored = rig.durable(3).await;
    assert_eq!(seqs(&stored), vec![1, 2, 3], "the hole is filled");
    let void = &stored[1];
    assert_eq!((void.kind.as_str(), void.from.as_str(), &void.body), (VOID, "", &serde_json::json!("")));
    assert_eq!(void.ts, reserved.ts, "ts stays monotonic");
    let read: Vec<(u64, String)> =
        a.range(&rig.conv, 0, 100).await.unwrap().into_iter().map(|m| (m.seq, m.kind)).collect();
    assert_eq!(read, vec![(1, "text".into()), (2, VOID.into()), (3, "text".into())]);
    let newest: Vec<u64> = seqs(&a.history(&rig.conv, None, 10).await.unwrap());
    assert_eq!(newest, vec![3, 2, 1]);
    assert_eq!(a.recall(&rig.conv, 2).await.unwrap(), None, "a void is no message to recall");

    assert_eq!(a.append(rig.msg("m4"), &rig.members).await.unwrap().msg.seq, 4);
    // the client comes back after all: its message was never sent, and is now
    let late = b.append(rig.msg("m2"), &rig.members).await.unwrap();
    assert_eq!((late.msg.seq, late.duplicate, &late.msg.body), (5, false, &reserved.body));
    assert_eq!(a.append(rig.msg("m2"), &rig.members).await.unwrap().msg, late.msg);
    let stored = rig.durable(5).await;
    assert_eq!(seqs(&stored), vec![1, 2, 3, 4, 5]);
    assert_eq!(stored[4].cmid, "m2");
    assert_eq!(rig.pg.find_cmid(&rig.conv, &rig.members[0], "m2").await.unwrap(), Some(late.msg));
    rig.stop_persist().await;
}

/// The broker had the message (the instance died before marking it done):
/// the void published after the timeout comes second in the partition and
/// is skipped, and a retry that meets the voided seq waits for the durable
/// store, then reports the message at its seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn void_never_replaces_a_published_message() {
    let Some(mut rig) = Rig::new().await else { return };
    let dying = rig.instance().await;
    let reserved = dying.append_then_crash(rig.msg("m1"), &rig.members, CrashPoint::AfterPublish).await.unwrap();
    drop(dying);
    let other = Arc::new(rig.instance().await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(other.sweep(Duration::from_millis(200)).await.unwrap(), 1, "Redis cannot tell: the seq is voided");

    // the retry comes while the persist worker is behind (here: not started)
    let (o, msg, members) = (other.clone(), rig.msg("m1"), rig.members.clone());
    let retry = tokio::spawn(async move { o.append(msg, &members).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!retry.is_finished(), "the retry waits for the durable store to decide");
    rig.start_persist();
    let retried = retry.await.unwrap().unwrap();
    assert_eq!((&retried.msg, retried.duplicate), (&reserved, false));
    assert_eq!(rig.durable(1).await, vec![reserved.clone()], "first in the partition wins");
    let again = other.append(rig.msg("m1"), &rig.members).await.unwrap();
    assert_eq!((&again.msg, again.duplicate), (&reserved, true));
    assert_eq!(other.append(rig.msg("m2"), &rig.members).await.unwrap().msg.seq, 2);
    assert_eq!(seqs(&rig.durable(2).await), vec![1, 2]);
    assert_eq!(other.sweep(Duration::from_millis(1)).await.unwrap(), 0, "nothing left to void");
    rig.stop_persist().await;
}

/// The sending instance was only slow: its message reaches the broker after
/// the void, so the void is stored; completing the reservation then fails,
/// and the send goes on at a fresh seq instead of reporting a void seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_send_after_its_void_is_not_acknowledged() {
    let Some(mut rig) = Rig::new().await else { return };
    rig.start_persist();
    let slow = rig.instance().await;
    let reserved = slow.append_then_crash(rig.msg("m1"), &rig.members, CrashPoint::AfterReserve).await.unwrap();
    let sweeper = rig.instance().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sweeper.sweep(Duration::from_millis(200)).await.unwrap(), 1);
    assert_eq!(rig.durable(1).await[0].kind, VOID);

    // the slow instance's publish lands now, then it tries to complete
    let record = SequencedRecord { msg: reserved.clone(), members: rig.members.clone(), recall: false };
    let producer = Producer::new(&rig.env.brokers, Duration::from_secs(10)).unwrap();
    producer.send(&rig.topics.messages, &rig.conv, &serde_json::to_vec(&record).unwrap()).await.unwrap();
    let redis = rig.redis().await;
    assert_eq!(redis.complete(&reserved, &rig.members).await.unwrap(), Completion::Void);
    assert!(slow.range(&rig.conv, 0, 10).await.unwrap().iter().all(|m| m.kind == VOID), "nothing cached");

    // its caller retries, as every append does on a failed completion
    let sent = slow.append(rig.msg("m1"), &rig.members).await.unwrap();
    assert_eq!((sent.msg.seq, sent.duplicate), (2, false));
    let stored = rig.durable(2).await;
    assert_eq!(seqs(&stored), vec![1, 2]);
    assert_eq!((stored[0].kind.as_str(), stored[1].cmid.as_str()), (VOID, "m1"));
    rig.stop_persist().await;
}

/// Redis loses everything (counters and cmids) while acknowledged records are still only in
/// the topic (the persist worker is down): a new send must not reuse their seqs, and a retry of
/// one of their cmids must get its message back, not a new seq. The counter is seeded only once
/// the worker has stored the topic up to its high watermark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_counters_never_reuse_a_seq_still_in_the_topic() {
    let Some(mut rig) = Rig::new().await else { return };
    let instance = || async {
        let producer = Producer::new(&rig.env.brokers, Duration::from_secs(10)).unwrap();
        ClusterMessages::new(rig.redis().await, producer, rig.topics.clone(), Arc::new(rig.pg.clone()))
            .with_persisted_log(Arc::new(rig.pg.clone()))
    };
    let before = instance().await;
    for i in 1..=3 {
        assert_eq!(before.append(rig.msg(&format!("m{i}")), &rig.members).await.unwrap().msg.seq, i);
    }
    drop(before);
    // Redis loses this deployment's keys; nothing is stored in PostgreSQL yet.
    let mut raw = rig.raw().await;
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{}:*", rig.prefix)).query_async(&mut raw).await.unwrap();
    assert!(!keys.is_empty());
    let _: () = redis::cmd("DEL").arg(&keys).query_async(&mut raw).await.unwrap();
    assert!(rig.pg.range(&rig.conv, 0, 100).await.unwrap().is_empty(), "nothing stored yet");

    let after = instance().await;
    // The worker comes back a little later; the send waits for it instead of reusing seq 1.
    let (m4, members) = (rig.msg("m4"), rig.members.clone());
    let send = after.append(m4, &members);
    let (sent, ()) = tokio::join!(send, async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        rig.start_persist();
    });
    assert_eq!(sent.unwrap().msg.seq, 4, "seqs 1-3 are taken by records that were still in the topic");
    let retried = after.append(rig.msg("m2"), &rig.members).await.unwrap();
    assert_eq!((retried.msg.seq, retried.duplicate), (2, true), "a forgotten cmid finds its message");
    assert_eq!(seqs(&rig.durable(4).await), vec![1, 2, 3, 4]);
    rig.stop_persist().await;
}

/// In a settled epoch (no Redis loss since the last wait), a new conversation's first send does
/// not wait for the persist worker: here the worker never runs, and the send still succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_conversations_do_not_wait_for_the_persist_worker() {
    let Some(rig) = Rig::new().await else { return };
    let producer = Producer::new(&rig.env.brokers, Duration::from_secs(10)).unwrap();
    let store = ClusterMessages::new(rig.redis().await, producer, rig.topics.clone(), Arc::new(rig.pg.clone()))
        .with_persisted_log(Arc::new(rig.pg.clone()));
    // The first counter ever: the epoch opens and settles (the topic is empty).
    assert_eq!(store.append(rig.msg("a1"), &rig.members).await.unwrap().msg.seq, 1);
    // Another conversation, with a record of the first one unstored in the topic: no wait.
    let other = NewMessage { conv: format!("{}x", rig.conv), ..rig.msg("b1") };
    assert_eq!(store.append(other, &rig.members).await.expect("no wait for the worker").msg.seq, 1);
}
