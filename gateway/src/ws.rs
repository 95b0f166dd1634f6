//! The server side of WebSocket (RFC 6455) without per-connection buffers: the
//! HTTP upgrade (path, version, key, subprotocol choice) and frame headers are
//! parsed straight out of whatever bytes the shard has read, and frames are
//! encoded straight into the connection's output bytes. Nothing here owns a
//! socket or keeps state between calls, so an idle connection costs nothing
//! in this layer.

use base64::Engine as _;

/// The JSON subprotocol.
pub const SUBPROTOCOL_JSON: &str = "sb.json.v1";
/// The binary (protobuf `Frame`) subprotocol.
pub const SUBPROTOCOL_BIN: &str = "sb.bin.v1";
/// Largest upgrade request accepted (request line plus headers).
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Largest payload of a control frame (RFC 6455 §5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;
const MAX_HEADERS: usize = 32;
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Frame opcodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl Opcode {
    fn from_bits(b: u8) -> Option<Opcode> {
        Some(match b {
            0x0 => Opcode::Continuation,
            0x1 => Opcode::Text,
            0x2 => Opcode::Binary,
            0x8 => Opcode::Close,
            0x9 => Opcode::Ping,
            0xA => Opcode::Pong,
            _ => return None,
        })
    }

    fn bits(self) -> u8 {
        match self {
            Opcode::Continuation => 0x0,
            Opcode::Text => 0x1,
            Opcode::Binary => 0x2,
            Opcode::Close => 0x8,
            Opcode::Ping => 0x9,
            Opcode::Pong => 0xA,
        }
    }

    /// Close, ping and pong.
    pub fn is_control(self) -> bool {
        matches!(self, Opcode::Close | Opcode::Ping | Opcode::Pong)
    }
}

/// Close status codes the gateway sends.
pub mod close_code {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The peer broke the framing rules.
    pub const PROTOCOL: u16 = 1002;
    /// A text frame was not UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// A message above the configured size.
    pub const TOO_BIG: u16 = 1009;
}

/// What the gateway decided about an upgrade request.
#[derive(Debug, PartialEq, Eq)]
pub struct Upgrade {
    /// True when `sb.bin.v1` was chosen.
    pub bin: bool,
    /// The complete `101 Switching Protocols` response.
    pub response: Vec<u8>,
}

/// An upgrade request the gateway refuses: answer with this HTTP response and close.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub response: Vec<u8>,
}

fn refuse(status: u16, reason: &str, text: &str) -> Refusal {
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{text}",
        text.len()
    )
    .into_bytes();
    Refusal { status, response }
}

fn header_has_token(value: &[u8], token: &str) -> bool {
    std::str::from_utf8(value).map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))).unwrap_or(false)
}

/// `Sec-WebSocket-Accept` for a client key.
pub fn accept_key(key: &[u8]) -> String {
    let mut h = sha1_smol::Sha1::new();
    h.update(key);
    h.update(ACCEPT_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(h.digest().bytes())
}

/// Parses an upgrade request from the start of `buf`. `Ok(None)` while the
/// request is incomplete; otherwise the bytes it used and the response to send.
pub fn parse_upgrade(buf: &[u8]) -> Result<Option<(usize, Upgrade)>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let used = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_REQUEST_BYTES {
                return Err(refuse(431, "Request Header Fields Too Large", "request too large"));
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(refuse(431, "Request Header Fields Too Large", "too many headers"))
        }
        Err(_) => return Err(refuse(400, "Bad Request", "malformed HTTP request")),
    };
    if used > MAX_REQUEST_BYTES {
        return Err(refuse(431, "Request Header Fields Too Large", "request too large"));
    }
    if req.method != Some("GET") {
        return Err(refuse(405, "Method Not Allowed", "use GET"));
    }
    let path = req.path.unwrap_or("");
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    if path != "/ws" {
        return Err(refuse(404, "Not Found", "not found"));
    }
    let (mut upgrade, mut connection, mut version, mut key) = (false, false, false, None);
    let mut offered: Vec<&str> = Vec::new();
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade |= header_has_token(h.value, "websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            connection |= header_has_token(h.value, "upgrade");
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            version = h.value == b"13";
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            key = Some(h.value);
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            if let Ok(v) = std::str::from_utf8(h.value) {
                offered.extend(v.split(',').map(str::trim).filter(|p| !p.is_empty()));
            }
        }
    }
    if !upgrade || !connection {
        return Err(refuse(426, "Upgrade Required", "this endpoint only speaks WebSocket"));
    }
    if !version {
        let mut r = refuse(426, "Upgrade Required", "WebSocket version 13 required");
        let at = r.response.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0);
        r.response.splice(at..at, b"\r\nSec-WebSocket-Version: 13".iter().copied());
        return Err(r);
    }
    let key = match key {
        Some(k) if k.len() == 24 => k,
        _ => return Err(refuse(400, "Bad Request", "missing or invalid Sec-WebSocket-Key")),
    };
    // the client lists its preferences first
    let chosen = if offered.is_empty() {
        None
    } else {
        match offered.iter().find(|p| **p == SUBPROTOCOL_JSON || **p == SUBPROTOCOL_BIN) {
            Some(&p) => Some(if p == SUBPROTOCOL_BIN { SUBPROTOCOL_BIN } else { SUBPROTOCOL_JSON }),
            None => {
                return Err(refuse(400, "Bad Request", "unsupported subprotocol (supported: sb.json.v1, sb.bin.v1)"))
            }
        }
    };
    let mut response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {}\r\n",
        accept_key(key)
    );
    if let Some(p) = chosen {
        response.push_str("Sec-WebSocket-Protocol: ");
        response.push_str(p);
        response.push_str("\r\n");
    }
    response.push_str("\r\n");
    Ok(Some((used, Upgrade { bin: chosen == Some(SUBPROTOCOL_BIN), response: response.into_bytes() })))
}

/// A decoded client frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    pub opcode: Opcode,
    pub mask: [u8; 4],
    /// Bytes of the header itself.
    pub header_len: usize,
    /// Bytes of the payload that follows.
    pub payload_len: usize,
}

/// A frame the gateway cannot accept; the connection is failed with `code`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    pub code: u16,
    pub message: String,
}

fn frame_error(code: u16, message: impl Into<String>) -> FrameError {
    FrameError { code, message: message.into() }
}

/// Decodes the header at the start of `buf`. `Ok(None)` until the whole header is
/// there. The payload length is checked against `max` (and control frames against
/// 125 bytes) before anyone makes room for the payload.
pub fn parse_header(buf: &[u8], max: usize) -> Result<Option<Header>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err(frame_error(close_code::PROTOCOL, "reserved bits set (no extension was negotiated)"));
    }
    let opcode =
        Opcode::from_bits(b0 & 0x0F).ok_or_else(|| frame_error(close_code::PROTOCOL, "unknown frame opcode"))?;
    let fin = b0 & 0x80 != 0;
    if b1 & 0x80 == 0 {
        return Err(frame_error(close_code::PROTOCOL, "client frames must be masked"));
    }
    let (len, ext) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 2)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 8)
        }
        n => (n as u64, 0),
    };
    if opcode.is_control() {
        if !fin {
            return Err(frame_error(close_code::PROTOCOL, "fragmented control frame"));
        }
        if len > MAX_CONTROL_PAYLOAD as u64 {
            return Err(frame_error(close_code::PROTOCOL, "control frame payload above 125 bytes"));
        }
    } else if len > max as u64 {
        return Err(frame_error(close_code::TOO_BIG, format!("frame of {len} bytes exceeds the limit of {max}")));
    }
    let header_len = 2 + ext + 4;
    if buf.len() < header_len {
        return Ok(None);
    }
    let mut mask = [0u8; 4];
    mask.copy_from_slice(&buf[2 + ext..header_len]);
    Ok(Some(Header { fin, opcode, mask, header_len, payload_len: len as usize }))
}

/// XORs `data` with the mask (RFC 6455 §5.3); `offset` is the position of
/// `data[0]` within the payload.
pub fn unmask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    let mut m = mask;
    m.rotate_left(offset % 4);
    let word = u32::from_ne_bytes(m);
    let mut chunks = data.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m[i];
    }
}

/// Bytes of the (unmasked, server) header for a payload of `len` bytes.
pub fn header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    }
}

/// Appends the header of an unmasked final frame carrying `len` payload bytes.
pub fn put_header(out: &mut Vec<u8>, opcode: Opcode, len: usize) {
    out.push(0x80 | opcode.bits());
    match len {
        0..=125 => out.push(len as u8),
        126..=0xFFFF => {
            out.push(126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
}

/// Appends a whole unmasked final frame.
pub fn put_frame(out: &mut Vec<u8>, opcode: Opcode, payload: &[u8]) {
    out.reserve(header_len(payload.len()) + payload.len());
    put_header(out, opcode, payload.len());
    out.extend_from_slice(payload);
}

/// Appends a close frame with a status code and a reason (cut to fit 125 bytes).
pub fn put_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    let mut reason = &reason.as_bytes()[..reason.len().min(MAX_CONTROL_PAYLOAD - 2)];
    while std::str::from_utf8(reason).is_err() {
        reason = &reason[..reason.len() - 1];
    }
    put_header(out, Opcode::Close, 2 + reason.len());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(reason);
}

/// Checks a close frame's payload (RFC 6455 §5.5.1, §7.4); returns the code to echo.
pub fn close_reply_code(payload: &[u8]) -> u16 {
    match payload.len() {
        0 => close_code::NORMAL,
        1 => close_code::PROTOCOL,
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            let valid = matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999);
            if !valid {
                close_code::PROTOCOL
            } else if std::str::from_utf8(&payload[2..]).is_err() {
                close_code::INVALID_DATA
            } else {
                close_code::NORMAL
            }
        }
    }
}

/// A masked client frame (first byte, minimal length form, `mask` applied), as a browser sends
/// it: for tests and the fuzz targets, which play the client.
#[doc(hidden)]
pub fn client_frame(first_byte: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut v = vec![first_byte];
    match payload.len() {
        0..=125 => v.push(0x80 | payload.len() as u8),
        126..=0xFFFF => {
            v.push(0x80 | 126);
            v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        _ => {
            v.push(0x80 | 127);
            v.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        }
    }
    v.extend_from_slice(&mask);
    v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(opcode: u8, fin: bool, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        client_frame((if fin { 0x80 } else { 0 }) | opcode, payload, mask)
    }

    const REQ: &str = "GET /ws?x=1 HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";

    #[test]
    fn accept_key_matches_the_rfc_example() {
        assert_eq!(accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn upgrade_chooses_the_first_supported_subprotocol() {
        let req = format!("{REQ}Sec-WebSocket-Protocol: x, sb.bin.v1, sb.json.v1\r\n\r\nEXTRA");
        let (used, up) = parse_upgrade(req.as_bytes()).unwrap().unwrap();
        assert_eq!(&req.as_bytes()[used..], b"EXTRA");
        assert!(up.bin);
        let text = String::from_utf8(up.response).unwrap();
        assert!(text.starts_with("HTTP/1.1 101 "));
        assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(text.contains("Sec-WebSocket-Protocol: sb.bin.v1\r\n"));
        let (_, up) = parse_upgrade(format!("{REQ}\r\n").as_bytes()).unwrap().unwrap();
        assert!(!up.bin);
        assert!(!String::from_utf8(up.response).unwrap().contains("Sec-WebSocket-Protocol"));
    }

    #[test]
    fn upgrade_refusals() {
        assert_eq!(parse_upgrade(REQ.as_bytes()), Ok(None), "incomplete");
        let st = |s: String| parse_upgrade(s.as_bytes()).unwrap_err().status;
        assert_eq!(st(format!("{REQ}Sec-WebSocket-Protocol: sb.xml.v1\r\n\r\n")), 400);
        assert_eq!(st(REQ.replace("/ws?x=1", "/nope") + "\r\n"), 404);
        assert_eq!(st(REQ.replace("GET", "POST") + "\r\n"), 405);
        assert_eq!(st(REQ.replace("Version: 13", "Version: 8") + "\r\n"), 426);
        assert_eq!(st(REQ.replace("Upgrade: websocket\r\n", "") + "\r\n"), 426);
        assert_eq!(st(REQ.replace("dGhlIHNhbXBsZSBub25jZQ==", "short") + "\r\n"), 400);
        assert_eq!(st("NOT HTTP\0\r\n\r\n".into()), 400);
        let big = format!("{REQ}X: {}\r\n", "a".repeat(MAX_REQUEST_BYTES));
        assert_eq!(st(big), 431);
    }

    #[test]
    fn headers_of_every_length_form_and_partial_input() {
        let mask = [1, 2, 3, 4];
        for len in [0usize, 5, 125, 126, 300, 0xFFFF, 0x10000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let f = masked(0x2, true, &payload, mask);
            let h = parse_header(&f, 1 << 20).unwrap().unwrap();
            assert_eq!((h.opcode, h.fin, h.payload_len), (Opcode::Binary, true, len));
            assert_eq!(h.header_len + len, f.len());
            for cut in 0..h.header_len {
                assert_eq!(parse_header(&f[..cut], 1 << 20), Ok(None), "len {len} cut {cut}");
            }
            let mut body = f[h.header_len..].to_vec();
            // unmask in two pieces at an odd offset, as reads split it
            let split = body.len() / 3;
            let (a, b) = body.split_at_mut(split);
            unmask(a, h.mask, 0);
            unmask(b, h.mask, split);
            assert_eq!(body, payload);
        }
    }

    #[test]
    fn header_errors() {
        let m = [9, 9, 9, 9];
        let err = |f: &[u8], max| parse_header(f, max).unwrap_err().code;
        assert_eq!(err(&[0x81, 0x05, 0, 0, 0, 0], 100), close_code::PROTOCOL, "unmasked");
        assert_eq!(err(&masked(0x1, true, &[0; 101], m), 100), close_code::TOO_BIG);
        assert_eq!(err(&[0x81, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF], 100), close_code::TOO_BIG);
        assert_eq!(err(&masked(0x9, true, &[0; 126], m), 1 << 20), close_code::PROTOCOL, "big ping");
        assert_eq!(err(&masked(0x9, false, b"x", m), 100), close_code::PROTOCOL, "fragmented ping");
        assert_eq!(err(&masked(0x3, true, b"x", m), 100), close_code::PROTOCOL, "opcode 3");
        assert_eq!(err(&masked(0x41, true, b"x", m), 100), close_code::PROTOCOL, "rsv");
    }

    #[test]
    fn server_frames_and_close_codes() {
        let mut out = Vec::new();
        put_frame(&mut out, Opcode::Text, b"hi");
        assert_eq!(out, b"\x81\x02hi");
        out.clear();
        put_frame(&mut out, Opcode::Binary, &[7; 200]);
        assert_eq!(&out[..4], &[0x82, 126, 0, 200]);
        assert_eq!(out.len(), 204);
        out.clear();
        put_close(&mut out, 1000, &"é".repeat(100));
        assert!(out.len() <= 2 + 125);
        assert!(std::str::from_utf8(&out[4..]).is_ok());
        assert_eq!(close_reply_code(b""), 1000);
        assert_eq!(close_reply_code(&[0x03, 0xE8]), 1000);
        assert_eq!(close_reply_code(&[0x03]), 1002);
        assert_eq!(close_reply_code(&[0x03, 0xED]), 1002, "1005 may not be sent");
        assert_eq!(close_reply_code(&[0x03, 0xE8, 0xFF]), 1007);
    }

    #[test]
    fn random_input_never_panics() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            let mut buf = Vec::new();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 40) as usize;
            for i in 0..len {
                buf.push((x >> (i % 8 * 8)) as u8 ^ i as u8);
            }
            let _ = parse_header(&buf, 64);
            let _ = parse_upgrade(&buf);
            let _ = close_reply_code(&buf);
        }
    }
}
