//! Ring timeout of `call.offer` on the caller's gateway, against a fake Logic gRPC server.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use switchboard_gateway::{Gateway, GatewayConfig};
use switchboard_proto::internal::Delivery;
use switchboard_proto::v1::Frame;

const RING: Duration = Duration::from_millis(300);

/// Logic's `Handle`: refuses offers to `ghost`; replies to rid-less requests too.
fn reply(v: &Value) -> Value {
    let op = v["op"].as_str().unwrap_or("?");
    if op == "call.offer" && v["to"] == "ghost" {
        json!({"op": "error", "rid": v["rid"], "code": "no_such_user", "message": "no such user"})
    } else if v.get("rid").is_some() {
        ok_reply(v)
    } else {
        // a reply the gateway must not hand to the client
        json!({"op": format!("{op}.ok"), "note": "reply to a rid-less request"})
    }
}

async fn start() -> (FakeLogic, Gateway) {
    let server = serve(FakeLogic::with_handler(reply)).await;
    let gw = start_gateway(GatewayConfig {
        tcp_addr: Some(any_port()),
        shards: 2,
        ring_timeout: RING,
        ..config(&[&server.url])
    })
    .await;
    (server.logic, gw)
}

fn offer(ws: &mut Ws, rid: u64, to: &str, call_id: &str) {
    ws_send_json(ws, json!({"op": "call.offer", "rid": rid, "to": to, "call_id": call_id, "sdp": "v=0"}));
}

/// Lets well over one ring timeout pass, then checks that nothing arrived meanwhile: the
/// next frame is the reply to a ping sent now.
fn assert_quiet(ws: &mut Ws) {
    std::thread::sleep(RING * 3);
    ws_send_json(ws, json!({"op": "ping", "rid": 999}));
    let r = ws_read_json(ws);
    assert_eq!((r["op"].as_str(), r["rid"].as_u64()), (Some("ping.ok"), Some(999)), "unexpected frame {r}");
}

fn is_timeout_hangup(v: &Value, call_id: &str) -> bool {
    v["op"] == "call.hangup" && v["call_id"] == call_id && v["reason"] == "timeout"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_offer_times_out() {
    let (logic, gw) = start().await;
    let addr = gw.ws_addr();
    blocking(move || {
        let mut ws = ws_connect_auth(addr);
        let started = Instant::now();
        offer(&mut ws, 2, "bob", "c1");
        let r = ws_read_json(&mut ws);
        assert_eq!((r["op"].as_str(), r["rid"].as_u64()), (Some("call.offer.ok"), Some(2)));
        let r = ws_read_json(&mut ws);
        let elapsed = started.elapsed();
        assert_eq!(r, json!({"op": "call.hangup", "call_id": "c1", "reason": "timeout"}));
        assert!(elapsed >= RING, "fired early: {elapsed:?}");
        assert!(elapsed < RING + Duration::from_secs(1), "fired late: {elapsed:?}");
        // the reply to the gateway's own call.hangup is not handed to the client, and the
        // call times out only once
        assert_quiet(&mut ws);
    })
    .await;
    let (_, hangup) = logic.wait_for("the synthetic call.hangup", |v| v["op"] == "call.hangup").await;
    assert_eq!(hangup, json!({"op": "call.hangup", "to": "bob", "call_id": "c1", "reason": "timeout"}));
    assert_eq!(gw.metrics().call_timeouts(), 1);
    let mut text = String::new();
    gw.metrics().render(&mut text);
    assert!(text.contains("switchboard_gateway_call_timeouts_total 1\n"), "{text}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_offer_does_not_time_out() {
    let (logic, gw) = start().await;
    let addr = gw.ws_addr();
    let (offered_tx, offered_rx) = tokio::sync::oneshot::channel::<()>();
    let (pushed_tx, pushed_rx) = std::sync::mpsc::channel::<()>();
    let client = tokio::task::spawn_blocking(move || {
        let mut ws = ws_connect_auth(addr);
        offer(&mut ws, 2, "bob", "c2");
        assert_eq!(ws_read_json(&mut ws)["op"], "call.offer.ok");
        offered_tx.send(()).unwrap();
        let r = ws_read_json(&mut ws);
        assert_eq!(r["op"], "call.answer", "{r}");
        assert_eq!(r["call_id"], "c2");
        pushed_rx.recv().unwrap();
        assert_quiet(&mut ws);
    });
    offered_rx.await.unwrap();
    let (conn_id, _) = logic.wait_for("the offer", |v| v["op"] == "call.offer").await;
    let gone = Pusher::connect(&gw)
        .await
        .push(vec![Delivery {
            targets: to(conn_id),
            frame: json!({"op": "call.answer", "from": "bob", "call_id": "c2", "sdp": "v=0"})
                .to_string()
                .into_bytes()
                .into(),
            ..Default::default()
        }])
        .await;
    assert!(gone.is_empty());
    pushed_tx.send(()).unwrap();
    client.await.unwrap();
    assert!(!logic.frames().iter().any(|(_, v)| v["op"] == "call.hangup"));
    assert_eq!(gw.metrics().call_timeouts(), 0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hangup_or_refused_offer_cancels_and_other_calls_still_ring() {
    let (logic, gw) = start().await;
    let addr = gw.ws_addr();
    blocking(move || {
        let mut ws = ws_connect_auth(addr);
        // the caller hangs up itself
        offer(&mut ws, 2, "bob", "c3");
        assert_eq!(ws_read_json(&mut ws)["op"], "call.offer.ok");
        ws_send_json(&mut ws, json!({"op": "call.hangup", "rid": 3, "to": "bob", "call_id": "c3"}));
        assert_eq!(ws_read_json(&mut ws)["op"], "call.hangup.ok");
        // an offer logic refuses never rang
        offer(&mut ws, 4, "ghost", "c4");
        assert_eq!(ws_read_json(&mut ws)["code"], "no_such_user");
        // pipelined: offer then hangup before the offer's reply
        offer(&mut ws, 5, "bob", "c5");
        ws_send_json(&mut ws, json!({"op": "call.hangup", "rid": 6, "to": "bob", "call_id": "c5"}));
        assert_eq!(ws_read_json(&mut ws)["rid"], 5);
        assert_eq!(ws_read_json(&mut ws)["rid"], 6);
        assert_quiet(&mut ws);
        // a hangup for some other call id leaves this one ringing
        offer(&mut ws, 7, "carol", "c6");
        ws_send_json(&mut ws, json!({"op": "call.hangup", "rid": 8, "to": "carol", "call_id": "other"}));
        assert_eq!(ws_read_json(&mut ws)["rid"], 7);
        assert_eq!(ws_read_json(&mut ws)["rid"], 8);
        let r = ws_read_json(&mut ws);
        assert!(is_timeout_hangup(&r, "c6"), "{r}");
    })
    .await;
    let (_, hangup) = logic.wait_for("the synthetic call.hangup", |v| v["reason"] == "timeout").await;
    assert_eq!(hangup["to"], "carol");
    assert_eq!(hangup["call_id"], "c6");
    let timeouts: Vec<_> = logic.frames().into_iter().filter(|(_, v)| v["reason"] == "timeout").collect();
    assert_eq!(timeouts.len(), 1, "{timeouts:?}");
    assert_eq!(gw.metrics().call_timeouts(), 1);
    gw.shutdown().await;
}

// ------------------------------------------------------------------ raw TCP (protobuf frames)

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_timeout_over_raw_tcp() {
    let (logic, gw) = start().await;
    let tcp = gw.tcp_addr().unwrap();
    blocking(move || {
        let mut s = tcp_connect(tcp);
        tcp_auth(&mut s);
        let offer = Frame { to: "bob".into(), call_id: "t1".into(), sdp: "v=0".into(), ..frame("call.offer", 2) };
        tcp_send(&mut s, &offer);
        assert_eq!(tcp_recv(&mut s).unwrap().op, "call.offer.ok");
        let r = tcp_recv(&mut s).unwrap();
        assert_eq!((r.op.as_str(), r.call_id.as_str(), r.reason.as_str()), ("call.hangup", "t1", "timeout"));
        assert_eq!(r.rid, None);
    })
    .await;
    let (_, hangup) = logic.wait_for("the synthetic call.hangup", |v| v["op"] == "call.hangup").await;
    assert_eq!(hangup, json!({"op": "call.hangup", "to": "bob", "call_id": "t1", "reason": "timeout"}));
    gw.shutdown().await;
}

/// A caller that disconnects while its offer rings hangs the call up: logic gets a
/// `call.hangup` with reason `gone` for the callee, made on the caller's behalf.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_gone_while_ringing_hangs_up() {
    let (logic, gw) = start().await;
    let addr = gw.ws_addr();
    blocking(move || {
        let mut ws = ws_connect_auth(addr);
        offer(&mut ws, 2, "bob", "c-gone");
        assert_eq!(ws_read_json(&mut ws)["op"], "call.offer.ok");
        drop(ws);
    })
    .await;
    let (_, hangup) =
        logic.wait_for("a hangup with reason gone", |v| v["op"] == "call.hangup" && v["reason"] == "gone").await;
    assert_eq!((hangup["to"].as_str(), hangup["call_id"].as_str()), (Some("bob"), Some("c-gone")));
    assert!(hangup.get("rid").is_none());
    gw.shutdown().await;
}
