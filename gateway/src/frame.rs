//! JSON frame parsing (op, rid and the few fields the gateway reads) and reply builders.

use std::borrow::Cow;

use serde_json::{json, Map, Value};

/// A parsed client request frame.
#[derive(Debug)]
pub struct Request {
    pub op: String,
    pub rid: Option<u64>,
    pub obj: Map<String, Value>,
}

impl Request {
    /// A string field, if present and a string.
    pub fn str_field(&self, name: &str) -> Option<&str> {
        self.obj.get(name).and_then(Value::as_str)
    }

    /// A u64 field, if present and a non-negative integer.
    pub fn u64_field(&self, name: &str) -> Option<u64> {
        self.obj.get(name).and_then(Value::as_u64)
    }
}

/// The fields of a request frame the gateway itself reads; everything else goes to logic
/// untouched (logic deserialises the frame once, into the op's own request type).
#[derive(Debug, Default, serde::Deserialize)]
pub struct Head<'a> {
    #[serde(borrow)]
    pub op: Cow<'a, str>,
    pub rid: Option<u64>,
    /// `auth`
    #[serde(borrow, default)]
    pub token: Option<Cow<'a, str>>,
    /// `ack`
    #[serde(borrow, default)]
    pub conv: Option<Cow<'a, str>>,
    pub seq: Option<u64>,
    /// `ack`: answer only a refusal, not success.
    #[serde(default)]
    pub quiet: Option<bool>,
    /// `call.*`
    #[serde(borrow, default)]
    pub call_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub to: Option<Cow<'a, str>>,
}

/// Reads the [`Head`] of one text frame. Well-formed frames take one pass without building a
/// JSON value; anything else (wrong types, duplicate keys, not an object, not UTF-8) goes
/// through [`parse`], which decides exactly as before: a field of the wrong type counts as
/// absent. One difference is kept: the one pass skips the fields it does not read the way
/// serde_json skips any value, without its nesting limit (128 levels), number range
/// (`1e999`) or surrogate (`"\ud800"`) checks, so a frame whose only such fault is inside
/// those fields is accepted here and refused by [`parse`]. Logic skips the same fields the same
/// way (its typed requests), and checks any field it reads (fuzz target `json_head`).
pub fn head(bytes: &[u8]) -> Result<Head<'_>, BadFrame> {
    // Only text takes the one pass: serde_json skips the strings it does not read without
    // checking their UTF-8, which `parse` refuses (found by fuzzing).
    if let Ok(text) = std::str::from_utf8(bytes) {
        if let Ok(h) = serde_json::from_str::<Head>(text) {
            if !h.op.is_empty() {
                return Ok(h);
            }
        }
    }
    let r = parse(bytes)?;
    let owned = |name: &str| r.str_field(name).map(|s| Cow::Owned(s.to_owned()));
    Ok(Head {
        rid: r.rid,
        token: owned("token"),
        conv: owned("conv"),
        seq: r.u64_field("seq"),
        quiet: r.obj.get("quiet").and_then(Value::as_bool),
        call_id: owned("call_id"),
        to: owned("to"),
        op: Cow::Owned(r.op),
    })
}

/// Why a frame could not be parsed; `rid` is set when one could still be read.
#[derive(Debug, PartialEq, Eq)]
pub struct BadFrame {
    pub rid: Option<u64>,
    pub message: &'static str,
}

/// Parses one text frame. Never panics, whatever the input.
pub fn parse(bytes: &[u8]) -> Result<Request, BadFrame> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|_| BadFrame { rid: None, message: "frame is not valid JSON" })?;
    let Value::Object(obj) = value else {
        return Err(BadFrame { rid: None, message: "frame is not a JSON object" });
    };
    let rid = obj.get("rid").and_then(Value::as_u64);
    let op = match obj.get("op") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err(BadFrame { rid, message: "missing or invalid field `op`" }),
    };
    Ok(Request { op, rid, obj })
}

fn with_rid(mut v: Value, rid: Option<u64>) -> String {
    if let (Some(rid), Value::Object(m)) = (rid, &mut v) {
        m.insert("rid".into(), rid.into());
    }
    v.to_string()
}

/// `{"op":"error","rid":R,"code":C,"message":M}` (rid omitted when unknown).
pub fn error(rid: Option<u64>, code: &str, message: &str) -> String {
    with_rid(json!({"op": "error", "code": code, "message": message}), rid)
}

/// An error carrying `retry_after_ms` (`rate_limited`, `unavailable`).
pub fn error_retry(rid: Option<u64>, code: &str, message: &str, retry_after_ms: u64) -> String {
    with_rid(json!({"op": "error", "code": code, "message": message, "retry_after_ms": retry_after_ms}), rid)
}

/// `{"op":"ack.ok","rid":R}`, written without building a JSON value (one per delivery).
pub fn ack_ok(rid: Option<u64>) -> String {
    match rid {
        Some(r) => format!("{{\"op\":\"ack.ok\",\"rid\":{r}}}"),
        None => "{\"op\":\"ack.ok\"}".to_owned(),
    }
}

/// `{"op":"ping.ok","rid":R}`.
pub fn ping_ok(rid: Option<u64>) -> String {
    with_rid(json!({"op": "ping.ok"}), rid)
}

/// `{"op":"auth.ok","rid":R,"user":U,"session":S,"server_ts":T}`.
pub fn auth_ok(rid: Option<u64>, user: &str, session: &str, server_ts: u64) -> String {
    with_rid(json!({"op": "auth.ok", "user": user, "session": session, "server_ts": server_ts}), rid)
}

/// `{"op":"drain","retry_after_ms":R}`.
pub fn drain(retry_after_ms: u64) -> String {
    json!({"op": "drain", "retry_after_ms": retry_after_ms}).to_string()
}

/// The push ending a call that rang out: `{"op":"call.hangup","call_id":C,"reason":"timeout"}`.
pub fn call_timeout_push(call_id: &str) -> String {
    json!({"op": "call.hangup", "call_id": call_id, "reason": "timeout"}).to_string()
}

/// The request relaying a ring timeout to the callee, sent to logic on the caller's behalf
/// (no rid): `{"op":"call.hangup","to":T,"call_id":C,"reason":"timeout"}`.
pub fn call_timeout_request(to: &str, call_id: &str) -> String {
    json!({"op": "call.hangup", "to": to, "call_id": call_id, "reason": "timeout"}).to_string()
}

/// The request ending a call whose caller went away while it rang, sent to logic on the caller's
/// behalf (no rid): `{"op":"call.hangup","to":T,"call_id":C,"reason":"gone"}`.
pub fn call_gone_request(to: &str, call_id: &str) -> String {
    json!({"op": "call.hangup", "to": to, "call_id": call_id, "reason": "gone"}).to_string()
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_op_and_rid() {
        let r = parse(br#"{"op":"send","rid":7,"to":"bob"}"#).unwrap();
        assert_eq!(r.op, "send");
        assert_eq!(r.rid, Some(7));
        assert_eq!(r.str_field("to"), Some("bob"));
        let r = parse(br#"{"op":"ping"}"#).unwrap();
        assert_eq!(r.rid, None);
    }

    #[test]
    fn head_reads_the_gateway_fields_once() {
        let h = head(br#"{"op":"ack","rid":3,"conv":"d:a:b","seq":9,"extra":[1,{"x":2}]}"#).unwrap();
        assert_eq!((h.op.as_ref(), h.rid, h.conv.as_deref(), h.seq), ("ack", Some(3), Some("d:a:b"), Some(9)));
        // wrong types fall back to the lenient path: the field is absent, the frame is not refused
        let h = head(br#"{"op":"auth","rid":-1,"token":5}"#).unwrap();
        assert_eq!((h.op.as_ref(), h.rid, h.token), ("auth", None, None));
        let h = head(br#"{"op":"x","rid":1,"rid":2}"#).unwrap();
        assert_eq!(h.rid, Some(2));
        assert_eq!(head(br#"{"op":"","rid":4}"#).unwrap_err().rid, Some(4));
        assert!(head(b"[1]").is_err());
        assert!(head(b"nope").is_err());
    }

    #[test]
    fn head_refuses_what_parse_refuses_in_fields_it_skips() {
        // fuzz target json_head: invalid UTF-8 in a string the one pass skips was accepted
        let frame = b"{\"op\":\"auth\",\"rid\":2,\"tn\":\"eyJ0eXAiOiJKV1Qif\xf8\xff\xff\xff9.c2ln\"}";
        assert_eq!(parse(frame).unwrap_err(), BadFrame { rid: None, message: "frame is not valid JSON" });
        assert_eq!(head(frame).unwrap_err(), parse(frame).unwrap_err());
        // the documented difference: faults serde_json does not look for in the values it skips
        let deep = format!(r#"{{"op":"x","rid":1,"skip":{}{}}}"#, "[".repeat(200), "]".repeat(200));
        let huge = r#"{"op":"s\u0019nd","d":184E6744073709515615,"rid":1}"#.to_string(); // found by fuzzing
        let lone = r#"{"op":"x","rid":1,"skip":"\ud800"}"#.to_string();
        for frame in [deep, huge, lone] {
            assert!(parse(frame.as_bytes()).is_err(), "{frame}");
            let h = head(frame.as_bytes()).unwrap();
            assert_eq!(h.rid, Some(1));
        }
        // ... and only there: the same faults in a field the gateway reads are refused
        for frame in [r#"{"op":"x","rid":1e999}"#, r#"{"op":"x","token":"\ud800"}"#] {
            assert_eq!(head(frame.as_bytes()).unwrap_err(), parse(frame.as_bytes()).unwrap_err(), "{frame}");
        }
    }

    #[test]
    fn rejects_bad_frames() {
        assert_eq!(parse(b"not json").unwrap_err().rid, None);
        assert!(parse(b"[1,2]").is_err());
        assert!(parse(b"\"op\"").is_err());
        let e = parse(br#"{"rid":5}"#).unwrap_err();
        assert_eq!(e.rid, Some(5));
        assert!(parse(br#"{"op":3,"rid":1}"#).is_err());
        assert!(parse(br#"{"op":"","rid":1}"#).is_err());
        // negative or fractional rid is not a rid
        assert_eq!(parse(br#"{"op":"x","rid":-1}"#).unwrap().rid, None);
    }

    #[test]
    fn random_bytes_never_panic() {
        // xorshift: deterministic pseudo-random input without extra dependencies
        let mut s: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let alphabet = br#"{}[]":,0123456789.-eE+truefalsnop rid\u"#;
        for _ in 0..20_000 {
            let len = (next() % 64) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    let r = next();
                    if r % 3 == 0 {
                        r as u8
                    } else {
                        alphabet[(r >> 8) as usize % alphabet.len()]
                    }
                })
                .collect();
            let _ = parse(&bytes);
        }
        // some structured near-misses too
        for s in [
            r#"{"op":"auth","rid":18446744073709551616}"#,
            r#"{"op":"auth","rid":1e400}"#,
            r#"{"op":"#,
            "{\"op\":\"\u{0}\"}",
        ] {
            let _ = parse(s.as_bytes());
        }
    }

    #[test]
    fn replies_are_json() {
        let e: Value = serde_json::from_str(&error(Some(3), "bad_request", "x")).unwrap();
        assert_eq!(e["rid"], 3);
        assert_eq!(e["code"], "bad_request");
        let e: Value = serde_json::from_str(&error(None, "auth_timeout", "x")).unwrap();
        assert!(e.get("rid").is_none());
        let e: Value = serde_json::from_str(&error_retry(Some(1), "unavailable", "x", 1000)).unwrap();
        assert_eq!(e["retry_after_ms"], 1000);
        let a: Value = serde_json::from_str(&auth_ok(Some(1), "alice", "s1", 5)).unwrap();
        assert_eq!(a["op"], "auth.ok");
        assert_eq!(a["user"], "alice");
        assert_eq!(a["server_ts"], 5);
        let d: Value = serde_json::from_str(&drain(1000)).unwrap();
        assert_eq!(d["op"], "drain");
        let h: Value = serde_json::from_str(&call_timeout_push("c\"1")).unwrap();
        assert_eq!(h, json!({"op": "call.hangup", "call_id": "c\"1", "reason": "timeout"}));
        let h: Value = serde_json::from_str(&call_timeout_request("bob", "c1")).unwrap();
        assert_eq!(h, json!({"op": "call.hangup", "to": "bob", "call_id": "c1", "reason": "timeout"}));
    }
}
