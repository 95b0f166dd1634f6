//! The PROXY protocol (versions 1 and 2, as HAProxy sends them with `send-proxy` /
//! `send-proxy-v2`): the header a load balancer writes before the client's first byte, naming
//! the client's address. Parsed from the connection's first bytes without reading past the
//! header, and refused beyond [`MAX_V1`] / [`MAX_V2`] bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12 bytes every version 2 header starts with.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest version 1 header, its CRLF included (the specification's bound).
pub const MAX_V1: usize = 107;
/// Longest version 2 header accepted: the fixed 16 bytes and up to 512 of addresses and TLVs
/// (HAProxy's own TLVs, such as ALPN or a unique id, fit well within it).
pub const MAX_V2: usize = 16 + 512;

/// What the start of a connection holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Header {
    /// Too few bytes to tell yet.
    Incomplete,
    /// Not a PROXY header (the client's own bytes).
    Absent,
    /// A header of `len` bytes. `source` is the client's address; `None` when the proxy speaks
    /// for itself (v2 `LOCAL`, e.g. a health check, or v1 `UNKNOWN` / an unsupported family).
    Present { len: usize, source: Option<SocketAddr> },
}

/// Parses the PROXY header at the start of `buf`; the error says why a header is malformed.
pub fn parse(buf: &[u8]) -> Result<Header, &'static str> {
    if buf.is_empty() {
        return Ok(Header::Incomplete);
    }
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        return if n < V2_SIGNATURE.len() { Ok(Header::Incomplete) } else { parse_v2(buf) };
    }
    let n = buf.len().min(6);
    if buf[..n] == b"PROXY "[..n] {
        return if n < 6 { Ok(Header::Incomplete) } else { parse_v1(buf) };
    }
    Ok(Header::Absent)
}

fn parse_v1(buf: &[u8]) -> Result<Header, &'static str> {
    let window = &buf[..buf.len().min(MAX_V1)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= MAX_V1 { Err("PROXY v1 header longer than 107 bytes") } else { Ok(Header::Incomplete) };
    };
    let line = std::str::from_utf8(&buf[6..end]).map_err(|_| "PROXY v1 header is not ASCII")?;
    let len = end + 2;
    let mut parts = line.split(' ');
    let family = parts.next().unwrap_or_default();
    if family == "UNKNOWN" {
        return Ok(Header::Present { len, source: None });
    }
    let fields: Vec<&str> = parts.collect();
    let [src, _dst, sport, _dport] = fields[..] else {
        return Err("PROXY v1 header needs four fields after the family");
    };
    let ip: IpAddr = match family {
        "TCP4" => src.parse::<Ipv4Addr>().map(IpAddr::V4).map_err(|_| "PROXY v1: bad IPv4 source")?,
        "TCP6" => src.parse::<Ipv6Addr>().map(IpAddr::V6).map_err(|_| "PROXY v1: bad IPv6 source")?,
        _ => return Err("PROXY v1: family must be TCP4, TCP6 or UNKNOWN"),
    };
    let port = parse_port(sport).ok_or("PROXY v1: bad source port")?;
    Ok(Header::Present { len, source: Some(SocketAddr::new(ip, port)) })
}

/// A decimal port without sign or leading zeros.
fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || (s.len() > 1 && s.starts_with('0')) || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn parse_v2(buf: &[u8]) -> Result<Header, &'static str> {
    if buf.len() < 16 {
        return Ok(Header::Incomplete);
    }
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err("PROXY v2: unsupported version");
    }
    let body = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    let len = 16 + body;
    if len > MAX_V2 {
        return Err("PROXY v2 header longer than the limit");
    }
    if buf.len() < len {
        return Ok(Header::Incomplete);
    }
    let addrs = &buf[16..len];
    match ver_cmd & 0x0f {
        // LOCAL: the proxy's own connection; the addresses (if any) are to be ignored.
        0 => Ok(Header::Present { len, source: None }),
        1 => {
            let source = match buf[13] {
                // TCP over IPv4
                0x11 => {
                    let a = addrs.get(..12).ok_or("PROXY v2: IPv4 addresses cut short")?;
                    let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
                    Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be_bytes([a[8], a[9]])))
                }
                // TCP over IPv6
                0x21 => {
                    let a = addrs.get(..36).ok_or("PROXY v2: IPv6 addresses cut short")?;
                    let ip: [u8; 16] = a[..16].try_into().expect("16 bytes");
                    Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), u16::from_be_bytes([a[32], a[33]])))
                }
                // UNSPEC, UDP, unix sockets: no client address to take.
                _ => None,
            };
            Ok(Header::Present { len, source })
        }
        _ => Err("PROXY v2: unknown command"),
    }
}

/// A version 2 header for a TCP connection from `source` to `dest` (tests and tools).
pub fn encode_v2(source: SocketAddr, dest: SocketAddr) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(0x21);
    match (source, dest) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
        _ => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(source).octets());
            out.extend_from_slice(&v6(dest).octets());
            out.extend_from_slice(&source.port().to_be_bytes());
            out.extend_from_slice(&dest.port().to_be_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn version_1_lines() {
        let line = b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 443\r\nGET /ws";
        let want = Header::Present { len: 41, source: Some(sa("192.0.2.7:56324")) };
        assert_eq!(parse(line), Ok(want));
        let v6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 443\r\n";
        assert_eq!(parse(v6), Ok(Header::Present { len: v6.len(), source: Some(sa("[2001:db8::7]:4000")) }));
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), Ok(Header::Present { len: 15, source: None }));
        // every prefix of a header is incomplete, never an error
        for n in 0..41 {
            assert_eq!(parse(&line[..n]), Ok(Header::Incomplete), "{n} bytes");
        }
        assert!(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n").is_err());
        assert!(parse(b"PROXY TCP4 1.2.3.999 5.6.7.8 1 2\r\n").is_err());
        assert!(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 070 2\r\n").is_err());
        assert!(parse(b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n").is_err());
        assert!(parse(&[b"PROXY ".as_slice(), &[b'x'; 120]].concat()).is_err());
    }

    #[test]
    fn version_2_headers() {
        let h = encode_v2(sa("192.0.2.7:56324"), sa("10.0.0.1:443"));
        let mut with_data = h.clone();
        with_data.extend_from_slice(b"GET /ws HTTP/1.1\r\n");
        assert_eq!(parse(&with_data), Ok(Header::Present { len: 28, source: Some(sa("192.0.2.7:56324")) }));
        for n in 0..h.len() {
            assert_eq!(parse(&h[..n]), Ok(Header::Incomplete), "{n} bytes");
        }
        let h6 = encode_v2(sa("[2001:db8::7]:4000"), sa("[2001:db8::1]:443"));
        assert_eq!(parse(&h6), Ok(Header::Present { len: 52, source: Some(sa("[2001:db8::7]:4000")) }));
        // LOCAL (a health check of the proxy itself)
        let mut local = h.clone();
        local[12] = 0x20;
        assert_eq!(parse(&local), Ok(Header::Present { len: 28, source: None }));
        // TLVs after the addresses are skipped with the header
        let mut tlv = h.clone();
        tlv[15] = 12 + 5;
        tlv.extend_from_slice(&[0x01, 0, 2, b'h', b'2']);
        assert_eq!(parse(&tlv), Ok(Header::Present { len: 33, source: Some(sa("192.0.2.7:56324")) }));
        let mut bad = h.clone();
        bad[12] = 0x31;
        assert!(parse(&bad).is_err());
        let mut huge = h.clone();
        huge[14..16].copy_from_slice(&4096u16.to_be_bytes());
        assert!(parse(&huge).is_err());
        let mut short = h;
        short[15] = 4;
        assert!(parse(&short).is_err());
    }

    #[test]
    fn client_bytes_are_not_a_header() {
        assert_eq!(parse(b"GET /ws HTTP/1.1\r\n"), Ok(Header::Absent));
        assert_eq!(parse(&[0, 0, 0, 5, 1]), Ok(Header::Absent));
        assert_eq!(parse(b"PROX"), Ok(Header::Incomplete));
        assert_eq!(parse(b"PROXIES"), Ok(Header::Absent));
    }
}
