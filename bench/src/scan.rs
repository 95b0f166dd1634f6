//! Cheap field extraction from server JSON frames for the hot path: a substring search for
//! `"key"` followed by `:` instead of a parse. Good for the flat, compact frames Switchboard
//! sends; setup frames go through serde_json.
//!
//! A key is found wherever `"key"` is followed by optional whitespace and `:`, so a string
//! *value* equal to the key is skipped, and a key inside a string value cannot match either
//! (its quotes would be escaped). Nested objects are searched too: `seq` of a `msg` push is the
//! message's `seq`.

use memchr::memmem;

/// The raw bytes of the value of the first `"key":`, from its first byte to the end of `json`.
fn value_at<'a>(json: &'a [u8], key: &str) -> Option<&'a [u8]> {
    let k = key.as_bytes();
    let mut from = 0;
    while let Some(i) = memmem::find(&json[from..], k) {
        let start = from + i;
        let end = start + k.len();
        from = start + 1;
        if start == 0 || json[start - 1] != b'"' || json.get(end) != Some(&b'"') {
            continue;
        }
        let mut j = end + 1;
        while json.get(j).is_some_and(|b| b.is_ascii_whitespace()) {
            j += 1;
        }
        if json.get(j) != Some(&b':') {
            continue;
        }
        j += 1;
        while json.get(j).is_some_and(|b| b.is_ascii_whitespace()) {
            j += 1;
        }
        return Some(&json[j..]);
    }
    None
}

/// The contents of the string value of `key` (escapes are not decoded; a value containing `\"`
/// ends early, which the bench never needs).
pub fn str_field<'a>(json: &'a [u8], key: &str) -> Option<&'a [u8]> {
    let v = value_at(json, key)?;
    let rest = v.strip_prefix(b"\"")?;
    let end = memchr::memchr(b'"', rest)?;
    Some(&rest[..end])
}

/// The unsigned integer value of `key`.
pub fn u64_field(json: &[u8], key: &str) -> Option<u64> {
    let v = value_at(json, key)?;
    let digits = v.iter().take_while(|b| b.is_ascii_digit()).count();
    parse_u64(&v[..digits])
}

/// The frame's `op`.
pub fn op(json: &[u8]) -> Option<&[u8]> {
    str_field(json, "op")
}

/// Parses an unsigned decimal number (all of `s`).
pub fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    let mut n = 0u64;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add((b - b'0') as u64)?;
    }
    Some(n)
}

/// A load-tool `cmid`: `<run>-<n>-<ns>` (run id in hex, message number, send time in ns since
/// the run's epoch). Carries what a receiver needs to measure delivery latency without a lookup.
pub fn cmid(run: u32, n: u64, ns: u64) -> String {
    format!("{run:x}-{n}-{ns}")
}

/// Parses a [`cmid`] of run `run` into `(n, ns)`; `None` for other runs or other shapes.
pub fn parse_cmid(cmid: &[u8], run_prefix: &[u8]) -> Option<(u64, u64)> {
    let rest = cmid.strip_prefix(run_prefix)?;
    let dash = memchr::memchr(b'-', rest)?;
    Some((parse_u64(&rest[..dash])?, parse_u64(&rest[dash + 1..])?))
}

/// The prefix [`parse_cmid`] wants for `run`: `"<run hex>-"`.
pub fn run_prefix(run: u32) -> Vec<u8> {
    format!("{run:x}-").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_of_a_msg_push() {
        let push = br#"{"msg":{"body":"op","cmid":"1f-7-123456","conv":"g:AbCdEf123456","from":"op","mid":"x","seq":42,"ts":1,"type":"text"},"op":"msg"}"#;
        assert_eq!(op(push), Some(&b"msg"[..]));
        assert_eq!(u64_field(push, "seq"), Some(42));
        assert_eq!(str_field(push, "conv"), Some(&b"g:AbCdEf123456"[..]));
        let c = str_field(push, "cmid").unwrap();
        assert_eq!(parse_cmid(c, &run_prefix(0x1f)), Some((7, 123456)));
        assert_eq!(parse_cmid(c, &run_prefix(0x2f)), None);
    }

    #[test]
    fn replies_and_whitespace() {
        assert_eq!(op(br#"{"op":"ping.ok","rid":2}"#), Some(&b"ping.ok"[..]));
        assert_eq!(u64_field(br#"{"op":"ping.ok","rid":2}"#, "rid"), Some(2));
        assert_eq!(op(br#"{ "op" : "send.ok" , "rid" : 18446744073709551615 }"#), Some(&b"send.ok"[..]));
        assert_eq!(u64_field(br#"{ "op" : "send.ok" , "rid" : 18446744073709551615 }"#, "rid"), Some(u64::MAX));
        assert_eq!(u64_field(br#"{"op":"error","code":"x"}"#, "rid"), None);
        // A key inside a string value does not match.
        assert_eq!(op(br#"{"body":"say \"op\":\"no\"","op":"msg"}"#), Some(&b"msg"[..]));
        assert_eq!(op(br#"{"opx":"a"}"#), None);
    }

    #[test]
    fn cmid_round_trip() {
        let c = cmid(0xabc, 99, 1_000_000_007);
        assert_eq!(parse_cmid(c.as_bytes(), &run_prefix(0xabc)), Some((99, 1_000_000_007)));
        assert_eq!(parse_u64(b"12a"), None);
    }
}
