//! The cluster as separate processes on the real engines (Redis, the
//! Kafka-protocol broker, PostgreSQL from scripts/services.sh): 2 gateways,
//! 2 logic instances and 1 persist worker. Users on different gateways
//! befriend and chat; one gateway and one logic instance are killed with
//! SIGKILL mid-traffic and the persist worker is restarted; in the end every
//! acknowledged message is stored exactly once and received after dedupe.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use switchboard_storage::contract::TestEngines;

fn engines() -> Option<TestEngines> {
    TestEngines::from_env("cluster process test")
}

fn gateways(http: SocketAddr) -> Vec<SocketAddr> {
    let (_, g) = http_req(http, "GET", "/v1/gateways");
    g["gateways"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["ws"].as_str().unwrap().trim_start_matches("ws://").trim_end_matches("/ws").parse().unwrap())
        .collect()
}

fn http_req(addr: SocketAddr, method: &str, path: &str) -> (u16, Value) {
    http(addr, method, path, None, None)
}

/// Seqs of `conv` received on a client (pushes and sync), deduplicated.
fn drain_msgs(c: &mut Client, conv: &str, into: &mut BTreeSet<u64>, wait: Duration) {
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        let r = c.call("sync", json!({"since": {conv: into.iter().next_back().copied().unwrap_or(0)}}));
        for m in r["msgs"].as_array().unwrap() {
            into.insert(m["seq"].as_u64().unwrap());
        }
        if r["more"] == false {
            break;
        }
    }
}

#[test]
fn cluster_survives_gateway_logic_and_persist_faults() {
    let Some(e) = engines() else { return };
    survives_faults(&e, &TestStore::Postgres);
}

/// The same run with MongoDB as the durable store (`[storage] backend = "mongodb"`), where
/// `SB_TEST_MONGODB_URL` names a server (none installs on the CI machine).
#[test]
fn cluster_on_mongodb_survives_gateway_logic_and_persist_faults() {
    let Some(e) = engines() else { return };
    let Some(store) = TestStore::mongo_from_env("cluster process test on MongoDB") else { return };
    survives_faults(&e, &store);
}

/// Roles started with `store` as the durable store in their configuration file.
fn survives_faults(e: &TestEngines, store: &TestStore) {
    let prefix = format!("ct{:08x}", rand::random::<u32>());
    let spawn = |role: &str, extra: &[&str]| Proc::start(Proc::command_on(role, e, store, &prefix, extra), role);
    let logic1 = spawn("logic", &[]);
    let logic2 = spawn("logic", &[]);
    let (l1_grpc, l2_grpc) = (logic1.addr("grpc "), logic2.addr("grpc "));
    let (http1, http2) = (logic1.addr("http://"), logic2.addr("http://"));
    let logic_urls = format!("http://{l1_grpc},http://{l2_grpc}");
    let gw1 = spawn("gateway", &["--logic-url", &logic_urls]);
    let gw2 = spawn("gateway", &["--logic-url", &logic_urls]);
    let (ws1, ws2) = (gw1.addr("ws://"), gw2.addr("ws://"));
    let mut persist = spawn("persist", &[]);

    // both gateways appear in the registry, ranked by P2C
    let deadline = Instant::now() + Duration::from_secs(10);
    while gateways(http1).len() < 2 {
        assert!(Instant::now() < deadline, "gateways did not register");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(gateways(http2).into_iter().collect::<BTreeSet<_>>(), [ws1, ws2].into_iter().collect());

    // names unique per run: the engines may outlive one test run
    let (a, b) = (format!("{prefix}-alice"), format!("{prefix}-bob"));
    let (a, b) = (a.as_str(), b.as_str());
    register(http1, a);
    register(http2, b);
    let mut alice = Client::login(http1, ws1, a, "a1");
    let mut bob = Client::login(http2, ws2, b, "b1");
    alice.ok("friend.request", json!({ "to": b }));
    assert_eq!(bob.push("friend.request")["from"], a, "push crosses gateways");
    bob.ok("friend.accept", json!({ "from": a }));
    assert_eq!(alice.push("friend.accepted")["user"], b);

    let conv = &format!("d:{a}:{b}");
    let mut acked: BTreeSet<u64> = BTreeSet::new();
    let mut bob_got: BTreeSet<u64> = BTreeSet::new();
    for i in 0..20 {
        let r = send_retrying(&mut alice, b, &format!("a{i}"), Duration::from_secs(30));
        let want = r["seq"].as_u64().unwrap();
        acked.insert(want);
        // Acked as a client does. On a loaded machine a re-push (1 s here) of an earlier push
        // can still come before its ack lands: a client takes it as a duplicate.
        loop {
            let seq = bob.push("msg")["msg"]["seq"].as_u64().unwrap();
            assert!(seq <= want, "#{seq} pushed before it was sent");
            bob_got.insert(seq);
            bob.ok("ack", json!({"conv": conv, "seq": seq}));
            if seq == want {
                break;
            }
        }
    }
    assert_eq!(bob_got, acked, "every message pushed across gateways");

    // a group across gateways: created on one logic instance, written
    // through the other, read back from both
    let g = alice.ok("group.create", json!({"name": "ops", "members": [b]}));
    let (group, gconv) = (g["group"].as_str().unwrap().to_string(), g["conv"].as_str().unwrap().to_string());
    assert_eq!(bob.push("group.joined")["group"], group.as_str());
    let gm = bob.ok("send", json!({"group": group, "cmid": "g1", "type": "text", "body": "to the group"}));
    assert_eq!(gm["seq"], 1);
    assert_eq!(alice.push("msg")["msg"]["conv"], gconv.as_str());
    alice.ok("ack", json!({"conv": gconv, "seq": 1}));
    alice.ok("read", json!({"conv": gconv, "seq": 1}));
    assert_eq!(bob.push("read")["user"], a);
    bob.ok("recall", json!({"conv": gconv, "mid": gm["mid"]}));
    assert_eq!(alice.push("recall")["mid"], gm["mid"]);
    let h = alice.ok("history", json!({ "conv": gconv }));
    assert_eq!(h["msgs"][0]["type"], "recalled", "recall visible at once in the cluster");
    let convs = bob.ok("convs", json!({}));
    assert_eq!(convs["convs"].as_array().unwrap().len(), 2);

    // an edit, a reaction and a pin in the group, each the next seq, pushed across gateways and
    // folded by history
    let gm2 = bob.ok("send", json!({"group": group, "cmid": "g2", "type": "text", "body": "draft"}));
    let take = |c: &mut Client, kind: &str| {
        let m = c.push("msg")["msg"].clone();
        assert_eq!(m["type"], kind, "{m}");
        c.ok("ack", json!({"conv": m["conv"], "seq": m["seq"]}));
    };
    take(&mut alice, "text");
    bob.ok("edit", json!({"conv": gconv, "mid": gm2["mid"], "cmid": "ge1", "text": "final"}));
    take(&mut alice, "edit");
    alice.ok("react", json!({"conv": gconv, "mid": gm2["mid"], "cmid": "gr1", "emoji": "👍"}));
    take(&mut bob, "reaction");
    bob.err("pin", json!({"conv": gconv, "mid": gm2["mid"], "cmid": "gp0"}), "forbidden");
    let pin = alice.ok("pin", json!({"conv": gconv, "mid": gm2["mid"], "cmid": "gp1"}));
    assert_eq!(pin["seq"], 5);
    take(&mut bob, "pin");
    let h = bob.ok("history", json!({"conv": gconv, "fold": true}));
    let folded: Vec<Value> = h["msgs"].as_array().unwrap().clone();
    assert_eq!(folded.len(), 2, "two messages, three events folded in: {h}");
    assert_eq!(
        (folded[0]["body"].clone(), folded[0]["reactions"].clone(), folded[0]["pinned"].clone()),
        (json!("final"), json!({"👍": 1}), json!(true))
    );
    assert_eq!(folded[1]["type"], "recalled");

    // a reply with a mention crosses gateways with its quote; once the persist worker stored it,
    // the mention flags alice's `convs` entry and search (PostgreSQL) finds words of both
    // languages, the edited message by its new text only
    let reply = json!({"group": group, "cmid": "g3", "type": "text", "body": "see 明天的计划",
                       "reply_to": gm2["mid"], "mentions": [a]});
    let sent = bob.ok("send", reply);
    let m = alice.push("msg")["msg"].clone();
    assert_eq!((m["reply_to"]["mid"].clone(), m["mentions"].clone()), (gm2["mid"].clone(), json!([a])));
    alice.ok("ack", json!({"conv": m["conv"], "seq": m["seq"]}));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let convs = alice.ok("convs", json!({}));
        let entry = convs["convs"].as_array().unwrap().iter().find(|e| e["conv"] == gconv.as_str()).cloned();
        let zh = alice.ok("search", json!({"q": "明天"}));
        let fin = bob.ok("search", json!({"q": "final", "conv": gconv}));
        let draft = bob.ok("search", json!({"q": "draft"}));
        let done = entry.is_some_and(|e| e["mentioned"] == true && e["mention_seq"] == sent["seq"])
            && zh["results"].as_array().unwrap().len() == 1
            && zh["results"][0]["mid"] == sent["mid"]
            && fin["results"][0]["text"] == "final"
            && draft["results"].as_array().unwrap().is_empty();
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "mention and search not seen: {zh} {fin} {draft}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // a push token and a mute kept in PostgreSQL, seen through the other logic instance
    alice.ok("push.register", json!({"platform": "webpush", "token": format!("{prefix}-wp")}));
    let until = switchboard_storage::now_ms() + 3_600_000;
    alice.ok("mute", json!({"conv": gconv, "until": until}));
    let mut alice2 = Client::login(http2, ws2, a, "a2");
    let convs = alice2.ok("convs", json!({}));
    let entry = convs["convs"].as_array().unwrap().iter().find(|e| e["conv"] == gconv.as_str()).unwrap().clone();
    assert_eq!((entry["muted"].clone(), entry["muted_until"].clone()), (json!(true), json!(until)));
    alice2.ok("unmute", json!({"conv": gconv}));
    let convs = alice.ok("convs", json!({}));
    assert!(convs["convs"].as_array().unwrap().iter().all(|e| e.get("muted").is_none()));
    alice2.close();

    // a file uploaded through one logic instance (stored in PostgreSQL), sent to the group,
    // downloaded by a member through the other; an outsider is refused
    let token = |http, user: &str| login(http, user, "files")["access_token"].as_str().unwrap().to_string();
    let (ta, tb) = (token(http1, a), token(http2, b));
    let png: Vec<u8> = b"\x89PNG\r\n\x1a\n".iter().copied().chain((0..700_000u32).map(|i| (i % 251) as u8)).collect();
    let auth = format!("Bearer {ta}");
    let (status, _, up) = http_raw(
        http1,
        "POST",
        "/v1/files?name=map.png",
        &[("Authorization", &auth), ("Content-Type", "image/png")],
        &png,
    );
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&up));
    let up: Value = serde_json::from_slice(&up).unwrap();
    let url = up["url"].as_str().unwrap().to_string();
    let media = json!({"url": url, "name": "map.png", "size": png.len(), "mime": "image/png"});
    alice.ok("send", json!({"group": group, "cmid": "gf1", "type": "image", "body": media}));
    take(&mut bob, "image");
    let (status, headers, got) = http_raw(http2, "GET", &url, &[("Authorization", &format!("Bearer {tb}"))], b"");
    assert_eq!((status, headers["content-type"].as_str(), got == png), (200, "image/png", true));
    let outsider = format!("{prefix}-eve");
    register(http2, &outsider);
    let te = token(http2, &outsider);
    assert_eq!(http_raw(http2, "GET", &url, &[("Authorization", &format!("Bearer {te}"))], b"").0, 403);

    // kill -9 alice's gateway; bob keeps sending while she is away
    gw1.kill9();
    for i in 0..10 {
        let r = send_retrying(&mut bob, a, &format!("b{i}"), Duration::from_secs(30));
        acked.insert(r["seq"].as_u64().unwrap());
    }
    // she reconnects through /v1/gateways (the dead one drops out of the registry)
    let deadline = Instant::now() + Duration::from_secs(15);
    let ws = loop {
        let list = gateways(http2);
        if list == vec![ws2] {
            break list[0];
        }
        assert!(Instant::now() < deadline, "dead gateway still listed: {list:?}");
        std::thread::sleep(Duration::from_millis(300));
    };
    let mut alice = Client::login(http2, ws, a, "a1");
    let mut alice_got = BTreeSet::new();
    drain_msgs(&mut alice, conv, &mut alice_got, Duration::from_secs(10));
    assert_eq!(alice_got, acked, "sync fills every gap after the gateway crash");

    // kill -9 one logic instance mid-traffic: retries with the same cmid
    // succeed exactly once
    let mut logic1 = Some(logic1);
    for i in 0..30 {
        if i == 10 {
            logic1.take().unwrap().kill9();
        }
        let cmid = format!("c{i}");
        let r = send_retrying(&mut alice, b, &cmid, Duration::from_secs(30));
        let again = send_retrying(&mut alice, b, &cmid, Duration::from_secs(30));
        assert_eq!(again["seq"], r["seq"], "a resent cmid is the same message");
        acked.insert(r["seq"].as_u64().unwrap());
    }

    // restart the persist worker while sends go on
    std::mem::replace(&mut persist, Proc::placeholder()).term();
    for i in 0..10 {
        let r = send_retrying(&mut bob, a, &format!("p{i}"), Duration::from_secs(30));
        acked.insert(r["seq"].as_u64().unwrap());
    }
    persist = spawn("persist", &[]);

    let last = *acked.iter().next_back().unwrap();
    assert_eq!(acked, (1..=last).collect(), "seqs are gap-free and never reused");
    drain_msgs(&mut bob, conv, &mut bob_got, Duration::from_secs(10));
    assert_eq!(bob_got, acked, "received after dedupe = acknowledged");

    // the durable store ends with every message exactly once
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stored = rt.block_on(async {
        let pg = store.messages(e, &prefix).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let msgs = pg.range(conv, 0, 10_000).await.unwrap();
            if msgs.len() as u64 >= last || Instant::now() > deadline {
                return msgs;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let seqs: Vec<u64> = stored.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=last).collect::<Vec<_>>(), "stored = acknowledged, each once");
    let cmids: BTreeSet<&str> = stored.iter().map(|m| m.cmid.as_str()).collect();
    assert_eq!(cmids.len() as u64, last, "no cmid stored twice");
    let group_stored = rt.block_on(async {
        let pg = store.messages(e, &prefix).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let msgs = pg.range(&gconv, 0, 10).await.unwrap();
            if msgs.len() >= 7 || Instant::now() > deadline {
                return msgs;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let kinds: Vec<&str> = group_stored.iter().map(|m| m.kind.as_str()).collect();
    assert_eq!(
        kinds,
        ["recalled", "text", "edit", "reaction", "pin", "text", "image"],
        "the recall, the events, the reply and the file message reached the durable store"
    );
    println!("cluster counts: acknowledged={} stored={} received={}", acked.len(), stored.len(), bob_got.len());
    // The surviving logic instance timed the broker's acknowledgements of what it produced.
    assert!(metric(http2, "switchboard_kafka_produce_seconds_count") > 0, "no produce acknowledgement timed");
    persist.term();
    drop(gw2);
    drop(logic2);
}

/// SIGKILL of logic instances, four times, while several devices send
/// into one conversation, so that sends are cut at any point (seq reserved,
/// message published, not yet marked done); the gateway retries a call cut
/// off that way on another instance, and clients retry `unavailable` with
/// the same cmid. Every send ends in `send.ok`, the acknowledged seqs are
/// distinct, no reservation stays pending, and PostgreSQL ends with seqs
/// 1..=n without a hole: each acknowledged message at its seq, any other
/// seq a void.
#[test]
fn logic_killed_mid_send_leaves_no_hole() {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    let Some(e) = engines() else { return };
    let prefix = format!("ck{:08x}", rand::random::<u32>());
    let fast = ["--user-rate", "0", "--ip-rate", "0", "--void-after-ms", "3000"];
    let mut logics = vec![Proc::spawn("logic", &e, &prefix, &fast), Proc::spawn("logic", &e, &prefix, &fast)];
    let http = logics[1].addr("http://");
    let logic_urls = format!("http://{},http://{}", logics[0].addr("grpc "), logics[1].addr("grpc "));
    let gw = Proc::spawn("gateway", &e, &prefix, &["--logic-url", &logic_urls]);
    let ws = gw.addr("ws://");
    let persist = Proc::spawn("persist", &e, &prefix, &[]);

    let (a, b) = (format!("{prefix}-alice"), format!("{prefix}-bob"));
    register(http, &a);
    register(http, &b);
    let mut alice = Client::login(http, ws, &a, "a0");
    let mut bob = Client::login(http, ws, &b, "b0");
    befriend(&mut alice, &mut bob, &b, &a);
    alice.close();
    bob.close();

    const DEVICES: usize = 8;
    let (sent, stop) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
    let senders: Vec<_> = (0..DEVICES)
        .map(|d| {
            let (a, b, sent, stop) = (a.clone(), b.clone(), sent.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut c = Client::login(http, ws, &a, &format!("a{}", d + 1));
                let (mut acked, mut retries) = (Vec::new(), 0);
                for i in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let cmid = format!("d{d}-{i}");
                    let deadline = Instant::now() + Duration::from_secs(30);
                    let r = loop {
                        let r = c.call("send", json!({"to": b, "cmid": cmid, "type": "text", "body": cmid}));
                        if r["op"] == "send.ok" {
                            break r;
                        }
                        assert_eq!(r["code"], "unavailable", "{r}");
                        assert!(Instant::now() < deadline, "send {cmid} kept failing: {r}");
                        retries += 1;
                        std::thread::sleep(Duration::from_millis(100));
                    };
                    acked.push((r["seq"].as_u64().unwrap(), r["mid"].as_str().unwrap().to_string(), cmid));
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                (acked, retries)
            })
        })
        .collect();

    // kill the oldest instance mid-traffic and start a replacement, three
    // times; the gateway learns of each replacement from the registry
    for round in 0..4 {
        let (target, deadline) = (sent.load(Ordering::Relaxed) + 40, Instant::now() + Duration::from_secs(60));
        while sent.load(Ordering::Relaxed) < target {
            assert!(Instant::now() < deadline, "sends stalled in round {round}");
            std::thread::sleep(Duration::from_millis(2));
        }
        logics.remove(0).kill9();
        logics.push(Proc::spawn("logic", &e, &prefix, &fast));
        std::thread::sleep(Duration::from_millis(1500));
    }
    stop.store(true, Ordering::Relaxed);

    let (mut acked, mut retries): (BTreeMap<u64, (String, String)>, usize) = (BTreeMap::new(), 0);
    for s in senders {
        let (sent, r) = s.join().expect("sender thread");
        retries += r;
        for (seq, mid, cmid) in sent {
            assert!(acked.insert(seq, (mid, cmid)).is_none(), "seq {seq} acknowledged twice");
        }
    }
    let last = *acked.keys().next_back().unwrap();

    let conv = format!("d:{a}:{b}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (stored, pending) = rt.block_on(async {
        use switchboard_storage::MessageStore;
        let pg = switchboard_storage::postgres::PgStore::connect(&e.pg, 2).await.unwrap();
        let redis = switchboard_storage::redis::RedisStore::connect(&e.redis, &format!("{prefix}:")).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let msgs = pg.range(&conv, 0, 100_000).await.unwrap();
            let pending = redis.pending().await.unwrap();
            if (msgs.len() as u64 >= last && pending == 0) || Instant::now() > deadline {
                return (msgs, pending);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    assert_eq!(pending, 0, "every reserved seq was completed or voided");
    let seqs: Vec<u64> = stored.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=last).collect::<Vec<_>>(), "stored gapless");
    let mut voids = 0;
    for m in &stored {
        match acked.get(&m.seq) {
            Some((mid, cmid)) => assert_eq!((&m.mid, &m.cmid), (mid, cmid), "seq {} stored as acknowledged", m.seq),
            None => {
                assert_eq!(m.kind, "void", "seq {} was never acknowledged: {m:?}", m.seq);
                voids += 1;
            }
        }
    }
    println!("kill counts: acknowledged={} stored={} voids={voids} retries={retries}", acked.len(), stored.len());
    drop((gw, persist, logics));
}
