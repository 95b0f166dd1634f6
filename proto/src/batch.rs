//! Cutting a queue of protobuf messages into batches bounded by count and encoded bytes, as
//! both ends of the gateway–logic link write them.

use prost::Message;

/// Takes `first` and then whatever `next` yields, up to `max` messages and `max_bytes` encoded
/// bytes (a single larger message goes alone). A message that would pass the byte bound is
/// returned as the carry, to start the next batch.
pub fn cut<T: Message>(
    first: T,
    mut next: impl FnMut() -> Option<T>,
    max: usize,
    max_bytes: usize,
) -> (Vec<T>, Option<T>) {
    let mut bytes = first.encoded_len();
    let mut batch = vec![first];
    while batch.len() < max {
        let Some(m) = next() else { break };
        let len = m.encoded_len();
        if bytes + len > max_bytes {
            return (batch, Some(m));
        }
        bytes += len;
        batch.push(m);
    }
    (batch, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::internal::AuthRequest;

    fn req(n: usize) -> AuthRequest {
        AuthRequest { token: "x".repeat(n) }
    }

    #[test]
    fn cuts_by_count_and_bytes_and_carries_the_next() {
        let mut q = vec![req(10), req(10), req(10)].into_iter();
        let (b, carry) = cut(req(10), || q.next(), 2, 1 << 20);
        assert_eq!((b.len(), carry.is_none()), (2, true), "count bound");
        let mut q = vec![req(10), req(100), req(10)].into_iter();
        let (b, carry) = cut(req(10), || q.next(), 100, 40);
        assert_eq!(b.len(), 2);
        assert_eq!(carry.unwrap().token.len(), 100, "the one that passes the bytes starts the next batch");
        let (b, carry) = cut(req(1000), || None, 100, 40);
        assert_eq!((b.len(), carry.is_none()), (1, true), "a single larger message goes alone");
    }
}
