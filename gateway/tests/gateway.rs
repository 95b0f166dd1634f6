//! End-to-end test: a fake Logic gRPC server, the gateway, and blocking WebSocket clients.

use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use switchboard_gateway::{Gateway, GatewayConfig};
use switchboard_proto::internal::{
    gateway_client::GatewayClient,
    logic_server::{Logic, LogicServer},
    AuthReply, AuthRequest, ClientReply, ClientRequest, ConnEvent, Delivery, Empty, PushRequest,
};
use tonic::{Request, Response, Status};
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

#[derive(Default, Clone)]
struct FakeLogic {
    connected: Arc<Mutex<Vec<ConnEvent>>>,
    disconnected: Arc<Mutex<Vec<ConnEvent>>>,
}

#[tonic::async_trait]
impl Logic for FakeLogic {
    async fn authenticate(&self, r: Request<AuthRequest>) -> Result<Response<AuthReply>, Status> {
        let ok = r.into_inner().token == "good";
        Ok(Response::new(if ok {
            AuthReply {
                ok: true,
                user: "alice".into(),
                session: "s1".into(),
                device: "d1".into(),
                ..Default::default()
            }
        } else {
            AuthReply { ok: false, code: "bad_token".into(), message: "invalid token".into(), ..Default::default() }
        }))
    }

    async fn connected(&self, r: Request<ConnEvent>) -> Result<Response<Empty>, Status> {
        self.connected.lock().unwrap().push(r.into_inner());
        Ok(Response::new(Empty {}))
    }

    async fn disconnected(&self, r: Request<ConnEvent>) -> Result<Response<Empty>, Status> {
        self.disconnected.lock().unwrap().push(r.into_inner());
        Ok(Response::new(Empty {}))
    }

    async fn handle(&self, r: Request<ClientRequest>) -> Result<Response<ClientReply>, Status> {
        let req = r.into_inner();
        let v: Value = serde_json::from_slice(&req.frame).map_err(|e| Status::internal(e.to_string()))?;
        let op = v["op"].as_str().unwrap_or("?");
        let reply = serde_json::json!({"op": format!("{op}.ok"), "rid": v["rid"]});
        Ok(Response::new(ClientReply { frame: reply.to_string().into_bytes(), close: false }))
    }
}

type Ws = WebSocket<TcpStream>;

fn connect(addr: SocketAddr) -> Ws {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", "sb.json.v1".parse().unwrap());
    let (ws, resp) = tungstenite::client(req, stream).unwrap();
    assert_eq!(resp.headers().get("Sec-WebSocket-Protocol").unwrap(), "sb.json.v1");
    ws
}

fn send(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).unwrap();
}

/// Next text frame as JSON; None if the connection closed.
fn recv(ws: &mut Ws) -> Option<Value> {
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => return Some(serde_json::from_str(t.as_str()).unwrap()),
            Ok(Message::Close(_)) => return None,
            Ok(_) => continue,
            Err(tungstenite::Error::ConnectionClosed)
            | Err(tungstenite::Error::AlreadyClosed)
            | Err(tungstenite::Error::Protocol(_)) => return None,
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
            Err(e) => panic!("unexpected read error: {e}"),
        }
    }
}

fn assert_closed(ws: &mut Ws) {
    assert!(recv(ws).is_none(), "expected the server to close");
}

fn auth(ws: &mut Ws) {
    send(ws, r#"{"op":"auth","rid":1,"token":"good"}"#);
    let r = recv(ws).unwrap();
    assert_eq!(r["op"], "auth.ok", "{r}");
    assert_eq!(r["rid"], 1);
    assert_eq!(r["user"], "alice");
    assert_eq!(r["session"], "s1");
    assert!(r["server_ts"].as_u64().unwrap() > 0);
}

async fn blocking<F: FnOnce() + Send + 'static>(f: F) {
    tokio::task::spawn_blocking(f).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_end_to_end() {
    let logic = FakeLogic::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let logic_addr = listener.local_addr().unwrap();
    let svc = LogicServer::new(logic.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream_incoming(listener))
            .await
            .unwrap();
    });

    let gw = Gateway::start(GatewayConfig {
        ws_addr: "127.0.0.1:0".parse().unwrap(),
        tcp_addr: None,
        push_addr: "127.0.0.1:0".parse().unwrap(),
        logic_endpoints: vec![format!("http://{logic_addr}")],
        shards: 2,
        auth_timeout: Duration::from_millis(300),
        ..Default::default()
    })
    .await
    .unwrap();
    let addr = gw.ws_addr();
    assert_ne!(addr.port(), 0);
    assert_eq!(gw.advertise(), format!("http://{}", gw.push_addr()));

    // Handshake checks: wrong path -> 404, only unsupported subprotocols -> 400.
    blocking(move || {
        let s = TcpStream::connect(addr).unwrap();
        match tungstenite::client(format!("ws://{addr}/nope"), s) {
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => {
                assert_eq!(r.status(), 404)
            }
            other => panic!("expected 404, got {:?}", other.map(|_| ())),
        }
        let s = TcpStream::connect(addr).unwrap();
        let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
        req.headers_mut().insert("Sec-WebSocket-Protocol", "sb.xml.v1".parse().unwrap());
        match tungstenite::client(req, s) {
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => {
                assert_eq!(r.status(), 400)
            }
            other => panic!("expected 400, got {:?}", other.map(|_| ())),
        }
        // No subprotocol offered: JSON by default.
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let (mut ws, _) = tungstenite::client(format!("ws://{addr}/ws"), s).unwrap();
        send(&mut ws, r#"{"op":"ping","rid":4}"#);
        assert_eq!(recv(&mut ws).unwrap()["op"], "ping.ok");
    })
    .await;

    // Main flow on one connection.
    blocking(move || {
        let mut ws = connect(addr);
        // before auth: ping ok, other ops unauthorized, connection stays open
        send(&mut ws, r#"{"op":"ping","rid":9}"#);
        let r = recv(&mut ws).unwrap();
        assert_eq!(r["op"], "ping.ok");
        assert_eq!(r["rid"], 9);
        send(&mut ws, r#"{"op":"send","rid":2}"#);
        let r = recv(&mut ws).unwrap();
        assert_eq!(r["code"], "unauthorized");
        assert_eq!(r["rid"], 2);
        // auth without token -> bad_request
        send(&mut ws, r#"{"op":"auth","rid":3}"#);
        assert_eq!(recv(&mut ws).unwrap()["code"], "bad_request");
        auth(&mut ws);
        // bad JSON -> bad_request, still open
        send(&mut ws, "{not json");
        let r = recv(&mut ws).unwrap();
        assert_eq!(r["op"], "error");
        assert_eq!(r["code"], "bad_request");
        send(&mut ws, r#"{"rid":77}"#);
        let r = recv(&mut ws).unwrap();
        assert_eq!(r["code"], "bad_request");
        assert_eq!(r["rid"], 77);
        // binary -> bad_request, still open
        ws.send(Message::binary(vec![1u8, 2, 3])).unwrap();
        assert_eq!(recv(&mut ws).unwrap()["code"], "bad_request");
        // second auth -> bad_request
        send(&mut ws, r#"{"op":"auth","rid":5,"token":"good"}"#);
        assert_eq!(recv(&mut ws).unwrap()["code"], "bad_request");
        // forwarded ops, strictly in order
        for rid in 10..20 {
            send(&mut ws, &format!(r#"{{"op":"history","rid":{rid},"conv":"d:a:b"}}"#));
        }
        for rid in 10..20 {
            let r = recv(&mut ws).unwrap();
            assert_eq!(r["op"], "history.ok");
            assert_eq!(r["rid"], rid);
        }
        send(&mut ws, r#"{"op":"ping","rid":21}"#);
        assert_eq!(recv(&mut ws).unwrap()["op"], "ping.ok");
    })
    .await;
    assert!(!logic.connected.lock().unwrap().is_empty());

    // Pushes via the Push RPC.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let client_thread = tokio::task::spawn_blocking(move || {
        let mut ws = connect(addr);
        auth(&mut ws);
        ready_tx.send(()).unwrap();
        let r = recv(&mut ws).unwrap();
        assert_eq!(r["op"], "msg");
        assert_eq!(r["msg"]["seq"], 1);
        send(&mut ws, r#"{"op":"ack","rid":30,"conv":"d:alice:bob","seq":1}"#);
        assert_eq!(recv(&mut ws).unwrap()["op"], "ack.ok");
        rx.recv().unwrap();
        let r = recv(&mut ws).unwrap();
        assert_eq!(r["op"], "kick");
        assert_closed(&mut ws);
    });
    ready_rx.await.unwrap();
    // Connected is fire-and-forget: wait for the second connection's event.
    let mut conn_id = None;
    for _ in 0..100 {
        if let Some(e) = logic.connected.lock().unwrap().get(1) {
            conn_id = Some(e.conn_id);
        }
        if conn_id.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let conn_id = conn_id.expect("Logic.Connected for the push connection");
    let mut push = GatewayClient::connect(gw.advertise().to_string()).await.unwrap();
    let reply = push
        .push(PushRequest {
            deliveries: vec![
                Delivery {
                    conn_id,
                    frame: br#"{"op":"msg","msg":{"conv":"d:alice:bob","seq":1}}"#.to_vec(),
                    conv: "d:alice:bob".into(),
                    seq: 1,
                    close: false,
                },
                Delivery {
                    conn_id: conn_id ^ 1, // same slot, other generation
                    frame: b"{}".to_vec(),
                    ..Default::default()
                },
                Delivery {
                    conn_id: u64::MAX, // no such shard
                    frame: b"{}".to_vec(),
                    ..Default::default()
                },
            ],
        })
        .await
        .unwrap()
        .into_inner();
    let mut gone = reply.gone.clone();
    gone.sort();
    let mut expect = vec![conn_id ^ 1, u64::MAX];
    expect.sort();
    assert_eq!(gone, expect);
    tokio::time::sleep(Duration::from_millis(200)).await;
    tx.send(()).unwrap();
    let reply = push
        .push(PushRequest {
            deliveries: vec![Delivery {
                conn_id,
                frame: br#"{"op":"kick","reason":"test"}"#.to_vec(),
                close: true,
                ..Default::default()
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(reply.gone.is_empty());
    client_thread.await.unwrap();
    // the kicked connection is gone now
    tokio::time::sleep(Duration::from_millis(200)).await;
    let reply = push
        .push(PushRequest { deliveries: vec![Delivery { conn_id, frame: b"{}".to_vec(), ..Default::default() }] })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.gone, vec![conn_id]);
    assert!(logic.disconnected.lock().unwrap().iter().any(|e| e.conn_id == conn_id));

    // Bad token -> error + close; oversize -> too_large + close; auth timeout.
    blocking(move || {
        let mut ws = connect(addr);
        send(&mut ws, r#"{"op":"auth","rid":1,"token":"bad"}"#);
        let r = recv(&mut ws).unwrap();
        assert_eq!(r["code"], "bad_token");
        assert_eq!(r["rid"], 1);
        assert_closed(&mut ws);

        let mut ws = connect(addr);
        auth(&mut ws);
        let big = format!(r#"{{"op":"send","rid":2,"body":"{}"}}"#, "x".repeat(70 * 1024));
        send(&mut ws, &big);
        let r = recv(&mut ws).unwrap();
        assert_eq!(r["code"], "too_large");
        assert_closed(&mut ws);

        let mut ws = connect(addr);
        let started = std::time::Instant::now();
        let r = recv(&mut ws).unwrap();
        assert_eq!(r["code"], "auth_timeout");
        assert!(started.elapsed() >= Duration::from_millis(250));
        assert!(started.elapsed() < Duration::from_secs(3));
        assert_closed(&mut ws);
    })
    .await;

    let mut text = String::new();
    gw.metrics().render(&mut text);
    assert!(text.contains("switchboard_gateway_frames_in_total"));

    // Graceful drain: an open connection gets `drain` and is closed.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let drained = tokio::task::spawn_blocking(move || {
        let mut ws = connect(addr);
        auth(&mut ws);
        ready_tx.send(()).unwrap();
        let r = recv(&mut ws).unwrap();
        assert_eq!(r["op"], "drain");
        assert_eq!(r["retry_after_ms"], 1000);
        assert_closed(&mut ws);
    });
    tokio::task::spawn_blocking(move || ready_rx.recv().unwrap()).await.unwrap();
    let metrics = gw.metrics();
    gw.shutdown().await;
    drained.await.unwrap();
    assert_eq!(metrics.connections(), 0);
}

fn tokio_stream_incoming(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tokio_stream::wrappers::TcpListenerStream::new(listener)
}

async fn start_logic() -> (FakeLogic, SocketAddr) {
    let logic = FakeLogic::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = LogicServer::new(logic.clone());
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream_incoming(listener))
            .await;
    });
    (logic, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_pushes_are_repushed_then_dropped_and_logic_down_is_unavailable() {
    let (logic, logic_addr) = start_logic().await;
    let gw = Gateway::start(GatewayConfig {
        ws_addr: "127.0.0.1:0".parse().unwrap(),
        tcp_addr: None,
        push_addr: "127.0.0.1:0".parse().unwrap(),
        logic_endpoints: vec![format!("http://{logic_addr}")],
        shards: 1,
        repush_interval: Duration::from_millis(200),
        repush_attempts: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let addr = gw.ws_addr();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let client = tokio::task::spawn_blocking(move || {
        let mut ws = connect(addr);
        auth(&mut ws);
        ready_tx.send(()).unwrap();
        // original + 2 re-pushes of seq 1; seq 2 is acked after its first copy
        let mut seq1 = 0;
        let mut seq2 = 0;
        let deadline = std::time::Instant::now() + Duration::from_millis(1500);
        ws.get_mut().set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        while std::time::Instant::now() < deadline {
            match ws.read() {
                Ok(Message::Text(t)) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap();
                    match v["seq"].as_u64() {
                        Some(1) => seq1 += 1,
                        Some(2) => {
                            seq2 += 1;
                            send(&mut ws, r#"{"op":"ack","rid":8,"conv":"c2","seq":2}"#);
                        }
                        _ => assert_eq!(v["op"], "ack.ok", "{v}"),
                    }
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(seq1, 3, "seq 1 sent once and re-pushed twice");
        assert_eq!(seq2, 1, "acked push is not re-sent");
        ws
    });
    ready_rx.await.unwrap();
    let mut conn_id = None;
    for _ in 0..100 {
        conn_id = logic.connected.lock().unwrap().first().map(|e| e.conn_id);
        if conn_id.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let conn_id = conn_id.unwrap();
    let mut push = GatewayClient::connect(gw.advertise().to_string()).await.unwrap();
    let reply = push
        .push(PushRequest {
            deliveries: vec![
                Delivery {
                    conn_id,
                    frame: br#"{"op":"msg","seq":1}"#.to_vec(),
                    conv: "c1".into(),
                    seq: 1,
                    close: false,
                },
                Delivery {
                    conn_id,
                    frame: br#"{"op":"msg","seq":2}"#.to_vec(),
                    conv: "c2".into(),
                    seq: 2,
                    close: false,
                },
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(reply.gone.is_empty());
    let mut ws = client.await.unwrap();
    gw.shutdown().await;
    // after shutdown the client sees drain then close
    tokio::task::spawn_blocking(move || {
        ws.get_mut().set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(recv(&mut ws).unwrap()["op"], "drain");
        assert_closed(&mut ws);
    })
    .await
    .unwrap();

    // Logic unreachable: forwarded ops get `unavailable` with retry_after_ms.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let gw = Gateway::start(GatewayConfig {
        ws_addr: "127.0.0.1:0".parse().unwrap(),
        tcp_addr: None,
        push_addr: "127.0.0.1:0".parse().unwrap(),
        logic_endpoints: vec![format!("http://{dead_addr}")],
        shards: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let addr = gw.ws_addr();
    blocking(move || {
        let mut ws = connect(addr);
        send(&mut ws, r#"{"op":"auth","rid":1,"token":"good"}"#);
        let r = recv(&mut ws).unwrap();
        assert_eq!(r["code"], "unavailable", "{r}");
        assert_eq!(r["retry_after_ms"], 1000);
        send(&mut ws, r#"{"op":"ping","rid":2}"#);
        assert_eq!(recv(&mut ws).unwrap()["op"], "ping.ok");
    })
    .await;
    gw.shutdown().await;
}
