//! Bytes in and out of one connection: reading into the shard's scratch buffer,
//! cutting the bytes into upgrade request, WebSocket frames or length-prefixed
//! TCP frames, and writing the encoded output. A connection keeps bytes only
//! while a frame is half-read or a write is half-done; both buffers are freed
//! as soon as they empty, so an idle connection owns no buffer at all.

use std::io::{self, Read, Write};
use std::sync::Arc;

use mio::{Interest, Registry, Token};
use prost::Message as _;
use switchboard_proto::internal::Delivery;
use switchboard_proto::v1::Frame;

use super::{Conn, Phase, Pushed, Wire};
use crate::connid::ConnId;
use crate::metrics::GatewayMetrics;
use crate::proxyproto::{self, Header};
use crate::shard::Env;
use crate::ws::{self, close_code, Opcode};
use crate::{bincodec, frame, tcpframe, ProxyMode};

/// A fragmented WebSocket message being assembled.
pub(super) struct Fragments {
    opcode: Opcode,
    data: Vec<u8>,
}

/// What the start of a trusted proxy's connection allows.
enum ProxyStep {
    /// The header is incomplete (bounded by `proxyproto::MAX_V1` / `MAX_V2`).
    Wait,
    /// Go on after this many bytes (the header's, or 0 without one).
    Go(usize),
    /// The connection was refused.
    Refused,
}

/// What one pass over buffered bytes found.
enum Parsed {
    /// Bytes consumed; the rest is an incomplete frame (or nothing).
    Used(usize),
    /// Stop reading: the connection is closing or failed.
    Stop,
}

impl Conn {
    /// The socket is readable: read until it would block (or, unless the peer
    /// hung up, until a read comes back short) and handle every complete frame.
    pub(super) fn read_ready(&mut self, env: &mut Env, hup: bool) {
        let mut scratch = std::mem::take(&mut env.scratch);
        loop {
            if self.closing {
                self.discard_input(&mut scratch);
                break;
            }
            match self.stream.read(&mut scratch) {
                Ok(0) => {
                    tracing::debug!(conn = self.id, "peer closed the socket");
                    self.die(env);
                    break;
                }
                Ok(n) => {
                    self.ingest(&mut scratch[..n], env);
                    if self.is_dead() || (n < scratch.len() && !hup && !self.closing) {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(conn = self.id, error = %e, "read error");
                    self.die(env);
                    break;
                }
            }
        }
        env.scratch = scratch;
    }

    /// Reads and drops whatever a closing peer still sends, until its EOF.
    pub(super) fn discard_input(&mut self, scratch: &mut [u8]) {
        self.rbuf = Vec::new();
        self.frag = None;
        loop {
            match self.stream.read(scratch) {
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

    /// Handles freshly read bytes, after any left from the previous read.
    fn ingest(&mut self, data: &mut [u8], env: &mut Env) {
        if self.rbuf.is_empty() {
            if let Parsed::Used(used) = self.parse(data, env) {
                if used < data.len() {
                    self.rbuf = data[used..].to_vec();
                }
            }
            return;
        }
        let mut buf = std::mem::take(&mut self.rbuf);
        buf.extend_from_slice(data);
        if let Parsed::Used(used) = self.parse(&mut buf, env) {
            if used < buf.len() {
                buf.drain(..used);
                self.rbuf = buf;
            }
        }
    }

    fn parse(&mut self, buf: &mut [u8], env: &mut Env) -> Parsed {
        let mut at = 0;
        if let Phase::Proxy { tcp } = self.phase {
            match self.proxy_header(buf, env) {
                ProxyStep::Wait => return Parsed::Used(0),
                ProxyStep::Refused => return Parsed::Stop,
                ProxyStep::Go(used) => at = used,
            }
            if !env.ip_caps.admit(self.peer.ip()) {
                tracing::debug!(conn = self.id, peer = %self.peer, "connections per address reached; closing");
                GatewayMetrics::inc(&env.metrics.errors);
                self.die(env);
                return Parsed::Stop;
            }
            self.counted = true;
            if tcp {
                self.opened(Wire::Tcp, env);
            } else {
                self.phase = Phase::Handshake;
            }
        }
        if self.phase == Phase::Handshake {
            let rest = &buf[at..];
            if rest.starts_with(b"PROXY ") || rest.starts_with(&proxyproto::V2_SIGNATURE) {
                tracing::debug!(conn = self.id, peer = %self.peer, "PROXY header from an untrusted address; closing");
                GatewayMetrics::inc(&env.metrics.errors);
                self.die(env);
                return Parsed::Stop;
            }
            match ws::parse_upgrade(rest) {
                Ok(None) => return Parsed::Used(at),
                Ok(Some((used, up))) => {
                    self.out.extend_from_slice(&up.response);
                    self.opened(if up.bin { Wire::Bin } else { Wire::Json }, env);
                    at += used;
                }
                Err(refusal) => {
                    tracing::debug!(conn = self.id, peer = %self.peer, status = refusal.status, "upgrade refused");
                    self.out.extend_from_slice(&refusal.response);
                    self.closing = true;
                    self.close_sent = true;
                    return Parsed::Stop;
                }
            }
        }
        let max = env.cfg.max_frame_bytes;
        while at < buf.len() {
            if self.closing || self.is_dead() {
                return Parsed::Stop;
            }
            let rest = &mut buf[at..];
            let used =
                if self.wire == Wire::Tcp { self.parse_tcp(rest, max, env) } else { self.parse_ws(rest, max, env) };
            match used {
                Some(0) => break,
                Some(n) => at += n,
                None => return Parsed::Stop,
            }
        }
        Parsed::Used(at)
    }

    /// The PROXY header at the start of a trusted proxy's connection; takes the client's
    /// address from it.
    fn proxy_header(&mut self, buf: &[u8], env: &mut Env) -> ProxyStep {
        let refuse = |conn: &mut Self, env: &mut Env, why: &str| {
            tracing::debug!(conn = conn.id, peer = %conn.peer, error = %why, "PROXY header refused; closing");
            GatewayMetrics::inc(&env.metrics.errors);
            conn.die(env);
            ProxyStep::Refused
        };
        match proxyproto::parse(buf) {
            Ok(Header::Incomplete) => ProxyStep::Wait,
            Ok(Header::Absent) if env.cfg.proxy_protocol == ProxyMode::Required => {
                refuse(self, env, "a PROXY header is required from this proxy")
            }
            Ok(Header::Absent) => ProxyStep::Go(0),
            Ok(Header::Present { len, source }) => {
                if let Some(client) = source {
                    self.peer = client;
                }
                ProxyStep::Go(len)
            }
            Err(why) => refuse(self, env, why),
        }
    }

    /// One length-prefixed frame from the start of `buf`: bytes used (0 while
    /// incomplete), `None` once the connection is closing.
    fn parse_tcp(&mut self, buf: &mut [u8], max: usize, env: &mut Env) -> Option<usize> {
        match tcpframe::parse_prefix(buf, max) {
            Ok(None) => Some(0),
            Ok(Some(len)) if buf.len() < tcpframe::PREFIX + len => Some(0),
            Ok(Some(len)) => {
                self.last_activity = env.now_ms;
                GatewayMetrics::inc(&env.metrics.frames_in);
                self.on_binary(&buf[tcpframe::PREFIX..tcpframe::PREFIX + len], env);
                Some(tcpframe::PREFIX + len)
            }
            Err(len) => {
                self.too_large(&format!("frame of {len} bytes exceeds the limit of {max}"), env);
                None
            }
        }
    }

    /// One WebSocket frame from the start of `buf`, like [`Conn::parse_tcp`].
    fn parse_ws(&mut self, buf: &mut [u8], max: usize, env: &mut Env) -> Option<usize> {
        let h = match ws::parse_header(buf, max) {
            Ok(Some(h)) => h,
            Ok(None) => return Some(0),
            Err(e) if e.code == close_code::TOO_BIG => {
                self.too_large(&e.message, env);
                return None;
            }
            Err(e) => {
                self.fail(e.code, &e.message, env);
                return None;
            }
        };
        let total = h.header_len + h.payload_len;
        if buf.len() < total {
            return Some(0);
        }
        let payload = &mut buf[h.header_len..total];
        ws::unmask(payload, h.mask, 0);
        self.last_activity = env.now_ms;
        match h.opcode {
            Opcode::Ping => self.queue_raw(Opcode::Pong, payload, env),
            Opcode::Pong => {}
            Opcode::Close => {
                tracing::debug!(conn = self.id, "peer sent close");
                self.notify_closed(env);
                let code = ws::close_reply_code(payload);
                if !self.close_sent {
                    ws::put_close(&mut self.out, code, "");
                    self.close_sent = true;
                }
                self.closing = true;
                return None;
            }
            Opcode::Text | Opcode::Binary if h.fin => {
                if self.frag.is_some() {
                    self.fail(close_code::PROTOCOL, "a new message began inside a fragmented one", env);
                    return None;
                }
                self.on_ws_message(h.opcode, payload, env);
            }
            Opcode::Text | Opcode::Binary => {
                if self.frag.is_some() {
                    self.fail(close_code::PROTOCOL, "a new message began inside a fragmented one", env);
                    return None;
                }
                self.frag = Some(Box::new(Fragments { opcode: h.opcode, data: payload.to_vec() }));
            }
            Opcode::Continuation => {
                let Some(frag) = self.frag.as_mut() else {
                    self.fail(close_code::PROTOCOL, "continuation frame without a message", env);
                    return None;
                };
                if frag.data.len() + payload.len() > max {
                    let size = frag.data.len() + payload.len();
                    self.too_large(&format!("message of {size}+ bytes exceeds the limit of {max}"), env);
                    return None;
                }
                frag.data.extend_from_slice(payload);
                if h.fin {
                    let frag = self.frag.take().expect("checked above");
                    self.on_ws_message(frag.opcode, &frag.data, env);
                }
            }
        }
        Some(total)
    }

    fn on_ws_message(&mut self, opcode: Opcode, payload: &[u8], env: &mut Env) {
        GatewayMetrics::inc(&env.metrics.frames_in);
        match (opcode, self.wire) {
            (Opcode::Text, Wire::Json) => {
                if std::str::from_utf8(payload).is_err() {
                    self.fail(close_code::INVALID_DATA, "text frame is not UTF-8", env);
                } else {
                    self.on_text(payload, env);
                }
            }
            (Opcode::Text, _) => {
                self.queue_json(frame::error(None, "bad_request", "text frames need subprotocol sb.json.v1"), env)
            }
            (_, Wire::Json) => {
                self.queue_json(frame::error(None, "bad_request", "binary frames need subprotocol sb.bin.v1"), env)
            }
            _ => self.on_binary(payload, env),
        }
    }

    /// A protobuf `Frame` (`sb.bin.v1` or raw TCP): handled as its canonical JSON.
    fn on_binary(&mut self, payload: &[u8], env: &mut Env) {
        match Frame::decode(payload) {
            Ok(f) => {
                let json = bincodec::frame_to_json(&f).to_string();
                self.on_text(json.as_bytes(), env);
            }
            Err(_) => self.queue_json(frame::error(None, "bad_request", "frame is not a valid protobuf Frame"), env),
        }
    }

    /// A frame above the size limit: `too_large`, then close (1009 on WebSocket).
    fn too_large(&mut self, message: &str, env: &mut Env) {
        tracing::debug!(conn = self.id, error = %message, "frame too large");
        GatewayMetrics::inc(&env.metrics.errors);
        self.queue_json(frame::error(None, "too_large", message), env);
        self.close_code = close_code::TOO_BIG;
        self.begin_close(env);
    }

    /// The peer broke the WebSocket rules: close with `code` and a reason.
    fn fail(&mut self, code: u16, message: &str, env: &mut Env) {
        tracing::debug!(conn = self.id, code, error = %message, "websocket protocol error");
        GatewayMetrics::inc(&env.metrics.errors);
        if !self.close_sent {
            ws::put_close(&mut self.out, code, message);
            self.close_sent = true;
        }
        self.begin_close(env);
    }

    /// Queues a canonical JSON frame from logic (reply or push), encoded for this connection's
    /// wire; the binary encoding is made once per `encoded` and shared by every connection that
    /// gets the same frame. `Ok(false)` when the connection was closed as a slow consumer.
    pub(super) fn queue_encoded(&mut self, json: &[u8], encoded: &mut Encoded, env: &mut Env) -> Result<bool, String> {
        if self.wire == Wire::Json {
            if !self.admit(env) {
                return Ok(false);
            }
            reserve_out(&mut self.out, json.len(), self.out_hint);
            ws::put_frame(&mut self.out, Opcode::Text, json);
            return Ok(true);
        }
        let payload = encoded.binary(json)?;
        if !self.admit(env) {
            return Ok(false);
        }
        reserve_out(&mut self.out, payload.len(), self.out_hint);
        if self.wire == Wire::Tcp {
            tcpframe::put_prefix(&mut self.out, payload.len());
        } else {
            ws::put_header(&mut self.out, Opcode::Binary, payload.len());
        }
        self.out.extend_from_slice(payload);
        Ok(true)
    }

    /// Counts one more outbound frame; closes a connection whose unwritten output
    /// already holds the configured number of frames (a slow consumer).
    fn admit(&mut self, env: &mut Env) -> bool {
        if self.closing && self.close_sent {
            return false;
        }
        if self.out_frames as usize >= env.cfg.max_outbound_frames || self.out.len() >= env.cfg.max_outbound_bytes {
            tracing::debug!(conn = self.id, "slow consumer closed");
            env.metrics.slow_consumer_closed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.out = Vec::new();
            self.die(env);
            return false;
        }
        self.out_frames += 1;
        env.frames_out += 1;
        true
    }

    /// Queues a WebSocket frame with a payload as is (pong).
    fn queue_raw(&mut self, opcode: Opcode, payload: &[u8], env: &mut Env) {
        if self.admit(env) {
            ws::put_frame(&mut self.out, opcode, payload);
        }
    }

    /// Encodes a canonical JSON frame for this connection's wire into `out`.
    pub(super) fn encode_into(wire: Wire, json: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        if wire == Wire::Json {
            ws::put_frame(out, Opcode::Text, json);
            return Ok(());
        }
        let v: serde_json::Value = serde_json::from_slice(json).map_err(|e| format!("not JSON: {e}"))?;
        let f = bincodec::json_to_frame(&v).map_err(|e| e.to_string())?;
        let len = f.encoded_len();
        if wire == Wire::Tcp {
            if u32::try_from(len).is_err() {
                return Err("frame too large to encode".into());
            }
            out.reserve(tcpframe::PREFIX + len);
            tcpframe::put_prefix(out, len);
        } else {
            out.reserve(ws::header_len(len) + len);
            ws::put_header(out, Opcode::Binary, len);
        }
        f.encode_raw(out);
        Ok(())
    }

    /// Queues a canonical JSON frame, encoded for this connection's wire.
    pub(super) fn queue_json(&mut self, json: String, env: &mut Env) {
        self.queue_json_bytes(json.as_bytes(), env);
    }

    pub(super) fn queue_json_bytes(&mut self, json: &[u8], env: &mut Env) {
        if !self.admit(env) {
            return;
        }
        if let Err(e) = Conn::encode_into(self.wire, json, &mut self.out) {
            tracing::warn!(conn = self.id, error = %e, "frame not encodable; dropped");
            GatewayMetrics::inc(&env.metrics.errors);
        }
    }

    /// `ping.ok` on the JSON wire without building a JSON value.
    pub(super) fn queue_ping_ok(&mut self, rid: Option<u64>, env: &mut Env) {
        if self.wire != Wire::Json {
            self.queue_json(frame::ping_ok(rid), env);
            return;
        }
        if !self.admit(env) {
            return;
        }
        let mut buf = [0u8; 48];
        let mut cur = io::Cursor::new(&mut buf[..]);
        let _ = match rid {
            Some(r) => write!(cur, "{{\"op\":\"ping.ok\",\"rid\":{r}}}"),
            None => write!(cur, "{{\"op\":\"ping.ok\"}}"),
        };
        let n = cur.position() as usize;
        ws::put_frame(&mut self.out, Opcode::Text, &buf[..n]);
    }

    /// Writes as much output as the socket takes; once a closing connection's
    /// output (and close frame) is out, half-closes so the peer sees EOF.
    pub fn flush_out(&mut self, env: &mut Env) {
        if self.write_blocked || self.shut || self.is_dead() {
            return;
        }
        if self.closing && !self.close_sent && self.phase == Phase::Open {
            if self.wire != Wire::Tcp {
                ws::put_close(&mut self.out, self.close_code, "");
            }
            self.close_sent = true;
        }
        while !self.out.is_empty() {
            match self.stream.write(&self.out) {
                Ok(0) => {
                    self.die(env);
                    return;
                }
                Ok(n) if n == self.out.len() => {
                    self.out_hint = hint_of(self.out.capacity());
                    self.out = Vec::new();
                    self.out_frames = 0;
                }
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.write_blocked = true;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(conn = self.id, error = %e, "write error");
                    self.die(env);
                    return;
                }
            }
        }
        self.out_frames = 0;
        if self.closing && self.close_sent {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
            self.shut = true;
            let mut scratch = std::mem::take(&mut env.scratch);
            self.discard_input(&mut scratch);
            env.scratch = scratch;
        }
    }

    /// Keeps WRITABLE interest registered only while output is blocked.
    pub fn sync_interest(&mut self, registry: &Registry) {
        if self.is_dead() {
            return;
        }
        let want = self.write_blocked;
        if want == self.registered_writable {
            return;
        }
        let interest = if want { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
        if registry.reregister(&mut self.stream, Token(ConnId::decode(self.id).key), interest).is_ok() {
            self.registered_writable = want;
        }
    }
}

/// Room to take in an empty output buffer, so that the few frames one wake-up queues for a
/// connection do not regrow it frame by frame (the buffer is freed once written out).
const OUT_CHUNK: usize = 4096;

/// The largest output buffer a connection's next wake-up starts with, whatever the last one held.
const OUT_HINT_MAX: usize = 32 * 1024;

/// What [`reserve_out`] reserves next for a connection whose last buffer grew to `capacity`,
/// in KiB (so it fits the connection's state in one byte).
fn hint_of(capacity: usize) -> u8 {
    (capacity.min(OUT_HINT_MAX) / 1024) as u8
}

/// Reserves room for a frame of `len` bytes when `out` has none: a whole [`OUT_CHUNK`], or as
/// much as the connection's last buffer grew to (`hint` KiB, a fan-out round that wrote many
/// frames to it), so that the frames of one wake-up do not regrow it frame by frame.
fn reserve_out(out: &mut Vec<u8>, len: usize, hint: u8) {
    if out.capacity() == 0 {
        out.reserve(OUT_CHUNK.max(usize::from(hint) * 1024).max(len + 14));
    }
}

/// What one push shares among every connection that receives it: its protobuf encoding
/// (`sb.bin.v1` and raw TCP) and the entry the unacked queues hold, each made at most once
/// however many connections receive the frame.
#[derive(Default)]
pub(crate) struct Encoded {
    binary: Option<Result<Vec<u8>, String>>,
    pushed: Option<Arc<Pushed>>,
}

impl Encoded {
    /// The shared unacked entry of `d` (a `msg` push), made once per push.
    pub(super) fn pushed(&mut self, d: &Delivery) -> &Arc<Pushed> {
        self.pushed.get_or_insert_with(|| {
            Arc::new(Pushed { conv: d.conv.as_str().into(), seq: d.seq, frame: d.frame.clone() })
        })
    }

    fn binary(&mut self, json: &[u8]) -> Result<&[u8], String> {
        let r = self.binary.get_or_insert_with(|| {
            let v: serde_json::Value = serde_json::from_slice(json).map_err(|e| format!("not JSON: {e}"))?;
            let f = bincodec::json_to_frame(&v).map_err(|e| e.to_string())?;
            if u32::try_from(f.encoded_len()).is_err() {
                return Err("frame too large to encode".into());
            }
            Ok(f.encode_to_vec())
        });
        r.as_deref().map_err(Clone::clone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_buffers_start_as_big_as_the_last_one_grew_within_a_cap() {
        // No history: a whole chunk, or the frame when it is bigger.
        let mut out = Vec::new();
        reserve_out(&mut out, 100, 0);
        assert!(out.capacity() >= OUT_CHUNK);
        let mut out = Vec::new();
        reserve_out(&mut out, 10_000, 0);
        assert!(out.capacity() >= 10_014);
        // A connection whose last buffer grew to 12 KiB starts with 12 KiB.
        assert_eq!(hint_of(12 * 1024 + 100), 12);
        let mut out = Vec::new();
        reserve_out(&mut out, 100, hint_of(12 * 1024));
        assert!(out.capacity() >= 12 * 1024);
        // However big it grew, the next starts with at most OUT_HINT_MAX.
        assert_eq!(usize::from(hint_of(10 << 20)) * 1024, OUT_HINT_MAX);
        // A buffer that has room already is left alone.
        let mut out = Vec::with_capacity(64);
        reserve_out(&mut out, 100, 8);
        assert_eq!(out.capacity(), 64);
    }
}
