//! Open connections per client address bucket (see [`switchboard_proto::net::ip_bucket`]),
//! shared by every shard of the gateway: a connection from a bucket at its cap is closed right
//! after `accept`, before any handshake, so one address cannot take the gateway's connections.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use switchboard_proto::net::ip_bucket;

pub(crate) struct IpCaps {
    /// Most connections per bucket; 0: no cap.
    limit: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl IpCaps {
    pub fn new(limit: usize) -> Self {
        Self { limit, open: Mutex::new(HashMap::new()) }
    }

    /// Counts a new connection from `ip`; `false` (and not counted) when its bucket is full.
    pub fn admit(&self, ip: IpAddr) -> bool {
        if self.limit == 0 {
            return true;
        }
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip_bucket(ip)).or_insert(0);
        if *n >= self.limit {
            return false;
        }
        *n += 1;
        true
    }

    /// Uncounts a connection [`IpCaps::admit`] counted.
    pub fn release(&self, ip: IpAddr) {
        if self.limit == 0 {
            return;
        }
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let bucket = ip_bucket(ip);
        if let Some(n) = open.get_mut(&bucket) {
            *n -= 1;
            if *n == 0 {
                open.remove(&bucket);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_is_capped_and_freed() {
        let caps = IpCaps::new(2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        assert!(caps.admit(a) && caps.admit(a));
        assert!(!caps.admit(a), "third from one address");
        assert!(caps.admit(b), "another address has its own count");
        caps.release(a);
        assert!(caps.admit(a));
        // one IPv6 /64 is one bucket
        let (c, d): (IpAddr, IpAddr) = ("2001:db8::1".parse().unwrap(), "2001:db8::ffff".parse().unwrap());
        assert!(caps.admit(c) && caps.admit(d));
        assert!(!caps.admit("2001:db8::7".parse().unwrap()));
        assert!(IpCaps::new(0).admit(a), "0 means no cap");
    }
}
