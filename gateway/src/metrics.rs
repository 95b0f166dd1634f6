//! Gateway counters (atomics) and their Prometheus text rendering.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Process-wide gateway metrics, updated lock-free by the shards.
#[derive(Debug, Default)]
pub struct GatewayMetrics {
    pub(crate) connections: AtomicI64,
    pub(crate) frames_in: AtomicU64,
    pub(crate) frames_out: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) slow_consumer_closed: AtomicU64,
    pub(crate) accepted: AtomicU64,
}

impl GatewayMetrics {
    /// Open connections right now.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed).max(0) as u64
    }

    /// Appends Prometheus text-format lines for every gateway metric.
    pub fn render(&self, out: &mut String) {
        let rows: [(&str, &str, &str, u64); 6] = [
            ("switchboard_gateway_connections", "gauge", "Open client connections.", self.connections()),
            (
                "switchboard_gateway_frames_in_total",
                "counter",
                "Client frames received.",
                self.frames_in.load(Ordering::Relaxed),
            ),
            (
                "switchboard_gateway_frames_out_total",
                "counter",
                "Frames sent to clients.",
                self.frames_out.load(Ordering::Relaxed),
            ),
            (
                "switchboard_gateway_errors_total",
                "counter",
                "Connection and relay errors.",
                self.errors.load(Ordering::Relaxed),
            ),
            (
                "switchboard_gateway_slow_consumer_closed_total",
                "counter",
                "Connections closed because their outbound queue overflowed.",
                self.slow_consumer_closed.load(Ordering::Relaxed),
            ),
            (
                "switchboard_gateway_connections_accepted_total",
                "counter",
                "Connections accepted.",
                self.accepted.load(Ordering::Relaxed),
            ),
        ];
        for (name, kind, help, value) in rows {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {value}");
        }
    }

    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_all_metrics() {
        let m = GatewayMetrics::default();
        m.connections.fetch_add(3, Ordering::Relaxed);
        GatewayMetrics::inc(&m.frames_in);
        let mut s = String::new();
        m.render(&mut s);
        assert!(s.contains("# TYPE switchboard_gateway_connections gauge"));
        assert!(s.contains("switchboard_gateway_connections 3\n"));
        assert!(s.contains("switchboard_gateway_frames_in_total 1\n"));
        assert!(s.contains("switchboard_gateway_connections_accepted_total 0\n"));
        assert_eq!(s.matches("# HELP").count(), 6);
    }
}
