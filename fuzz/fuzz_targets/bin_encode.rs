//! Canonical JSON -> binary frames (`gateway/src/bincodec.rs`: `json_to_frame`), as the gateway
//! encodes every reply and push for `sb.bin.v1` / raw TCP clients. Input: JSON text. Asserts,
//! for every input that is JSON:
//! - a non-object is refused as `NotObject("frame")`;
//! - an encoded frame decodes back (protobuf) to the same `Frame`, its JSON encodes back to the
//!   same `Frame` again (JSON -> proto -> JSON -> proto is the identity on the proto side), and
//!   that JSON names no top-level field the input did not have;
//! - the protobuf is at most `GROWTH` times the JSON text (plus a constant).
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use serde_json::Value;
use switchboard_gateway::bincodec::{self, CodecError};
use switchboard_proto::v1::Frame;

/// Protobuf bytes per JSON byte at most: numbers in a JSON `body` are re-serialised, and
/// `1e15` is written `1000000000000000.0`.
const GROWTH: usize = 8;

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let f = match bincodec::json_to_frame(&v) {
        Ok(f) => f,
        Err(e) => {
            if !v.is_object() {
                assert_eq!(e, CodecError::NotObject("frame"));
            }
            return;
        }
    };
    let Value::Object(input) = &v else {
        panic!("a non-object encoded");
    };
    let bytes = f.encode_to_vec();
    assert!(bytes.len() <= GROWTH * data.len() + 64, "{} JSON bytes became {} protobuf bytes", data.len(), bytes.len());
    let back = Frame::decode(bytes.as_slice()).expect("the encoder's output decodes");
    assert_eq!(back, f, "protobuf round trip");
    let v2 = bincodec::frame_to_json(&back);
    let Value::Object(out) = &v2 else {
        panic!("frame_to_json gave a non-object");
    };
    for k in out.keys() {
        assert!(input.contains_key(k), "field `{k}` appeared from nowhere");
    }
    let f2 = bincodec::json_to_frame(&v2).unwrap_or_else(|e| panic!("canonical JSON {v2} does not encode: {e}"));
    assert_eq!(f2, f, "JSON -> proto -> JSON -> proto changed the frame");
});
