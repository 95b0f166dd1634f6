//! A caller whose socket goes away while the call rings: the callee is told at once with
//! `call.hangup` (reason `gone`) instead of ringing until the ring timeout. End to end through
//! the all-in-one's gateway and logic.

mod common;

use common::{friends, with_node};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callee_hears_when_the_ringing_caller_is_gone() {
    // A ring timeout far beyond the test: only the caller's disconnect can end the call.
    with_node(
        "call-gone",
        |s| s.ring_timeout_ms = Some(600_000),
        |http_addr, ws| {
            let (mut caller, mut callee) = friends(http_addr, ws, "cgo", "cge");
            caller.ok("call.offer", json!({"to": "cge", "call_id": "ring1", "sdp": "v=0"}));
            assert_eq!(callee.push("call.offer")["call_id"], "ring1");
            caller.close();
            let h = callee.push("call.hangup");
            assert_eq!(
                (h["call_id"].as_str(), h["reason"].as_str(), h["from"].as_str()),
                (Some("ring1"), Some("gone"), Some("cgo"))
            );
        },
    )
    .await;
}
