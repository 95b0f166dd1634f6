//! End-to-end tests of the binary transports: raw length-prefixed TCP and WebSocket
//! `sb.bin.v1`, against a fake Logic gRPC server that speaks canonical JSON.

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;
use prost::Message as _;
use serde_json::{json, Value};
use switchboard_gateway::{Gateway, GatewayConfig};
use switchboard_proto::internal::Delivery;
use switchboard_proto::v1::{body::Kind, Body, Frame};
use tungstenite::Message;

/// Logic's `Handle`: `send` and `presence` get replies with extra fields to convert.
fn reply(v: &Value) -> Value {
    match v["op"].as_str().unwrap_or("?") {
        "send" => {
            json!({"op": "send.ok", "rid": v["rid"], "conv": format!("d:alice:{}", v["to"].as_str().unwrap_or("")),
                         "mid": "m1", "seq": 1, "ts": 5, "ignored_extra": true})
        }
        "presence" => json!({"op": "presence.ok", "rid": v["rid"], "online": {"bob": true, "carol": false}}),
        _ => ok_reply(v),
    }
}

async fn start_logic() -> (FakeLogic, String) {
    let server = serve(FakeLogic::with_handler(reply)).await;
    (server.logic, server.url)
}

async fn start_gateway(logic_url: &str) -> Gateway {
    common::start_gateway(GatewayConfig {
        tcp_addr: Some(any_port()),
        shards: 2,
        max_frame_bytes: 1024,
        ..config(&[logic_url])
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_tcp_end_to_end() {
    let (logic, logic_url) = start_logic().await;
    let gw = start_gateway(&logic_url).await;
    let tcp = gw.tcp_addr().unwrap();
    assert_ne!(tcp.port(), 0);

    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let (pushed_tx, pushed_rx) = std::sync::mpsc::channel::<()>();
    let client = tokio::task::spawn_blocking(move || {
        let mut s = tcp_connect(tcp);
        // before auth: ping answered, other ops unauthorized
        tcp_send(&mut s, &frame("ping", 9));
        let r = tcp_recv(&mut s).unwrap();
        assert_eq!((r.op.as_str(), r.rid), ("ping.ok", Some(9)));
        tcp_send(&mut s, &frame("send", 2));
        let r = tcp_recv(&mut s).unwrap();
        assert_eq!((r.op.as_str(), r.code.as_str(), r.rid), ("error", "unauthorized", Some(2)));
        tcp_auth(&mut s);
        // a forwarded op: logic sees canonical JSON, the reply comes back as a Frame
        let send = Frame {
            to: "bob".into(),
            cmid: "c1".into(),
            r#type: "text".into(),
            body: Some(Body { kind: Some(Kind::Text("hi".into())) }),
            ..frame("send", 3)
        };
        tcp_send(&mut s, &send);
        let r = tcp_recv(&mut s).unwrap();
        assert_eq!(r.op, "send.ok", "{r:?}");
        assert_eq!(r.rid, Some(3));
        assert_eq!(r.conv, "d:alice:bob");
        assert_eq!((r.mid.as_str(), r.seq, r.ts), ("m1", Some(1), Some(5)));
        // presence reply: `online` object -> online_map
        tcp_send(&mut s, &Frame { users: vec!["bob".into(), "carol".into()], ..frame("presence", 4) });
        let r = tcp_recv(&mut s).unwrap();
        assert_eq!(r.online_map.get("bob"), Some(&true));
        assert_eq!(r.online_map.get("carol"), Some(&false));
        // garbage -> bad_request, connection stays open
        tcp_write_raw(&mut s, &[0xff; 8]);
        let r = tcp_recv(&mut s).unwrap();
        assert_eq!((r.op.as_str(), r.code.as_str()), ("error", "bad_request"), "{r:?}");
        tcp_send(&mut s, &frame("ping", 5));
        assert_eq!(tcp_recv(&mut s).unwrap().op, "ping.ok");
        // several frames in one write, answered in order
        let mut batch = Vec::new();
        for rid in 10..13 {
            let p = frame("ping", rid).encode_to_vec();
            batch.extend_from_slice(&(p.len() as u32).to_be_bytes());
            batch.extend_from_slice(&p);
        }
        s.write_all(&batch).unwrap();
        for rid in 10..13 {
            assert_eq!(tcp_recv(&mut s).unwrap().rid, Some(rid));
        }
        ready_tx.send(()).unwrap();
        // a push sent through the Push RPC
        let r = tcp_recv(&mut s).unwrap();
        assert_eq!(r.op, "msg", "{r:?}");
        let m = r.msg.unwrap();
        assert_eq!((m.conv.as_str(), m.seq, m.from.as_str(), m.mid.as_str()), ("d:alice:bob", 7, "bob", "m7"));
        assert_eq!(m.body.unwrap().kind, Some(Kind::Text("yo".into())));
        // it is re-pushed until acked; acking goes through logic
        tcp_send(&mut s, &Frame { conv: "d:alice:bob".into(), seq: Some(7), ..frame("ack", 6) });
        loop {
            let r = tcp_recv(&mut s).unwrap();
            if r.op == "ack.ok" {
                break;
            }
            assert_eq!(r.op, "msg");
        }
        pushed_tx.send(()).unwrap();

        // another connection: a length above the limit -> too_large, then close
        let mut t = tcp_connect(tcp);
        t.write_all(&1025u32.to_be_bytes()).unwrap();
        let r = tcp_recv(&mut t).unwrap();
        assert_eq!((r.op.as_str(), r.code.as_str()), ("error", "too_large"), "{r:?}");
        assert!(tcp_recv(&mut t).is_none(), "expected close after too_large");
        s
    });

    blocking(move || ready_rx.recv().unwrap()).await;
    let conn_id = logic.connected_conn_id(0).await;
    let frames = logic.frame_values();
    assert_eq!(
        frames[0],
        json!({"op": "send", "rid": 3, "to": "bob", "cmid": "c1", "type": "text", "body": "hi"}),
        "logic receives canonical JSON"
    );
    let mut push = Pusher::connect(&gw).await;
    let msg = json!({"op": "msg", "msg": {"conv": "d:alice:bob", "mid": "m7", "seq": 7, "from": "bob", "cmid": "x",
                     "type": "text", "body": "yo", "ts": 11}});
    let gone = push
        .push(vec![Delivery {
            targets: to(conn_id),
            frame: msg.to_string().into_bytes().into(),
            conv: "d:alice:bob".into(),
            seq: 7,
            close: false,
        }])
        .await;
    assert!(gone.is_empty());
    blocking(move || pushed_rx.recv().unwrap()).await;
    let mut s = client.await.unwrap();

    // drain on shutdown reaches raw TCP clients too
    gw.shutdown().await;
    blocking(move || {
        assert_eq!(tcp_recv(&mut s).unwrap().op, "drain");
        assert!(tcp_recv(&mut s).is_none());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_tcp_auth_timeout_and_disabled_listener() {
    let (_logic, logic_url) = start_logic().await;
    let gw = common::start_gateway(GatewayConfig {
        tcp_addr: Some(any_port()),
        auth_timeout: Duration::from_millis(300),
        ..config(&[&logic_url])
    })
    .await;
    let tcp = gw.tcp_addr().unwrap();
    blocking(move || {
        let mut s = tcp_connect(tcp);
        let r = tcp_recv(&mut s).unwrap();
        assert_eq!(r.code, "auth_timeout");
        assert!(tcp_recv(&mut s).is_none());
    })
    .await;
    gw.shutdown().await;

    let gw = common::start_gateway(GatewayConfig { tcp_addr: None, ..config(&[&logic_url]) }).await;
    assert_eq!(gw.tcp_addr(), None);
    gw.shutdown().await;
}

// ------------------------------------------------------------------ WebSocket sb.bin.v1

fn ws_send(ws: &mut Ws, f: &Frame) {
    ws.send(Message::Binary(f.encode_to_vec().into())).unwrap();
}

fn ws_recv(ws: &mut Ws) -> Frame {
    loop {
        match ws.read().unwrap() {
            Message::Binary(b) => return Frame::decode(b.as_ref()).unwrap(),
            Message::Text(t) => panic!("text frame on a binary connection: {t}"),
            _ => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_binary_subprotocol() {
    let (logic, logic_url) = start_logic().await;
    let gw = start_gateway(&logic_url).await;
    let addr = gw.ws_addr();
    blocking(move || {
        // the client's order of preference decides
        let (mut ws, chosen) = ws_connect(addr, "sb.json.v1, sb.bin.v1");
        assert_eq!(chosen, "sb.json.v1");
        ws.send(Message::text(r#"{"op":"ping","rid":1}"#)).unwrap();
        match ws.read().unwrap() {
            Message::Text(t) => assert!(t.as_str().contains("ping.ok")),
            other => panic!("{other:?}"),
        }
        let (_, chosen) = ws_connect(addr, "sb.xml.v1, sb.bin.v1, sb.json.v1");
        assert_eq!(chosen, "sb.bin.v1");

        let (mut ws, chosen) = ws_connect(addr, "sb.bin.v1");
        assert_eq!(chosen, "sb.bin.v1");
        ws_send(&mut ws, &frame("ping", 2));
        let r = ws_recv(&mut ws);
        assert_eq!((r.op.as_str(), r.rid), ("ping.ok", Some(2)));
        ws_send(&mut ws, &Frame { token: "good".into(), ..frame("auth", 3) });
        let r = ws_recv(&mut ws);
        assert_eq!((r.op.as_str(), r.user.as_str(), r.session.as_str()), ("auth.ok", "alice", "s1"));
        let body = json!({"url": "https://x/y.png", "name": "y.png", "size": 3, "mime": "image/png"});
        let send = Frame {
            to: "carol".into(),
            cmid: "c9".into(),
            r#type: "image".into(),
            body: Some(Body { kind: Some(Kind::Json(body.to_string())) }),
            ..frame("send", 4)
        };
        ws_send(&mut ws, &send);
        let r = ws_recv(&mut ws);
        assert_eq!((r.op.as_str(), r.rid, r.conv.as_str(), r.seq), ("send.ok", Some(4), "d:alice:carol", Some(1)));
        // text frame on a binary connection -> bad_request, stays open
        ws.send(Message::text(r#"{"op":"ping","rid":5}"#)).unwrap();
        let r = ws_recv(&mut ws);
        assert_eq!((r.op.as_str(), r.code.as_str()), ("error", "bad_request"));
        // undecodable binary frame -> bad_request, stays open
        ws.send(Message::Binary(vec![0xffu8; 8].into())).unwrap();
        let r = ws_recv(&mut ws);
        assert_eq!((r.op.as_str(), r.code.as_str()), ("error", "bad_request"));
        // a frame without op -> bad_request with its rid
        ws_send(&mut ws, &Frame { rid: Some(6), ..Default::default() });
        let r = ws_recv(&mut ws);
        assert_eq!((r.code.as_str(), r.rid), ("bad_request", Some(6)));
        ws_send(&mut ws, &frame("ping", 7));
        assert_eq!(ws_recv(&mut ws).op, "ping.ok");
    })
    .await;
    let frames = logic.frame_values();
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0]["body"]["mime"], "image/png", "JSON body arrives as a JSON object");
    gw.shutdown().await;
}
