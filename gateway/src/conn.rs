//! One client connection: auth state, request FIFO, outbound queue, unacked
//! pushes and its timers, shared by every transport. The transport (WebSocket
//! after its handshake, or raw length-prefixed TCP) and the wire codec (JSON
//! text, or protobuf `Frame`s converted at this edge by [`crate::bincodec`])
//! only matter when reading, encoding and writing frames: the rest of the
//! state machine sees canonical JSON.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use prost::Message as _;
use switchboard_proto::internal::{AuthReply, ClientReply, ClientRequest, ConnEvent, Delivery};
use switchboard_proto::v1::Frame;
use tungstenite::handshake::server::{Callback, ErrorResponse, Request, Response};
use tungstenite::handshake::MidHandshake;
use tungstenite::http::{header, HeaderValue, StatusCode};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Error as WsError, HandshakeError, Message, ServerHandshake, WebSocket};

use crate::calls::{Calls, Ringing};
use crate::metrics::GatewayMetrics;
use crate::shard::{Env, TimerEv, TimerKind};
use crate::tcpframe::{self, ReadStop, TcpFramed, WriteStop};
use crate::wheel::TimerId;
use crate::{bincodec, frame};

/// The JSON subprotocol.
pub const SUBPROTOCOL_JSON: &str = "sb.json.v1";
/// The binary (protobuf `Frame`) subprotocol.
pub const SUBPROTOCOL_BIN: &str = "sb.bin.v1";
/// How long a closing connection may linger waiting for the peer.
const LINGER: std::time::Duration = std::time::Duration::from_secs(2);
const RETRY_AFTER_MS: u64 = 1000;

/// Handshake callback: checks the path and negotiates the subprotocol; sets
/// `bin` when `sb.bin.v1` was selected.
pub struct HsCallback {
    bin: Arc<AtomicBool>,
}

fn reject(status: StatusCode, text: &str) -> ErrorResponse {
    let mut r = ErrorResponse::new(Some(text.to_string()));
    *r.status_mut() = status;
    r
}

impl Callback for HsCallback {
    fn on_request(self, req: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
        if req.uri().path() != "/ws" {
            return Err(reject(StatusCode::NOT_FOUND, "not found"));
        }
        let offered: Vec<&str> = req
            .headers()
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect();
        if offered.is_empty() {
            return Ok(resp);
        }
        // the client lists its preferences first
        match offered.iter().find(|p| **p == SUBPROTOCOL_JSON || **p == SUBPROTOCOL_BIN) {
            Some(&p) => {
                let chosen = if p == SUBPROTOCOL_BIN { SUBPROTOCOL_BIN } else { SUBPROTOCOL_JSON };
                self.bin.store(chosen == SUBPROTOCOL_BIN, Ordering::Relaxed);
                resp.headers_mut().insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(chosen));
                Ok(resp)
            }
            None => Err(reject(StatusCode::BAD_REQUEST, "unsupported subprotocol (supported: sb.json.v1, sb.bin.v1)")),
        }
    }
}

type Mid = MidHandshake<ServerHandshake<TcpStream, HsCallback>>;

enum Phase {
    /// WebSocket handshake in progress; the flag is set when `sb.bin.v1` was chosen.
    Handshake(Option<Box<Mid>>, Arc<AtomicBool>),
    Open(Transport),
    Dead,
}

/// How frames are carried once the connection is open.
enum Transport {
    Ws(Box<WebSocket<TcpStream>>),
    Tcp(Box<TcpFramed>),
}

impl Transport {
    fn stream_mut(&mut self) -> &mut TcpStream {
        match self {
            Transport::Ws(ws) => ws.get_mut(),
            Transport::Tcp(t) => t.stream_mut(),
        }
    }
}

/// Encoding of the frames written to (and read from) the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    /// WebSocket text frames with JSON (`sb.json.v1`).
    Json,
    /// WebSocket binary frames with a protobuf `Frame` (`sb.bin.v1`).
    Bin,
    /// Raw TCP: big-endian u32 length + protobuf `Frame`.
    Tcp,
}

/// One inbound frame or why reading stopped, whatever the transport.
enum Read1 {
    Frame(Message),
    WouldBlock,
    TooLarge(String),
    Closed,
    Failed(String),
}

/// Encodes a canonical JSON frame for the wire.
fn encode(wire: Wire, json: String) -> Result<Message, String> {
    if wire == Wire::Json {
        return Ok(Message::text(json));
    }
    let v: serde_json::Value = serde_json::from_str(&json).map_err(|e| format!("not JSON: {e}"))?;
    let f = bincodec::json_to_frame(&v).map_err(|e| e.to_string())?;
    let len = f.encoded_len();
    let bytes = if wire == Wire::Tcp {
        if u32::try_from(len).is_err() {
            return Err("frame too large to encode".into());
        }
        tcpframe::prefixed(len, |buf| f.encode_raw(buf))
    } else {
        f.encode_to_vec()
    };
    Ok(Message::Binary(bytes.into()))
}

struct Identity {
    user: String,
    session: String,
    device: String,
}

enum Auth {
    None,
    Pending,
    Done(Identity),
}

struct Unacked {
    conv: String,
    seq: u64,
    frame: Message,
    attempts: u32,
}

struct Queued {
    op: String,
    rid: Option<u64>,
    bytes: Vec<u8>,
    /// Set for `call.offer` / `call.answer` / `call.hangup` requests naming a `call_id`.
    call: Option<Box<CallRef>>,
}

/// The call a forwarded call request is about.
struct CallRef {
    /// `call.offer` (starts ringing); otherwise `call.answer` / `call.hangup` (stops it).
    offer: bool,
    call_id: String,
    to: String,
}

impl CallRef {
    /// The call of a client request, for the ops that start or stop ringing.
    fn of(req: &frame::Request) -> Option<Box<CallRef>> {
        let offer = match req.op.as_str() {
            "call.offer" => true,
            "call.answer" | "call.hangup" => false,
            _ => return None,
        };
        let call_id = req.str_field("call_id")?;
        let to = req.str_field("to");
        if offer && to.is_none() {
            return None;
        }
        Some(Box::new(CallRef { offer, call_id: call_id.to_string(), to: to.unwrap_or_default().to_string() }))
    }
}

/// The fields of a push that may end a ringing call.
#[derive(serde::Deserialize)]
struct CallPush {
    op: String,
    call_id: Option<String>,
}

/// State of one connection, owned by its shard's slab.
pub(crate) struct Conn {
    key: usize,
    pub id: u64,
    peer: SocketAddr,
    phase: Phase,
    wire: Wire,
    auth: Auth,
    last_activity: Instant,
    out: VecDeque<Message>,
    /// A write hit WouldBlock: wait for WRITABLE.
    write_blocked: bool,
    registered_writable: bool,
    /// Closing: no more input is processed; flush, send close, shut down.
    closing: bool,
    close_sent: bool,
    shut: bool,
    notified_closed: bool,
    inflight: bool,
    pending: VecDeque<Queued>,
    unacked: Vec<Unacked>,
    auth_timer: Option<TimerId>,
    idle_timer: Option<TimerId>,
    repush_timer: Option<TimerId>,
    linger_timer: Option<TimerId>,
    /// Ringing `call.offer`s sent by this connection; allocated only while there are some.
    calls: Option<Box<Calls>>,
}

fn would_block(e: &WsError) -> bool {
    matches!(e, WsError::Io(io) if io.kind() == io::ErrorKind::WouldBlock)
}

impl Conn {
    fn new(key: usize, id: u64, peer: SocketAddr, phase: Phase, wire: Wire, env: &mut Env) -> Conn {
        let mut conn = Conn {
            key,
            id,
            peer,
            phase,
            wire,
            auth: Auth::None,
            last_activity: env.now,
            out: VecDeque::new(),
            write_blocked: false,
            registered_writable: true,
            closing: false,
            close_sent: false,
            shut: false,
            notified_closed: false,
            inflight: false,
            pending: VecDeque::new(),
            unacked: Vec::new(),
            auth_timer: None,
            idle_timer: None,
            repush_timer: None,
            linger_timer: None,
            calls: None,
        };
        conn.auth_timer = Some(conn.timer(env, env.now + env.cfg.auth_timeout, TimerKind::Auth));
        conn
    }

    /// Starts the server handshake on a freshly accepted (and registered) socket.
    pub fn accept(
        key: usize,
        id: u64,
        peer: SocketAddr,
        stream: TcpStream,
        ws_config: WebSocketConfig,
        env: &mut Env,
    ) -> Conn {
        let bin = Arc::new(AtomicBool::new(false));
        let mut conn = Conn::new(key, id, peer, Phase::Dead, Wire::Json, env);
        let cb = HsCallback { bin: bin.clone() };
        match tungstenite::accept_hdr_with_config(stream, cb, Some(ws_config)) {
            Ok(ws) => conn.opened(ws, &bin, env),
            Err(HandshakeError::Interrupted(mid)) => conn.phase = Phase::Handshake(Some(Box::new(mid)), bin),
            Err(HandshakeError::Failure(e)) => {
                tracing::debug!(peer = %peer, error = %e, "handshake failed");
                conn.phase = Phase::Dead;
            }
        }
        conn
    }

    /// A freshly accepted (and registered) raw TCP socket: open at once.
    pub fn accept_tcp(key: usize, id: u64, peer: SocketAddr, stream: TcpStream, env: &mut Env) -> Conn {
        let phase = Phase::Open(Transport::Tcp(Box::new(TcpFramed::new(stream))));
        let mut conn = Conn::new(key, id, peer, phase, Wire::Tcp, env);
        tracing::debug!(conn = conn.id, peer = %peer, "tcp open");
        conn.idle_timer = Some(conn.timer(env, env.now + env.cfg.idle_timeout, TimerKind::Idle));
        conn.read_all(env);
        conn
    }

    fn timer(&self, env: &mut Env, at: Instant, kind: TimerKind) -> TimerId {
        env.wheel.insert(at, TimerEv { key: self.key, conn_id: self.id, kind })
    }

    /// True once the connection can be dropped.
    pub fn is_dead(&self) -> bool {
        matches!(self.phase, Phase::Dead)
    }

    fn opened(&mut self, ws: WebSocket<TcpStream>, bin: &AtomicBool, env: &mut Env) {
        self.wire = if bin.load(Ordering::Relaxed) { Wire::Bin } else { Wire::Json };
        tracing::debug!(conn = self.id, peer = %self.peer, wire = ?self.wire, "websocket open");
        self.phase = Phase::Open(Transport::Ws(Box::new(ws)));
        self.last_activity = env.now;
        self.idle_timer = Some(self.timer(env, env.now + env.cfg.idle_timeout, TimerKind::Idle));
        // The handshake may already have buffered the first frames.
        self.read_all(env);
    }

    /// Socket readiness.
    pub fn on_ready(&mut self, env: &mut Env, readable: bool, writable: bool) {
        if let Phase::Handshake(mid, bin) = &mut self.phase {
            let bin = bin.clone();
            let Some(mid) = mid.take() else {
                self.phase = Phase::Dead;
                return;
            };
            match mid.handshake() {
                Ok(ws) => self.opened(ws, &bin, env),
                Err(HandshakeError::Interrupted(mid)) => self.phase = Phase::Handshake(Some(Box::new(mid)), bin),
                Err(HandshakeError::Failure(e)) => {
                    tracing::debug!(peer = %self.peer, error = %e, "handshake failed");
                    self.phase = Phase::Dead;
                }
            }
            return;
        }
        if writable {
            self.write_blocked = false;
        }
        if readable {
            self.read_all(env);
        }
    }

    /// Reads the next inbound frame, whatever the transport.
    fn read1(&mut self, max: usize) -> Read1 {
        match &mut self.phase {
            Phase::Open(Transport::Ws(ws)) => match ws.read() {
                Ok(msg) => Read1::Frame(msg),
                Err(e) if would_block(&e) => Read1::WouldBlock,
                Err(WsError::Capacity(e)) => Read1::TooLarge(e.to_string()),
                Err(WsError::ConnectionClosed) | Err(WsError::AlreadyClosed) => Read1::Closed,
                Err(e) => Read1::Failed(e.to_string()),
            },
            Phase::Open(Transport::Tcp(t)) => match t.read_frame(max) {
                Ok(payload) => Read1::Frame(Message::Binary(payload.into())),
                Err(ReadStop::WouldBlock) => Read1::WouldBlock,
                Err(ReadStop::TooLarge(n)) => Read1::TooLarge(format!("frame of {n} bytes exceeds the limit of {max}")),
                Err(ReadStop::Closed) => Read1::Closed,
                Err(ReadStop::Io(e)) => Read1::Failed(e.to_string()),
            },
            _ => Read1::WouldBlock,
        }
    }

    fn read_all(&mut self, env: &mut Env) {
        let max = env.cfg.max_frame_bytes;
        loop {
            if self.closing {
                self.discard_input();
                return;
            }
            match self.read1(max) {
                Read1::Frame(msg) => self.on_message(msg, env),
                Read1::WouldBlock => return,
                Read1::TooLarge(e) => {
                    tracing::debug!(conn = self.id, error = %e, "frame too large");
                    GatewayMetrics::inc(&env.metrics.errors);
                    self.queue_json(frame::error(None, "too_large", &e), env);
                    self.begin_close(env);
                }
                Read1::Closed => {
                    self.die(env);
                    return;
                }
                Read1::Failed(e) => {
                    tracing::debug!(conn = self.id, error = %e, "read error");
                    self.die(env);
                    return;
                }
            }
        }
    }

    /// Reads and drops raw bytes of a closing connection until the peer closes.
    fn discard_input(&mut self) {
        let Phase::Open(tr) = &mut self.phase else {
            return;
        };
        if let Transport::Tcp(t) = tr {
            t.clear_input();
        }
        let mut buf = [0u8; 4096];
        loop {
            match tr.stream_mut().read(&mut buf) {
                Ok(0) => {
                    self.phase = Phase::Dead;
                    return;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.phase = Phase::Dead;
                    return;
                }
            }
        }
    }

    fn on_message(&mut self, msg: Message, env: &mut Env) {
        self.last_activity = env.now;
        match msg {
            Message::Text(t) => {
                GatewayMetrics::inc(&env.metrics.frames_in);
                if self.wire == Wire::Json {
                    self.on_text(t.as_bytes(), env);
                } else {
                    self.queue_json(frame::error(None, "bad_request", "text frames need subprotocol sb.json.v1"), env);
                }
            }
            Message::Binary(b) => {
                GatewayMetrics::inc(&env.metrics.frames_in);
                if self.wire == Wire::Json {
                    let text = "binary frames need subprotocol sb.bin.v1";
                    self.queue_json(frame::error(None, "bad_request", text), env);
                    return;
                }
                match Frame::decode(b.as_ref()) {
                    Ok(f) => {
                        let json = bincodec::frame_to_json(&f).to_string();
                        self.on_text(json.as_bytes(), env);
                    }
                    Err(_) => {
                        self.queue_json(frame::error(None, "bad_request", "frame is not a valid protobuf Frame"), env)
                    }
                }
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            Message::Close(_) => {
                // tungstenite queued the close reply; send it and drop.
                tracing::debug!(conn = self.id, "peer closed");
                self.notify_closed(env);
                self.closing = true;
                self.close_sent = true;
            }
        }
    }

    fn on_text(&mut self, bytes: &[u8], env: &mut Env) {
        let req = match frame::parse(bytes) {
            Ok(r) => r,
            Err(bad) => {
                self.queue_json(frame::error(bad.rid, "bad_request", bad.message), env);
                return;
            }
        };
        if req.op == "ping" {
            self.queue_json(frame::ping_ok(req.rid), env);
            return;
        }
        match &self.auth {
            Auth::None => {
                if req.op != "auth" {
                    self.queue_json(frame::error(req.rid, "unauthorized", "authenticate first (op auth)"), env);
                    return;
                }
                let Some(token) = req.str_field("token") else {
                    self.queue_json(frame::error(req.rid, "bad_request", "missing field `token`"), env);
                    return;
                };
                self.auth = Auth::Pending;
                self.inflight = true;
                env.bridge.authenticate(&env.link, self.id, req.rid, token.to_string());
            }
            Auth::Pending | Auth::Done(_) => {
                if req.op == "auth" && matches!(self.auth, Auth::Done(_)) {
                    self.queue_json(frame::error(req.rid, "bad_request", "already authenticated"), env);
                    return;
                }
                if req.op == "ack" {
                    if let (Some(conv), Some(seq)) = (req.str_field("conv"), req.u64_field("seq")) {
                        self.unacked.retain(|u| !(u.conv == conv && u.seq <= seq));
                    }
                }
                let call = CallRef::of(&req);
                let q = Queued { op: req.op, rid: req.rid, bytes: bytes.to_vec(), call };
                if self.inflight || !self.pending.is_empty() {
                    if self.pending.len() >= env.cfg.max_pending_requests {
                        self.queue_json(
                            frame::error_retry(q.rid, "rate_limited", "too many requests in flight", RETRY_AFTER_MS),
                            env,
                        );
                    } else {
                        self.pending.push_back(q);
                    }
                } else {
                    self.dispatch(q, env);
                }
            }
        }
    }

    fn conn_event(&self, env: &Env) -> Option<ConnEvent> {
        match &self.auth {
            Auth::Done(id) => Some(ConnEvent {
                gateway: env.bridge.advertise.to_string(),
                conn_id: self.id,
                user: id.user.clone(),
                session: id.session.clone(),
                device: id.device.clone(),
            }),
            _ => None,
        }
    }

    fn dispatch(&mut self, q: Queued, env: &mut Env) {
        if q.op == "auth" {
            self.queue_json(frame::error(q.rid, "bad_request", "already authenticated"), env);
            return;
        }
        let Some(ev) = self.conn_event(env) else {
            self.queue_json(frame::error(q.rid, "unauthorized", "authenticate first (op auth)"), env);
            return;
        };
        if let Some(call) = &q.call {
            self.track_call(call, env);
        }
        self.inflight = true;
        let req = ClientRequest { conn: Some(ev), frame: q.bytes, ip: self.peer.ip().to_string() };
        env.bridge.handle(&env.link, q.rid, req);
    }

    /// A call request is going to logic: an offer starts ringing (its reply is awaited to
    /// learn whether logic took it), an answer or hangup stops ringing that call.
    fn track_call(&mut self, call: &CallRef, env: &mut Env) {
        if call.offer {
            let at = env.now + env.cfg.ring_timeout;
            let (key, conn_id) = (self.key, self.id);
            let calls = self.calls.get_or_insert_with(Box::default);
            let token = calls.arm(&mut env.wheel, at, &call.call_id, &call.to, |token| TimerEv {
                key,
                conn_id,
                kind: TimerKind::Ring(token),
            });
            calls.inflight_offer = Some(token);
        } else if let Some(calls) = &mut self.calls {
            calls.cancel(&mut env.wheel, &call.call_id);
            self.release_calls();
        }
    }

    /// Frees the ringing-calls structure once it holds nothing.
    fn release_calls(&mut self) {
        if self.calls.as_ref().is_some_and(|c| c.is_idle()) {
            self.calls = None;
        }
    }

    /// The reply to an offer arrived: an offer logic refused (error reply or failed RPC)
    /// never reached the callee, so it stops ringing.
    fn offer_replied(&mut self, result: &Result<ClientReply, String>, env: &mut Env) {
        let Some(calls) = &mut self.calls else {
            return;
        };
        let Some(token) = calls.inflight_offer.take() else {
            return;
        };
        let refused = match result {
            Ok(reply) => serde_json::from_slice::<CallPush>(&reply.frame).is_ok_and(|r| r.op == "error"),
            Err(_) => true,
        };
        if refused {
            calls.cancel_token(&mut env.wheel, token);
        }
        self.release_calls();
    }

    /// A push to this connection while calls ring: `call.answer` or `call.hangup` of a
    /// ringing call stops its ring timer.
    fn on_call_push(&mut self, frame: &[u8], env: &mut Env) {
        let Some(calls) = &mut self.calls else {
            return;
        };
        let Ok(p) = serde_json::from_slice::<CallPush>(frame) else {
            return;
        };
        if p.op != "call.answer" && p.op != "call.hangup" {
            return;
        }
        if let Some(call_id) = p.call_id {
            calls.cancel(&mut env.wheel, &call_id);
            self.release_calls();
        }
    }

    /// A call rang out: tell the client, and the callee's devices through logic.
    fn call_timed_out(&mut self, call: Ringing, env: &mut Env) {
        tracing::debug!(conn = self.id, call_id = %call.call_id, to = %call.to, "call ring timeout");
        GatewayMetrics::inc(&env.metrics.call_timeouts);
        self.queue_json(frame::call_timeout_push(&call.call_id), env);
        if let Some(ev) = self.conn_event(env) {
            let frame = frame::call_timeout_request(&call.to, &call.call_id).into_bytes();
            env.bridge.handle_detached(ClientRequest { conn: Some(ev), frame, ip: self.peer.ip().to_string() });
        }
    }

    /// Sends queued requests while none is in flight.
    fn pump(&mut self, env: &mut Env) {
        while !self.inflight && !self.closing {
            let Some(q) = self.pending.pop_front() else {
                return;
            };
            self.dispatch(q, env);
        }
    }

    /// Result of `Logic.Authenticate`.
    pub fn on_auth_done(&mut self, rid: Option<u64>, result: Result<AuthReply, String>, env: &mut Env) {
        if self.closing || !matches!(self.auth, Auth::Pending) {
            return;
        }
        self.inflight = false;
        match result {
            Ok(r) if r.ok => {
                if let Some(t) = self.auth_timer.take() {
                    env.wheel.cancel(t);
                }
                self.queue_json(frame::auth_ok(rid, &r.user, &r.session, frame::now_ms()), env);
                tracing::debug!(conn = self.id, user = %r.user, "authenticated");
                self.auth = Auth::Done(Identity { user: r.user, session: r.session, device: r.device });
                if let Some(ev) = self.conn_event(env) {
                    env.bridge.connected(ev);
                }
                self.pump(env);
            }
            Ok(r) => {
                let code = if r.code.is_empty() { "bad_token" } else { r.code.as_str() };
                let message = if r.message.is_empty() { "invalid token" } else { r.message.as_str() };
                self.queue_json(frame::error(rid, code, message), env);
                self.auth = Auth::None;
                self.begin_close(env);
            }
            Err(e) => {
                tracing::warn!(conn = self.id, error = %e, "Logic.Authenticate failed");
                GatewayMetrics::inc(&env.metrics.errors);
                self.auth = Auth::None;
                let msg = "logic service unavailable";
                self.queue_json(frame::error_retry(rid, "unavailable", msg, RETRY_AFTER_MS), env);
                while let Some(q) = self.pending.pop_front() {
                    self.queue_json(frame::error_retry(q.rid, "unavailable", msg, RETRY_AFTER_MS), env);
                }
            }
        }
    }

    /// Result of `Logic.Handle`.
    pub fn on_handle_done(&mut self, rid: Option<u64>, result: Result<ClientReply, String>, env: &mut Env) {
        if self.closing {
            return;
        }
        self.inflight = false;
        if self.calls.is_some() {
            self.offer_replied(&result, env);
        }
        match result {
            Ok(reply) => {
                if !reply.frame.is_empty() {
                    let encoded = String::from_utf8(reply.frame)
                        .map_err(|_| "not UTF-8".to_string())
                        .and_then(|s| encode(self.wire, s));
                    match encoded {
                        Ok(m) => self.queue(m, env),
                        Err(e) => {
                            tracing::warn!(conn = self.id, error = %e, "invalid reply from logic");
                            GatewayMetrics::inc(&env.metrics.errors);
                            self.queue_json(frame::error(rid, "internal", "invalid reply from logic"), env);
                        }
                    }
                }
                if reply.close {
                    self.begin_close(env);
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(conn = self.id, error = %e, "Logic.Handle failed");
                GatewayMetrics::inc(&env.metrics.errors);
                self.queue_json(
                    frame::error_retry(rid, "unavailable", "logic service unavailable", RETRY_AFTER_MS),
                    env,
                );
            }
        }
        self.pump(env);
    }

    /// A push delivery; false when this connection cannot take pushes (gone).
    pub fn on_push(&mut self, d: Delivery, env: &mut Env) -> bool {
        if self.closing || !matches!(self.auth, Auth::Done(_)) || !matches!(self.phase, Phase::Open(_)) {
            return false;
        }
        if self.calls.is_some() {
            self.on_call_push(&d.frame, env);
        }
        let encoded =
            String::from_utf8(d.frame).map_err(|_| "not UTF-8".to_string()).and_then(|s| encode(self.wire, s));
        let msg = match encoded {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(conn = self.id, error = %e, "invalid push frame; dropped");
                GatewayMetrics::inc(&env.metrics.errors);
                return true;
            }
        };
        if !d.conv.is_empty() && d.seq > 0 {
            if self.unacked.len() >= env.cfg.max_outbound_frames.max(1) {
                self.unacked.remove(0);
            }
            self.unacked.push(Unacked { conv: d.conv, seq: d.seq, frame: msg.clone(), attempts: 0 });
            if self.repush_timer.is_none() {
                self.repush_timer = Some(self.timer(env, env.now + env.cfg.repush_interval, TimerKind::Repush));
            }
        }
        self.queue(msg, env);
        if d.close {
            self.begin_close(env);
        }
        true
    }

    /// A timer of this connection fired.
    pub fn on_timer(&mut self, kind: TimerKind, env: &mut Env) {
        match kind {
            TimerKind::Auth => {
                self.auth_timer = None;
                if matches!(self.auth, Auth::Done(_)) || self.closing {
                    return;
                }
                if matches!(self.phase, Phase::Open(_)) {
                    tracing::debug!(conn = self.id, "auth timeout");
                    self.queue_json(frame::error(None, "auth_timeout", "no auth within the time limit"), env);
                    self.begin_close(env);
                } else {
                    self.die(env);
                }
            }
            TimerKind::Idle => {
                self.idle_timer = None;
                if self.closing {
                    return;
                }
                let deadline = self.last_activity + env.cfg.idle_timeout;
                if env.now >= deadline {
                    tracing::debug!(conn = self.id, "idle timeout");
                    self.begin_close(env);
                } else {
                    self.idle_timer = Some(self.timer(env, deadline, TimerKind::Idle));
                }
            }
            TimerKind::Repush => {
                self.repush_timer = None;
                if self.closing {
                    return;
                }
                let max = env.cfg.repush_attempts;
                self.unacked.retain(|u| u.attempts < max);
                let frames: Vec<Message> = self
                    .unacked
                    .iter_mut()
                    .map(|u| {
                        u.attempts += 1;
                        u.frame.clone()
                    })
                    .collect();
                for f in frames {
                    self.queue(f, env);
                }
                if !self.unacked.is_empty() && !self.closing {
                    self.repush_timer = Some(self.timer(env, env.now + env.cfg.repush_interval, TimerKind::Repush));
                }
            }
            TimerKind::Linger => {
                self.linger_timer = None;
                self.phase = Phase::Dead;
            }
            TimerKind::Ring(token) => {
                let Some(call) = self.calls.as_mut().and_then(|c| c.expired(token)) else {
                    return;
                };
                self.release_calls();
                if !self.closing {
                    self.call_timed_out(call, env);
                }
            }
        }
    }

    /// Graceful drain: push `drain` and close.
    pub fn drain(&mut self, env: &mut Env) {
        match self.phase {
            Phase::Open(_) if !self.closing => {
                self.queue_json(frame::drain(RETRY_AFTER_MS), env);
                self.begin_close(env);
            }
            Phase::Open(_) => {}
            _ => self.die(env),
        }
    }

    /// Queues a gateway-made JSON frame, encoded for this connection's wire.
    fn queue_json(&mut self, json: String, env: &mut Env) {
        match encode(self.wire, json) {
            Ok(m) => self.queue(m, env),
            Err(e) => {
                tracing::warn!(conn = self.id, error = %e, "frame not encodable; dropped");
                GatewayMetrics::inc(&env.metrics.errors);
            }
        }
    }

    fn queue(&mut self, msg: Message, env: &mut Env) {
        if self.closing && self.close_sent {
            return;
        }
        if self.out.len() >= env.cfg.max_outbound_frames {
            tracing::debug!(conn = self.id, "slow consumer closed");
            env.metrics.slow_consumer_closed.fetch_add(1, Ordering::Relaxed);
            self.out.clear();
            self.die(env);
            return;
        }
        self.out.push_back(msg);
    }

    /// Starts a graceful close: remaining frames, then a close frame, then FIN.
    pub fn begin_close(&mut self, env: &mut Env) {
        if self.closing {
            return;
        }
        self.closing = true;
        self.pending.clear();
        self.unacked.clear();
        self.cancel_timers(env);
        self.linger_timer = Some(self.timer(env, env.now + LINGER, TimerKind::Linger));
        self.notify_closed(env);
    }

    fn die(&mut self, env: &mut Env) {
        self.notify_closed(env);
        self.phase = Phase::Dead;
    }

    /// Tells logic an authenticated connection went away (once).
    pub fn notify_closed(&mut self, env: &mut Env) {
        if self.notified_closed {
            return;
        }
        self.notified_closed = true;
        if let Some(ev) = self.conn_event(env) {
            env.bridge.disconnected(ev);
        }
    }

    /// Cancels every timer of this connection.
    pub fn cancel_timers(&mut self, env: &mut Env) {
        for t in [self.auth_timer.take(), self.idle_timer.take(), self.repush_timer.take(), self.linger_timer.take()]
            .into_iter()
            .flatten()
        {
            env.wheel.cancel(t);
        }
        if let Some(mut calls) = self.calls.take() {
            calls.cancel_all(&mut env.wheel);
        }
    }

    /// Writes as much of the outbound queue as the socket takes.
    pub fn flush_out(&mut self, env: &mut Env) {
        if self.write_blocked || self.shut {
            return;
        }
        match &self.phase {
            Phase::Open(Transport::Ws(_)) => self.flush_ws(env),
            Phase::Open(Transport::Tcp(_)) => self.flush_tcp(env),
            _ => return,
        }
        if self.shut {
            // read what the peer still sends (its close frame), then EOF
            self.discard_input();
        }
    }

    fn flush_tcp(&mut self, env: &mut Env) {
        let Phase::Open(Transport::Tcp(t)) = &mut self.phase else {
            return;
        };
        loop {
            if !t.has_current() {
                match self.out.pop_front() {
                    Some(Message::Binary(b)) => {
                        GatewayMetrics::inc(&env.metrics.frames_out);
                        t.set_current(b);
                    }
                    Some(_) => continue,
                    None => break,
                }
            }
            match t.write_current() {
                WriteStop::Done => {}
                WriteStop::WouldBlock => {
                    self.write_blocked = true;
                    return;
                }
                WriteStop::Io(e) => {
                    tracing::debug!(conn = self.id, error = %e, "tcp write error");
                    self.die(env);
                    return;
                }
            }
        }
        if self.closing && self.out.is_empty() {
            // everything is out: half-close so the peer sees EOF
            self.close_sent = true;
            let _ = t.stream_mut().shutdown(std::net::Shutdown::Write);
            self.shut = true;
        }
    }

    fn flush_ws(&mut self, env: &mut Env) {
        let Phase::Open(Transport::Ws(ws)) = &mut self.phase else {
            return;
        };
        while let Some(msg) = self.out.pop_front() {
            match ws.write(msg) {
                Ok(()) => GatewayMetrics::inc(&env.metrics.frames_out),
                Err(e) if would_block(&e) => {
                    // the frame sits in tungstenite's buffer
                    GatewayMetrics::inc(&env.metrics.frames_out);
                    self.write_blocked = true;
                    return;
                }
                Err(WsError::WriteBufferFull(m)) => {
                    self.out.push_front(*m);
                    break;
                }
                Err(e) => {
                    tracing::debug!(conn = self.id, error = %e, "websocket write error");
                    self.die(env);
                    return;
                }
            }
        }
        if self.closing && self.out.is_empty() && !self.close_sent {
            self.close_sent = true;
            match ws.close(None) {
                Ok(()) => {}
                Err(e) if would_block(&e) => {
                    self.write_blocked = true;
                    return;
                }
                Err(_) => {
                    self.phase = Phase::Dead;
                    return;
                }
            }
        }
        match ws.flush() {
            Ok(()) => {
                if self.closing && self.close_sent && self.out.is_empty() {
                    // everything is out: half-close so the peer sees EOF
                    let _ = ws.get_mut().shutdown(std::net::Shutdown::Write);
                    self.shut = true;
                }
            }
            Err(e) if would_block(&e) => self.write_blocked = true,
            Err(WsError::ConnectionClosed) => self.phase = Phase::Dead,
            Err(e) => {
                tracing::debug!(conn = self.id, error = %e, "websocket flush error");
                self.die(env);
            }
        }
    }

    /// Keeps WRITABLE interest registered only while output is pending.
    pub fn sync_interest(&mut self, registry: &Registry) {
        let Phase::Open(tr) = &mut self.phase else {
            return;
        };
        let want = self.write_blocked;
        if want == self.registered_writable {
            return;
        }
        let interest = if want { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
        if registry.reregister(tr.stream_mut(), Token(self.key), interest).is_ok() {
            self.registered_writable = want;
        }
    }
}
