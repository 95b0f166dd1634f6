//! Binary client frames, protobuf -> canonical JSON (`gateway/src/bincodec.rs`), as the gateway
//! handles every `sb.bin.v1` / raw TCP frame. Input: the frame's protobuf bytes. Asserts, for
//! every input that decodes as a `Frame`:
//! - its canonical JSON is an object no larger than `AMPLIFICATION` times the input (plus a
//!   constant), so the frame-size limit bounds what goes to logic;
//! - that JSON encodes back (`json_to_frame`) to the frame itself, but for what the module's
//!   mapping rules change (`canonical`: nothing is lost), whose JSON is the same (canonical
//!   JSON is a fixed point), and that `Frame` survives protobuf encoding unchanged;
//! - re-encoding the decoded frame is never longer than the input;
//! - the gateway's own reading of that JSON (`frame::head`) finds the frame's op, rid, token,
//!   conv, seq, call_id and to, and refuses it exactly when the op is empty.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use serde_json::Value;
use switchboard_gateway::{bincodec, frame};
use switchboard_proto::v1::{body::Kind, Body, Frame, Message};

/// JSON bytes per protobuf byte at most: an empty `ConvSummary` (2 bytes) becomes
/// `{"unread":0,"read_seq":0},` (26 bytes), and a control character in a string 6 bytes.
const AMPLIFICATION: usize = 16;

/// The frame the mapping rules of `bincodec` (its module doc) make of `f` through JSON: a
/// `Body{json}` becomes its JSON value (a string is a text body; `null` or invalid JSON, no
/// body), `member_list` wins over `members`, `online_map` over `online`; nothing else changes.
fn canonical(f: &Frame) -> Frame {
    fn body(b: &Option<Body>) -> Option<Body> {
        let kind = match b.as_ref()?.kind.as_ref()? {
            Kind::Text(t) => Kind::Text(t.clone()),
            Kind::Json(j) => match serde_json::from_str::<Value>(j).ok()? {
                Value::Null => return None,
                Value::String(s) => Kind::Text(s),
                v => Kind::Json(v.to_string()),
            },
        };
        Some(Body { kind: Some(kind) })
    }
    fn message(m: &Message) -> Message {
        Message { body: body(&m.body), ..m.clone() }
    }
    let mut c = f.clone();
    c.body = body(&f.body);
    c.msgs = f.msgs.iter().map(message).collect();
    c.msg = f.msg.as_ref().map(message);
    for conv in &mut c.convs {
        conv.last = conv.last.as_ref().map(message);
    }
    if !c.member_list.is_empty() {
        c.members.clear();
    }
    if !c.online_map.is_empty() {
        c.online = None;
    }
    c
}

fn nonempty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

fuzz_target!(|data: &[u8]| {
    let Ok(f) = Frame::decode(data) else {
        return;
    };
    assert!(f.encoded_len() <= data.len(), "re-encoding grew: {} > {}", f.encoded_len(), data.len());
    let v = bincodec::frame_to_json(&f);
    assert!(v.is_object());
    let text = v.to_string();
    assert!(
        text.len() <= AMPLIFICATION * data.len() + 64,
        "{} protobuf bytes became {} JSON bytes",
        data.len(),
        text.len()
    );

    let f2 = bincodec::json_to_frame(&v).unwrap_or_else(|e| panic!("canonical JSON {text} does not encode: {e}"));
    assert_eq!(f2, canonical(&f), "the frame lost or changed a field on its way through JSON");
    assert_eq!(bincodec::frame_to_json(&f2), v, "canonical JSON is not a fixed point");
    let bytes = f2.encode_to_vec();
    assert_eq!(Frame::decode(bytes.as_slice()).as_ref(), Ok(&f2), "protobuf round trip");

    match frame::head(text.as_bytes()) {
        Ok(h) => {
            assert_eq!(h.op, f.op);
            assert_eq!(h.rid, f.rid);
            assert_eq!(h.token.as_deref(), nonempty(&f.token));
            assert_eq!(h.conv.as_deref(), nonempty(&f.conv));
            assert_eq!(h.seq, f.seq);
            assert_eq!(h.call_id.as_deref(), nonempty(&f.call_id));
            assert_eq!(h.to.as_deref(), nonempty(&f.to));
        }
        Err(e) => {
            assert!(f.op.is_empty(), "head refused the JSON of a frame with op {:?}: {}", f.op, e.message);
            assert_eq!(e.rid, f.rid);
        }
    }
});
