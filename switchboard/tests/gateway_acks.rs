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
        },
    )
    .await;
}
