//! The gateway's own WebSocket layer driven byte by byte through a raw socket:
//! upgrades and frames split across writes, several frames per write,
//! fragmented messages with control frames between the fragments, the close
//! handshake and every way a peer can break the framing rules.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use serde_json::Value;
use switchboard_gateway::GatewayConfig;

const UPGRADE: &str = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
    Sec-WebSocket-Protocol: sb.json.v1\r\n\r\n";

/// A masked client frame.
fn frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    switchboard_gateway::ws::client_frame((if fin { 0x80 } else { 0 }) | opcode, payload, [0x37, 0xFA, 0x21, 0x3D])
}

fn text(s: &str) -> Vec<u8> {
    frame(0x1, true, s.as_bytes())
}

struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Raw { s, buf: Vec::new() }
    }

    /// Connects and upgrades, sending `extra` bytes right behind the request.
    fn open(addr: SocketAddr, extra: &[u8]) -> Raw {
        let mut r = Raw::connect(addr);
        let mut req = UPGRADE.as_bytes().to_vec();
        req.extend_from_slice(extra);
        r.s.write_all(&req).unwrap();
        let head = r.read_head();
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        assert!(head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"), "{head}");
        assert!(head.contains("Sec-WebSocket-Protocol: sb.json.v1\r\n"), "{head}");
        r
    }

    fn fill(&mut self) -> bool {
        let mut b = [0u8; 4096];
        match self.s.read(&mut b) {
            Ok(0) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&b[..n]);
                true
            }
            Err(e) => panic!("read: {e}"),
        }
    }

    /// The HTTP response head.
    fn read_head(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8(self.buf[..i + 4].to_vec()).unwrap();
                self.buf.drain(..i + 4);
                return head;
            }
            assert!(self.fill(), "EOF before the response head");
        }
    }

    /// The next server frame (opcode, payload); None at EOF. Server frames are unmasked.
    fn next(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                assert_eq!(self.buf[1] & 0x80, 0, "server frames are not masked");
                assert_eq!(self.buf[0] & 0x80, 0x80, "server frames are final");
                let (len, at) = match self.buf[1] & 0x7F {
                    126 if self.buf.len() >= 4 => (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4),
                    127 if self.buf.len() >= 10 => {
                        (u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize, 10)
                    }
                    n if n < 126 => (n as usize, 2),
                    _ => (usize::MAX, 0),
                };
                if len != usize::MAX && self.buf.len() >= at + len {
                    let op = self.buf[0] & 0x0F;
                    let payload = self.buf[at..at + len].to_vec();
                    self.buf.drain(..at + len);
                    return Some((op, payload));
                }
            }
            if !self.fill() {
                assert!(self.buf.is_empty(), "EOF inside a frame");
                return None;
            }
        }
    }

    fn json(&mut self) -> Value {
        let (op, payload) = self.next().expect("a frame");
        assert_eq!(op, 0x1, "a text frame");
        serde_json::from_slice(&payload).unwrap()
    }

    /// Expects a close frame with `code`, then EOF.
    fn expect_close(&mut self, code: u16) {
        let (op, payload) = self.next().expect("a close frame");
        assert_eq!(op, 0x8, "close frame expected, payload {:?}", String::from_utf8_lossy(&payload));
        assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), code);
        assert!(self.next().is_none(), "EOF after close");
    }

    fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_framing_over_a_raw_socket() {
    let (_logic, logic_url) = start_logic().await;
    let gw = start_gateway(GatewayConfig { max_frame_bytes: 1024, ..config(&[&logic_url]) }).await;
    let addr = gw.ws_addr();
    blocking(move || {
        // The upgrade dribbled a byte at a time, then a frame split at every byte.
        let mut r = Raw::connect(addr);
        for b in UPGRADE.as_bytes() {
            r.send(&[*b]);
        }
        assert!(r.read_head().starts_with("HTTP/1.1 101 "));
        for b in text(r#"{"op":"ping","rid":1}"#) {
            r.send(&[b]);
            std::thread::sleep(Duration::from_micros(200));
        }
        assert_eq!(r.json()["rid"], 1);

        // A frame in the same write as the upgrade, then 50 pipelined frames in one write,
        // answered in order.
        let mut r = Raw::open(addr, &text(r#"{"op":"ping","rid":0}"#));
        assert_eq!(r.json(), serde_json::json!({"op": "ping.ok", "rid": 0}));
        let many: Vec<u8> = (1..=50).flat_map(|i| text(&format!(r#"{{"op":"ping","rid":{i}}}"#))).collect();
        r.send(&many);
        for i in 1..=50 {
            assert_eq!(r.json()["rid"], i);
        }

        // A 16-bit length frame (padding field makes it > 125 bytes), and a ping without rid.
        let long = format!(r#"{{"op":"ping","rid":7,"pad":"{}"}}"#, "x".repeat(300));
        r.send(&text(&long));
        assert_eq!(r.json()["rid"], 7);
        r.send(&text(r#"{"op":"ping"}"#));
        assert_eq!(r.json(), serde_json::json!({"op": "ping.ok"}));

        // A message in three fragments with control frames between them.
        let msg = br#"{"op":"ping","rid":99}"#;
        let mut bytes = frame(0x1, false, &msg[..5]);
        bytes.extend(frame(0x9, true, b"hello"));
        bytes.extend(frame(0x0, false, &msg[5..12]));
        bytes.extend(frame(0xA, true, b"unsolicited pong"));
        bytes.extend(frame(0x0, true, &msg[12..]));
        r.send(&bytes);
        assert_eq!(r.next(), Some((0xA, b"hello".to_vec())), "pong echoes the ping payload");
        assert_eq!(r.json()["rid"], 99);

        // Binary frames need the binary subprotocol; the connection stays open.
        r.send(&frame(0x2, true, b"\x08\x01"));
        assert_eq!(r.json()["code"], "bad_request");
        r.send(&text("not json"));
        assert_eq!(r.json()["code"], "bad_request");

        // The close handshake: our close is echoed, then EOF.
        let mut close = 1000u16.to_be_bytes().to_vec();
        close.extend_from_slice(b"bye");
        r.send(&frame(0x8, true, &close));
        r.expect_close(1000);

        // Framing violations close with the matching code.
        let cases: Vec<(Vec<u8>, u16, &str)> = vec![
            (b"\x81\x02hi".to_vec(), 1002, "unmasked"),
            (frame(0x1, true, b"\xff\xfe"), 1007, "invalid UTF-8"),
            (frame(0x0, true, b"x"), 1002, "continuation without a message"),
            ([frame(0x1, false, b"a"), frame(0x1, true, b"b")].concat(), 1002, "message inside a message"),
            (frame(0x9, true, &[0; 126]), 1002, "oversize control frame"),
            (frame(0x3, true, b""), 1002, "reserved opcode"),
            (frame(0x8, true, &[0x03]), 1002, "one-byte close payload"),
        ];
        for (bytes, code, what) in cases {
            let mut r = Raw::open(addr, &[]);
            r.send(&bytes);
            let (op, payload) = r.next().unwrap_or_else(|| panic!("{what}: a close frame"));
            assert_eq!(op, 0x8, "{what}");
            assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), code, "{what}");
            assert!(r.next().is_none(), "{what}: EOF");
        }

        // A frame above max_frame_bytes is refused from its header alone: too_large, close 1009.
        let mut r = Raw::open(addr, &[]);
        r.send(&[0x81, 0x80 | 127, 0, 0, 0, 0, 0x40, 0, 0, 0, 1, 2, 3, 4]);
        let e = r.json();
        assert_eq!(e["code"], "too_large", "{e}");
        r.expect_close(1009);
        // ... and so is a fragmented message whose parts add up to more.
        let mut r = Raw::open(addr, &[]);
        r.send(&[frame(0x1, false, &[b' '; 1000]), frame(0x0, true, &[b' '; 100])].concat());
        assert_eq!(r.json()["code"], "too_large");
        r.expect_close(1009);

        // Refused upgrades get an HTTP status and EOF.
        for (req, status) in [
            (UPGRADE.replace("GET /ws", "GET /other"), "404"),
            (UPGRADE.replace("Version: 13", "Version: 12"), "426"),
            (UPGRADE.replace("sb.json.v1", "sb.xml.v1"), "400"),
            ("BREW /ws HTCPCP/1.0\r\n\r\n".to_string(), "400"),
        ] {
            let mut r = Raw::connect(addr);
            r.send(req.as_bytes());
            let head = r.read_head();
            assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{head}");
        }

        // After all that the gateway still serves.
        let mut r = Raw::open(addr, &text(r#"{"op":"ping","rid":5}"#));
        assert_eq!(r.json()["rid"], 5);
    })
    .await;
    gw.shutdown().await;
}
