//! Trusted proxies: the networks whose connections may name another client address (a PROXY
//! protocol header on a gateway listener, `Forwarded` / `X-Forwarded-For` on the HTTP API), and
//! how the client's address is found behind them.

use std::net::IpAddr;
use std::str::FromStr;

/// One network: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net {
    addr: IpAddr,
    prefix: u8,
}

impl Net {
    /// Whether `ip` is inside (an IPv4 address inside an IPv4-mapped IPv6 network and back
    /// count too).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (canonical(self.addr), canonical(ip)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let bits = u32::from(self.prefix.min(32));
                let mask = if bits == 0 { 0 } else { u32::MAX << (32 - bits) };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let bits = u32::from(self.prefix.min(128));
                let mask = if bits == 0 { 0 } else { u128::MAX << (128 - bits) };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// An IPv4-mapped IPv6 address as IPv4; others as they are.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl FromStr for Net {
    type Err = String;

    /// `10.0.0.0/8`, `fd00::/8`, or one address (`127.0.0.1`: /32, or /128 for IPv6).
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| format!("{s:?}: not an IP address or network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|&p| p <= max).ok_or_else(|| format!("{s:?}: prefix 0..={max}"))?,
            None => max,
        };
        Ok(Net { addr, prefix })
    }
}

/// The trusted proxy networks; empty trusts nobody.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<Net>);

impl TrustedProxies {
    /// Parses networks separated by commas (spaces allowed), e.g. `"10.0.0.0/8, 127.0.0.1"`.
    pub fn parse(list: &str) -> Result<Self, String> {
        list.split(',').filter(|s| !s.trim().is_empty()).map(str::parse).collect::<Result<_, _>>().map(Self)
    }

    pub fn from_nets(nets: Vec<Net>) -> Self {
        Self(nets)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether a connection from `ip` may name another client address.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|n| n.contains(ip))
    }

    /// The client's address behind an HTTP request from `peer`: `peer` unless it is trusted;
    /// then the right-most hop of the forwarding chain that is not a trusted proxy (the last
    /// address a trusted proxy vouches for). `forwarded` are the request's `Forwarded` header
    /// values (RFC 7239, used when present), `x_forwarded_for` its `X-Forwarded-For` values,
    /// in header order. An unparsable hop ends the walk there: it is taken as the client if
    /// it is an address, and otherwise the last trusted hop before it is.
    pub fn client(&self, peer: IpAddr, forwarded: &[&str], x_forwarded_for: &[&str]) -> IpAddr {
        if !self.trusts(peer) {
            return peer;
        }
        let hops: Vec<Option<IpAddr>> = if !forwarded.is_empty() {
            forwarded
                .iter()
                .flat_map(|v| v.split(','))
                .map(|element| {
                    element
                        .split(';')
                        .filter_map(|pair| pair.split_once('='))
                        .find(|(k, _)| k.trim().eq_ignore_ascii_case("for"))
                        .and_then(|(_, v)| forwarded_node(v))
                })
                .collect()
        } else {
            x_forwarded_for.iter().flat_map(|v| v.split(',')).map(forwarded_node).collect()
        };
        let mut client = peer;
        for hop in hops.into_iter().rev() {
            match hop {
                Some(ip) if self.trusts(ip) => client = ip,
                Some(ip) => return ip,
                None => return client,
            }
        }
        client
    }
}

/// The address in one hop of a forwarding header: `1.2.3.4`, `1.2.3.4:80`, `"[2001:db8::1]:80"`,
/// `2001:db8::1`; `None` for obfuscated or unknown nodes.
fn forwarded_node(v: &str) -> Option<IpAddr> {
    let v = v.trim().trim_matches('"');
    if let Ok(ip) = v.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Some(rest) = v.strip_prefix('[') {
        return rest.split_once(']').and_then(|(a, _)| a.parse().ok()).map(canonical);
    }
    v.rsplit_once(':').and_then(|(a, _)| a.parse::<std::net::Ipv4Addr>().ok()).map(IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_parse_and_match() {
        let t = TrustedProxies::parse("10.0.0.0/8, 127.0.0.1 ,fd00::/8").unwrap();
        assert!(t.trusts(ip("10.1.2.3")));
        assert!(t.trusts(ip("127.0.0.1")));
        assert!(!t.trusts(ip("127.0.0.2")));
        assert!(t.trusts(ip("fd12::1")));
        assert!(t.trusts(ip("::ffff:10.9.9.9")));
        assert!(!t.trusts(ip("11.0.0.1")));
        assert!(TrustedProxies::parse("").unwrap().is_empty());
        assert!(TrustedProxies::parse("10.0.0.0/33").is_err());
        assert!(TrustedProxies::parse("example.com").is_err());
        assert!(TrustedProxies::parse("0.0.0.0/0").unwrap().trusts(ip("8.8.8.8")));
    }

    #[test]
    fn the_right_most_untrusted_hop_is_the_client() {
        let t = TrustedProxies::parse("10.0.0.0/8").unwrap();
        let proxy = ip("10.0.0.1");
        // an untrusted peer's headers are ignored
        assert_eq!(t.client(ip("1.1.1.1"), &[], &["6.6.6.6"]), ip("1.1.1.1"));
        // a spoofed left-most hop does not win over the one the proxy saw
        assert_eq!(t.client(proxy, &[], &["6.6.6.6, 2.2.2.2"]), ip("2.2.2.2"));
        // trusted hops are skipped, across several header lines
        assert_eq!(t.client(proxy, &[], &["2.2.2.2", "10.0.0.7"]), ip("2.2.2.2"));
        assert_eq!(t.client(proxy, &[], &[]), proxy);
        assert_eq!(t.client(proxy, &[], &["10.0.0.8"]), ip("10.0.0.8"));
        // garbage ends the walk at the last trusted hop
        assert_eq!(t.client(proxy, &[], &["2.2.2.2, nonsense"]), proxy);
        // Forwarded wins over X-Forwarded-For, with ports, quotes and IPv6
        assert_eq!(t.client(proxy, &["for=3.3.3.3;proto=https"], &["2.2.2.2"]), ip("3.3.3.3"));
        assert_eq!(t.client(proxy, &["for=\"[2001:db8::1]:4711\", for=10.0.0.9"], &[]), ip("2001:db8::1"));
        assert_eq!(t.client(proxy, &["For=5.5.5.5:80"], &[]), ip("5.5.5.5"));
        assert_eq!(t.client(proxy, &["for=_hidden, for=4.4.4.4"], &[]), ip("4.4.4.4"));
        assert_eq!(t.client(proxy, &["for=unknown"], &[]), proxy);
    }
}
