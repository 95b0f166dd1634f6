//! Raw TCP framing (`gateway/src/tcpframe.rs`: `parse_prefix`, `put_prefix`) and what the
//! gateway does with each frame (protobuf `Frame` -> canonical JSON).
//!
//! Input: byte 0 picks the frame-size limit, byte 1 seeds the reads, the rest is the client's
//! byte stream (see `switchboard_fuzz`). Asserts:
//! - `parse_prefix` reads exactly the 4-byte prefix: "incomplete" below 4 bytes, otherwise the
//!   big-endian length, refused exactly when above the limit, whatever follows;
//! - the stream decodes to the same frames, refusal and leftover whether it arrives at once or
//!   in arbitrary reads;
//! - each frame's protobuf decoding, when it decodes, gives a JSON object;
//! - frames made with `put_prefix` from pieces of the input decode back to the same pieces,
//!   read at once or in arbitrary reads, when within the limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use switchboard_fuzz::{by_reads, pick_max, tcp_drain, Reads, TcpEvent};
use switchboard_gateway::{bincodec, tcpframe};
use switchboard_proto::v1::Frame;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let max = pick_max(data[0]);
    let mut reads = Reads::new(data[1]);
    let stream = &data[2..];

    let r = tcpframe::parse_prefix(stream, max);
    if stream.len() < tcpframe::PREFIX {
        assert_eq!(r, Ok(None));
    } else {
        let len = u32::from_be_bytes([stream[0], stream[1], stream[2], stream[3]]) as usize;
        assert_eq!(r, if len > max { Err(len) } else { Ok(Some(len)) });
        assert_eq!(tcpframe::parse_prefix(&stream[..tcpframe::PREFIX], max), r, "read past the prefix");
    }

    let mut events = Vec::new();
    let (used, stopped) = tcp_drain(stream, max, &mut events);
    let lengths = reads.lengths(stream.len());
    let (by_read, left) = by_reads(stream, &lengths, |buf, ev| tcp_drain(buf, max, ev));
    assert_eq!(by_read, events, "decoding depends on how the bytes were read");
    assert_eq!(left, stream.len() - used);
    assert_eq!(stopped, matches!(events.last(), Some(TcpEvent::TooLarge(_))));
    for e in &events {
        if let TcpEvent::Frame(payload) = e {
            if let Ok(f) = Frame::decode(payload.as_slice()) {
                assert!(bincodec::frame_to_json(&f).is_object());
            }
        }
    }

    // encoder round trip: cut the input into pieces (each piece's first byte is its length)
    let mut pieces: Vec<&[u8]> = Vec::new();
    let mut rest = stream;
    while let Some((&n, tail)) = rest.split_first() {
        let n = usize::from(n).min(tail.len());
        pieces.push(&tail[..n]);
        rest = &tail[n..];
    }
    let mut wire = Vec::new();
    for p in &pieces {
        tcpframe::put_prefix(&mut wire, p.len());
        wire.extend_from_slice(p);
    }
    let lengths = reads.lengths(wire.len());
    let (decoded, left) = by_reads(&wire, &lengths, |buf, ev| tcp_drain(buf, max, ev));
    let fitting = pieces.iter().take_while(|p| p.len() <= max).count();
    let expected: Vec<TcpEvent> = pieces[..fitting].iter().map(|p| TcpEvent::Frame(p.to_vec())).collect();
    assert_eq!(decoded[..fitting.min(decoded.len())], expected[..], "put_prefix frames decode differently");
    if fitting == pieces.len() {
        assert_eq!((decoded.len(), left), (fitting, 0));
    } else {
        assert_eq!(decoded.get(fitting), Some(&TcpEvent::TooLarge(pieces[fitting].len())));
    }
});
