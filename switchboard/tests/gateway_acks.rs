//! Acks the gateway answers itself: an `ack` of a push the connection holds is answered at once
//! and reaches logic's cursor coalesced (a later ack-based `sync` skips what was acked); an ack
//! the gateway cannot vouch for (a conversation never delivered on this connection) still goes
//! to logic, which refuses it.

mod common;

use std::time::{Duration, Instant};

use common::{friends, metric, with_node, Client};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_of_delivered_pushes_are_answered_by_the_gateway_and_reach_logic() {
    with_node(
        "gateway-acks",
        |s| s.ack_flush_ms = Some(50),
        |http_addr, ws| {
            let (mut a, mut b) = friends(http_addr, ws, "gka", "gkb");
            let conv = "d:gka:gkb";
            let mut last = 0;
            for i in 0..3 {
                let sent = a.ok("send", json!({"to": "gkb", "cmid": format!("c{i}"), "type": "text", "body": "hi"}));
                last = sent["seq"].as_u64().unwrap();
                assert_eq!(b.push("msg")["msg"]["seq"], last);
            }
            let local = || metric(http_addr, "switchboard_gateway_acks_local_total");
            let before = local();
            b.ok("ack", json!({"conv": conv, "seq": last}));
            assert_eq!(local(), before + 1, "answered by the gateway");
            // The connection's next request reaches logic after the held ack: sync resumes after it.
            assert_eq!(b.ok("sync", json!({}))["msgs"], json!([]), "a sync right after the ack saw it");

            // Not delivered here: logic answers, and refuses a conversation the caller is not in.
            b.err("ack", json!({"conv": "d:gka:gkz", "seq": 1}), "forbidden");
            b.ok("ack", json!({"conv": conv, "seq": last}));
            assert_eq!(local(), before + 1, "nothing held: relayed");

            // Logic got the cursor: the same device, reconnected, resumes after what it acked.
            b.close();
            let mut b = Client::login(http_addr, ws, "gkb", "b1");
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let r = b.ok("sync", json!({}));
                if r["msgs"].as_array().unwrap().is_empty() {
                    break;
                }
                assert!(Instant::now() < deadline, "the gateway's ack never reached logic: {r}");
                std::thread::sleep(Duration::from_millis(50));
            }
            // And a new message after it is synced normally.
            a.ok("send", json!({"to": "gkb", "cmid": "c9", "type": "text", "body": "later"}));
            assert_eq!(b.push("msg")["msg"]["body"], "later");

            // Queue depths on /metrics: cursors waiting for their flush, push bytes per gateway.
            metric(http_addr, "switchboard_logic_cursors_pending");
            let (_, text) = common::http(http_addr, "GET", "/metrics", None, None);
            let text = text.as_str().unwrap_or_default().to_owned();
            assert!(text.lines().any(|l| l.starts_with("switchboard_logic_push_queue_bytes{gateway=")), "{text}");
        },
    )
    .await;
}

/// A `quiet` ack is not answered when it succeeds, whether the gateway vouches for it or logic
/// takes it, and still is when refused; its cursor counts like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_acks_are_answered_only_when_refused() {
    with_node(
        "gateway-quiet-acks",
        |s| s.ack_flush_ms = Some(50),
        |http_addr, ws| {
            let (mut a, mut b) = friends(http_addr, ws, "gqa", "gqb");
            let conv = "d:gqa:gqb";
            let first = a.ok("send", json!({"to": "gqb", "cmid": "q1", "type": "text", "body": "one"}))["seq"].as_u64();
            assert_eq!(b.push("msg")["msg"]["seq"].as_u64(), first);
            let local = || metric(http_addr, "switchboard_gateway_acks_local_total");
            let before = local();
            // Replies on a connection keep request order: an `ack.ok` would come before `ping.ok`.
            let quiet_ack = json!({"op": "ack", "rid": 500, "conv": conv, "seq": first, "quiet": true}).to_string();
            b.send_text(&quiet_ack);
            b.send_text(r#"{"op":"ping","rid":501}"#);
            let next = b.read().unwrap();
            assert_eq!((next["op"].as_str(), next["rid"].as_u64()), (Some("ping.ok"), Some(501)), "{next}");
            assert_eq!(local(), before + 1, "answered (silently) by the gateway");

            // Nothing held any more: logic takes it, and its `ack.ok` is dropped too.
            b.send_text(&quiet_ack);
            b.send_text(r#"{"op":"ping","rid":502}"#);
            let next = b.read().unwrap();
            assert_eq!((next["op"].as_str(), next["rid"].as_u64()), (Some("ping.ok"), Some(502)), "{next}");
            assert_eq!(local(), before + 1, "relayed");

            // A refusal is answered.
            b.send_text(r#"{"op":"ack","rid":503,"conv":"d:gqa:gqz","seq":1,"quiet":true}"#);
            let refused = b.read().unwrap();
            assert_eq!(
                (refused["code"].as_str(), refused["rid"].as_u64()),
                (Some("forbidden"), Some(503)),
                "{refused}"
            );

            // The quiet ack moved the cursor: sync resumes after it.
            let second =
                a.ok("send", json!({"to": "gqb", "cmid": "q2", "type": "text", "body": "two"}))["seq"].as_u64();
            assert_eq!(b.push("msg")["msg"]["seq"].as_u64(), second);
            let msgs = b.ok("sync", json!({}))["msgs"].clone();
            assert_eq!(msgs.as_array().map(|m| m.len()), Some(1), "{msgs}");
            assert_eq!(msgs[0]["seq"].as_u64(), second);
        },
    )
    .await;
}
