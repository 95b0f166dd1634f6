//! End to end through real sockets: accounts, friends, 1:1 chat with push,
//! ack, re-push, offline sync, history and restart on the same data dir.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn seqs(msgs: &Value) -> Vec<u64> {
    msgs.as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_chat_survives_offline_and_restart() {
    let dir = temp_dir("chat");
    let node = start(&dir).await;
    let (http_addr, ws) = (node.http_addr(), node.ws_addr());

    let (mid1, conv) = blocking(move || {
        for u in ["alice", "bob", "carol"] {
            register(http_addr, u);
        }
        let mut alice = Client::login(http_addr, ws, "alice", "a-phone");
        let mut bob = Client::login(http_addr, ws, "bob", "b-phone");

        // befriend
        alice.ok("friend.request", json!({"to": "bob", "note": "hi bob"}));
        let p = bob.push("friend.request");
        assert_eq!((p["from"].as_str(), p["note"].as_str()), (Some("alice"), Some("hi bob")));
        let list = bob.ok("friend.list", json!({}));
        assert_eq!(list["pending"], json!([{"from": "alice", "note": "hi bob"}]));
        assert_eq!(list["friends"], json!([]));
        bob.ok("friend.accept", json!({"from": "alice"}));
        assert_eq!(alice.push("friend.accepted")["user"], "bob");
        let list = alice.ok("friend.list", json!({}));
        assert_eq!(list["friends"], json!([{"user": "bob", "nickname": "bob", "online": true}]));
        alice.err("friend.request", json!({"to": "bob"}), "already_friends");
        alice.err("friend.request", json!({"to": "nobody"}), "no_such_user");

        // send, push, ack
        let sent = alice.ok("send", json!({"to": "bob", "cmid": "c1", "type": "text", "body": "hello"}));
        assert_eq!(sent["conv"], "d:alice:bob");
        assert_eq!(sent["seq"], 1);
        assert!(sent["ts"].as_u64().unwrap() > 0);
        let pushed = bob.push("msg")["msg"].clone();
        assert_eq!(pushed["mid"], sent["mid"]);
        assert_eq!(pushed["from"], "alice");
        assert_eq!(pushed["cmid"], "c1");
        assert_eq!(pushed["type"], "text");
        assert_eq!(pushed["body"], "hello");
        bob.ok("ack", json!({"conv": "d:alice:bob", "seq": 1}));

        // same cmid: same message, no second push
        let again = alice.ok("send", json!({"to": "bob", "cmid": "c1", "type": "text", "body": "hello"}));
        assert_eq!((again["mid"].clone(), again["seq"].clone()), (sent["mid"].clone(), sent["seq"].clone()));
        bob.quiet(Duration::from_millis(900));

        // media body
        let img = json!({"url": "https://cdn.example/cat.png", "name": "cat.png", "size": 1234, "mime": "image/png"});
        let s2 = alice.ok("send", json!({"to": "bob", "cmid": "c2", "type": "image", "body": img}));
        assert_eq!(s2["seq"], 2);
        assert_eq!(bob.push("msg")["msg"]["body"], img);
        bob.ok("ack", json!({"conv": "d:alice:bob", "seq": 2}));

        // custom bodies are any JSON value
        let poll = json!({"kind": "poll", "options": ["a", "b"]});
        let s3 = alice.ok("send", json!({"to": "bob", "cmid": "c2b", "type": "custom", "body": poll}));
        let got = bob.push("msg")["msg"].clone();
        assert_eq!((got["type"].as_str(), got["body"].clone()), (Some("custom"), poll));
        bob.ok("ack", json!({"conv": "d:alice:bob", "seq": s3["seq"]}));

        // strangers and outsiders
        let mut carol = Client::login(http_addr, ws, "carol", "c-phone");
        carol.ok("friend.request", json!({"to": "alice", "note": "me?"}));
        assert_eq!(alice.push("friend.request")["from"], "carol");
        alice.ok("friend.reject", json!({"from": "carol"}));
        alice.err("friend.accept", json!({"from": "carol"}), "bad_request");
        alice.err("friend.reject", json!({"from": "ghost"}), "no_such_user");
        assert_eq!(alice.ok("friend.list", json!({}))["pending"], json!([]));
        carol.err("send", json!({"to": "alice", "cmid": "x", "type": "text", "body": "hey"}), "not_friends");
        carol.err("send", json!({"to": "ghost", "cmid": "x", "type": "text", "body": "hey"}), "no_such_user");
        carol.err("history", json!({"conv": "d:alice:bob"}), "forbidden");
        carol.err("ack", json!({"conv": "d:alice:bob", "seq": 9}), "forbidden");
        let s = carol.ok("sync", json!({"since": {"d:alice:bob": 0}}));
        assert_eq!(s["msgs"], json!([]), "sync never leaks others' conversations");

        // offline: bob leaves, alice sends three, bob comes back and syncs
        bob.close();
        for i in 4..=6 {
            let r = alice
                .ok("send", json!({"to": "bob", "cmid": format!("c{i}"), "type": "text", "body": format!("m{i}")}));
            assert_eq!(r["seq"], i);
        }
        let mut bob = Client::login(http_addr, ws, "bob", "b-phone");
        let s = bob.ok("sync", json!({"since": {}}));
        assert_eq!(seqs(&s["msgs"]), vec![4, 5, 6], "resumes after this device's ack");
        assert_eq!(s["more"], false);
        let s = bob.ok("sync", json!({"since": {"d:alice:bob": 0}, "limit": 2}));
        assert_eq!(seqs(&s["msgs"]), vec![1, 2]);
        assert_eq!(s["more"], true);
        bob.ok("ack", json!({"conv": "d:alice:bob", "seq": 6}));

        // a fresh device of bob has acked nothing: it gets everything
        let mut bob_laptop = Client::login(http_addr, ws, "bob", "b-laptop");
        assert_eq!(seqs(&bob_laptop.ok("sync", json!({}))["msgs"]), vec![1, 2, 3, 4, 5, 6]);

        // history: newest first, paging by before_seq
        let h = alice.ok("history", json!({"conv": "d:alice:bob", "limit": 2}));
        assert_eq!(seqs(&h["msgs"]), vec![6, 5]);
        let h = alice.ok("history", json!({"conv": "d:alice:bob", "before_seq": 4}));
        assert_eq!(seqs(&h["msgs"]), vec![3, 2, 1]);

        // both of bob's devices get the next push
        let r = alice.ok("send", json!({"to": "bob", "cmid": "c-both", "type": "text", "body": "both"}));
        assert_eq!(bob.push("msg")["msg"]["seq"], 7);
        assert_eq!(bob_laptop.push("msg")["msg"]["seq"], 7);
        bob.ok("ack", json!({"conv": "d:alice:bob", "seq": 7}));

        // an unacked push comes again; acking stops it
        let again = bob_laptop.push("msg")["msg"].clone();
        assert_eq!(again["mid"], r["mid"], "unacked push is re-sent");
        bob_laptop.ok("ack", json!({"conv": "d:alice:bob", "seq": 7}));
        bob.quiet(Duration::from_millis(1500));
        bob_laptop.quiet(Duration::from_millis(1500));
        (sent["mid"].as_str().unwrap().to_string(), sent["conv"].as_str().unwrap().to_string())
    })
    .await;

    // `/metrics` shows the latency histograms of what just happened: seven sends, each stored
    // and pushed, and every request relayed by the gateway.
    blocking(move || {
        let (st, m) = http(http_addr, "GET", "/metrics", None, None);
        assert_eq!(st, 200);
        let m = m.as_str().unwrap().to_string();
        let count = |series: &str| -> u64 {
            let line = m.lines().find(|l| l.starts_with(series)).unwrap_or_else(|| panic!("{series} missing:\n{m}"));
            // Counts are integers; a sum is written as a float.
            line.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64
        };
        for h in ["switchboard_logic_request_seconds", "switchboard_gateway_logic_call_seconds"] {
            assert!(m.contains(&format!("# TYPE {h} histogram")), "{h} missing:\n{m}");
        }
        assert!(count("switchboard_logic_request_seconds_count{op=\"send\"}") >= 7);
        assert!(count("switchboard_logic_request_seconds_bucket{le=\"+Inf\",op=\"send\"}") >= 7);
        assert!(count("switchboard_logic_store_append_seconds_count") >= 7);
        assert!(count("switchboard_logic_push_batch_seconds_count") >= 1);
        assert!(count("switchboard_gateway_logic_call_seconds_count") >= 7);
        // The embedded store's log took the seven messages (and the friendship's and cursors'
        // records) in fsynced batches, and (a checkpoint every 200 ms by default, 1.5 s of
        // quiet above) committed them.
        assert!(count("switchboard_embedded_log_sync_seconds_count") >= 1);
        assert!(count("switchboard_embedded_log_batch_records_sum") >= 7);
        assert!(count("switchboard_embedded_checkpoint_seconds_count") >= 1);
        // Every send's cmid was new, and the filter of stored cmids (filled at start: the store
        // was empty) knew it: none of them read the cmid index.
        assert!(count("switchboard_embedded_cmid_probe_skipped_total") >= 7);
    })
    .await;

    // restart on the same data dir: everything is still there
    node.stop().await;
    let node = start(&dir).await;
    let (http_addr, ws) = (node.http_addr(), node.ws_addr());
    blocking(move || {
        let mut alice = Client::login(http_addr, ws, "alice", "a-phone");
        let h = alice.ok("history", json!({"conv": conv}));
        assert_eq!(seqs(&h["msgs"]), vec![7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(h["msgs"][6]["mid"], mid1.as_str());
        let list = alice.ok("friend.list", json!({}));
        assert_eq!(list["friends"][0]["user"], "bob");
        let r = alice.ok("send", json!({"to": "bob", "cmid": "c-restart", "type": "text", "body": "after restart"}));
        assert_eq!(r["seq"], 8, "seq continues after a restart, never reused");
        let r = alice.ok("send", json!({"to": "bob", "cmid": "c1", "type": "text", "body": "hello"}));
        assert_eq!(r["mid"], mid1.as_str(), "cmid idempotency survives a restart");
    })
    .await;
    node.stop().await;
    std::fs::remove_dir_all(&dir).ok();
}
