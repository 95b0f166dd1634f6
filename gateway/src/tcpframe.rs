//! Raw TCP framing: each frame is a big-endian u32 length followed by that many
//! bytes (a protobuf `Frame`), in both directions. Like [`crate::ws`], this only
//! looks at bytes the shard has already read; it owns no buffer.

/// Bytes of the length prefix.
pub const PREFIX: usize = 4;

/// The payload length announced at the start of `buf`: `Ok(None)` until the
/// prefix is complete, `Err(len)` when `len` exceeds `max` (checked before
/// anyone makes room for the payload).
pub fn parse_prefix(buf: &[u8], max: usize) -> Result<Option<usize>, usize> {
    if buf.len() < PREFIX {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > max {
        return Err(len);
    }
    Ok(Some(len))
}

/// Appends `payload_len` as the big-endian u32 prefix.
pub fn put_prefix(out: &mut Vec<u8>, payload_len: usize) {
    out.extend_from_slice(&(payload_len as u32).to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_round_trip_and_limits() {
        let mut out = Vec::new();
        put_prefix(&mut out, 300);
        out.extend_from_slice(&[1; 300]);
        assert_eq!(parse_prefix(&out, 1000), Ok(Some(300)));
        assert_eq!(parse_prefix(&out, 299), Err(300));
        for cut in 0..PREFIX {
            assert_eq!(parse_prefix(&out[..cut], 1000), Ok(None));
        }
        assert_eq!(parse_prefix(&[0xFF; 4], usize::MAX >> 1), Ok(Some(u32::MAX as usize)));
    }
}
