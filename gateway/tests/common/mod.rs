//! Shared by the end-to-end tests: a fake Logic gRPC server, gateway start-up, and blocking
//! WebSocket and raw-TCP clients.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message as _;
use serde_json::{json, Value};
use switchboard_gateway::{Gateway, GatewayConfig};
use switchboard_proto::internal::{
    gateway_client::GatewayClient,
    link_call::Call,
    link_result::Result as Outcome,
    logic_server::{Logic, LogicServer},
    AuthReply, AuthRequest, ClientReply, ClientRequest, ConnEvent, Delivery, Empty, LinkCall, LinkDown, LinkFailure,
    LinkPush, LinkResult, LinkUp, PushAnswer, PushRequest,
};
use switchboard_proto::v1::Frame;
use tonic::{Request, Response, Status, Streaming};
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

// ------------------------------------------------------------------ fake Logic

/// The logic end of a push stream.
pub type PushDown = tokio::sync::mpsc::Sender<Result<LinkPush, Status>>;

/// How a [`FakeLogic`] answers `Handle`: the reply frame for a forwarded frame (JSON).
pub type Handler = Arc<dyn Fn(&Value) -> Value + Send + Sync>;

/// The default `Handle` reply: `{"op": "<op>.ok", "rid": <rid>}`.
pub fn ok_reply(v: &Value) -> Value {
    json!({"op": format!("{}.ok", v["op"].as_str().unwrap_or("?")), "rid": v["rid"]})
}

/// A fake Logic service that records what it is told. `Authenticate` accepts the token
/// `good` (as alice, session s1, device d1) and refuses any other with `bad_token`;
/// `Handle` answers through its [`Handler`].
#[derive(Clone)]
pub struct FakeLogic {
    /// Every RPC received, of any kind.
    pub calls: Arc<AtomicU64>,
    pub connected: Arc<Mutex<Vec<ConnEvent>>>,
    pub disconnected: Arc<Mutex<Vec<ConnEvent>>>,
    /// Every frame forwarded through `Handle`, with the sending connection's id.
    pub frames: Arc<Mutex<Vec<(u64, Value)>>>,
    /// When set, `Connected` first pushes this frame to the new connection through the
    /// gateway's Push RPC (as a real logic instance may, before it answers).
    pub push_on_connect: Arc<Mutex<Option<Value>>>,
    /// How long each batch of closed connections takes to handle (a slow logic instance).
    pub disconnect_delay: Arc<Mutex<Duration>>,
    /// Turns `true` when the server stops: its links end (as a real instance's do).
    closing: Arc<tokio::sync::watch::Sender<bool>>,
    /// `None`: `Pushes` is refused as unimplemented (pushes go over `Gateway.Push`); `Some`:
    /// every push stream the gateway opens, as the sender that writes down it.
    push_streams: Arc<Mutex<Option<Vec<Option<PushDown>>>>>,
    /// Every answer read from the push streams.
    pub push_answers: Arc<Mutex<Vec<PushAnswer>>>,
    handler: Handler,
}

impl Default for FakeLogic {
    fn default() -> Self {
        FakeLogic::with_handler(ok_reply)
    }
}

impl FakeLogic {
    pub fn with_handler(handler: impl Fn(&Value) -> Value + Send + Sync + 'static) -> Self {
        FakeLogic {
            calls: Arc::default(),
            connected: Arc::default(),
            disconnected: Arc::default(),
            frames: Arc::default(),
            push_on_connect: Arc::default(),
            disconnect_delay: Arc::default(),
            closing: Arc::new(tokio::sync::watch::channel(false).0),
            push_streams: Arc::default(),
            push_answers: Arc::default(),
            handler: Arc::new(handler),
        }
    }

    /// Serves the gateway's push streams (before the gateway starts).
    pub fn serve_push_streams(self) -> Self {
        *self.push_streams.lock().unwrap() = Some(Vec::new());
        self
    }

    /// The `n`th push stream the gateway opened (0-based), once it is open (up to 5 s); taking it
    /// leaves `None` in its place, so dropping the sender ends the stream.
    pub async fn take_push_stream(&self, n: usize) -> PushDown {
        for _ in 0..250 {
            if let Some(tx) = self.push_streams.lock().unwrap().as_mut().and_then(|v| v.get_mut(n)?.take()) {
                return tx;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("push stream #{n} never opened");
    }

    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn frames(&self) -> Vec<(u64, Value)> {
        self.frames.lock().unwrap().clone()
    }

    /// The forwarded frames without their connection ids.
    pub fn frame_values(&self) -> Vec<Value> {
        self.frames().into_iter().map(|(_, v)| v).collect()
    }

    /// Waits until a forwarded frame matches `pred`.
    pub async fn wait_for(&self, what: &str, pred: impl Fn(&Value) -> bool) -> (u64, Value) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(f) = self.frames().into_iter().find(|(_, v)| pred(v)) {
                return f;
            }
            assert!(Instant::now() < deadline, "logic never received {what}; got {:?}", self.frames());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The connection id of the `n`th `Connected` event (0-based); `Connected` is fire and
    /// forget, so this waits for it (up to 2 s).
    pub async fn connected_conn_id(&self, n: usize) -> u64 {
        for _ in 0..100 {
            if let Some(e) = self.connected.lock().unwrap().get(n) {
                return e.conn_id;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("Logic.Connected #{n} never reported");
    }

    fn count(&self) {
        self.calls.fetch_add(1, Ordering::SeqCst);
    }
}

#[tonic::async_trait]
impl Logic for FakeLogic {
    async fn authenticate(&self, r: Request<AuthRequest>) -> Result<Response<AuthReply>, Status> {
        self.count();
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
        self.count();
        let ev = r.into_inner();
        let push = self.push_on_connect.lock().unwrap().clone();
        if let Some(frame) = push {
            let mut client = GatewayClient::connect(ev.gateway.clone()).await.unwrap();
            let d = Delivery {
                targets: to(ev.conn_id),
                frame: frame.to_string().into_bytes().into(),
                ..Default::default()
            };
            let gone = client.push(PushRequest { deliveries: vec![d] }).await.unwrap().into_inner().gone;
            assert!(gone.is_empty(), "a connection being authenticated is not gone");
        }
        self.connected.lock().unwrap().push(ev);
        Ok(Response::new(Empty {}))
    }

    async fn disconnected(&self, r: Request<ConnEvent>) -> Result<Response<Empty>, Status> {
        self.count();
        self.disconnected.lock().unwrap().push(r.into_inner());
        Ok(Response::new(Empty {}))
    }

    async fn handle(&self, r: Request<ClientRequest>) -> Result<Response<ClientReply>, Status> {
        self.count();
        let req = r.into_inner();
        let conn_id = req.conn.as_ref().map(|c| c.conn_id).unwrap_or(0);
        for a in &req.acks {
            self.frames.lock().unwrap().push((conn_id, json!({"op": "ack", "conv": a.conv, "seq": a.seq})));
        }
        if req.frame.is_empty() {
            return Ok(Response::new(ClientReply::default()));
        }
        let v: Value = serde_json::from_slice(&req.frame).map_err(|e| Status::internal(e.to_string()))?;
        self.frames.lock().unwrap().push((conn_id, v.clone()));
        let reply = (self.handler)(&v);
        Ok(Response::new(ClientReply { frame: reply.to_string().into_bytes().into(), close: false }))
    }

    type LinkStream = tokio_stream::wrappers::ReceiverStream<Result<LinkDown, Status>>;

    /// Every call of the link runs as its own task, its result sent back alone.
    async fn link(&self, r: Request<Streaming<LinkUp>>) -> Result<Response<Self::LinkStream>, Status> {
        let mut up = r.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let logic = self.clone();
        let mut closing = self.closing.subscribe();
        tokio::spawn(async move {
            loop {
                let batch = tokio::select! {
                    _ = closing.wait_for(|c| *c) => break,
                    m = up.message() => match m {
                        Ok(Some(batch)) => batch,
                        _ => break,
                    },
                };
                for call in batch.calls {
                    let (logic, tx) = (logic.clone(), tx.clone());
                    tokio::spawn(async move {
                        let result = logic.link_call(call).await;
                        let _ = tx.send(Ok(LinkDown { results: vec![result] })).await;
                    });
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    type PushesStream = tokio_stream::wrappers::ReceiverStream<Result<LinkPush, Status>>;

    /// Refused as an older logic instance would (most of these tests push through the gateway's
    /// `Gateway.Push`), unless [`FakeLogic::serve_push_streams`]: then the stream's sender is
    /// kept for the test and its answers recorded.
    async fn pushes(&self, r: Request<Streaming<PushAnswer>>) -> Result<Response<Self::PushesStream>, Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        match self.push_streams.lock().unwrap().as_mut() {
            Some(streams) => streams.push(Some(tx)),
            None => return Err(Status::unimplemented("pushes go over Gateway.Push here")),
        }
        let (mut up, answers) = (r.into_inner(), self.push_answers.clone());
        tokio::spawn(async move {
            while let Ok(Some(a)) = up.message().await {
                answers.lock().unwrap().push(a);
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}

impl FakeLogic {
    /// One call of a `Link` stream, answered by the unary method that serves it.
    async fn link_call(&self, call: LinkCall) -> LinkResult {
        let outcome = match call.call {
            Some(Call::Authenticate(a)) => {
                self.authenticate(Request::new(a)).await.map(|r| Outcome::Auth(r.into_inner()))
            }
            Some(Call::AuthConnect(a)) => {
                let reply = self.authenticate(Request::new(AuthRequest { token: a.token })).await.unwrap().into_inner();
                if reply.ok {
                    let ev = ConnEvent {
                        gateway: a.gateway,
                        conn_id: a.conn_id,
                        user: reply.user.clone(),
                        session: reply.session.clone(),
                        device: reply.device.clone(),
                    };
                    self.connected(Request::new(ev)).await.map(|_| Outcome::Auth(reply))
                } else {
                    Ok(Outcome::Auth(reply))
                }
            }
            Some(Call::Connected(ev)) => self.connected(Request::new(ev)).await.map(|r| Outcome::Done(r.into_inner())),
            Some(Call::Disconnected(ev)) => {
                self.disconnected(Request::new(ev)).await.map(|r| Outcome::Done(r.into_inner()))
            }
            Some(Call::DisconnectedMany(evs)) => {
                let delay = *self.disconnect_delay.lock().unwrap();
                tokio::time::sleep(delay).await;
                let mut done = Ok(Outcome::Done(Empty {}));
                for ev in evs.events {
                    if let Err(e) = self.disconnected(Request::new(ev)).await {
                        done = Err(e);
                    }
                }
                done
            }
            Some(Call::Handle(req)) => self.handle(Request::new(req)).await.map(|r| Outcome::Reply(r.into_inner())),
            None => Err(Status::invalid_argument("empty call")),
        };
        let outcome = outcome
            .unwrap_or_else(|s| Outcome::Failure(LinkFailure { code: s.code() as i32, message: s.message().into() }));
        LinkResult { id: call.id, result: Some(outcome) }
    }
}

/// A running fake Logic gRPC server.
pub struct FakeServer {
    pub logic: FakeLogic,
    pub addr: SocketAddr,
    /// `http://{addr}`, as the gateway dials it.
    pub url: String,
    /// Stops the server (dropping it does not).
    pub stop: tokio::sync::oneshot::Sender<()>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Serves `logic` on a free loopback port.
pub async fn serve(logic: FakeLogic) -> FakeServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let svc = LogicServer::new(logic.clone());
    let closing = logic.closing.clone();
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), async {
                if stop_rx.await.is_err() {
                    // the sender was dropped, not used: keep serving
                    std::future::pending::<()>().await;
                }
                let _ = closing.send(true);
            })
            .await;
    });
    FakeServer { logic, addr, url: format!("http://{addr}"), stop, task }
}

/// Serves a default [`FakeLogic`]; returns it with the server's URL.
pub async fn start_logic() -> (FakeLogic, String) {
    let server = serve(FakeLogic::default()).await;
    (server.logic, server.url)
}

// ------------------------------------------------------------------ gateway

/// A loopback address with a free port.
pub fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A gateway on free loopback ports (WebSocket and push; no raw TCP listener), one shard,
/// dialing `logic_endpoints`; adjust with struct update syntax.
pub fn config(logic_endpoints: &[&str]) -> GatewayConfig {
    GatewayConfig {
        ws_addr: any_port(),
        tcp_addr: None,
        push_addr: any_port(),
        logic_endpoints: logic_endpoints.iter().map(|u| u.to_string()).collect(),
        shards: 1,
        ..Default::default()
    }
}

pub async fn start_gateway(config: GatewayConfig) -> Gateway {
    Gateway::start(config).await.unwrap()
}

/// The delivery targets naming one connection of the fake logic's user (`alice`).
pub fn to(conn_id: u64) -> Vec<switchboard_proto::internal::Target> {
    vec![switchboard_proto::internal::Target { conn_id, user: "alice".into() }]
}

/// A client of the gateway's Push RPC.
pub struct Pusher(GatewayClient<tonic::transport::Channel>);

impl Pusher {
    pub async fn connect(gw: &Gateway) -> Self {
        Pusher(GatewayClient::connect(gw.advertise().to_string()).await.unwrap())
    }

    /// Pushes `deliveries`; returns the ids of the connections that are gone.
    pub async fn push(&mut self, deliveries: Vec<Delivery>) -> Vec<u64> {
        self.0.push(PushRequest { deliveries }).await.unwrap().into_inner().gone
    }
}

/// Runs blocking client code off the runtime.
pub async fn blocking<T: Send + 'static, F: FnOnce() -> T + Send + 'static>(f: F) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

// ------------------------------------------------------------------ WebSocket client

pub type Ws = WebSocket<TcpStream>;

/// Connects to `/ws` (5 s read timeout), offering the subprotocols `offer` if any; returns the
/// socket and the subprotocol the server chose, if any.
pub fn ws_open(addr: SocketAddr, offer: Option<&str>) -> (Ws, Option<String>) {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    if let Some(offer) = offer {
        req.headers_mut().insert("Sec-WebSocket-Protocol", offer.parse().unwrap());
    }
    let (ws, resp) = tungstenite::client(req, stream).unwrap();
    let chosen = resp.headers().get("Sec-WebSocket-Protocol").map(|h| h.to_str().unwrap().to_string());
    (ws, chosen)
}

/// Connects offering `offer`; returns the socket and the chosen subprotocol.
pub fn ws_connect(addr: SocketAddr, offer: &str) -> (Ws, String) {
    let (ws, chosen) = ws_open(addr, Some(offer));
    (ws, chosen.expect("a subprotocol chosen"))
}

/// Connects with the JSON subprotocol `sb.json.v1`.
pub fn ws_connect_json(addr: SocketAddr) -> Ws {
    let (ws, chosen) = ws_connect(addr, "sb.json.v1");
    assert_eq!(chosen, "sb.json.v1");
    ws
}

pub fn ws_send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).unwrap();
}

pub fn ws_send_json(ws: &mut Ws, v: Value) {
    ws_send_text(ws, &v.to_string());
}

/// Next text frame as JSON; None if the connection closed.
pub fn ws_recv_json(ws: &mut Ws) -> Option<Value> {
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

/// Next text frame as JSON; panics if the connection closed.
pub fn ws_read_json(ws: &mut Ws) -> Value {
    ws_recv_json(ws).expect("connection closed")
}

pub fn ws_assert_closed(ws: &mut Ws) {
    assert!(ws_recv_json(ws).is_none(), "expected the server to close");
}

/// Authenticates with the token `good` (JSON) and checks the `auth.ok` reply.
pub fn ws_auth(ws: &mut Ws) {
    ws_send_text(ws, r#"{"op":"auth","rid":1,"token":"good"}"#);
    let r = ws_read_json(ws);
    assert_eq!(r["op"], "auth.ok", "{r}");
    assert_eq!(r["rid"], 1);
    assert_eq!(r["user"], "alice");
    assert_eq!(r["session"], "s1");
    assert!(r["server_ts"].as_u64().unwrap() > 0);
}

/// Connects with the JSON subprotocol and authenticates.
pub fn ws_connect_auth(addr: SocketAddr) -> Ws {
    let mut ws = ws_connect_json(addr);
    ws_auth(&mut ws);
    ws
}

// ------------------------------------------------------------------ raw TCP client (protobuf frames)

pub fn frame(op: &str, rid: u64) -> Frame {
    Frame { op: op.into(), rid: Some(rid), ..Default::default() }
}

/// Connects with a 5 s read timeout.
pub fn tcp_connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Writes `payload` behind its big-endian u32 length.
pub fn tcp_write_raw(s: &mut TcpStream, payload: &[u8]) {
    let mut buf = (payload.len() as u32).to_be_bytes().to_vec();
    buf.extend_from_slice(payload);
    s.write_all(&buf).unwrap();
}

pub fn tcp_send(s: &mut TcpStream, f: &Frame) {
    tcp_write_raw(s, &f.encode_to_vec());
}

/// Next frame; None on EOF.
pub fn tcp_recv(s: &mut TcpStream) -> Option<Frame> {
    let mut len = [0u8; 4];
    match s.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
        Err(e) => panic!("read: {e}"),
    }
    let mut payload = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut payload).unwrap();
    Some(Frame::decode(payload.as_slice()).unwrap())
}

/// Authenticates with the token `good` and checks the `auth.ok` reply.
pub fn tcp_auth(s: &mut TcpStream) {
    tcp_send(s, &Frame { token: "good".into(), ..frame("auth", 1) });
    let r = tcp_recv(s).unwrap();
    assert_eq!(r.op, "auth.ok", "{r:?}");
    assert_eq!(r.rid, Some(1));
    assert_eq!(r.user, "alice");
    assert_eq!(r.session, "s1");
    assert!(r.server_ts.unwrap() > 0);
}
