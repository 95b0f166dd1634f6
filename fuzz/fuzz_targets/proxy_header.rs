//! PROXY protocol headers (`gateway/src/proxyproto.rs`), as a gateway reads the first bytes of
//! a trusted proxy's connection. Input: those bytes. Asserts that parsing never panics, that a
//! header's length lies within the input and the limits (`MAX_V1` / `MAX_V2`), that a verdict
//! on a prefix holds for every longer input (bytes after a complete header never change it, so
//! reading more cannot turn a refusal into an accepted header), that only a prefix no longer
//! than the limits is ever `Incomplete`, and that a v2 header the module encodes parses back
//! to its source.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_gateway::proxyproto::{self, Header, MAX_V1, MAX_V2};

fuzz_target!(|data: &[u8]| {
    let verdict = proxyproto::parse(data);
    match &verdict {
        Ok(Header::Present { len, .. }) => {
            assert!(*len <= data.len() && *len <= MAX_V1.max(MAX_V2), "length {len} of {}", data.len());
            // whatever follows the header is the client's
            let mut longer = data[..*len].to_vec();
            longer.extend_from_slice(b"GET /ws HTTP/1.1\r\n");
            assert_eq!(proxyproto::parse(&longer), verdict);
        }
        Ok(Header::Incomplete) => assert!(data.len() < MAX_V1.max(MAX_V2), "{} bytes still incomplete", data.len()),
        Ok(Header::Absent) | Err(_) => {}
    }
    // a verdict on a prefix is final once it is not `Incomplete`
    for cut in 0..data.len().min(64) {
        match proxyproto::parse(&data[..cut]) {
            Ok(Header::Incomplete) => {}
            Ok(Header::Present { len, .. }) => assert!(matches!(verdict, Ok(Header::Present { len: l, .. }) if l == len)),
            other => assert_eq!(other.is_err(), verdict.is_err(), "prefix of {cut} bytes"),
        }
    }
    if data.len() >= 12 {
        let v4 = |b: &[u8]| std::net::SocketAddr::from(([b[0], b[1], b[2], b[3]], u16::from_be_bytes([b[4], b[5]])));
        let (src, dst) = (v4(&data[..6]), v4(&data[6..12]));
        let h = proxyproto::encode_v2(src, dst);
        assert_eq!(proxyproto::parse(&h), Ok(Header::Present { len: h.len(), source: Some(src) }));
    }
});
