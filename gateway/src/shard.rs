//! One shard: a thread with its own mio poll, SO_REUSEPORT listeners (WebSocket
//! and, optionally, raw TCP), connection slab, timing wheel and mailbox.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::acks::AckBatch;
use crate::bridge::{Bridge, ShardLink, ShardMsg};
use crate::conn::{Conn, Encoded};
use crate::connid::{ConnId, GenCounter, MAX_KEYS};
use crate::ipcap::IpCaps;
use crate::metrics::{GatewayMetrics, ShardMeters};
use crate::wheel::Wheel;
use crate::GatewayConfig;
use switchboard_proto::internal::Delivery;

pub(crate) const LISTENER: Token = Token(usize::MAX - 1);
pub(crate) const TCP_LISTENER: Token = Token(usize::MAX - 2);
pub(crate) const WAKER: Token = Token(usize::MAX);
pub(crate) const TICK: Duration = Duration::from_millis(100);
pub(crate) const WHEEL_SLOTS: usize = 1024;
const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// Connections re-announced to logic per loop iteration (spreads a re-announce of a full shard).
const REANNOUNCE_PER_TURN: usize = 512;
/// Bytes of the per-shard read buffer.
pub(crate) const SCRATCH_BYTES: usize = 64 * 1024;

/// Why a connection timer fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimerKind {
    Auth,
    Idle,
    Repush,
    Linger,
    /// Ring timeout of a `call.offer`; the token names the call in the connection's
    /// [`crate::calls::Calls`].
    Ring(u32),
}

/// A wheel entry: which connection and which timer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TimerEv {
    pub conn_id: u64,
    pub kind: TimerKind,
}

/// Everything a connection needs from its shard besides the socket.
pub(crate) struct Env {
    pub cfg: Arc<GatewayConfig>,
    pub metrics: Arc<GatewayMetrics>,
    pub bridge: Bridge,
    pub link: ShardLink,
    pub wheel: Wheel<TimerEv>,
    pub now: Instant,
    /// `now` in milliseconds since `epoch`, wrapping after 49 days: compact enough for
    /// per-entry stamps, compared by difference (`wrapping_sub`).
    pub now_ms: u32,
    /// What `now_ms` counts from (the shard's start).
    pub epoch: Instant,
    /// Frames queued since the loop last added them to the `frames_out` counter.
    pub frames_out: u64,
    /// Where every connection of the shard reads into (see `conn::io`).
    pub scratch: Vec<u8>,
    /// Open connections per client address, over every shard.
    pub ip_caps: Arc<IpCaps>,
    /// Acks answered here and not yet handed to logic.
    pub acks: AckBatch,
}

impl Env {
    /// Sets `now` (and `now_ms`) to the current time.
    pub fn tick(&mut self) {
        self.now = Instant::now();
        self.now_ms = self.now.saturating_duration_since(self.epoch).as_millis() as u32;
    }
}

/// The shard event loop state.
pub(crate) struct Shard {
    idx: usize,
    poll: Poll,
    listener: Option<TcpListener>,
    tcp_listener: Option<TcpListener>,
    conns: Slab<Conn>,
    env: Env,
    rx: Receiver<ShardMsg>,
    gens: GenCounter,
    /// Connection ids still to re-announce to logic.
    reannounce: Vec<u64>,
    /// Connections touched by mailbox messages, flushed once after the mailbox is empty (one
    /// write for a reply, pushes and re-pushes that arrived together).
    dirty: Vec<usize>,
    /// Connections given pushes since the last push round (see [`PushRounds`]), each once (the
    /// connection's `in_push_round` flag).
    push_dirty: Vec<usize>,
    rounds: PushRounds,
    /// Pushes for connections whose `auth` logic has registered but the shard has not heard back
    /// yet (logic routes a connection before answering), delivered right after `auth.ok`;
    /// bounded by [`HELD_MAX`] per connection.
    held: std::collections::HashMap<u64, Vec<Delivery>>,
    meters: ShardMeters,
}

/// Most pushes held for one connection while its `auth` is answered (more are dropped: the
/// client catches up with `sync` after `auth.ok`).
const HELD_MAX: usize = 64;

impl Shard {
    pub fn new(
        idx: usize,
        poll: Poll,
        mut listener: TcpListener,
        mut tcp_listener: Option<TcpListener>,
        rx: Receiver<ShardMsg>,
        env: Env,
    ) -> io::Result<Shard> {
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        if let Some(l) = &mut tcp_listener {
            poll.registry().register(l, TCP_LISTENER, Interest::READABLE)?;
        }
        let meters = env.metrics.shard_meters(idx);
        let rounds = PushRounds::new(env.cfg.push_linger);
        Ok(Shard {
            idx,
            poll,
            listener: Some(listener),
            tcp_listener,
            conns: Slab::new(),
            env,
            rx,
            gens: GenCounter::new_boot(),
            reannounce: Vec::new(),
            dirty: Vec::new(),
            push_dirty: Vec::new(),
            rounds,
            held: std::collections::HashMap::new(),
            meters,
        })
    }

    /// Runs until shutdown has drained every connection.
    pub fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        let mut fired = Vec::new();
        let mut drain_deadline: Option<Instant> = None;
        loop {
            let wait = if !self.reannounce.is_empty() {
                Duration::ZERO
            } else if self.push_dirty.is_empty() {
                TICK
            } else {
                self.rounds.due.saturating_duration_since(Instant::now()).min(TICK)
            };
            if let Err(e) = self.poll.poll(&mut events, Some(wait)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::warn!(shard = self.idx, error = %e, "poll failed");
                break;
            }
            self.env.tick();
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept_all(false),
                    TCP_LISTENER => self.accept_all(true),
                    WAKER => {}
                    Token(key) => {
                        if let Some(conn) = self.conns.get_mut(key) {
                            let hup = ev.is_read_closed() || ev.is_error();
                            let readable = ev.is_readable() || hup;
                            let writable = ev.is_writable() || ev.is_write_closed() || ev.is_error();
                            conn.on_ready(&mut self.env, readable, writable, hup);
                            self.finish(key);
                        }
                    }
                }
            }
            self.env.link.rearm();
            while let Ok(msg) = self.rx.try_recv() {
                if let ShardMsg::Shutdown = msg {
                    if drain_deadline.is_none() {
                        self.start_drain();
                        drain_deadline = Some(self.env.now + DRAIN_GRACE);
                    }
                } else {
                    self.on_msg(msg);
                }
            }
            self.flush_dirty();
            if !self.push_dirty.is_empty() && self.env.now >= self.rounds.due {
                self.push_round();
            }
            self.reannounce_some();
            if self.env.acks.is_due(self.env.now) || drain_deadline.is_some() {
                self.flush_acks();
            }
            self.env.wheel.advance(self.env.now, &mut fired);
            for t in fired.drain(..) {
                if let Some(key) = self.lookup(t.conn_id) {
                    self.conns[key].on_timer(t.kind, &mut self.env);
                    self.finish(key);
                }
            }
            self.count_frames_out();
            self.meters.loop_time.observe(self.env.now.elapsed().as_secs_f64());
            if let Some(deadline) = drain_deadline {
                if self.conns.is_empty() || self.env.now >= deadline {
                    break;
                }
            }
        }
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for k in keys {
            self.remove(k);
        }
        self.flush_acks();
        self.count_frames_out();
        // answer pushes that raced with shutdown
        while let Ok(msg) = self.rx.try_recv() {
            if let ShardMsg::Push { deliveries, reply } = msg {
                let _ = reply.send(deliveries.iter().flat_map(|d| d.targets.iter().map(|t| t.conn_id)).collect());
            }
        }
        tracing::debug!(shard = self.idx, "shard stopped");
    }

    /// Hands the acks answered here to logic (one request each, replies dropped).
    fn flush_acks(&mut self) {
        for req in self.env.acks.take() {
            self.env.bridge.handle_detached(req);
        }
    }

    /// Accepts every pending connection of the WebSocket (`tcp` false) or raw TCP listener.
    fn accept_all(&mut self, tcp: bool) {
        loop {
            let listener = if tcp { &self.tcp_listener } else { &self.listener };
            let Some(listener) = listener else {
                return;
            };
            let (mut stream, peer) = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(shard = self.idx, error = %e, "accept failed");
                    GatewayMetrics::inc(&self.env.metrics.errors);
                    return;
                }
            };
            GatewayMetrics::inc(&self.env.metrics.accepted);
            let open = self.env.metrics.connections.load(Ordering::Relaxed);
            if open >= self.env.cfg.max_connections as i64 || self.conns.len() >= MAX_KEYS - 1 {
                tracing::debug!(peer = %peer, "connection limit reached; closing");
                GatewayMetrics::inc(&self.env.metrics.errors);
                drop(stream);
                continue;
            }
            // A trusted proxy's connection is counted under the client's address once its
            // PROXY header names it.
            let proxied =
                self.env.cfg.proxy_protocol != crate::ProxyMode::Off && self.env.cfg.trusted_proxies.trusts(peer.ip());
            if !proxied && !self.env.ip_caps.admit(peer.ip()) {
                tracing::debug!(peer = %peer, "connections per address reached; closing");
                GatewayMetrics::inc(&self.env.metrics.errors);
                drop(stream);
                continue;
            }
            let _ = stream.set_nodelay(true);
            let entry = self.conns.vacant_entry();
            let key = entry.key();
            let id = ConnId { shard: self.idx, key, gen: self.gens.bump() }.encode();
            if let Err(e) = self.poll.registry().register(&mut stream, Token(key), Interest::READABLE) {
                tracing::warn!(error = %e, "register failed");
                GatewayMetrics::inc(&self.env.metrics.errors);
                if !proxied {
                    self.env.ip_caps.release(peer.ip());
                }
                continue;
            }
            self.env.metrics.connections.fetch_add(1, Ordering::Relaxed);
            self.meters.connections.inc();
            tracing::debug!(shard = self.idx, conn = id, peer = %peer, "accepted");
            let conn = Conn::accept(id, peer, stream, tcp, proxied, &mut self.env);
            entry.insert(conn);
            self.finish(key);
        }
    }

    fn on_msg(&mut self, msg: ShardMsg) {
        match msg {
            ShardMsg::AuthDone { conn_id, rid, result } => match self.lookup(conn_id) {
                Some(key) => {
                    self.conns[key].on_auth_done(rid, result, &mut self.env);
                    // Pushes that raced ahead of the answer go out right after `auth.ok`.
                    for d in self.held.remove(&conn_id).unwrap_or_default() {
                        let user = d.targets.first().map(|t| t.user.clone()).unwrap_or_default();
                        self.conns[key].on_push(&d, &user, &mut Encoded::default(), &mut self.env);
                    }
                    self.dirty.push(key);
                }
                // Closed while logic registered it: unregister.
                None => {
                    if let Some(r) = result.as_ref().ok().filter(|r| r.ok) {
                        self.env.bridge.disconnected(Conn::auth_event(&self.env, conn_id, r));
                    }
                }
            },
            ShardMsg::HandleDone { conn_id, rid, result } => {
                if let Some(key) = self.lookup(conn_id) {
                    self.conns[key].on_handle_done(rid, result, &mut self.env);
                    self.dirty.push(key);
                }
            }
            ShardMsg::Push { deliveries, reply } => {
                let mut gone = Vec::new();
                for d in &deliveries {
                    // The frame is encoded once per wire for all of its targets.
                    let mut encoded = Encoded::default();
                    for t in &d.targets {
                        match self.lookup(t.conn_id) {
                            Some(key) if self.conns[key].auth_pending() => {
                                let held = self.held.entry(t.conn_id).or_default();
                                if held.len() < HELD_MAX {
                                    held.push(Delivery { targets: vec![t.clone()], ..d.clone() });
                                }
                            }
                            Some(key) if self.conns[key].on_push(d, &t.user, &mut encoded, &mut self.env) => {
                                self.rounds.frames += 1;
                                let conn = &mut self.conns[key];
                                if !conn.in_push_round {
                                    conn.in_push_round = true;
                                    self.push_dirty.push(key);
                                }
                            }
                            _ => gone.push(t.conn_id),
                        }
                    }
                }
                let _ = reply.send(gone);
            }
            ShardMsg::Reannounce => {
                self.reannounce = self.conns.iter().map(|(_, c)| c.id).collect();
                tracing::info!(shard = self.idx, conns = self.reannounce.len(), "re-announcing connections to logic");
            }
            ShardMsg::Shutdown => self.start_drain(),
        }
    }

    /// Writes out (and settles) every connection the mailbox touched.
    fn flush_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        for key in dirty.drain(..) {
            self.finish(key);
        }
        self.dirty = dirty;
    }

    /// Adds the frames queued since the last call to the `frames_out` counter (one atomic add
    /// per loop turn, not per frame).
    fn count_frames_out(&mut self) {
        let n = std::mem::take(&mut self.env.frames_out);
        if n > 0 {
            self.env.metrics.frames_out.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Writes out every connection given pushes since the last round, and sets when the next
    /// round may start.
    fn push_round(&mut self) {
        let start = self.env.now;
        let mut dirty = std::mem::take(&mut self.push_dirty);
        let conns = dirty.len();
        for key in dirty.drain(..) {
            if let Some(conn) = self.conns.get_mut(key) {
                conn.in_push_round = false;
            }
            self.finish(key);
        }
        self.push_dirty = dirty;
        self.rounds.done(start, Instant::now(), conns);
    }

    /// Re-announces the next few connections of a pending re-announce.
    fn reannounce_some(&mut self) {
        let n = self.reannounce.len().min(REANNOUNCE_PER_TURN);
        for id in self.reannounce.drain(..n).collect::<Vec<_>>() {
            if let Some(key) = self.lookup(id) {
                self.conns[key].announce(&mut self.env);
            }
        }
    }

    fn lookup(&self, conn_id: u64) -> Option<usize> {
        let d = ConnId::decode(conn_id);
        if d.shard != self.idx {
            return None;
        }
        match self.conns.get(d.key) {
            Some(c) if c.id == conn_id => Some(d.key),
            _ => None,
        }
    }

    fn start_drain(&mut self) {
        for mut l in [self.listener.take(), self.tcp_listener.take()].into_iter().flatten() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.conns[key].drain(&mut self.env);
            self.finish(key);
        }
    }

    /// After any event on a connection: write, fix interest, drop when dead. A connection with
    /// pushes waiting for the push round is written by the round, replies queued behind them
    /// included (in order): an event on it (a member's `ack`, a reply) does not write its pushes
    /// one by one ahead of the round, so each write carries what the round gathered.
    fn finish(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if !conn.waits_for_push_round() {
            conn.flush_out(&mut self.env);
        }
        if conn.is_dead() {
            self.remove(key);
            return;
        }
        conn.sync_interest(self.poll.registry());
    }

    fn remove(&mut self, key: usize) {
        if let Some(mut conn) = self.conns.try_remove(key) {
            self.held.remove(&conn.id);
            // Its held acks go now: a reconnect of the device resumes after them.
            if let Some(req) = self.env.acks.take_closed(conn.id) {
                self.env.bridge.handle_detached(req);
            }
            conn.notify_closed(&mut self.env);
            conn.cancel_timers(&mut self.env);
            self.env.metrics.connections.fetch_sub(1, Ordering::Relaxed);
            self.meters.connections.dec();
            if let Some(ip) = conn.counted_ip() {
                self.env.ip_caps.release(ip);
            }
            tracing::debug!(shard = self.idx, conn = conn.id, "connection closed");
        }
    }
}

/// When a shard writes pushes out. A push round writes every connection that got pushes since
/// the round before. Under fan-out load (a round that carried [`COALESCING`] or more pushes per
/// connection it wrote: many messages reach the same connections) the next round starts
/// [`ROUND_FACTOR`] times the last round's duration after it began, at most `linger` later, so
/// each write carries more messages and the shard makes fewer `send` calls per delivery; 1:1
/// traffic, where a round rarely finds two pushes for one connection, is written at once.
struct PushRounds {
    linger: Duration,
    /// When the next round may start.
    due: Instant,
    /// Pushes queued since the last round.
    frames: usize,
}

/// Pushes per written connection from which a round counts as fan-out load.
const COALESCING: usize = 2;

/// The share of its time a shard under fan-out load spends in push rounds is about
/// `1 / ROUND_FACTOR` (while `linger` does not cap the wait).
const ROUND_FACTOR: u32 = 4;

impl PushRounds {
    fn new(linger: Duration) -> PushRounds {
        PushRounds { linger, due: Instant::now(), frames: 0 }
    }

    /// A round that began at `start`, ended at `end` and wrote `conns` connections.
    fn done(&mut self, start: Instant, end: Instant, conns: usize) {
        let took = end.saturating_duration_since(start);
        self.due = if self.frames >= COALESCING * conns { start + (took * ROUND_FACTOR).min(self.linger) } else { end };
        self.frames = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_rounds_wait_only_under_fan_out_load() {
        let linger = Duration::from_millis(20);
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut r = PushRounds::new(linger);
        // 1:1 traffic: one push per connection written; the next round may start at once.
        r.frames = 50;
        r.done(t0, t0 + ms(1), 50);
        assert_eq!(r.due, t0 + ms(1));
        assert_eq!(r.frames, 0, "each round counts its own pushes");
        // Fan-out: 8 pushes per connection; the next round waits 4 × the round's duration.
        r.frames = 8_000;
        r.done(t0, t0 + ms(3), 1_000);
        assert_eq!(r.due, t0 + ms(12));
        // ... at most `linger` after the round began.
        r.frames = 8_000;
        r.done(t0, t0 + ms(9), 1_000);
        assert_eq!(r.due, t0 + linger);
        // Fewer than 2 pushes per connection on average counts as 1:1.
        r.frames = 1_999;
        r.done(t0, t0 + ms(9), 1_000);
        assert_eq!(r.due, t0 + ms(9));
        // A zero linger writes every round at once.
        let mut off = PushRounds::new(Duration::ZERO);
        off.frames = 8_000;
        off.done(t0, t0 + ms(3), 1_000);
        assert!(off.due <= t0 + ms(3));
    }
}
