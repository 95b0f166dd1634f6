//! Helpers shared by the fuzz targets: the frame-size limits a target picks from, a
//! deterministic splitter that cuts a byte stream into reads, and small reference
//! decoders that mirror the gateway's read loop (`gateway/src/conn/io.rs`) over the
//! public parsing functions.
//!
//! Input layout of the stream targets (`ws_frame`, `tcp_frame`): byte 0 picks the
//! frame-size limit ([`pick_max`]), byte 1 seeds how the rest is cut into reads
//! ([`Reads`]), and bytes 2.. are what the client sent.

use switchboard_gateway::tcpframe;
use switchboard_gateway::ws::{self, Opcode};

/// Frame-size limits a target runs with (the gateway's default is 64 KiB).
const MAXES: [usize; 8] = [0, 1, 7, 125, 126, 65_535, 65_536, 1 << 20];

/// The frame-size limit selected by one input byte.
pub fn pick_max(b: u8) -> usize {
    MAXES[usize::from(b) % MAXES.len()]
}

/// Splits `[0, len)` into consecutive reads of 1..=64 bytes, pseudo-randomly from a seed
/// (xorshift), so the same input always gives the same reads.
pub struct Reads {
    state: u64,
}

impl Reads {
    pub fn new(seed: u8) -> Self {
        Reads { state: 0x9E37_79B9_7F4A_7C15 ^ (u64::from(seed) << 17 | u64::from(seed)) }
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        x
    }

    /// The read boundaries of a stream of `len` bytes: each entry is one read's length.
    pub fn lengths(&mut self, len: usize) -> Vec<usize> {
        let mut out = Vec::new();
        let mut left = len;
        while left > 0 {
            let n = (1 + (self.next_u64() % 64) as usize).min(left);
            out.push(n);
            left -= n;
        }
        out
    }
}

/// What a client's WebSocket byte stream decoded to, frame by frame.
#[derive(Debug, PartialEq, Eq)]
pub enum WsEvent {
    Frame {
        opcode: Opcode,
        fin: bool,
        payload: Vec<u8>,
    },
    /// The connection is failed with this close code; nothing after it is read.
    Error(u16),
}

/// Decodes every complete frame at the start of `buf` (unmasking payloads in place), as the
/// gateway's read loop does. Returns the bytes used and whether decoding stopped on an error.
/// Checks on the way that the header never claims bytes beyond `buf` and that lengths respect
/// `max` (control frames: 125 bytes, final).
pub fn ws_drain(buf: &mut [u8], max: usize, events: &mut Vec<WsEvent>) -> (usize, bool) {
    let mut at = 0;
    loop {
        let rest = &mut buf[at..];
        match ws::parse_header(rest, max) {
            Ok(None) => {
                assert!(rest.len() < 14, "no header needs more than 14 bytes, had {}", rest.len());
                return (at, false);
            }
            Err(e) => {
                assert!(
                    e.code == ws::close_code::PROTOCOL || e.code == ws::close_code::TOO_BIG,
                    "unexpected close code {}",
                    e.code
                );
                events.push(WsEvent::Error(e.code));
                return (at, true);
            }
            Ok(Some(h)) => {
                assert!(matches!(h.header_len, 6 | 8 | 14), "header_len {}", h.header_len);
                assert!(h.header_len <= rest.len(), "header claims bytes it was not given");
                if h.opcode.is_control() {
                    assert!(h.fin && h.payload_len <= ws::MAX_CONTROL_PAYLOAD);
                } else {
                    assert!(h.payload_len <= max, "payload {} above the limit {max}", h.payload_len);
                }
                let total = h.header_len + h.payload_len;
                if rest.len() < total {
                    return (at, false);
                }
                let payload = &mut rest[h.header_len..total];
                ws::unmask(payload, h.mask, 0);
                events.push(WsEvent::Frame { opcode: h.opcode, fin: h.fin, payload: payload.to_vec() });
                at += total;
            }
        }
    }
}

/// What a raw TCP byte stream decoded to.
#[derive(Debug, PartialEq, Eq)]
pub enum TcpEvent {
    Frame(Vec<u8>),
    /// A frame above the limit was announced; the connection is closed.
    TooLarge(usize),
}

/// Decodes every complete length-prefixed frame at the start of `buf`, as the gateway's read
/// loop does. Returns the bytes used and whether decoding stopped on an oversize frame.
pub fn tcp_drain(buf: &[u8], max: usize, events: &mut Vec<TcpEvent>) -> (usize, bool) {
    let mut at = 0;
    loop {
        let rest = &buf[at..];
        match tcpframe::parse_prefix(rest, max) {
            Ok(None) => {
                assert!(rest.len() < tcpframe::PREFIX);
                return (at, false);
            }
            Err(len) => {
                assert!(len > max);
                events.push(TcpEvent::TooLarge(len));
                return (at, true);
            }
            Ok(Some(len)) => {
                assert!(len <= max);
                if rest.len() < tcpframe::PREFIX + len {
                    return (at, false);
                }
                events.push(TcpEvent::Frame(rest[tcpframe::PREFIX..tcpframe::PREFIX + len].to_vec()));
                at += tcpframe::PREFIX + len;
            }
        }
    }
}

/// Feeds `data` to `drain` in the reads `lengths` gives, keeping the undecoded tail between
/// reads like the connection's read buffer. Returns the events and the bytes left undecoded.
pub fn by_reads<E>(
    data: &[u8],
    lengths: &[usize],
    mut drain: impl FnMut(&mut [u8], &mut Vec<E>) -> (usize, bool),
) -> (Vec<E>, usize) {
    let mut events = Vec::new();
    let mut kept: Vec<u8> = Vec::new();
    let mut at = 0;
    for &n in lengths {
        kept.extend_from_slice(&data[at..at + n]);
        at += n;
        let (used, stop) = drain(&mut kept, &mut events);
        if stop {
            return (events, kept.len() - used + (data.len() - at));
        }
        kept.drain(..used);
    }
    (events, kept.len())
}

/// A client (masked) frame, as a browser would send it: minimal length form.
pub use switchboard_gateway::ws::client_frame;

/// Decodes one unmasked server frame (reference decoder, independent of the gateway's):
/// `(first byte, header bytes, payload)`. Panics unless the frame is complete, uses the
/// minimal length form and nothing follows it.
pub fn server_frame(out: &[u8]) -> (u8, usize, &[u8]) {
    assert!(out.len() >= 2, "server frame shorter than its header");
    assert_eq!(out[1] & 0x80, 0, "server frames are not masked");
    let (len, header) = match out[1] & 0x7F {
        126 => (u64::from(u16::from_be_bytes([out[2], out[3]])), 4),
        127 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&out[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        n => (u64::from(n), 2),
    };
    let minimal = match header {
        2 => len <= 125,
        4 => (126..=0xFFFF).contains(&len),
        _ => len > 0xFFFF && len >> 63 == 0,
    };
    assert!(minimal, "length {len} not in its minimal form");
    assert_eq!(out.len() as u64, header as u64 + len, "server frame length and bytes disagree");
    (out[0], header, &out[header..])
}
