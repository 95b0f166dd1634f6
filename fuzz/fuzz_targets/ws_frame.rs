//! WebSocket frames (`gateway/src/ws.rs`): `parse_header`, `unmask`, and the server-side
//! encoders `put_frame`, `put_header`, `put_close`, `close_reply_code`.
//!
//! Input: byte 0 picks the frame-size limit, byte 1 seeds the reads, the rest is the client's
//! byte stream (see `switchboard_fuzz`). Asserts:
//! - a header never claims bytes it was not given, its lengths respect the limit (control
//!   frames: final and at most 125 bytes), and it decodes the same from its own bytes alone;
//! - every prefix of a valid header is "incomplete", never an error (frames split anywhere are
//!   accepted), and an error stays the same error whatever bytes follow;
//! - the stream decodes to the same frames, error and leftover whether it arrives at once or in
//!   arbitrary reads;
//! - `unmask` in pieces at any offset equals a byte-wise XOR, and twice is the identity;
//! - a frame `put_frame` made decodes (reference decoder) to the same opcode and payload in the
//!   minimal length form with `header_len` bytes of header, and the same frame masked by a
//!   client parses back to the same payload; `put_close` stays within 125 bytes with a UTF-8
//!   reason cut from the one given, which `close_reply_code` accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_fuzz::{by_reads, client_frame, pick_max, server_frame, ws_drain, Reads, WsEvent};
use switchboard_gateway::ws::{self, close_code, Opcode};

const OPCODES: [Opcode; 6] =
    [Opcode::Continuation, Opcode::Text, Opcode::Binary, Opcode::Close, Opcode::Ping, Opcode::Pong];

fn header_properties(stream: &[u8], max: usize) {
    let r = ws::parse_header(stream, max);
    match &r {
        Ok(Some(h)) => {
            let expected = match stream[1] & 0x7F {
                126 => 8,
                127 => 14,
                _ => 6,
            };
            assert_eq!(h.header_len, expected);
            assert!(h.header_len <= stream.len());
            assert_eq!(h.fin, stream[0] & 0x80 != 0);
            assert_eq!(h.mask[..], stream[h.header_len - 4..h.header_len]);
            assert_eq!(ws::parse_header(&stream[..h.header_len], max), r, "read past its header");
            for cut in 0..h.header_len {
                assert_eq!(ws::parse_header(&stream[..cut], max), Ok(None), "a prefix of a valid header refused");
            }
        }
        Ok(None) => assert!(stream.len() < 14),
        Err(e) => {
            let mut longer = stream.to_vec();
            longer.extend_from_slice(&[0xA5; 14]);
            assert_eq!(ws::parse_header(&longer, max).as_ref().err(), Some(e), "error changed with more bytes");
            if e.code == close_code::TOO_BIG {
                assert!(matches!(stream[0] & 0x0F, 0..=2), "only data frames are too big");
            }
        }
    }
}

fn unmask_properties(data: &[u8], reads: &mut Reads) {
    if data.len() < 4 {
        return;
    }
    let mask = [data[0], data[1], data[2], data[3]];
    let body = &data[4..];
    let expected: Vec<u8> = body.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect();
    let mut got = body.to_vec();
    let mut at = 0;
    for n in reads.lengths(got.len()) {
        ws::unmask(&mut got[at..at + n], mask, at);
        at += n;
    }
    assert_eq!(got, expected, "unmask in pieces differs from a byte-wise XOR");
    ws::unmask(&mut got, mask, 0);
    assert_eq!(got, body, "unmask twice is not the identity");
}

fn encoder_properties(payload: &[u8], pick: u8, max: usize) {
    let opcode = OPCODES[usize::from(pick) % OPCODES.len()];
    let payload = if opcode.is_control() { &payload[..payload.len().min(ws::MAX_CONTROL_PAYLOAD)] } else { payload };
    let mut out = vec![0xEE; usize::from(pick) % 3]; // bytes already queued stay untouched
    let before = out.clone();
    ws::put_frame(&mut out, opcode, payload);
    assert_eq!(out[..before.len()], before[..]);
    let (b0, header, body) = server_frame(&out[before.len()..]);
    assert_eq!(header, ws::header_len(payload.len()));
    assert_eq!(body, payload);
    let mut by_parts = Vec::new();
    ws::put_header(&mut by_parts, opcode, payload.len());
    by_parts.extend_from_slice(payload);
    assert_eq!(by_parts[..], out[before.len()..], "put_header + payload differs from put_frame");
    assert_eq!(b0 & 0x80, 0x80, "server frames are final");
    // the same frame from a client, masked: parses back to this opcode and payload
    let mask = [pick, pick.wrapping_mul(7), 0x5A, !pick];
    let mut client = client_frame(b0, payload, mask);
    let limit = if opcode.is_control() { max } else { max.max(payload.len()) };
    let h = ws::parse_header(&client, limit).expect("a valid client frame").expect("complete");
    assert_eq!((h.opcode, h.fin, h.payload_len, h.mask), (opcode, true, payload.len(), mask));
    assert_eq!(h.header_len + h.payload_len, client.len());
    ws::unmask(&mut client[h.header_len..], h.mask, 0);
    assert_eq!(&client[h.header_len..], payload);

    // close frames: cut to fit, reason a UTF-8 prefix of the one given
    let reason = String::from_utf8_lossy(payload);
    let code = u16::from_be_bytes([pick, payload.first().copied().unwrap_or(0)]);
    let mut close = Vec::new();
    ws::put_close(&mut close, code, &reason);
    let (b0, _, body) = server_frame(&close);
    assert_eq!(b0, 0x88);
    assert!(body.len() >= 2 && body.len() <= ws::MAX_CONTROL_PAYLOAD);
    assert_eq!(u16::from_be_bytes([body[0], body[1]]), code);
    let sent = std::str::from_utf8(&body[2..]).expect("close reason is UTF-8");
    assert!(reason.starts_with(sent));
    assert!(sent.len() == reason.len() || sent.len() + 4 > ws::MAX_CONTROL_PAYLOAD - 2, "reason cut too short");
    let valid = matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999);
    let reply = ws::close_reply_code(body);
    assert_eq!(reply, if valid { close_code::NORMAL } else { close_code::PROTOCOL });
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let max = pick_max(data[0]);
    let seed = data[1];
    let stream = &data[2..];

    header_properties(stream, max);

    // the whole stream at once, then in reads: same frames, same error, same leftover
    let mut whole = stream.to_vec();
    let mut events = Vec::new();
    let (used, stopped) = ws_drain(&mut whole, max, &mut events);
    let left = stream.len() - used;
    let mut reads = Reads::new(seed);
    let lengths = reads.lengths(stream.len());
    let (by_read, left_by_read) = by_reads(stream, &lengths, |buf, ev| ws_drain(buf, max, ev));
    assert_eq!(by_read, events, "decoding depends on how the bytes were read");
    assert_eq!(left_by_read, left);
    assert_eq!(stopped, matches!(events.last(), Some(WsEvent::Error(_))));

    for e in &events {
        let code = match e {
            WsEvent::Frame { opcode: Opcode::Close, payload, .. } => ws::close_reply_code(payload),
            _ => continue,
        };
        assert!(matches!(code, close_code::NORMAL | close_code::PROTOCOL | close_code::INVALID_DATA));
    }

    unmask_properties(stream, &mut reads);
    encoder_properties(&stream[..stream.len().min(70_000)], seed, max);
});
