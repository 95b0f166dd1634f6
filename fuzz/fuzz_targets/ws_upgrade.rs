//! The HTTP upgrade request parser (`gateway/src/ws.rs`: `parse_upgrade`). Input: the bytes a
//! client sent first. Asserts:
//! - an accepted request used at most the bytes given (and at most `MAX_REQUEST_BYTES`), ends
//!   with its blank line, and gives the same answer from its own bytes alone (nothing after it is
//!   read); shorter prefixes of it are "incomplete", never refused;
//! - "incomplete" is only said while the request is still within `MAX_REQUEST_BYTES`;
//! - a refusal seen on a prefix is the same refusal on the whole input;
//! - every response is plain ASCII HTTP: a `101` with a 28-character accept key and at most the
//!   subprotocol we chose (nothing of the request's own bytes, so no header injection), or a
//!   refusal whose status line matches its status and whose `Content-Length` matches its body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_gateway::ws::{self, Refusal, Upgrade, MAX_REQUEST_BYTES};

fn http_ascii(resp: &[u8]) -> &str {
    let text = std::str::from_utf8(resp).expect("response is UTF-8");
    assert!(
        text.bytes().all(|b| b == b'\r' || b == b'\n' || (0x20..0x7F).contains(&b)),
        "response has bytes beyond printable ASCII: {text:?}"
    );
    let head_end = text.find("\r\n\r\n").expect("response has a blank line");
    // no bare CR or LF in the head: every line ends with CRLF
    let head = &text[..head_end];
    assert_eq!(head.matches('\r').count(), head.matches('\n').count(), "bare CR/LF in {head:?}");
    assert_eq!(head.matches("\r\n").count(), head.matches('\n').count(), "bare CR/LF in {head:?}");
    text
}

fn check_upgrade(up: &Upgrade) {
    let text = http_ascii(&up.response);
    assert!(text.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
    assert!(text.ends_with("\r\n\r\n") && text.matches("\r\n\r\n").count() == 1);
    let accept = text
        .split("\r\n")
        .find_map(|l| l.strip_prefix("Sec-WebSocket-Accept: "))
        .expect("101 without Sec-WebSocket-Accept");
    assert_eq!(accept.len(), 28);
    let proto = text.split("\r\n").find_map(|l| l.strip_prefix("Sec-WebSocket-Protocol: "));
    match proto {
        Some(p) => assert_eq!(p, if up.bin { ws::SUBPROTOCOL_BIN } else { ws::SUBPROTOCOL_JSON }),
        None => assert!(!up.bin),
    }
    assert_eq!(text.split("\r\n").count(), if proto.is_some() { 7 } else { 6 });
}

fn check_refusal(r: &Refusal) {
    assert!(matches!(r.status, 400 | 404 | 405 | 426 | 431), "status {}", r.status);
    let text = http_ascii(&r.response);
    assert!(text.starts_with(&format!("HTTP/1.1 {} ", r.status)));
    let (head, body) = text.split_once("\r\n\r\n").expect("blank line");
    let len: usize = head
        .split("\r\n")
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("Content-Length")
        .parse()
        .expect("numeric Content-Length");
    assert_eq!(len, body.len(), "Content-Length disagrees with the body");
    if r.status == 426 && body.contains("version") {
        assert!(head.contains("\r\nSec-WebSocket-Version: 13"));
    }
}

fuzz_target!(|data: &[u8]| {
    let r = ws::parse_upgrade(data);
    let mut cuts: Vec<usize> = vec![data.len() / 2, data.len() / 4, data.len().saturating_sub(1)];
    match &r {
        Ok(None) => assert!(data.len() <= MAX_REQUEST_BYTES, "incomplete request above the limit not refused"),
        Ok(Some((used, up))) => {
            let used = *used;
            assert!(used <= data.len() && used <= MAX_REQUEST_BYTES);
            assert!(data[..used].ends_with(b"\n"), "request does not end with its blank line");
            assert_eq!(ws::parse_upgrade(&data[..used]), r, "the answer depends on bytes after the request");
            check_upgrade(up);
            cuts.extend([used.saturating_sub(1), used.saturating_sub(2), used.saturating_sub(3)]);
            for &cut in cuts.iter().filter(|&&c| c < used) {
                assert_eq!(ws::parse_upgrade(&data[..cut]), Ok(None), "prefix {cut} of an accepted request");
            }
            return;
        }
        Err(refusal) => check_refusal(refusal),
    }
    for cut in cuts {
        if let Err(early) = ws::parse_upgrade(&data[..cut]) {
            check_refusal(&early);
            match &r {
                Err(full) => assert_eq!(full.status, early.status, "prefix {cut} refused differently"),
                other => panic!("prefix {cut} refused ({}), whole input {other:?}", early.status),
            }
        }
    }
});
