//! One client connection: WebSocket handshake, auth state, request FIFO,
//! outbound queue, unacked pushes and its timers.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Instant;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use switchboard_proto::internal::{AuthReply, ClientReply, ClientRequest, ConnEvent, Delivery};
use tungstenite::handshake::server::{Callback, ErrorResponse, Request, Response};
use tungstenite::handshake::MidHandshake;
use tungstenite::http::{header, HeaderValue, StatusCode};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Error as WsError, HandshakeError, Message, ServerHandshake, Utf8Bytes, WebSocket};

use crate::frame;
use crate::metrics::GatewayMetrics;
use crate::shard::{Env, TimerEv, TimerKind};
use crate::wheel::TimerId;

/// The JSON subprotocol.
pub const SUBPROTOCOL_JSON: &str = "sb.json.v1";
/// How long a closing connection may linger waiting for the peer.
const LINGER: std::time::Duration = std::time::Duration::from_secs(2);
const RETRY_AFTER_MS: u64 = 1000;

/// Handshake callback: checks the path and negotiates the subprotocol.
pub struct HsCallback;

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
        if offered.contains(&SUBPROTOCOL_JSON) {
            resp.headers_mut().insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(SUBPROTOCOL_JSON));
            return Ok(resp);
        }
        Err(reject(StatusCode::BAD_REQUEST, "unsupported subprotocol (supported: sb.json.v1)"))
    }
}

type Mid = MidHandshake<ServerHandshake<TcpStream, HsCallback>>;

enum Phase {
    Handshake(Option<Box<Mid>>),
    Open(Box<WebSocket<TcpStream>>),
    Dead,
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
    frame: Utf8Bytes,
    attempts: u32,
}

struct Queued {
    op: String,
    rid: Option<u64>,
    bytes: Vec<u8>,
}

/// State of one connection, owned by its shard's slab.
pub(crate) struct Conn {
    key: usize,
    pub id: u64,
    peer: SocketAddr,
    phase: Phase,
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
}

fn would_block(e: &WsError) -> bool {
    matches!(e, WsError::Io(io) if io.kind() == io::ErrorKind::WouldBlock)
}

impl Conn {
    /// Starts the server handshake on a freshly accepted (and registered) socket.
    pub fn accept(
        key: usize,
        id: u64,
        peer: SocketAddr,
        stream: TcpStream,
        ws_config: WebSocketConfig,
        env: &mut Env,
    ) -> Conn {
        let mut conn = Conn {
            key,
            id,
            peer,
            phase: Phase::Handshake(None),
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
        };
        conn.auth_timer = Some(conn.timer(env, env.now + env.cfg.auth_timeout, TimerKind::Auth));
        match tungstenite::accept_hdr_with_config(stream, HsCallback, Some(ws_config)) {
            Ok(ws) => conn.opened(ws, env),
            Err(HandshakeError::Interrupted(mid)) => conn.phase = Phase::Handshake(Some(Box::new(mid))),
            Err(HandshakeError::Failure(e)) => {
                tracing::debug!(peer = %peer, error = %e, "handshake failed");
                conn.phase = Phase::Dead;
            }
        }
        conn
    }

    fn timer(&self, env: &mut Env, at: Instant, kind: TimerKind) -> TimerId {
        env.wheel.insert(at, TimerEv { key: self.key, conn_id: self.id, kind })
    }

    /// True once the connection can be dropped.
    pub fn is_dead(&self) -> bool {
        matches!(self.phase, Phase::Dead)
    }

    fn opened(&mut self, ws: WebSocket<TcpStream>, env: &mut Env) {
        tracing::debug!(conn = self.id, peer = %self.peer, "websocket open");
        self.phase = Phase::Open(Box::new(ws));
        self.last_activity = env.now;
        self.idle_timer = Some(self.timer(env, env.now + env.cfg.idle_timeout, TimerKind::Idle));
        // The handshake may already have buffered the first frames.
        self.read_all(env);
    }

    /// Socket readiness.
    pub fn on_ready(&mut self, env: &mut Env, readable: bool, writable: bool) {
        if let Phase::Handshake(mid) = &mut self.phase {
            let Some(mid) = mid.take() else {
                self.phase = Phase::Dead;
                return;
            };
            match mid.handshake() {
                Ok(ws) => self.opened(ws, env),
                Err(HandshakeError::Interrupted(mid)) => self.phase = Phase::Handshake(Some(Box::new(mid))),
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

    fn read_all(&mut self, env: &mut Env) {
        loop {
            if self.closing {
                self.discard_input();
                return;
            }
            let res = match &mut self.phase {
                Phase::Open(ws) => ws.read(),
                _ => return,
            };
            match res {
                Ok(msg) => self.on_message(msg, env),
                Err(e) if would_block(&e) => return,
                Err(WsError::Capacity(e)) => {
                    tracing::debug!(conn = self.id, error = %e, "frame too large");
                    GatewayMetrics::inc(&env.metrics.errors);
                    let rid = None;
                    self.queue_text(frame::error(rid, "too_large", &e.to_string()), env);
                    self.begin_close(env);
                }
                Err(WsError::ConnectionClosed) | Err(WsError::AlreadyClosed) => {
                    self.die(env);
                    return;
                }
                Err(e) => {
                    tracing::debug!(conn = self.id, error = %e, "websocket read error");
                    self.die(env);
                    return;
                }
            }
        }
    }

    /// Reads and drops raw bytes of a closing connection until the peer closes.
    fn discard_input(&mut self) {
        let Phase::Open(ws) = &mut self.phase else {
            return;
        };
        let mut buf = [0u8; 4096];
        loop {
            match ws.get_mut().read(&mut buf) {
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
                self.on_text(t.as_bytes(), env);
            }
            Message::Binary(_) => {
                GatewayMetrics::inc(&env.metrics.frames_in);
                self.queue_text(frame::error(None, "bad_request", "binary frames need subprotocol sb.bin.v1"), env);
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
                self.queue_text(frame::error(bad.rid, "bad_request", bad.message), env);
                return;
            }
        };
        if req.op == "ping" {
            self.queue_text(frame::ping_ok(req.rid), env);
            return;
        }
        match &self.auth {
            Auth::None => {
                if req.op != "auth" {
                    self.queue_text(frame::error(req.rid, "unauthorized", "authenticate first (op auth)"), env);
                    return;
                }
                let Some(token) = req.str_field("token") else {
                    self.queue_text(frame::error(req.rid, "bad_request", "missing field `token`"), env);
                    return;
                };
                self.auth = Auth::Pending;
                self.inflight = true;
                env.bridge.authenticate(&env.link, self.id, req.rid, token.to_string());
            }
            Auth::Pending | Auth::Done(_) => {
                if req.op == "auth" && matches!(self.auth, Auth::Done(_)) {
                    self.queue_text(frame::error(req.rid, "bad_request", "already authenticated"), env);
                    return;
                }
                if req.op == "ack" {
                    if let (Some(conv), Some(seq)) = (req.str_field("conv"), req.u64_field("seq")) {
                        self.unacked.retain(|u| !(u.conv == conv && u.seq <= seq));
                    }
                }
                let q = Queued { op: req.op, rid: req.rid, bytes: bytes.to_vec() };
                if self.inflight || !self.pending.is_empty() {
                    if self.pending.len() >= env.cfg.max_pending_requests {
                        self.queue_text(
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
            self.queue_text(frame::error(q.rid, "bad_request", "already authenticated"), env);
            return;
        }
        let Some(ev) = self.conn_event(env) else {
            self.queue_text(frame::error(q.rid, "unauthorized", "authenticate first (op auth)"), env);
            return;
        };
        self.inflight = true;
        let req = ClientRequest { conn: Some(ev), frame: q.bytes, ip: self.peer.ip().to_string() };
        env.bridge.handle(&env.link, q.rid, req);
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
                self.queue_text(frame::auth_ok(rid, &r.user, &r.session, frame::now_ms()), env);
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
                self.queue_text(frame::error(rid, code, message), env);
                self.auth = Auth::None;
                self.begin_close(env);
            }
            Err(e) => {
                tracing::warn!(conn = self.id, error = %e, "Logic.Authenticate failed");
                GatewayMetrics::inc(&env.metrics.errors);
                self.auth = Auth::None;
                let msg = "logic service unavailable";
                self.queue_text(frame::error_retry(rid, "unavailable", msg, RETRY_AFTER_MS), env);
                while let Some(q) = self.pending.pop_front() {
                    self.queue_text(frame::error_retry(q.rid, "unavailable", msg, RETRY_AFTER_MS), env);
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
        match result {
            Ok(reply) => {
                if !reply.frame.is_empty() {
                    match String::from_utf8(reply.frame) {
                        Ok(s) => self.queue_text(s, env),
                        Err(_) => {
                            GatewayMetrics::inc(&env.metrics.errors);
                            self.queue_text(frame::error(rid, "internal", "invalid reply from logic"), env);
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
                self.queue_text(
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
        let text = match String::from_utf8(d.frame) {
            Ok(s) => Utf8Bytes::from(s),
            Err(_) => {
                tracing::warn!(conn = self.id, "push frame is not UTF-8; dropped");
                GatewayMetrics::inc(&env.metrics.errors);
                return true;
            }
        };
        if !d.conv.is_empty() && d.seq > 0 {
            if self.unacked.len() >= env.cfg.max_outbound_frames.max(1) {
                self.unacked.remove(0);
            }
            self.unacked.push(Unacked { conv: d.conv, seq: d.seq, frame: text.clone(), attempts: 0 });
            if self.repush_timer.is_none() {
                self.repush_timer = Some(self.timer(env, env.now + env.cfg.repush_interval, TimerKind::Repush));
            }
        }
        self.queue(Message::Text(text), env);
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
                    self.queue_text(frame::error(None, "auth_timeout", "no auth within the time limit"), env);
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
                let frames: Vec<Utf8Bytes> = self
                    .unacked
                    .iter_mut()
                    .map(|u| {
                        u.attempts += 1;
                        u.frame.clone()
                    })
                    .collect();
                for f in frames {
                    self.queue(Message::Text(f), env);
                }
                if !self.unacked.is_empty() && !self.closing {
                    self.repush_timer = Some(self.timer(env, env.now + env.cfg.repush_interval, TimerKind::Repush));
                }
            }
            TimerKind::Linger => {
                self.linger_timer = None;
                self.phase = Phase::Dead;
            }
        }
    }

    /// Graceful drain: push `drain` and close.
    pub fn drain(&mut self, env: &mut Env) {
        match self.phase {
            Phase::Open(_) if !self.closing => {
                self.queue_text(frame::drain(RETRY_AFTER_MS), env);
                self.begin_close(env);
            }
            Phase::Open(_) => {}
            _ => self.die(env),
        }
    }

    fn queue_text(&mut self, text: String, env: &mut Env) {
        self.queue(Message::text(text), env);
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
    }

    /// Writes as much of the outbound queue as the socket takes.
    pub fn flush_out(&mut self, env: &mut Env) {
        let Phase::Open(ws) = &mut self.phase else {
            return;
        };
        if self.write_blocked || self.shut {
            return;
        }
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
        if self.shut {
            // read what the peer still sends (its close frame), then EOF
            self.discard_input();
        }
    }

    /// Keeps WRITABLE interest registered only while output is pending.
    pub fn sync_interest(&mut self, registry: &Registry) {
        let Phase::Open(ws) = &mut self.phase else {
            return;
        };
        let want = self.write_blocked;
        if want == self.registered_writable {
            return;
        }
        let interest = if want { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
        if registry.reregister(ws.get_mut(), Token(self.key), interest).is_ok() {
            self.registered_writable = want;
        }
    }
}
