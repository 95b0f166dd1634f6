//! One client connection: auth state, request FIFO, outbound bytes, unacked
//! pushes and its timers, shared by every transport. The transport (WebSocket
//! after its upgrade, or raw length-prefixed TCP) and the wire codec (JSON
//! text, or protobuf `Frame`s converted at this edge by [`crate::bincodec`])
//! only matter in [`io`], which reads, cuts and writes frames: the rest of the
//! state machine sees canonical JSON.
//!
//! The struct is kept small: an idle authenticated connection is this struct in
//! the shard's slab, its identity and one timer-wheel entry.

mod io;

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mio::net::TcpStream;
use switchboard_proto::internal::{AuthReply, ClientReply, ClientRequest, ConnEvent, Delivery};

pub(crate) use io::Encoded;

use crate::calls::{Calls, Ringing};
use crate::frame;
use crate::metrics::GatewayMetrics;
use crate::shard::{Env, TimerEv, TimerKind};
use crate::wheel::TimerId;
use crate::ws::close_code;

/// How long a closing connection may linger waiting for the peer.
const LINGER: Duration = Duration::from_secs(2);
const RETRY_AFTER_MS: u64 = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A trusted proxy's connection: waiting for its PROXY header (then the upgrade request, or
    /// the first frame of a raw TCP connection when `tcp`).
    Proxy {
        tcp: bool,
    },
    /// Waiting for the WebSocket upgrade request.
    Handshake,
    Open,
    Dead,
}

/// Encoding of the frames written to (and read from) the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wire {
    /// WebSocket text frames with JSON (`sb.json.v1`).
    Json,
    /// WebSocket binary frames with a protobuf `Frame` (`sb.bin.v1`).
    Bin,
    /// Raw TCP: big-endian u32 length + protobuf `Frame`.
    Tcp,
}

struct Identity {
    user: String,
    session: String,
    device: String,
}

impl Identity {
    /// The event naming connection `conn_id` of `gateway` with this identity.
    fn event(&self, gateway: &str, conn_id: u64) -> ConnEvent {
        ConnEvent {
            gateway: gateway.to_owned(),
            conn_id,
            user: self.user.clone(),
            session: self.session.clone(),
            device: self.device.clone(),
        }
    }
}

enum Auth {
    None,
    Pending,
    Done(Box<Identity>),
}

/// A `msg` push as the unacked entries of every receiving connection of a shard share it:
/// made once per push, so holding it costs a connection one reference count, not a copy.
pub(crate) struct Pushed {
    conv: Box<str>,
    seq: u64,
    /// The push as logic sent it (canonical JSON).
    frame: Bytes,
}

struct Unacked {
    push: Arc<Pushed>,
    /// Re-sends so far.
    attempts: u32,
    /// When it was last written ([`Env::now_ms`]): it is re-sent once `repush_interval` has
    /// passed since, not at the first repush timer after it arrived.
    sent_ms: u32,
}

struct Queued {
    op: String,
    rid: Option<u64>,
    bytes: Bytes,
    /// Set for `call.offer` / `call.answer` / `call.hangup` requests naming a `call_id`.
    call: Option<Box<CallRef>>,
    /// A `quiet` ack: its success is not answered.
    quiet: bool,
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
    fn of(req: &frame::Head) -> Option<Box<CallRef>> {
        let offer = match req.op.as_ref() {
            "call.offer" => true,
            "call.answer" | "call.hangup" => false,
            _ => return None,
        };
        let call_id = req.call_id.as_deref()?;
        let to = req.to.as_deref();
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
    pub id: u64,
    stream: TcpStream,
    /// The client's address: the socket's peer, or what a trusted proxy's header named.
    peer: SocketAddr,
    /// `peer`'s address is counted in the per-address connection caps (released at the end).
    counted: bool,
    /// When a frame last arrived ([`Env::now_ms`]).
    last_activity: u32,
    auth: Auth,
    /// Bytes of an incomplete inbound frame (empty, unallocated, otherwise).
    rbuf: Vec<u8>,
    /// Encoded frames not yet written (empty, unallocated, otherwise).
    out: Vec<u8>,
    /// Frames queued since `out` was last empty (the slow-consumer bound).
    out_frames: u32,
    /// KiB `out` grew to before it was last written out (see `io::reserve_out`).
    out_hint: u8,
    /// In its shard's list of connections for the next push round.
    pub(crate) in_push_round: bool,
    /// Auth timeout before auth, idle timeout after, linger while closing.
    timer: Option<TimerId>,
    repush_timer: Option<TimerId>,
    pending: VecDeque<Queued>,
    unacked: VecDeque<Unacked>,
    /// A fragmented WebSocket message being assembled.
    frag: Option<Box<io::Fragments>>,
    /// Ringing `call.offer`s sent by this connection; allocated only while there are some.
    calls: Option<Box<Calls>>,
    /// Close code of the WebSocket close frame the gateway sends.
    close_code: u16,
    phase: Phase,
    wire: Wire,
    /// A write hit WouldBlock: wait for WRITABLE.
    write_blocked: bool,
    registered_writable: bool,
    /// Closing: no more input is processed; flush, send close, shut down.
    closing: bool,
    close_sent: bool,
    shut: bool,
    notified_closed: bool,
    inflight: bool,
    /// The request in flight is a `quiet` ack (its `ack.ok` is dropped; a refusal is not).
    inflight_quiet: bool,
}

impl Conn {
    /// The client's address counted in the per-address caps, if it is (to release it).
    pub fn counted_ip(&self) -> Option<std::net::IpAddr> {
        self.counted.then(|| self.peer.ip())
    }

    /// A freshly accepted (and registered) socket: a WebSocket waiting for its
    /// upgrade request, or (`tcp`) a raw TCP connection, open at once; first waiting for its
    /// PROXY header when `proxied` (its address is counted in the caps once the header names
    /// the client; otherwise the caller counted it already).
    pub fn accept(id: u64, peer: SocketAddr, stream: TcpStream, tcp: bool, proxied: bool, env: &mut Env) -> Conn {
        let mut conn = Conn {
            id,
            stream,
            peer,
            counted: !proxied,
            last_activity: env.now_ms,
            auth: Auth::None,
            rbuf: Vec::new(),
            out: Vec::new(),
            out_frames: 0,
            out_hint: 0,
            in_push_round: false,
            timer: None,
            repush_timer: None,
            pending: VecDeque::new(),
            unacked: VecDeque::new(),
            frag: None,
            calls: None,
            close_code: close_code::NORMAL,
            phase: Phase::Handshake,
            wire: Wire::Json,
            write_blocked: false,
            registered_writable: false,
            closing: false,
            close_sent: false,
            shut: false,
            notified_closed: false,
            inflight: false,
            inflight_quiet: false,
        };
        conn.timer = Some(conn.arm(env, env.now + env.cfg.auth_timeout, TimerKind::Auth));
        if proxied {
            conn.phase = Phase::Proxy { tcp };
        } else if tcp {
            conn.opened(Wire::Tcp, env);
        }
        conn
    }

    fn arm(&self, env: &mut Env, at: Instant, kind: TimerKind) -> TimerId {
        env.wheel.insert(at, TimerEv { conn_id: self.id, kind })
    }

    /// When the connection is idle for `idle_timeout` unless a frame arrives first.
    fn idle_deadline(&self, env: &Env) -> Instant {
        let since = Duration::from_millis(u64::from(env.now_ms.wrapping_sub(self.last_activity)));
        env.now + env.cfg.idle_timeout.saturating_sub(since)
    }

    /// Replaces the connection's main timer.
    fn rearm(&mut self, env: &mut Env, at: Instant, kind: TimerKind) {
        if let Some(t) = self.timer.take() {
            env.wheel.cancel(t);
        }
        self.timer = Some(self.arm(env, at, kind));
    }

    /// Logic is registering this connection (its `auth` is being answered): pushes for it are
    /// held by the shard until the answer arrives.
    pub fn auth_pending(&self) -> bool {
        matches!(self.auth, Auth::Pending) && !self.closing
    }

    /// True once the connection can be dropped.
    pub fn is_dead(&self) -> bool {
        self.phase == Phase::Dead
    }

    fn opened(&mut self, wire: Wire, env: &mut Env) {
        self.wire = wire;
        self.phase = Phase::Open;
        self.last_activity = env.now_ms;
        tracing::debug!(conn = self.id, peer = %self.peer, wire = ?wire, "open");
    }

    /// Socket readiness.
    pub fn on_ready(&mut self, env: &mut Env, readable: bool, writable: bool, hup: bool) {
        if writable {
            self.write_blocked = false;
        }
        if readable {
            self.read_ready(env, hup);
        }
    }

    fn on_text(&mut self, bytes: &[u8], env: &mut Env) {
        let req = match frame::head(bytes) {
            Ok(r) => r,
            Err(bad) => {
                self.queue_json(frame::error(bad.rid, "bad_request", bad.message), env);
                return;
            }
        };
        if req.op == "ping" {
            self.queue_ping_ok(req.rid, env);
            return;
        }
        match &self.auth {
            Auth::None => {
                if req.op != "auth" {
                    self.queue_json(frame::error(req.rid, "unauthorized", "authenticate first (op auth)"), env);
                    return;
                }
                let Some(token) = req.token.as_deref() else {
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
                let quiet = req.op == "ack" && req.quiet == Some(true);
                if req.op == "ack" {
                    if let (Some(conv), Some(seq)) = (req.conv.as_deref(), req.seq) {
                        if self.ack_here(req.rid, conv, seq, quiet, env) {
                            return;
                        }
                    }
                }
                let call = CallRef::of(&req);
                let q =
                    Queued { op: req.op.into_owned(), rid: req.rid, bytes: Bytes::copy_from_slice(bytes), call, quiet };
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

    /// Drops the unacked pushes an `ack` of `conv` up to `seq` covers. When one of them had
    /// `seq` at least (the connection received the conversation, so it is a member) and no
    /// request is in flight (replies stay in request order), answers `ack.ok` here and queues
    /// the ack for logic (see `crate::acks`); `true` then. A `quiet` ack is not answered.
    fn ack_here(&mut self, rid: Option<u64>, conv: &str, seq: u64, quiet: bool, env: &mut Env) -> bool {
        let held = self.unacked.iter().any(|u| &*u.push.conv == conv && u.push.seq >= seq);
        self.unacked.retain(|u| !(&*u.push.conv == conv && u.push.seq <= seq));
        if !held || env.cfg.ack_flush.is_zero() || self.inflight || !self.pending.is_empty() {
            return false;
        }
        let Auth::Done(id) = &self.auth else { return false };
        // The connection is named (strings copied) only for its first ack of a batch.
        let (conn_id, peer, due) = (self.id, self.peer, env.now + env.cfg.ack_flush);
        let gateway = &env.bridge.advertise;
        env.acks.add(conn_id, || (id.event(gateway, conn_id), ip_text(peer.ip())), conv, seq, due);
        GatewayMetrics::inc(&env.metrics.acks_local);
        if !quiet {
            self.queue_json(frame::ack_ok(rid), env);
        }
        true
    }

    /// The event naming a connection that `reply` authenticated.
    pub fn auth_event(env: &Env, conn_id: u64, reply: &AuthReply) -> ConnEvent {
        ConnEvent {
            gateway: env.bridge.advertise.to_string(),
            conn_id,
            user: reply.user.clone(),
            session: reply.session.clone(),
            device: reply.device.clone(),
        }
    }

    fn conn_event(&self, env: &Env) -> Option<ConnEvent> {
        match &self.auth {
            Auth::Done(id) => Some(id.event(&env.bridge.advertise, self.id)),
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
        self.inflight_quiet = q.quiet;
        let req = ClientRequest {
            conn: Some(ev),
            frame: q.bytes,
            ip: ip_text(self.peer.ip()),
            op: q.op,
            rid: q.rid,
            acks: env.acks.take_conn(self.id),
        };
        env.bridge.handle(&env.link, q.rid, req);
    }

    /// A call request is going to logic: an offer starts ringing (its reply is awaited to
    /// learn whether logic took it), an answer or hangup stops ringing that call.
    fn track_call(&mut self, call: &CallRef, env: &mut Env) {
        if call.offer {
            let at = env.now + env.cfg.ring_timeout;
            let conn_id = self.id;
            let calls = self.calls.get_or_insert_with(Box::default);
            let token = calls.arm(&mut env.wheel, at, &call.call_id, &call.to, |token| TimerEv {
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
            let frame = Bytes::from(frame::call_timeout_request(&call.to, &call.call_id));
            env.bridge.handle_detached(ClientRequest {
                conn: Some(ev),
                frame,
                ip: ip_text(self.peer.ip()),
                op: "call.hangup".into(),
                ..Default::default()
            });
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
            // Registered meanwhile but no longer wanted: unregister.
            if let Ok(r) = &result {
                if r.ok {
                    env.bridge.disconnected(Conn::auth_event(env, self.id, r));
                }
            }
            return;
        }
        self.inflight = false;
        match result {
            Ok(r) if r.ok => {
                self.rearm(env, self.idle_deadline(env), TimerKind::Idle);
                self.queue_json(frame::auth_ok(rid, &r.user, &r.session, frame::now_ms()), env);
                tracing::debug!(conn = self.id, user = %r.user, "authenticated");
                // Logic registered the connection before answering (see `Bridge::authenticate`).
                self.auth = Auth::Done(Box::new(Identity { user: r.user, session: r.session, device: r.device }));
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
        let quiet = std::mem::take(&mut self.inflight_quiet);
        if self.calls.is_some() {
            self.offer_replied(&result, env);
        }
        match result {
            Ok(reply) => {
                // A quiet ack's success is not answered; its refusal is.
                let silenced = quiet && frame::head(&reply.frame).is_ok_and(|h| h.op == "ack.ok");
                if !reply.frame.is_empty() && !silenced {
                    match self.queue_encoded(&reply.frame, &mut Encoded::default(), env) {
                        Ok(_) => {}
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

    /// Its output waits for its shard's next push round (it was given pushes since the last
    /// one, and is neither closing nor dead: those are written at once).
    pub fn waits_for_push_round(&self) -> bool {
        self.in_push_round && !self.closing && !self.is_dead()
    }

    /// A push delivery for `user` on this connection; false when this connection cannot take
    /// pushes (gone), or is another user's (a stale route: never deliver it). `encoded` holds the
    /// frame's encoding for the binary wires, shared by every target of the delivery.
    pub fn on_push(&mut self, d: &Delivery, user: &str, encoded: &mut Encoded, env: &mut Env) -> bool {
        if self.closing || self.phase != Phase::Open {
            return false;
        }
        match &self.auth {
            Auth::Done(id) if id.user == user => {}
            _ => return false,
        }
        if self.calls.is_some() {
            self.on_call_push(&d.frame, env);
        }
        match self.queue_encoded(&d.frame, encoded, env) {
            Ok(true) => {}
            Ok(false) => return true,
            Err(e) => {
                tracing::warn!(conn = self.id, error = %e, "invalid push frame; dropped");
                GatewayMetrics::inc(&env.metrics.errors);
                return true;
            }
        }
        if !d.conv.is_empty() && d.seq > 0 {
            if self.unacked.len() >= env.cfg.max_unacked.max(1) {
                self.unacked.pop_front();
            }
            let push = encoded.pushed(d).clone();
            self.unacked.push_back(Unacked { push, attempts: 0, sent_ms: env.now_ms });
            if self.repush_timer.is_none() {
                self.repush_timer = Some(self.arm(env, env.now + env.cfg.repush_interval, TimerKind::Repush));
            }
        }
        if d.close {
            self.begin_close(env);
        }
        true
    }

    /// A timer of this connection fired.
    pub fn on_timer(&mut self, kind: TimerKind, env: &mut Env) {
        match kind {
            TimerKind::Auth => {
                self.timer = None;
                if matches!(self.auth, Auth::Done(_)) || self.closing {
                    return;
                }
                if self.phase == Phase::Open {
                    tracing::debug!(conn = self.id, "auth timeout");
                    self.queue_json(frame::error(None, "auth_timeout", "no auth within the time limit"), env);
                    self.begin_close(env);
                } else {
                    self.die(env);
                }
            }
            TimerKind::Idle => {
                self.timer = None;
                if self.closing {
                    return;
                }
                let deadline = self.idle_deadline(env);
                if env.now >= deadline {
                    tracing::debug!(conn = self.id, "idle timeout");
                    self.begin_close(env);
                } else {
                    self.timer = Some(self.arm(env, deadline, TimerKind::Idle));
                }
            }
            TimerKind::Repush => {
                self.repush_timer = None;
                if self.closing {
                    return;
                }
                let max = env.cfg.repush_attempts;
                let interval = u32::try_from(env.cfg.repush_interval.as_millis()).unwrap_or(u32::MAX);
                let now = env.now_ms;
                let mut unacked = std::mem::take(&mut self.unacked);
                // An entry re-sent `max` times is dropped once its last re-send went unacked
                // for an interval too.
                unacked.retain(|u| u.attempts < max || now.wrapping_sub(u.sent_ms) < interval);
                let mut next = None::<u32>;
                for u in &mut unacked {
                    let age = now.wrapping_sub(u.sent_ms);
                    let wait = if age >= interval {
                        u.attempts += 1;
                        u.sent_ms = now;
                        if !matches!(self.queue_encoded(&u.push.frame, &mut Encoded::default(), env), Ok(true)) {
                            return;
                        }
                        interval
                    } else {
                        interval - age
                    };
                    next = Some(next.map_or(wait, |n| n.min(wait)));
                }
                self.unacked = unacked;
                if let (Some(wait), false) = (next, self.closing) {
                    let at = env.now + Duration::from_millis(u64::from(wait));
                    self.repush_timer = Some(self.arm(env, at, TimerKind::Repush));
                }
            }
            TimerKind::Linger => {
                self.timer = None;
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
            Phase::Open if !self.closing => {
                self.queue_json(frame::drain(RETRY_AFTER_MS), env);
                self.begin_close(env);
            }
            Phase::Open => {}
            _ => self.die(env),
        }
    }

    /// Starts a graceful close: remaining frames, then a close frame, then FIN.
    pub fn begin_close(&mut self, env: &mut Env) {
        if self.closing {
            return;
        }
        self.closing = true;
        self.pending.clear();
        self.unacked.clear();
        self.notify_closed(env);
        self.cancel_timers(env);
        self.timer = Some(self.arm(env, env.now + LINGER, TimerKind::Linger));
    }

    fn die(&mut self, env: &mut Env) {
        self.notify_closed(env);
        self.phase = Phase::Dead;
    }

    /// Tells logic (again) that this connection is authenticated, if it is and stays open.
    pub fn announce(&mut self, env: &mut Env) {
        if self.closing {
            return;
        }
        if let Some(ev) = self.conn_event(env) {
            env.bridge.connected(ev);
        }
    }

    /// Tells logic an authenticated connection went away (once).
    pub fn notify_closed(&mut self, env: &mut Env) {
        if self.notified_closed {
            return;
        }
        self.notified_closed = true;
        self.hang_up_ringing(env);
        if let Some(ev) = self.conn_event(env) {
            env.bridge.disconnected(ev);
        }
    }

    /// The connection goes away while its offers ring: each callee gets a `call.hangup` with
    /// reason `gone`, relayed through logic on the caller's behalf.
    fn hang_up_ringing(&mut self, env: &mut Env) {
        let Some(mut calls) = self.calls.take() else {
            return;
        };
        let ringing = calls.cancel_all(&mut env.wheel);
        let Some(ev) = self.conn_event(env) else {
            return;
        };
        for call in ringing {
            env.bridge.handle_detached(ClientRequest {
                conn: Some(ev.clone()),
                frame: Bytes::from(frame::call_gone_request(&call.to, &call.call_id)),
                ip: ip_text(self.peer.ip()),
                op: "call.hangup".into(),
                ..Default::default()
            });
        }
    }

    /// Cancels every timer of this connection.
    pub fn cancel_timers(&mut self, env: &mut Env) {
        for t in [self.timer.take(), self.repush_timer.take()].into_iter().flatten() {
            env.wheel.cancel(t);
        }
        if let Some(mut calls) = self.calls.take() {
            calls.cancel_all(&mut env.wheel);
        }
    }
}

/// A client's address as logic's per-IP limits name it: `Ipv4Addr`'s `Display` goes through
/// the formatting machinery (padding support), a visible cost when every request carries it.
fn ip_text(ip: IpAddr) -> String {
    let IpAddr::V4(v4) = ip else {
        return ip.to_string();
    };
    let mut s = String::with_capacity(15);
    for (i, o) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            s.push('.');
        }
        if o >= 100 {
            s.push(char::from(b'0' + o / 100));
        }
        if o >= 10 {
            s.push(char::from(b'0' + o / 10 % 10));
        }
        s.push(char::from(b'0' + o % 10));
    }
    s
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    #[test]
    fn addresses_read_as_display_writes_them() {
        for o in 0..=255u8 {
            for ip in [Ipv4Addr::new(o, 0, 9, o), Ipv4Addr::new(10, o, 255, 100)] {
                assert_eq!(super::ip_text(IpAddr::V4(ip)), ip.to_string());
            }
        }
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        assert_eq!(super::ip_text(v6), "::1");
    }

    /// The slab holds one `Conn` per socket, so its size is most of what an idle
    /// connection costs; keep it within budget.
    #[test]
    fn connection_state_stays_small() {
        let size = std::mem::size_of::<super::Conn>();
        println!("size_of::<Conn>() = {size}");
        assert!(size <= 256, "Conn grew to {size} bytes");
    }
}
