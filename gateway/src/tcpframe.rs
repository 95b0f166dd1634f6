//! Raw TCP framing: each frame is a big-endian u32 length followed by that many
//! bytes (a protobuf `Frame`), in both directions.
//!
//! Memory stays small while idle: the read buffer only holds bytes of a frame
//! that is still arriving and is freed once empty, and the write side keeps
//! only the remainder of the one frame a blocked write left behind.

use std::io::{self, Read, Write};

use bytes::{Buf, Bytes};
use mio::net::TcpStream;

/// Bytes of the length prefix.
pub const PREFIX: usize = 4;
/// Bytes read from the socket per `read` call (on the stack).
const CHUNK: usize = 4096;

/// Outcome of [`TcpFramed::read_frame`] other than a frame.
#[derive(Debug)]
pub enum ReadStop {
    /// No complete frame yet; wait for READABLE.
    WouldBlock,
    /// The peer announced a frame of this many bytes, above the limit.
    TooLarge(usize),
    /// The peer closed (possibly in the middle of a frame).
    Closed,
    /// Another socket error.
    Io(io::Error),
}

/// Outcome of [`TcpFramed::write_current`].
pub enum WriteStop {
    /// Nothing is left of the current frame.
    Done,
    /// The socket is full; wait for WRITABLE.
    WouldBlock,
    /// The socket failed.
    Io(io::Error),
}

/// A length-prefixed frame stream over one socket.
pub struct TcpFramed {
    stream: TcpStream,
    rbuf: Vec<u8>,
    /// Remainder of the frame being written.
    cur: Option<Bytes>,
}

/// `payload` with its big-endian u32 length in front.
pub fn prefixed(payload_len: usize, write: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut buf = Vec::with_capacity(PREFIX + payload_len);
    buf.extend_from_slice(&(payload_len as u32).to_be_bytes());
    write(&mut buf);
    debug_assert_eq!(buf.len(), PREFIX + payload_len);
    buf
}

impl TcpFramed {
    pub fn new(stream: TcpStream) -> TcpFramed {
        TcpFramed { stream, rbuf: Vec::new(), cur: None }
    }

    pub fn stream_mut(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// The next complete frame's payload. The announced length is checked
    /// against `max` before any room is made for the payload.
    pub fn read_frame(&mut self, max: usize) -> Result<Vec<u8>, ReadStop> {
        loop {
            if self.rbuf.len() >= PREFIX {
                let mut len = [0u8; PREFIX];
                len.copy_from_slice(&self.rbuf[..PREFIX]);
                let len = u32::from_be_bytes(len) as usize;
                if len > max {
                    self.rbuf = Vec::new();
                    return Err(ReadStop::TooLarge(len));
                }
                if self.rbuf.len() >= PREFIX + len {
                    let payload = self.rbuf[PREFIX..PREFIX + len].to_vec();
                    self.rbuf.drain(..PREFIX + len);
                    return Ok(payload);
                }
                self.rbuf.reserve_exact(PREFIX + len - self.rbuf.len());
            }
            // The buffer grows by at most one chunk past a prefix before that
            // prefix is checked at the top of the loop.
            let mut chunk = [0u8; CHUNK];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(ReadStop::Closed),
                Ok(n) => self.rbuf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.rbuf.is_empty() {
                        self.rbuf = Vec::new();
                    }
                    return Err(ReadStop::WouldBlock);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReadStop::Io(e)),
            }
        }
    }

    /// Drops buffered input (a closing connection).
    pub fn clear_input(&mut self) {
        self.rbuf = Vec::new();
    }

    /// True while part of a frame waits to be written.
    pub fn has_current(&self) -> bool {
        self.cur.is_some()
    }

    /// Makes `frame` (prefix included) the frame being written.
    pub fn set_current(&mut self, frame: Bytes) {
        debug_assert!(self.cur.is_none());
        if !frame.is_empty() {
            self.cur = Some(frame);
        }
    }

    /// Writes as much of the current frame as the socket takes.
    pub fn write_current(&mut self) -> WriteStop {
        while let Some(cur) = &mut self.cur {
            match self.stream.write(cur) {
                Ok(0) => return WriteStop::Io(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    cur.advance(n);
                    if cur.is_empty() {
                        self.cur = None;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return WriteStop::WouldBlock,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return WriteStop::Io(e),
            }
        }
        WriteStop::Done
    }
}
