//! Ring timeout of `call.offer` on the caller's gateway, against a fake Logic gRPC server.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message as _;
use serde_json::{json, Value};
use switchboard_gateway::{Gateway, GatewayConfig};
use switchboard_proto::internal::{
    gateway_client::GatewayClient,
    logic_server::{Logic, LogicServer},
    AuthReply, AuthRequest, ClientReply, ClientRequest, ConnEvent, Delivery, Empty, PushRequest,
};
use switchboard_proto::v1::Frame;
use tonic::{Request, Response, Status};
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

const RING: Duration = Duration::from_millis(300);

#[derive(Default, Clone)]
struct FakeLogic {
    /// Every frame forwarded through `Handle`, with the sending connection's id.
    frames: Arc<Mutex<Vec<(u64, Value)>>>,
}

impl FakeLogic {
    fn frames(&self) -> Vec<(u64, Value)> {
        self.frames.lock().unwrap().clone()
    }

    /// Waits until a forwarded frame matches `pred`.
    async fn wait_for(&self, what: &str, pred: impl Fn(&Value) -> bool) -> (u64, Value) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(f) = self.frames().into_iter().find(|(_, v)| pred(v)) {
                return f;
            }
            assert!(Instant::now() < deadline, "logic never received {what}; got {:?}", self.frames());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tonic::async_trait]
impl Logic for FakeLogic {
    async fn authenticate(&self, r: Request<AuthRequest>) -> Result<Response<AuthReply>, Status> {
        let ok = r.into_inner().token == "good";
        Ok(Response::new(AuthReply {
            ok,
            user: "alice".into(),
            session: "s1".into(),
            device: "d1".into(),
            ..Default::default()
        }))
    }

    async fn connected(&self, _r: Request<ConnEvent>) -> Result<Response<Empty>, Status> {
        Ok(Response::new(Empty {}))
    }

    async fn disconnected(&self, _r: Request<ConnEvent>) -> Result<Response<Empty>, Status> {
        Ok(Response::new(Empty {}))
    }

    async fn handle(&self, r: Request<ClientRequest>) -> Result<Response<ClientReply>, Status> {
        let req = r.into_inner();
        let v: Value = serde_json::from_slice(&req.frame).map_err(|e| Status::internal(e.to_string()))?;
        let conn_id = req.conn.map(|c| c.conn_id).unwrap_or(0);
        self.frames.lock().unwrap().push((conn_id, v.clone()));
        let op = v["op"].as_str().unwrap_or("?");
        let reply = if op == "call.offer" && v["to"] == "ghost" {
            json!({"op": "error", "rid": v["rid"], "code": "no_such_user", "message": "no such user"})
        } else if v.get("rid").is_some() {
            json!({"op": format!("{op}.ok"), "rid": v["rid"]})
        } else {
            // a reply the gateway must not hand to the client
            json!({"op": format!("{op}.ok"), "note": "reply to a rid-less request"})
        };
        Ok(Response::new(ClientReply { frame: reply.to_string().into_bytes(), close: false }))
    }
}

async fn start() -> (FakeLogic, Gateway) {
    let logic = FakeLogic::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let logic_addr = listener.local_addr().unwrap();
    let svc = LogicServer::new(logic.clone());
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    let gw = Gateway::start(GatewayConfig {
        ws_addr: "127.0.0.1:0".parse().unwrap(),
        tcp_addr: Some("127.0.0.1:0".parse().unwrap()),
        push_addr: "127.0.0.1:0".parse().unwrap(),
        logic_endpoints: vec![format!("http://{logic_addr}")],
        shards: 2,
        ring_timeout: RING,
        ..Default::default()
    })
    .await
    .unwrap();
    (logic, gw)
}

type Ws = WebSocket<TcpStream>;

fn connect(addr: SocketAddr) -> Ws {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", "sb.json.v1".parse().unwrap());
    tungstenite::client(req, stream).unwrap().0
}

fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).unwrap();
}

fn recv(ws: &mut Ws) -> Value {
    loop {
        match ws.read().unwrap() {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Close(_) => panic!("connection closed"),
            _ => continue,
        }
    }
}

fn auth(ws: &mut Ws) {
    send(ws, json!({"op": "auth", "rid": 1, "token": "good"}));
    assert_eq!(recv(ws)["op"], "auth.ok");
}

fn offer(ws: &mut Ws, rid: u64, to: &str, call_id: &str) {
    send(ws, json!({"op": "call.offer", "rid": rid, "to": to, "call_id": call_id, "sdp": "v=0"}));
}

/// Lets well over one ring timeout pass, then checks that nothing arrived meanwhile: the
/// next frame is the reply to a ping sent now.
fn assert_quiet(ws: &mut Ws) {
    std::thread::sleep(RING * 3);
    send(ws, json!({"op": "ping", "rid": 999}));
    let r = recv(ws);
    assert_eq!((r["op"].as_str(), r["rid"].as_u64()), (Some("ping.ok"), Some(999)), "unexpected frame {r}");
}

fn is_timeout_hangup(v: &Value, call_id: &str) -> bool {
    v["op"] == "call.hangup" && v["call_id"] == call_id && v["reason"] == "timeout"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_offer_times_out() {
    let (logic, gw) = start().await;
    let addr = gw.ws_addr();
    tokio::task::spawn_blocking(move || {
        let mut ws = connect(addr);
        auth(&mut ws);
        let started = Instant::now();
        offer(&mut ws, 2, "bob", "c1");
        let r = recv(&mut ws);
        assert_eq!((r["op"].as_str(), r["rid"].as_u64()), (Some("call.offer.ok"), Some(2)));
        let r = recv(&mut ws);
        let elapsed = started.elapsed();
        assert_eq!(r, json!({"op": "call.hangup", "call_id": "c1", "reason": "timeout"}));
        assert!(elapsed >= RING, "fired early: {elapsed:?}");
        assert!(elapsed < RING + Duration::from_secs(1), "fired late: {elapsed:?}");
        // the reply to the gateway's own call.hangup is not handed to the client, and the
        // call times out only once
        assert_quiet(&mut ws);
    })
    .await
    .unwrap();
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
        let mut ws = connect(addr);
        auth(&mut ws);
        offer(&mut ws, 2, "bob", "c2");
        assert_eq!(recv(&mut ws)["op"], "call.offer.ok");
        offered_tx.send(()).unwrap();
        let r = recv(&mut ws);
        assert_eq!(r["op"], "call.answer", "{r}");
        assert_eq!(r["call_id"], "c2");
        pushed_rx.recv().unwrap();
        assert_quiet(&mut ws);
    });
    offered_rx.await.unwrap();
    let (conn_id, _) = logic.wait_for("the offer", |v| v["op"] == "call.offer").await;
    let mut push = GatewayClient::connect(gw.advertise().to_string()).await.unwrap();
    let reply = push
        .push(PushRequest {
            deliveries: vec![Delivery {
                conn_id,
                frame: json!({"op": "call.answer", "from": "bob", "call_id": "c2", "sdp": "v=0"})
                    .to_string()
                    .into_bytes(),
                ..Default::default()
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(reply.gone.is_empty());
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
    tokio::task::spawn_blocking(move || {
        let mut ws = connect(addr);
        auth(&mut ws);
        // the caller hangs up itself
        offer(&mut ws, 2, "bob", "c3");
        assert_eq!(recv(&mut ws)["op"], "call.offer.ok");
        send(&mut ws, json!({"op": "call.hangup", "rid": 3, "to": "bob", "call_id": "c3"}));
        assert_eq!(recv(&mut ws)["op"], "call.hangup.ok");
        // an offer logic refuses never rang
        offer(&mut ws, 4, "ghost", "c4");
        assert_eq!(recv(&mut ws)["code"], "no_such_user");
        // pipelined: offer then hangup before the offer's reply
        offer(&mut ws, 5, "bob", "c5");
        send(&mut ws, json!({"op": "call.hangup", "rid": 6, "to": "bob", "call_id": "c5"}));
        assert_eq!(recv(&mut ws)["rid"], 5);
        assert_eq!(recv(&mut ws)["rid"], 6);
        assert_quiet(&mut ws);
        // a hangup for some other call id leaves this one ringing
        offer(&mut ws, 7, "carol", "c6");
        send(&mut ws, json!({"op": "call.hangup", "rid": 8, "to": "carol", "call_id": "other"}));
        assert_eq!(recv(&mut ws)["rid"], 7);
        assert_eq!(recv(&mut ws)["rid"], 8);
        let r = recv(&mut ws);
        assert!(is_timeout_hangup(&r, "c6"), "{r}");
    })
    .await
    .unwrap();
    let (_, hangup) = logic.wait_for("the synthetic call.hangup", |v| v["reason"] == "timeout").await;
    assert_eq!(hangup["to"], "carol");
    assert_eq!(hangup["call_id"], "c6");
    let timeouts: Vec<_> = logic.frames().into_iter().filter(|(_, v)| v["reason"] == "timeout").collect();
    assert_eq!(timeouts.len(), 1, "{timeouts:?}");
    assert_eq!(gw.metrics().call_timeouts(), 1);
    gw.shutdown().await;
}

// ------------------------------------------------------------------ raw TCP (protobuf frames)

fn tcp_send(s: &mut TcpStream, f: &Frame) {
    let payload = f.encode_to_vec();
    let mut buf = (payload.len() as u32).to_be_bytes().to_vec();
    buf.extend_from_slice(&payload);
    s.write_all(&buf).unwrap();
}

fn tcp_recv(s: &mut TcpStream) -> Frame {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut payload = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut payload).unwrap();
    Frame::decode(payload.as_slice()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_timeout_over_raw_tcp() {
    let (logic, gw) = start().await;
    let tcp = gw.tcp_addr().unwrap();
    tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(tcp).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        tcp_send(&mut s, &Frame { op: "auth".into(), rid: Some(1), token: "good".into(), ..Default::default() });
        assert_eq!(tcp_recv(&mut s).op, "auth.ok");
        let offer = Frame {
            op: "call.offer".into(),
            rid: Some(2),
            to: "bob".into(),
            call_id: "t1".into(),
            sdp: "v=0".into(),
            ..Default::default()
        };
        tcp_send(&mut s, &offer);
        assert_eq!(tcp_recv(&mut s).op, "call.offer.ok");
        let r = tcp_recv(&mut s);
        assert_eq!((r.op.as_str(), r.call_id.as_str(), r.reason.as_str()), ("call.hangup", "t1", "timeout"));
        assert_eq!(r.rid, None);
    })
    .await
    .unwrap();
    let (_, hangup) = logic.wait_for("the synthetic call.hangup", |v| v["op"] == "call.hangup").await;
    assert_eq!(hangup, json!({"op": "call.hangup", "to": "bob", "call_id": "t1", "reason": "timeout"}));
    gw.shutdown().await;
}
