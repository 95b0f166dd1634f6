//! The cluster backends against real servers started by scripts/services.sh:
//! the Redis route table and registry, and the whole cluster message path
//! (Redis seq + Kafka + PostgreSQL) through the same contract suite as every
//! other message store, then the persist worker end to end, and two persist
//! workers sharing one topic.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchboard_storage::cluster::ClusterMessages;
use switchboard_storage::contract::{self, TestEngines};
use switchboard_storage::kafka::{ensure_topics, Producer, Topics};
use switchboard_storage::persist::{PersistConfig, PersistStats, PersistWorker};
use switchboard_storage::postgres::{partition_lock_key, PgStore};
use switchboard_storage::redis::RedisStore;
use switchboard_storage::{Member, Message, MessageStore, NewMessage, Registry, RouteTable, SequencedRecord};

fn env() -> Option<TestEngines> {
    TestEngines::from_env("cluster storage tests")
}

fn member(rpc: &str) -> Member {
    Member { id: rpc.into(), rpc: rpc.into(), ws: String::new(), tcp: String::new(), load: 0.1, connections: 0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_routes_and_registry() {
    let Some(env) = env() else { return };
    let prefix = format!("{}:", contract::prefix());
    let store = RedisStore::connect(&env.redis, &prefix).await.unwrap();
    assert!(store.register("gateway", &member("gw1"), 30).await.unwrap(), "a first registration");
    assert!(!store.register("gateway", &member("gw1"), 30).await.unwrap(), "a refresh");
    store.register("gateway", &member("gw2"), 30).await.unwrap();
    contract::routes_contract(Arc::new(store.clone())).await;

    // a gateway that stops refreshing its entry drops out, with its routes
    store.register("gateway", &member("gw3"), 1).await.unwrap();
    let conn =
        switchboard_storage::ConnRef { gateway: "gw3".into(), conn_id: 7, device: "d".into(), session: "s".into() };
    store.add("zed", conn).await.unwrap();
    assert_eq!(store.get("zed").await.unwrap().len(), 1);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let ids: Vec<String> = store.members("gateway").await.unwrap().into_iter().map(|m| m.id).collect();
    assert!(!ids.contains(&"gw3".to_string()), "{ids:?}");
    assert!(store.get("zed").await.unwrap().is_empty(), "routes of a dead gateway are ignored");
    assert!(store.register("gateway", &member("gw3"), 30).await.unwrap(), "a lapsed entry registers anew");
    // a claim holds for its time, across every instance of the store
    let other = RedisStore::connect(&env.redis, &prefix).await.unwrap();
    assert!(store.claim("notify:zed:d:a:b", Duration::from_millis(300)).await.unwrap());
    assert!(!other.claim("notify:zed:d:a:b", Duration::from_millis(300)).await.unwrap(), "held");
    assert!(other.claim("notify:zed:d:a:c", Duration::from_millis(300)).await.unwrap(), "another name");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(other.claim("notify:zed:d:a:b", Duration::from_millis(300)).await.unwrap(), "lapsed");
    store.deregister("gateway", "gw3").await.unwrap();
    store.deregister("gateway", "gw1").await.unwrap();
    let ids: Vec<String> = store.members("gateway").await.unwrap().into_iter().map(|m| m.id).collect();
    assert_eq!(ids, vec!["gw2".to_string()]);
}

/// The recent-message cache of a conversation stays bounded (trimmed every 16th seq rather than
/// at every message) and keeps the newest messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recent_cache_keeps_the_newest_messages_and_stays_bounded() {
    let Some(env) = env() else { return };
    let store = RedisStore::connect(&env.redis, &format!("{}:", contract::prefix())).await.unwrap();
    let members = vec!["a".to_string(), "b".to_string()];
    let keep = switchboard_storage::redis::RECENT_KEEP as u64;
    let last = keep + 137;
    let mut seq = 1;
    while seq <= last {
        let batch: Vec<_> = (seq..=last.min(seq + 99))
            .map(|s| {
                let msg = text("d:a:b", &format!("c{s}")).stored_as(s, 1_700_000_000_000 + s);
                store.complete_request(&msg, &members).unwrap()
            })
            .collect();
        seq += batch.len() as u64;
        store.complete_many(&batch).await.unwrap();
        let cached = store.cached_range("d:a:b", 0, u64::MAX).await.unwrap();
        assert!(cached.len() as u64 <= keep + 15, "{} cached after seq {}", cached.len(), seq - 1);
    }
    let cached: Vec<u64> = store.cached_range("d:a:b", 0, u64::MAX).await.unwrap().iter().map(|m| m.seq).collect();
    let newest: Vec<u64> = (last - keep + 1..=last).collect();
    assert_eq!(cached[cached.len() - newest.len()..], newest[..], "the newest {keep} are cached");
    assert!(cached.len() as u64 >= keep && cached.len() as u64 <= keep + 15, "{} cached", cached.len());
}

fn text(conv: &str, cmid: &str) -> NewMessage {
    NewMessage {
        conv: conv.into(),
        from: "ann".into(),
        cmid: cmid.into(),
        kind: "text".into(),
        body: serde_json::json!(format!("body of {cmid}")),
        reply_to: None,
        mentions: Vec::new(),
    }
}

async fn wait_durable(pg: &PgStore, conv: &str, n: usize) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seqs: Vec<u64> = pg.range(conv, 0, 10_000).await.unwrap().into_iter().map(|m| m.seq).collect();
        if seqs.len() >= n || Instant::now() > deadline {
            return seqs;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A fresh name prefix, Redis and PostgreSQL, and the topics under that prefix (created).
async fn engines_for_a_run(env: &TestEngines) -> (String, RedisStore, PgStore, Topics) {
    let p = contract::prefix();
    let redis = RedisStore::connect(&env.redis, &format!("{p}:")).await.unwrap();
    let pg = PgStore::connect(&env.pg, 4).await.unwrap();
    let topics = Topics::with_prefix(&format!("{p}."));
    ensure_topics(&env.brokers, &topics).await.unwrap();
    (p, redis, pg, topics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_message_path_and_persist_worker() {
    let Some(env) = env() else { return };
    let (p, redis, pg, topics) = engines_for_a_run(&env).await;
    ensure_topics(&env.brokers, &topics).await.expect("creating existing topics is fine");
    let producer = Producer::new(&env.brokers, Duration::from_secs(10)).unwrap();
    let cluster = ClusterMessages::new(redis.clone(), producer.clone(), topics.clone(), Arc::new(pg.clone()));

    // the same contract as the embedded and Postgres stores, before any
    // persist worker runs: everything is readable from Redis' cache
    contract::messages_contract(&cluster).await;
    contract::concurrent_appends(&cluster).await;

    let conv = format!("d:{p}ann:{p}bob");
    let members = vec!["ann".to_string()];
    for i in 1..=50 {
        let a = cluster.append(text(&conv, &format!("m{i}")), &members).await.unwrap();
        assert_eq!(a.msg.seq, i);
    }
    let run_worker = |stop: tokio::sync::oneshot::Receiver<()>| {
        let config = PersistConfig { max_batch: 100, ..PersistConfig::default() };
        let pg = Arc::new(pg.clone());
        let worker = PersistWorker::new(&env.brokers, topics.clone(), pg.clone(), pg, config).unwrap();
        let stats = worker.stats.clone();
        (
            tokio::spawn(async move {
                worker
                    .run(async {
                        let _ = stop.await;
                    })
                    .await
            }),
            stats,
        )
    };
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let (task, stats) = run_worker(stopped);
    assert_eq!(wait_durable(&pg, &conv, 50).await, (1..=50).collect::<Vec<_>>());
    let _ = stop.send(());
    task.await.unwrap().unwrap();
    assert!(stats.stored.load(Ordering::Relaxed) >= 50);

    // a recall of a persisted message shows at once, though Postgres still
    // has the original until the worker runs again
    let original = pg.range(&conv, 9, 1).await.unwrap().pop().unwrap();
    let recalled = cluster.recall(&conv, 10).await.unwrap().expect("seq 10 exists");
    assert_eq!((recalled.seq, recalled.mid.as_str(), recalled.kind.as_str()), (10, original.mid.as_str(), "recalled"));
    assert_eq!(recalled.body, serde_json::json!(""));
    assert_eq!(cluster.range(&conv, 9, 1).await.unwrap(), vec![recalled.clone()]);
    assert_eq!(cluster.history(&conv, Some(11), 1).await.unwrap(), vec![recalled.clone()]);
    assert_eq!(cluster.find_mid(&conv, &original.mid).await.unwrap(), Some(recalled.clone()));
    assert_eq!(pg.range(&conv, 9, 1).await.unwrap(), vec![original.clone()], "persisted by the worker only");
    assert_eq!(cluster.recall(&conv, 500).await.unwrap(), None);

    // worker down: sends still succeed and are readable at once
    for i in 51..=60 {
        cluster.append(text(&conv, &format!("m{i}")), &members).await.unwrap();
    }
    let seqs: Vec<u64> = cluster.range(&conv, 0, 100).await.unwrap().into_iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=60).collect::<Vec<_>>());
    // a recall of a message only in the cache, found by mid
    let fresh = cluster.range(&conv, 54, 1).await.unwrap().pop().unwrap();
    assert_eq!(pg.find_mid(&conv, &fresh.mid).await.unwrap(), None, "not persisted yet");
    assert_eq!(cluster.find_mid(&conv, &fresh.mid).await.unwrap(), Some(fresh.clone()));
    let recalled55 = cluster.recall(&conv, 55).await.unwrap().expect("seq 55 is cached");
    assert_eq!(recalled55.kind, "recalled");
    assert_eq!(cluster.range(&conv, 54, 1).await.unwrap(), vec![recalled55.clone()]);
    assert_eq!(cluster.find_mid(&conv, &fresh.mid).await.unwrap(), Some(recalled55.clone()));
    assert_eq!(
        cluster.history(&conv, None, 3).await.unwrap().iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![60, 59, 58]
    );

    // a poison record goes to the dead-letter topic and does not block
    producer.send(&topics.messages, &conv, b"{not a record").await.unwrap();
    cluster.append(text(&conv, "m61"), &members).await.unwrap();

    // restarted worker: picks up after its stored offsets, exactly once
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let (task, stats) = run_worker(stopped);
    assert_eq!(wait_durable(&pg, &conv, 61).await, (1..=61).collect::<Vec<_>>());
    // the recall records reached Postgres (ordered before m61 in the partition)
    assert_eq!(pg.range(&conv, 9, 1).await.unwrap(), vec![recalled.clone()]);
    assert_eq!(pg.range(&conv, 54, 1).await.unwrap(), vec![recalled55.clone()]);
    let kinds: Vec<String> = pg.range(&conv, 0, 100).await.unwrap().into_iter().map(|m| m.kind).collect();
    assert_eq!(kinds.iter().filter(|k| *k == "recalled").count(), 2, "{kinds:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats.dead_lettered.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 1);
    let _ = stop.send(());
    task.await.unwrap().unwrap();

    // Redis loses its counters and cmids: seqs continue from the durable
    // store, and an old cmid is still recognised
    let mut c = redis::Client::open(env.redis.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{p}:*")).query_async(&mut c).await.unwrap();
    let _: () = redis::cmd("DEL").arg(&keys).query_async(&mut c).await.unwrap();
    let next = cluster.append(text(&conv, "m62"), &members).await.unwrap();
    assert_eq!(next.msg.seq, 62, "reseeded from the durable store, never reused");
    let old = cluster.append(text(&conv, "m7"), &members).await.unwrap();
    assert!(old.duplicate);
    assert_eq!(old.msg.seq, 7);

    // A conversation whose counter started from zero has every cmid in Redis, so its sends
    // allocate without asking the durable store; once its first cmids could have expired (it
    // started longer ago than a cmid lives), a cmid Redis forgot is found in the store again.
    let conv2 = format!("d:{p}cat:{p}dan");
    assert_eq!(cluster.append(text(&conv2, "f1"), &members).await.unwrap().msg.seq, 1);
    let born_key = format!("{p}:born:{conv2}");
    let born: Option<u64> = redis::cmd("GET").arg(&born_key).query_async(&mut c).await.unwrap();
    assert!(born.is_some_and(|b| b > 0), "a counter from zero records when it started");
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let (task, _) = run_worker(stopped);
    assert_eq!(wait_durable(&pg, &conv2, 1).await, vec![1]);
    let _ = stop.send(());
    task.await.unwrap().unwrap();
    let eight_days_ago = switchboard_storage::now_ms() - 8 * 24 * 3600 * 1000;
    let _: () = redis::cmd("SET").arg(&born_key).arg(eight_days_ago).query_async(&mut c).await.unwrap();
    let _: () = redis::cmd("DEL").arg(format!("{p}:cmid:{conv2}:3:ann:f1")).query_async(&mut c).await.unwrap();
    let again = cluster.append(text(&conv2, "f1"), &members).await.unwrap();
    assert!(again.duplicate && again.msg.seq == 1, "an expired cmid found in the store: {again:?}");
    assert_eq!(cluster.append(text(&conv2, "f2"), &members).await.unwrap().msg.seq, 2);
    assert!(cluster.append(text(&conv2, "f2"), &members).await.unwrap().duplicate);
}

/// A record of `conv` at `seq` as the message topic carries it.
fn record_bytes(conv: &str, seq: u64) -> Vec<u8> {
    let msg = Message {
        conv: conv.into(),
        seq,
        mid: switchboard_storage::new_mid(1_000 + seq),
        from: "ann".into(),
        cmid: format!("k{seq}"),
        kind: "text".into(),
        body: serde_json::json!(seq),
        ts: 1_000 + seq,
        reply_to: None,
        mentions: Vec::new(),
    };
    serde_json::to_vec(&SequencedRecord { msg, members: vec!["ann".into()], recall: false }).unwrap()
}

/// A persist worker running in a task of this test.
struct Worker {
    stats: Arc<PersistStats>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<switchboard_storage::Result<()>>,
}

impl Worker {
    fn start(brokers: &str, topics: &Topics, pg: &PgStore) -> Worker {
        let config =
            PersistConfig { max_batch: 100, claim_every: Duration::from_millis(200), ..PersistConfig::default() };
        let pg = Arc::new(pg.clone());
        let worker = PersistWorker::new(brokers, topics.clone(), pg.clone(), pg, config).unwrap();
        let stats = worker.stats.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(worker.run(async {
            let _ = stopped.await;
        }));
        Worker { stats, stop, task }
    }

    fn partitions(&self) -> u64 {
        self.stats.partitions.load(Ordering::Relaxed)
    }

    fn stored(&self) -> u64 {
        self.stats.stored.load(Ordering::Relaxed)
    }

    fn records(&self) -> u64 {
        self.stats.records.load(Ordering::Relaxed)
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The server process holding the lock of `partition` of `topic`.
async fn lock_holder(admin: &tokio_postgres::Client, topic: &str, partition: i32) -> Option<i32> {
    let key = partition_lock_key(topic, partition) as u64;
    let (hi, lo) = ((key >> 32) as i64, (key & 0xffff_ffff) as i64);
    let row = admin
        .query_opt(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 \
             AND classid::int8 = $1 AND objid::int8 = $2",
            &[&hi, &lo],
        )
        .await
        .unwrap();
    row.map(|r| r.get(0))
}

/// Two workers on one topic: the first owns every partition and the second
/// none (no record is stored twice over); when the first stops, the second
/// takes every partition over; when the server ends its lock session, it
/// lets its partitions go, takes them again on a new session and goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persist_workers_own_partitions_exclusively_and_take_over() {
    let Some(env) = env() else { return };
    let p = contract::prefix();
    let topics = Topics::with_prefix(&format!("{p}."));
    ensure_topics(&env.brokers, &topics).await.unwrap();
    let producer = Producer::new(&env.brokers, Duration::from_secs(10)).unwrap();
    let pg = PgStore::connect(&env.pg, 4).await.unwrap();
    let (admin, conn) = tokio_postgres::connect(&env.pg, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    // conversations over every partition
    let convs: Vec<String> = (0..8).map(|i| format!("d:{p}ann:{p}b{i}")).collect();
    let send_round = |seq: u64| {
        let (producer, topics, convs) = (producer.clone(), topics.clone(), convs.clone());
        async move {
            for conv in &convs {
                producer.send(&topics.messages, conv, &record_bytes(conv, seq)).await.unwrap();
            }
        }
    };
    let all_stored = |seq: u64| {
        let (pg, convs) = (pg.clone(), convs.clone());
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            for conv in &convs {
                assert_eq!(wait_durable(&pg, conv, seq as usize).await, (1..=seq).collect::<Vec<_>>(), "{conv}");
                assert!(Instant::now() < deadline, "stored too late");
            }
        }
    };

    let a = Worker::start(&env.brokers, &topics, &pg);
    eventually("the first worker owns every partition", || a.partitions() == 3).await;
    let b = Worker::start(&env.brokers, &topics, &pg);
    send_round(1).await;
    all_stored(1).await;
    tokio::time::sleep(Duration::from_millis(600)).await; // a few claim rounds of the second worker
    assert_eq!((a.partitions(), b.partitions()), (3, 0), "a partition has one owner");
    assert_eq!((a.stored(), b.stored()), (8, 0));

    a.stop().await;
    eventually("the second worker takes over", || b.partitions() == 3).await;
    send_round(2).await;
    all_stored(2).await;
    assert_eq!((b.records(), b.stored()), (8, 8), "the new owner reads on from the stored offsets");

    // the server ends the second worker's lock session
    let holder = lock_holder(&admin, &topics.messages, 0).await.expect("partition 0 is held");
    admin.execute("SELECT pg_terminate_backend($1)", &[&holder]).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match lock_holder(&admin, &topics.messages, 0).await {
            Some(pid) if pid != holder && b.partitions() == 3 => break,
            _ => assert!(Instant::now() < deadline, "partitions not claimed again on a new session"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    send_round(3).await;
    all_stored(3).await;
    b.stop().await;
}

/// Two logic instances' friendship caches over one PostgreSQL and one Redis: the cache passes the
/// social contract, and a change made through one instance reaches the other's cache (the
/// relation it had cached is read anew), in every direction a relation can change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn friendship_caches_hear_changes_made_elsewhere() {
    use switchboard_storage::cluster_caches::CachedSocial;
    use switchboard_storage::{FriendState, SocialStore};
    let Some(env) = env() else { return };
    let prefix = format!("{}:", contract::prefix());
    let pg: Arc<dyn SocialStore> = Arc::new(PgStore::connect(&env.pg, 2).await.unwrap());
    let one = CachedSocial::new(pg.clone(), RedisStore::connect(&env.redis, &prefix).await.unwrap());
    let two = CachedSocial::new(pg.clone(), RedisStore::connect(&env.redis, &prefix).await.unwrap());
    for s in [&one, &two] {
        let s = s.clone();
        eventually("the change subscription is up", move || s.listening()).await;
    }
    contract::social_contract(one.as_ref()).await;

    let p = contract::prefix();
    let (a, b) = (format!("{p}ann"), format!("{p}bob"));
    // Both instances cache "friends" (asked twice: the second answer comes from memory).
    assert_eq!(one.request_friend(&a, &b, "").await.unwrap(), switchboard_storage::RequestOutcome::Pending);
    assert!(two.accept_friend(&b, &a).await.unwrap());
    for s in [&one, &two] {
        for _ in 0..2 {
            assert_eq!(s.friend_state(&a, &b).await.unwrap(), Some(FriendState::Friends));
        }
    }
    // Changes through `two` reach `one`'s cache, and the other way round.
    let changes: [(&Arc<CachedSocial>, &Arc<CachedSocial>, Option<FriendState>); 3] = [
        (&two, &one, None),                                                 // delete
        (&one, &two, Some(FriendState::Outgoing { note: "again".into() })), // request
        (&two, &one, None),                                                 // block
    ];
    for (i, (writer, reader, expected)) in changes.into_iter().enumerate() {
        match i {
            0 => assert!(writer.delete_friend(&b, &a).await.unwrap()),
            1 => {
                writer.request_friend(&a, &b, "again").await.unwrap();
            }
            _ => assert!(writer.set_block(&b, &a, true).await.unwrap()),
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let seen = reader.friend_state(&a, &b).await.unwrap();
            if seen == expected {
                break;
            }
            assert!(Instant::now() < deadline, "change {i} never reached the other cache: still {seen:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(writer.friend_state(&a, &b).await.unwrap(), expected, "the writer's own cache, change {i}");
    }
}

/// The same for group member lists: the cache passes the groups contract, and a membership
/// change made through one instance reaches the other's cached list (and the roles it answers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_list_caches_hear_changes_made_elsewhere() {
    use switchboard_storage::cluster_caches::CachedGroups;
    use switchboard_storage::{Group, GroupStore, Role};
    let Some(env) = env() else { return };
    let prefix = format!("{}:", contract::prefix());
    let pg: Arc<dyn GroupStore> = Arc::new(PgStore::connect(&env.pg, 2).await.unwrap());
    let one = CachedGroups::new(pg.clone(), RedisStore::connect(&env.redis, &prefix).await.unwrap());
    let two = CachedGroups::new(pg.clone(), RedisStore::connect(&env.redis, &prefix).await.unwrap());
    for s in [&one, &two] {
        let s = s.clone();
        eventually("the change subscription is up", move || s.listening()).await;
    }
    contract::groups_contract(one.as_ref()).await;

    let p = contract::prefix();
    let (o, a, b) = (format!("{p}own"), format!("{p}amy"), format!("{p}ben"));
    let g = Group { id: format!("{p}gc"), name: "Cache".into(), owner: o.clone(), created_ms: 1, invite_only: false };
    // `one` caches the id before the group exists, then it is created through `two`.
    assert!(one.members(&g.id).await.unwrap().is_empty());
    assert!(two.create_group(&g, std::slice::from_ref(&a)).await.unwrap());
    let expect = |members: &[(&String, Role)]| -> Vec<(String, Role)> {
        members.iter().map(|(u, r)| ((*u).clone(), *r)).collect()
    };
    let steps: [Vec<(String, Role)>; 4] = [
        expect(&[(&a, Role::Member), (&o, Role::Owner)]), // created elsewhere
        expect(&[(&a, Role::Member), (&b, Role::Member), (&o, Role::Owner)]), // added
        expect(&[(&a, Role::Admin), (&b, Role::Member), (&o, Role::Owner)]), // role set
        expect(&[(&a, Role::Admin), (&o, Role::Owner)]),  // removed
    ];
    for (i, expected) in steps.into_iter().enumerate() {
        match i {
            0 => {}
            1 => assert!(two.add_member(&g.id, &b, Role::Member).await.unwrap()),
            2 => assert!(two.set_role(&g.id, &a, Role::Admin).await.unwrap()),
            _ => assert!(two.remove_member(&g.id, &b).await.unwrap()),
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let seen = one.members(&g.id).await.unwrap();
            if seen == expected {
                break;
            }
            assert!(Instant::now() < deadline, "change {i} never reached the other cache: still {seen:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for (user, role) in &expected {
            assert_eq!(one.role(&g.id, user).await.unwrap(), Some(*role), "change {i}: role of {user}");
        }
        let gone = if i == 3 { Some(&b) } else { None };
        if let Some(gone) = gone {
            assert_eq!(one.role(&g.id, gone).await.unwrap(), None, "a removed member has no role");
        }
        assert_eq!(two.members(&g.id).await.unwrap(), expected, "the writer's own cache, change {i}");
    }
}

/// Every record of `topic`, as (partition, payload), read from the beginning up to the high
/// watermarks `producer` sees now.
async fn read_topic(env: &TestEngines, producer: &Producer, topic: &str) -> Vec<(i32, Vec<u8>)> {
    use rdkafka::consumer::Consumer as _;
    use rdkafka::Message as _;
    let marks = producer.high_watermarks(topic).await.unwrap();
    let consumer =
        switchboard_storage::kafka::assigning_consumer(&env.brokers.as_str().into(), &format!("{topic}-reader"))
            .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for (p, _) in &marks {
        tpl.add_partition_offset(topic, *p, rdkafka::Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let total: i64 = marks.iter().map(|(_, hw)| hw).sum();
    let mut out = Vec::new();
    while (out.len() as i64) < total {
        let m = tokio::time::timeout(Duration::from_secs(10), consumer.recv()).await.expect("records").unwrap();
        out.push((m.partition(), m.payload().unwrap_or_default().to_vec()));
    }
    out
}

/// Concurrent sends share records of the message topic, each message in the partition that
/// librdkafka's own partitioner gives its conversation (so batched and single records of one
/// conversation keep their order); the persist worker stores every message of a batch record
/// and sends only its bad line to the dead-letter topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_share_records_in_their_conversations_partitions() {
    use switchboard_storage::record_batch::{partition_of, split};
    let Some(env) = env() else { return };
    let (p, redis, pg, topics) = engines_for_a_run(&env).await;
    let producer = Producer::batching(&env.brokers, Duration::from_secs(10), Duration::from_millis(20)).unwrap();
    let cluster = Arc::new(ClusterMessages::new(redis, producer.clone(), topics.clone(), Arc::new(pg.clone())));
    let convs: Vec<String> = (0..40).map(|i| format!("d:{p}ann:{p}c{i}")).collect();
    let mut sends = tokio::task::JoinSet::new();
    for conv in &convs {
        let (cluster, conv) = (cluster.clone(), conv.clone());
        sends.spawn(async move { cluster.append(text(&conv, "b1"), &["ann".to_string()]).await.unwrap() });
    }
    while let Some(sent) = sends.join_next().await {
        assert_eq!(sent.unwrap().msg.seq, 1);
    }
    // single records placed by librdkafka's partitioner, by key
    let keyed: Vec<String> = (0..12).map(|i| format!("d:{p}key:{p}k{i}")).collect();
    for conv in &keyed {
        producer.send(&topics.messages, conv, &record_bytes(conv, 1)).await.unwrap();
    }
    // a batch record with a bad line between two good ones
    let (x, y) = (format!("d:{p}ann:{p}x"), format!("d:{p}ann:{p}y"));
    let mut mixed = record_bytes(&x, 1);
    mixed.extend_from_slice(b"\n{not a record\n");
    mixed.extend_from_slice(&record_bytes(&y, 1));
    producer.send(&topics.messages, &x, &mixed).await.unwrap();

    let records = read_topic(&env, &producer, &topics.messages).await;
    let mut batched_records = 0;
    let mut batched_messages = 0;
    for (partition, payload) in &records {
        let lines: Vec<SequencedRecord> = split(payload).filter_map(|l| serde_json::from_slice(l).ok()).collect();
        if lines.iter().any(|r| convs.contains(&r.msg.conv)) {
            batched_records += 1;
            for r in &lines {
                assert_eq!(*partition, partition_of(&r.msg.conv, 3), "{} in its conversation's partition", r.msg.conv);
                batched_messages += 1;
            }
        }
        if let [r] = &lines[..] {
            if keyed.contains(&r.msg.conv) {
                assert_eq!(*partition, partition_of(&r.msg.conv, 3), "librdkafka placed {} there", r.msg.conv);
            }
        }
    }
    assert_eq!(batched_messages, 40);
    assert!(batched_records < 40, "40 concurrent sends took {batched_records} records");

    let worker = Worker::start(&env.brokers, &topics, &pg);
    for conv in convs.iter().chain(&keyed).chain([&x, &y]) {
        assert_eq!(wait_durable(&pg, conv, 1).await, vec![1], "{conv}");
    }
    eventually("the bad line is dead-lettered", || worker.stats.dead_lettered.load(Ordering::Relaxed) == 1).await;
    worker.stop().await;
}

/// Sends placed one after another (as logic does under its conversation lock) get their seqs
/// in that order, wait for the broker together (sharing records, in seq order in their
/// partition), and stay invisible until finished, in order: a reader sees a gap-free prefix at
/// every step. A retry of a placed cmid, and a place of a known cmid, settle as duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placed_sends_wait_for_the_broker_together_and_show_in_order() {
    use switchboard_storage::record_batch::split;
    let Some(env) = env() else { return };
    let (p, redis, pg, topics) = engines_for_a_run(&env).await;
    let producer = Producer::batching(&env.brokers, Duration::from_secs(10), Duration::from_millis(20)).unwrap();
    let cluster = ClusterMessages::new(redis, producer.clone(), topics.clone(), Arc::new(pg.clone()));
    let conv = format!("d:{p}ann:{p}bob");
    let members = vec!["ann".to_string(), "bob".to_string()];

    let mut placed = Vec::new();
    for i in 1..=30 {
        placed.push(cluster.place(text(&conv, &format!("p{i}")), &members).await.expect("the cluster places").unwrap());
    }
    assert!(cluster.range(&conv, 0, 100).await.unwrap().is_empty(), "nothing is visible before it is finished");
    // all wait for the broker at once
    let waits: Vec<_> =
        placed.into_iter().map(|mut p| tokio::spawn(async move { p.durable().await.map(|()| p) })).collect();
    let mut durable = Vec::new();
    for w in waits {
        durable.push(w.await.unwrap().unwrap());
    }
    for (i, p) in durable.into_iter().enumerate() {
        let a = p.finish().await.unwrap();
        assert_eq!(
            (a.msg.seq, a.msg.cmid.as_str(), a.duplicate),
            (i as u64 + 1, format!("p{}", i + 1).as_str(), false)
        );
        let seen: Vec<u64> = cluster.range(&conv, 0, 100).await.unwrap().into_iter().map(|m| m.seq).collect();
        assert_eq!(seen, (1..=i as u64 + 1).collect::<Vec<_>>(), "a gap-free prefix after each finish");
    }

    let retry = cluster.append(text(&conv, "p5"), &members).await.unwrap();
    assert!(retry.duplicate && retry.msg.seq == 5, "{retry:?}");
    let mut known = cluster.place(text(&conv, "p7"), &members).await.unwrap().unwrap();
    known.durable().await.unwrap();
    let known = known.finish().await.unwrap();
    assert!(known.duplicate && known.msg.seq == 7, "{known:?}");

    // the 30 sends share records, in seq order in their partition
    let mut records = 0;
    let mut order = Vec::new();
    for (_, payload) in read_topic(&env, &producer, &topics.messages).await {
        let lines: Vec<SequencedRecord> = split(&payload).map(|l| serde_json::from_slice(l).unwrap()).collect();
        if lines.iter().any(|r| r.msg.conv == conv) {
            records += 1;
            order.extend(lines.iter().map(|r| r.msg.seq));
        }
    }
    assert_eq!(order, (1..=30).collect::<Vec<_>>());
    assert!(records < 30, "30 placed sends took {records} records");
    let worker = Worker::start(&env.brokers, &topics, &pg);
    assert_eq!(wait_durable(&pg, &conv, 30).await, (1..=30).collect::<Vec<_>>());
    worker.stop().await;
}

/// One script call for several sends answers each as if it had been called alone, in order:
/// two new cmids of one conversation get consecutive seqs, the first one's retry in the same
/// call finds its reservation, a conversation without a counter says so; completions mark the
/// first, then find it marked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_calls_answer_each_send_as_if_alone() {
    use switchboard_storage::redis::{Alloc, CmidState, Completion};
    let Some(env) = env() else { return };
    let (p, redis, _pg, _topics) = engines_for_a_run(&env).await;
    let (conv, unseeded) = (format!("d:{p}ann:{p}bob"), format!("d:{p}ann:{p}cat"));
    redis.seed(&conv, 0, 0).await.unwrap();
    let reqs: Vec<_> = [(&conv, "s1"), (&conv, "s2"), (&conv, "s1"), (&unseeded, "s1")]
        .into_iter()
        .map(|(c, cmid)| redis.alloc_request(&text(c, cmid), None, true).unwrap())
        .collect();
    let answers = redis.alloc_many(&reqs, switchboard_storage::now_ms()).await.unwrap();
    let [Alloc::New(first), Alloc::New(second), Alloc::Known(again), Alloc::NoCounter] = &answers[..] else {
        panic!("{answers:?}");
    };
    assert_eq!((first.seq, second.seq), (1, 2));
    assert_eq!((again.seq, again.state), (1, CmidState::Pending));
    let (m1, m2) = (first.message().unwrap(), second.message().unwrap());
    assert_eq!((m1.cmid.as_str(), m2.cmid.as_str()), ("s1", "s2"));

    let members = vec!["ann".to_string(), "bob".to_string()];
    let done: Vec<_> = [&m1, &m2, &m1].into_iter().map(|m| redis.complete_request(m, &members).unwrap()).collect();
    assert_eq!(
        redis.complete_many(&done).await.unwrap(),
        vec![Completion::Done, Completion::Done, Completion::Already]
    );
    assert_eq!(redis.cached_range(&conv, 1, 2).await.unwrap(), vec![m1, m2]);
    assert!(redis.convs_of("bob").await.unwrap().contains(&conv), "indexed for each member");
}
