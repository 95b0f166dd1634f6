//! Counters of the logic role, rendered in Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct LogicMetrics {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub sends: AtomicU64,
    pub pushes: AtomicU64,
    pub push_failures: AtomicU64,
    pub http_requests: AtomicU64,
}

pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl LogicMetrics {
    pub fn render(&self, out: &mut String) {
        let rows: [(&str, &str, &AtomicU64); 6] = [
            ("switchboard_logic_requests_total", "Socket requests handled by logic.", &self.requests),
            ("switchboard_logic_errors_total", "Socket requests answered with an error.", &self.errors),
            ("switchboard_logic_sends_total", "Messages stored by send.", &self.sends),
            ("switchboard_logic_pushes_total", "Push deliveries handed to gateways.", &self.pushes),
            ("switchboard_logic_push_failures_total", "Push RPCs that failed.", &self.push_failures),
            ("switchboard_http_requests_total", "HTTP API requests.", &self.http_requests),
        ];
        for (name, help, v) in rows {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", v.load(Ordering::Relaxed));
        }
    }
}
