//! Client addresses as the per-IP limits count them: an IPv4 address (also when it arrives
//! IPv4-mapped over IPv6) is its own bucket; an IPv6 address counts as its /64, the block one
//! subscriber usually holds, so a client cannot escape a limit by rotating through its prefix.

use std::net::{IpAddr, Ipv6Addr};

/// The bucket `ip` counts in.
pub fn ip_bucket(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// [`ip_bucket`] of an address in text, as its text (`/64` appended for IPv6); text that is not
/// an address is its own bucket.
pub fn ip_bucket_key(ip: &str) -> String {
    match ip.parse::<IpAddr>() {
        Ok(addr) => match ip_bucket(addr) {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("{v6}/64"),
        },
        Err(_) => ip.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_counts_by_its_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(ip_bucket_key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64");
        assert_eq!(ip_bucket_key("2001:db8:1:2:ffff:1:2:3"), "2001:db8:1:2::/64");
        assert_ne!(ip_bucket_key("2001:db8:1:3::1"), ip_bucket_key("2001:db8:1:2::1"));
        assert_eq!(ip_bucket_key("::ffff:10.0.0.7"), "10.0.0.7");
        assert_eq!(ip_bucket_key("10.0.0.7"), "10.0.0.7");
        assert_eq!(ip_bucket_key("not an ip"), "not an ip");
        assert_eq!(ip_bucket("::1".parse().unwrap()), "::".parse::<IpAddr>().unwrap());
    }
}
