//! `rawws`: a minimal single-threaded client-side WebSocket engine on mio, built for load.
//!
//! - nonblocking connect from a chosen source address (so many 127.0.0.x addresses can be used to
//!   pass the 64k ephemeral-port limit of one address);
//! - HTTP/1.1 upgrade offering `Sec-WebSocket-Protocol: sb.json.v1`, answered by `101`;
//! - masked client frames (RFC 6455 §5.3; one fixed mask key, enough for a load tool), which can
//!   be pre-encoded once and copied as bytes ([`encode_frame`]);
//! - unmasked server frames parsed incrementally from a per-connection buffer ([`parse_frame`]):
//!   one read syscall drains many frames, and everything the handler queues while they are
//!   processed goes out in one write syscall.
//!
//! The engine owns the sockets; a [`Handler`] sees `opened`, every complete data message
//! (`frame`), the end of each read batch (`read_done`) and `closed`, and queues outgoing frames
//! through the [`Ctx`] it is given. Between polls, [`Client::send_text`] / [`Client::send_raw`]
//! queue frames too; [`Client::poll`] writes them out first.
//!
//! **Lean mode** ([`Client::set_lean`], used by `connect` to hold hundreds of thousands of idle
//! connections): connections opened in it own no buffer while idle. Reads go into one scratch
//! buffer shared by all connections (only an incomplete frame's bytes are copied into a buffer of
//! the connection's own, freed once the frame completes); the write buffer and the fragment
//! buffer are freed as soon as they are empty.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

/// The mask key of every client frame.
pub const MASK: [u8; 4] = [0x5a, 0x3c, 0x96, 0xe1];

/// Opcodes (RFC 6455 §5.2).
pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Largest message accepted from a server (a bigger one closes the connection).
const MAX_MESSAGE: usize = 16 << 20;
/// Initial per-connection read buffer; grows only for frames that do not fit.
const READ_BUF: usize = 64 << 10;
/// Lean mode: a read buffer larger than this (grown for a big frame) is freed rather than kept
/// as the shared scratch buffer.
const MAX_SCRATCH: usize = 1 << 20;
/// Lean mode: smallest buffer an incomplete frame's bytes are kept in between reads.
const TAIL_BUF: usize = 4 << 10;

/// Appends one complete (FIN), masked client frame carrying `payload` to `out`.
pub fn encode_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    let n = payload.len();
    out.push(0x80 | (opcode & 0x0f));
    if n < 126 {
        out.push(0x80 | n as u8);
    } else if n <= 0xffff {
        out.push(0x80 | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    out.extend_from_slice(&MASK);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], MASK);
}

/// XORs `data` with the repeating 4-byte `mask` (masking and unmasking are the same operation).
pub fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = data.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

/// A masked text frame as bytes, for pre-encoding frames sent many times.
pub fn text_frame(payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(payload.len() + 14);
    encode_frame(&mut v, OP_TEXT, payload);
    v
}

/// The header of one frame found at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    pub fin: bool,
    pub opcode: u8,
    /// Offset of the payload from the frame's first byte.
    pub header_len: usize,
    pub payload_len: usize,
    /// The mask key when the frame is masked (servers must not mask; see [`parse_frame`]).
    pub mask: Option<[u8; 4]>,
}

impl FrameHead {
    pub fn total_len(&self) -> usize {
        self.header_len + self.payload_len
    }
}

/// Parses the frame header at the start of `buf`: `Ok(None)` when more bytes are needed for the
/// header or the payload, `Err` on a protocol violation. Masked frames are parsed (so the codec
/// can be tested both ways); the client engine refuses them.
pub fn parse_frame(buf: &[u8]) -> Result<Option<FrameHead>, &'static str> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err("reserved bits set");
    }
    let opcode = b0 & 0x0f;
    let fin = b0 & 0x80 != 0;
    let masked = b1 & 0x80 != 0;
    let (len, mut at) = match b1 & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let n = u64::from_be_bytes(b);
            if n >> 63 != 0 {
                return Err("64-bit length with the high bit set");
            }
            (n, 10)
        }
        n => (n as u64, 2),
    };
    if opcode >= 0x8 && (!fin || len > 125) {
        return Err("fragmented or oversized control frame");
    }
    if !matches!(opcode, OP_CONT | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG) {
        return Err("unknown opcode");
    }
    if len > MAX_MESSAGE as u64 {
        return Err("frame too large");
    }
    let mask = if masked {
        if buf.len() < at + 4 {
            return Ok(None);
        }
        let m = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        at += 4;
        Some(m)
    } else {
        None
    };
    let head = FrameHead { fin, opcode, header_len: at, payload_len: len as usize, mask };
    if buf.len() < head.total_len() {
        return Ok(None);
    }
    Ok(Some(head))
}

/// What a handler may do with the connection an event is about.
pub struct Ctx<'a> {
    /// The connection.
    pub id: usize,
    /// When the bytes being processed were read (taken once per read syscall).
    pub now: Instant,
    wbuf: &'a mut Vec<u8>,
    close: &'a mut bool,
}

impl Ctx<'_> {
    /// Queues a text frame (masked now).
    pub fn send_text(&mut self, payload: &[u8]) {
        encode_frame(self.wbuf, OP_TEXT, payload);
    }
    /// Queues pre-encoded frame bytes (see [`text_frame`]).
    pub fn send_raw(&mut self, frame: &[u8]) {
        self.wbuf.extend_from_slice(frame);
    }
    /// Closes the connection after this event (a close frame is sent first).
    pub fn close(&mut self) {
        *self.close = true;
    }
}

/// Receives a client's events.
pub trait Handler {
    /// The upgrade was answered with 101: the connection is open.
    fn opened(&mut self, _cx: &mut Ctx) {}
    /// One complete text or binary message.
    fn frame(&mut self, cx: &mut Ctx, opcode: u8, payload: &[u8]);
    /// The frames of one read syscall have all been passed to `frame`.
    fn read_done(&mut self, _cx: &mut Ctx) {}
    /// The connection failed or closed (it is gone from the client after this).
    fn closed(&mut self, id: usize, why: &str);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Connecting,
    Upgrading,
    Open,
}

struct Conn {
    sock: TcpStream,
    state: State,
    rbuf: Vec<u8>,
    rlen: usize,
    wbuf: Vec<u8>,
    wpos: usize,
    /// The message being reassembled from fragments, and its opcode.
    frag: Vec<u8>,
    frag_op: u8,
    dirty: bool,
    /// Lean mode (see the module docs): no buffers kept while idle.
    lean: bool,
}

/// Counters of the engine's own work.
#[derive(Debug, Default, Clone, Copy)]
pub struct IoStats {
    pub reads: u64,
    pub writes: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub frames_in: u64,
}

/// One event loop with its connections.
pub struct Client {
    poll: Poll,
    events: Events,
    conns: Slab<Conn>,
    dirty: Vec<usize>,
    target: SocketAddrV4,
    request: Vec<u8>,
    /// Scratch list of the ready connections of one poll.
    ready: Vec<(usize, bool, bool)>,
    pub stats: IoStats,
    /// Connections opened from now on are lean (see the module docs).
    lean: bool,
    /// Lean mode: the read buffer lent to the connection being read (empty while lent out).
    scratch: Vec<u8>,
}

impl Client {
    /// A client of `ws://{target}{path}`.
    pub fn new(target: SocketAddrV4, path: &str) -> io::Result<Self> {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {target}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: c3dpdGNoYm9hcmRiZW5jaA==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: sb.json.v1\r\n\r\n"
        );
        Ok(Self {
            poll: Poll::new()?,
            events: Events::with_capacity(1024),
            conns: Slab::new(),
            dirty: Vec::new(),
            target,
            request: request.into_bytes(),
            ready: Vec::with_capacity(1024),
            stats: IoStats::default(),
            lean: false,
            scratch: Vec::new(),
        })
    }

    /// Lean mode for the connections opened from now on: no per-connection buffers while idle
    /// (reads use one shared scratch buffer; write and fragment buffers are freed once empty).
    /// For many mostly idle connections; costs an allocation per queued write.
    pub fn set_lean(&mut self, lean: bool) {
        self.lean = lean;
    }

    /// Starts a nonblocking connect, bound to `src` when given; the upgrade request is queued
    /// and goes out once connected. Returns the connection's id.
    pub fn open(&mut self, src: Option<Ipv4Addr>) -> io::Result<usize> {
        use socket2::{Domain, Protocol, SockAddr, Socket, Type};
        let sock = Socket::new(Domain::IPV4, Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
        if let Some(ip) = src {
            // Lets connections from different source addresses share ephemeral ports.
            let _ = sock.set_reuse_address(true);
            // IP_BIND_ADDRESS_NO_PORT: pick the port at connect time from the whole 4-tuple.
            // Without it bind(ip, 0) searches for a port no socket on `ip` holds, which
            // grows slow (kernel time per bind) once tens of thousands are in use.
            let on: libc::c_int = 1;
            // SAFETY: setsockopt on a socket this function owns, with a c_int option value.
            unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&sock),
                    libc::IPPROTO_IP,
                    libc::IP_BIND_ADDRESS_NO_PORT,
                    (&on as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
            sock.bind(&SockAddr::from(SocketAddrV4::new(ip, 0)))?;
        }
        sock.set_nodelay(true)?;
        match sock.connect(&SockAddr::from(SocketAddr::V4(self.target))) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        let mut stream = TcpStream::from_std(std::net::TcpStream::from(sock));
        let entry = self.conns.vacant_entry();
        let id = entry.key();
        self.poll.registry().register(&mut stream, Token(id), Interest::READABLE | Interest::WRITABLE)?;
        entry.insert(Conn {
            sock: stream,
            state: State::Connecting,
            rbuf: if self.lean { Vec::new() } else { vec![0; READ_BUF] },
            rlen: 0,
            wbuf: self.request.clone(),
            wpos: 0,
            frag: Vec::new(),
            frag_op: 0,
            dirty: false,
            lean: self.lean,
        });
        Ok(id)
    }

    /// Reserves room for `additional` more connections (so the connection table is not moved
    /// and copied while it grows; untouched room costs no memory).
    pub fn reserve(&mut self, additional: usize) {
        self.conns.reserve(additional);
    }

    /// Number of connections (in any state).
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// The state of connection `id`, or `None` once it is gone.
    pub fn state(&self, id: usize) -> Option<State> {
        self.conns.get(id).map(|c| c.state)
    }

    /// Queues a text frame on `id` (masked now); written by the next [`poll`](Self::poll) or
    /// [`flush`](Self::flush).
    pub fn send_text(&mut self, id: usize, payload: &[u8]) {
        if let Some(c) = self.conns.get_mut(id) {
            encode_frame(&mut c.wbuf, OP_TEXT, payload);
            Self::mark(&mut self.dirty, id, c);
        }
    }

    /// Queues pre-encoded frame bytes on `id`.
    pub fn send_raw(&mut self, id: usize, frame: &[u8]) {
        if let Some(c) = self.conns.get_mut(id) {
            c.wbuf.extend_from_slice(frame);
            Self::mark(&mut self.dirty, id, c);
        }
    }

    fn mark(dirty: &mut Vec<usize>, id: usize, c: &mut Conn) {
        if !c.dirty {
            c.dirty = true;
            dirty.push(id);
        }
    }

    /// Writes what was queued with `send_*` since the last poll.
    pub fn flush(&mut self, h: &mut impl Handler) {
        let dirty = std::mem::take(&mut self.dirty);
        for id in dirty {
            let Some(c) = self.conns.get_mut(id) else { continue };
            c.dirty = false;
            if c.state == State::Connecting {
                continue;
            }
            if let Err(e) = write_out(c, &mut self.stats) {
                self.drop_conn(id, &format!("write: {e}"), h);
            }
        }
    }

    /// Sends a close frame (best effort) and forgets the connection; `h.closed` is not called.
    pub fn close(&mut self, id: usize) {
        if let Some(mut c) = self.conns.try_remove(id) {
            if c.state == State::Open {
                encode_frame(&mut c.wbuf, OP_CLOSE, &1000u16.to_be_bytes());
                let _ = write_out(&mut c, &mut self.stats);
            }
            let _ = self.poll.registry().deregister(&mut c.sock);
        }
    }

    /// Closes every connection.
    pub fn close_all(&mut self) {
        let ids: Vec<usize> = self.conns.iter().map(|(id, _)| id).collect();
        for id in ids {
            self.close(id);
        }
    }

    fn drop_conn(&mut self, id: usize, why: &str, h: &mut impl Handler) {
        if let Some(mut c) = self.conns.try_remove(id) {
            let _ = self.poll.registry().deregister(&mut c.sock);
            h.closed(id, why);
        }
    }

    /// Writes queued frames, waits up to `timeout` for socket events and handles them.
    pub fn poll(&mut self, timeout: Option<Duration>, h: &mut impl Handler) -> io::Result<()> {
        self.flush(h);
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        }
        let mut ready = std::mem::take(&mut self.ready);
        ready.clear();
        ready.extend(
            self.events
                .iter()
                .map(|e| (e.token().0, e.is_readable() || e.is_read_closed() || e.is_error(), e.is_writable())),
        );
        for &(id, readable, writable) in &ready {
            if let Err(why) = self.ready(id, readable, writable, h) {
                self.drop_conn(id, &why, h);
            }
        }
        self.ready = ready;
        Ok(())
    }

    fn ready(&mut self, id: usize, readable: bool, writable: bool, h: &mut impl Handler) -> Result<(), String> {
        let Some(c) = self.conns.get_mut(id) else { return Ok(()) };
        if c.state == State::Connecting {
            if !writable && !readable {
                return Ok(());
            }
            if let Some(e) = c.sock.take_error().map_err(|e| format!("connect: {e}"))? {
                return Err(format!("connect: {e}"));
            }
            match c.sock.peer_addr() {
                Ok(_) => c.state = State::Upgrading,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(()),
                Err(e) => return Err(format!("connect: {e}")),
            }
            write_out(c, &mut self.stats).map_err(|e| format!("write: {e}"))?;
        } else if writable && c.wpos < c.wbuf.len() {
            write_out(c, &mut self.stats).map_err(|e| format!("write: {e}"))?;
        }
        if readable {
            self.read_ready(id, h)?;
        }
        Ok(())
    }

    /// Reads until the socket is drained, handing every complete frame to `h`. A lean
    /// connection without a buffer of its own borrows the scratch buffer for the reads and gives
    /// it back afterwards, keeping only the bytes of an incomplete frame.
    fn read_ready(&mut self, id: usize, h: &mut impl Handler) -> Result<(), String> {
        let c = &mut self.conns[id];
        if !c.lean {
            return self.read_loop(id, h);
        }
        if c.rbuf.is_empty() {
            if self.scratch.is_empty() {
                self.scratch = vec![0; READ_BUF];
            }
            std::mem::swap(&mut c.rbuf, &mut self.scratch);
        }
        let r = self.read_loop(id, h);
        // The connection may be gone (closed by the handler): its buffer went with it, and the
        // scratch buffer is allocated again on the next read.
        if let Some(c) = self.conns.get_mut(id) {
            if c.rlen == 0 {
                let buf = std::mem::take(&mut c.rbuf);
                if self.scratch.is_empty() && buf.len() <= MAX_SCRATCH {
                    self.scratch = buf;
                }
            } else if self.scratch.is_empty() {
                let mut tail = vec![0; (c.rlen * 2).max(TAIL_BUF)];
                tail[..c.rlen].copy_from_slice(&c.rbuf[..c.rlen]);
                let buf = std::mem::replace(&mut c.rbuf, tail);
                if buf.len() <= MAX_SCRATCH {
                    self.scratch = buf;
                }
            }
            if c.frag_op == 0 && c.frag.capacity() > 0 {
                c.frag = Vec::new();
            }
        }
        r
    }

    fn read_loop(&mut self, id: usize, h: &mut impl Handler) -> Result<(), String> {
        loop {
            let c = &mut self.conns[id];
            if c.rlen == c.rbuf.len() {
                let n = c.rbuf.len() * 2;
                c.rbuf.resize(n, 0);
            }
            let space = c.rbuf.len() - c.rlen;
            let n = match c.sock.read(&mut c.rbuf[c.rlen..]) {
                Ok(0) => return Err("closed by server".into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("read: {e}")),
            };
            self.stats.reads += 1;
            self.stats.bytes_in += n as u64;
            c.rlen += n;
            let now = Instant::now();
            let mut close = false;
            if c.state == State::Upgrading {
                let used = match upgrade_response(&c.rbuf[..c.rlen])? {
                    Some(used) => used,
                    None => continue,
                };
                c.rbuf.copy_within(used..c.rlen, 0);
                c.rlen -= used;
                c.state = State::Open;
                let mut cx = Ctx { id, now, wbuf: &mut c.wbuf, close: &mut close };
                h.opened(&mut cx);
            }
            let frames = process_frames(c, id, now, h, &mut close)?;
            self.stats.frames_in += frames;
            if close {
                self.close(id);
                return Ok(());
            }
            let c = &mut self.conns[id];
            write_out(c, &mut self.stats).map_err(|e| format!("write: {e}"))?;
            // A short read drained the socket: epoll reports any later data as a new edge.
            if n < space {
                return Ok(());
            }
        }
    }
}

/// Parses the 101 response at the start of `buf`: the bytes it used, or `None` if incomplete.
fn upgrade_response(buf: &[u8]) -> Result<Option<usize>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let used = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > 16 << 10 => return Err("upgrade response too long".into()),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("bad upgrade response: {e}")),
    };
    if resp.code != Some(101) {
        return Err(format!("upgrade refused: HTTP {}", resp.code.unwrap_or(0)));
    }
    let header = |name: &str| resp.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value);
    if !header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case(b"websocket")) {
        return Err("101 without Upgrade: websocket".into());
    }
    if let Some(p) = header("sec-websocket-protocol") {
        if p != b"sb.json.v1" {
            return Err(format!("server chose subprotocol {}", String::from_utf8_lossy(p)));
        }
    }
    Ok(Some(used))
}

/// Hands every complete frame in `c.rbuf[..c.rlen]` to `h`, then keeps the incomplete tail.
fn process_frames(
    c: &mut Conn,
    id: usize,
    now: Instant,
    h: &mut impl Handler,
    close: &mut bool,
) -> Result<u64, String> {
    let Conn { rbuf, rlen, wbuf, frag, frag_op, .. } = c;
    let mut pos = 0;
    let mut frames = 0;
    while let Some(head) = parse_frame(&rbuf[pos..*rlen]).map_err(|e| format!("protocol: {e}"))? {
        if head.mask.is_some() {
            return Err("protocol: masked frame from server".into());
        }
        let payload = &rbuf[pos + head.header_len..pos + head.total_len()];
        pos += head.total_len();
        frames += 1;
        let mut cx = Ctx { id, now, wbuf: &mut *wbuf, close: &mut *close };
        match head.opcode {
            OP_TEXT | OP_BINARY if head.fin && *frag_op == 0 => h.frame(&mut cx, head.opcode, payload),
            OP_TEXT | OP_BINARY if *frag_op == 0 => {
                *frag_op = head.opcode;
                frag.clear();
                frag.extend_from_slice(payload);
            }
            OP_CONT if *frag_op != 0 => {
                if frag.len() + payload.len() > MAX_MESSAGE {
                    return Err("message too large".into());
                }
                frag.extend_from_slice(payload);
                if head.fin {
                    let op = std::mem::take(frag_op);
                    h.frame(&mut cx, op, frag);
                }
            }
            OP_PING => encode_frame(cx.wbuf, OP_PONG, payload),
            OP_PONG => {}
            OP_CLOSE => return Err("close frame from server".into()),
            _ => return Err("protocol: unexpected continuation or interleaved data frame".into()),
        }
    }
    if frames > 0 {
        let mut cx = Ctx { id, now, wbuf: &mut *wbuf, close: &mut *close };
        h.read_done(&mut cx);
    }
    if pos == *rlen {
        *rlen = 0;
    } else if pos > 0 {
        rbuf.copy_within(pos..*rlen, 0);
        *rlen -= pos;
    }
    Ok(frames)
}

/// Writes as much of the queued bytes as the socket takes.
fn write_out(c: &mut Conn, stats: &mut IoStats) -> io::Result<()> {
    if c.state == State::Connecting {
        return Ok(());
    }
    while c.wpos < c.wbuf.len() {
        match c.sock.write(&c.wbuf[c.wpos..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                stats.writes += 1;
                stats.bytes_out += n as u64;
                c.wpos += n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if c.lean {
        c.wbuf = Vec::new();
    } else {
        c.wbuf.clear();
    }
    c.wpos = 0;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server frame (unmasked) as bytes.
    fn server_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![if fin { 0x80 } else { 0 } | opcode];
        let n = payload.len();
        if n < 126 {
            v.push(n as u8);
        } else if n <= 0xffff {
            v.push(126);
            v.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            v.push(127);
            v.extend_from_slice(&(n as u64).to_be_bytes());
        }
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn client_frames_are_masked_with_the_right_lengths() {
        for n in [0usize, 1, 125, 126, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..n).map(|i| (i * 7) as u8).collect();
            let mut out = Vec::new();
            encode_frame(&mut out, OP_TEXT, &payload);
            let head = parse_frame(&out).unwrap().unwrap();
            assert!(head.fin);
            assert_eq!(head.opcode, OP_TEXT);
            assert_eq!(head.payload_len, n);
            assert_eq!(head.mask, Some(MASK));
            let expected_header = 2
                + 4
                + if n < 126 {
                    0
                } else if n <= 0xffff {
                    2
                } else {
                    8
                };
            assert_eq!(head.header_len, expected_header);
            assert_eq!(out.len(), head.total_len());
            let mut p = out[head.header_len..].to_vec();
            if n >= 4 {
                assert_ne!(p[..4], payload[..4], "payload must be masked");
            }
            apply_mask(&mut p, MASK);
            assert_eq!(p, payload);
        }
    }

    #[test]
    fn server_frames_16_and_64_bit_lengths() {
        for n in [125usize, 126, 300, 65535, 65536, 200_000] {
            let payload = vec![b'x'; n];
            let f = server_frame(true, OP_TEXT, &payload);
            let head = parse_frame(&f).unwrap().unwrap();
            assert_eq!(head.payload_len, n);
            assert_eq!(head.mask, None);
            assert_eq!(
                head.header_len,
                if n < 126 {
                    2
                } else if n <= 0xffff {
                    4
                } else {
                    10
                }
            );
            // Every strict prefix is incomplete, never an error.
            for cut in [0, 1, 2, 3, 9, head.header_len, f.len() - 1] {
                assert_eq!(parse_frame(&f[..cut]).unwrap(), None, "n={n} cut={cut}");
            }
        }
    }

    #[test]
    fn protocol_errors() {
        assert!(parse_frame(&[0x80 | 0x3, 0]).is_err()); // unknown opcode
        assert!(parse_frame(&[0xC1, 0]).is_err()); // RSV1
        assert!(parse_frame(&[0x09, 0]).is_err()); // fragmented ping
        let mut big = vec![0x81, 127];
        big.extend_from_slice(&(1u64 << 63).to_be_bytes());
        assert!(parse_frame(&big).is_err());
    }

    /// Collects what the handler sees.
    #[derive(Default)]
    struct Collect {
        msgs: Vec<(u8, Vec<u8>)>,
        batches: usize,
    }

    impl Handler for Collect {
        fn frame(&mut self, _cx: &mut Ctx, opcode: u8, payload: &[u8]) {
            self.msgs.push((opcode, payload.to_vec()));
        }
        fn read_done(&mut self, _cx: &mut Ctx) {
            self.batches += 1;
        }
        fn closed(&mut self, _id: usize, _why: &str) {}
    }

    fn test_conn() -> Conn {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        Conn {
            sock: TcpStream::from_std(s),
            state: State::Open,
            rbuf: vec![0; 64],
            rlen: 0,
            wbuf: Vec::new(),
            wpos: 0,
            frag: Vec::new(),
            frag_op: 0,
            dirty: false,
            lean: false,
        }
    }

    /// Feeds `bytes` to the connection's read buffer in pieces of `step`, as reads would.
    fn feed(c: &mut Conn, h: &mut Collect, bytes: &[u8], step: usize) {
        for piece in bytes.chunks(step) {
            if c.rbuf.len() < c.rlen + piece.len() {
                c.rbuf.resize(c.rlen + piece.len(), 0);
            }
            c.rbuf[c.rlen..c.rlen + piece.len()].copy_from_slice(piece);
            c.rlen += piece.len();
            let mut close = false;
            process_frames(c, 0, Instant::now(), h, &mut close).unwrap();
        }
    }

    #[test]
    fn frames_split_across_reads_and_many_per_read() {
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        for i in 0..50usize {
            let n = [3, 125, 126, 1000, 70_000][i % 5];
            let p: Vec<u8> = (0..n).map(|j| (i + j) as u8).collect();
            stream.extend(server_frame(true, OP_TEXT, &p));
            expected.push((OP_TEXT, p));
        }
        for step in [1usize, 7, 4096, stream.len()] {
            let mut c = test_conn();
            let mut h = Collect::default();
            feed(&mut c, &mut h, &stream, step);
            assert_eq!(h.msgs, expected, "step {step}");
            assert_eq!(c.rlen, 0);
        }
        // One read with everything: one batch.
        let mut c = test_conn();
        let mut h = Collect::default();
        feed(&mut c, &mut h, &stream, stream.len());
        assert_eq!(h.batches, 1);
    }

    #[test]
    fn fragments_are_reassembled_and_pings_answered() {
        let mut stream = server_frame(false, OP_TEXT, b"hel");
        stream.extend(server_frame(true, OP_PING, b"pp"));
        stream.extend(server_frame(false, OP_CONT, b"lo "));
        stream.extend(server_frame(true, OP_CONT, b"world"));
        stream.extend(server_frame(true, OP_TEXT, b"next"));
        let mut c = test_conn();
        let mut h = Collect::default();
        feed(&mut c, &mut h, &stream, 3);
        assert_eq!(h.msgs, vec![(OP_TEXT, b"hello world".to_vec()), (OP_TEXT, b"next".to_vec())]);
        let pong = parse_frame(&c.wbuf).unwrap().unwrap();
        assert_eq!(pong.opcode, OP_PONG);
        let mut p = c.wbuf[pong.header_len..].to_vec();
        apply_mask(&mut p, MASK);
        assert_eq!(p, b"pp");
    }

    #[test]
    fn masked_server_frames_are_refused() {
        let mut c = test_conn();
        let mut h = Collect::default();
        let mut f = Vec::new();
        encode_frame(&mut f, OP_TEXT, b"x");
        c.rbuf[..f.len()].copy_from_slice(&f);
        c.rlen = f.len();
        let mut close = false;
        assert!(process_frames(&mut c, 0, Instant::now(), &mut h, &mut close).is_err());
    }

    #[test]
    fn lean_connections_keep_no_buffers_while_idle() {
        use std::io::{Read as _, Write as _};
        // A tiny server: answers the upgrade, then sends a frame in two pieces, then one whole.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = match l.local_addr().unwrap() {
            SocketAddr::V4(a) => a,
            _ => unreachable!(),
        };
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut req = Vec::new();
            let mut b = [0u8; 1024];
            while !req.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut b).unwrap();
                req.extend_from_slice(&b[..n]);
            }
            s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
                .unwrap();
            let f = server_frame(true, OP_TEXT, &[b'x'; 300]);
            go_rx.recv().unwrap();
            s.write_all(&f[..100]).unwrap();
            go_rx.recv().unwrap();
            s.write_all(&f[100..]).unwrap();
            s.write_all(&server_frame(true, OP_TEXT, b"two")).unwrap();
            // Read the client's frame, then wait for the end.
            let mut got = [0u8; 64];
            let _ = s.read(&mut got).unwrap();
            let _ = go_rx.recv();
        });
        let mut c = Client::new(addr, "/").unwrap();
        c.set_lean(true);
        let id = c.open(None).unwrap();
        let mut h = Collect::default();
        let until = |c: &mut Client, h: &mut Collect, f: &dyn Fn(&Client, &Collect) -> bool| {
            let t = Instant::now();
            while !f(c, h) {
                assert!(t.elapsed() < Duration::from_secs(5), "timed out");
                c.poll(Some(Duration::from_millis(10)), h).unwrap();
            }
        };
        until(&mut c, &mut h, &|c, _| c.state(id) == Some(State::Open));
        let conn = &c.conns[id];
        assert_eq!((conn.rbuf.capacity(), conn.wbuf.capacity(), conn.rlen), (0, 0, 0), "idle after upgrade");
        go_tx.send(()).unwrap();
        until(&mut c, &mut h, &|c, _| c.conns[id].rlen == 100);
        assert!(c.conns[id].rbuf.len() < READ_BUF, "an incomplete frame keeps a small buffer");
        go_tx.send(()).unwrap();
        until(&mut c, &mut h, &|_, h| h.msgs.len() == 2);
        assert_eq!(h.msgs[0], (OP_TEXT, vec![b'x'; 300]));
        assert_eq!(h.msgs[1], (OP_TEXT, b"two".to_vec()));
        assert_eq!(c.conns[id].rbuf.capacity(), 0, "buffer freed once the frame completed");
        c.send_text(id, b"hello");
        c.flush(&mut h);
        assert_eq!(c.conns[id].wbuf.capacity(), 0, "write buffer freed once written");
        assert_eq!(c.scratch.len(), READ_BUF, "the scratch buffer is back");
        go_tx.send(()).unwrap();
        server.join().unwrap();
        c.close_all();
    }

    #[test]
    fn upgrade_responses() {
        let ok = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Protocol: sb.json.v1\r\n\r\n\x81\x02hi";
        let used = upgrade_response(ok).unwrap().unwrap();
        assert_eq!(&ok[used..], b"\x81\x02hi");
        assert_eq!(upgrade_response(&ok[..20]).unwrap(), None);
        assert!(upgrade_response(b"HTTP/1.1 404 Not Found\r\n\r\n").is_err());
        assert!(upgrade_response(
            b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nSec-WebSocket-Protocol: sb.bin.v1\r\n\r\n"
        )
        .is_err());
    }
}
