//! Counters and latency histograms of the logic role, rendered in Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::OnceLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use switchboard_proto::latency;

#[derive(Default)]
pub struct LogicMetrics {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub sends: AtomicU64,
    pub pushes: AtomicU64,
    pub push_failures: AtomicU64,
    /// Push batches sent down gateways' links (the others went over `Gateway.Push`).
    pub link_pushes: AtomicU64,
    pub http_requests: AtomicU64,
    /// Socket requests being handled right now.
    pub inflight: AtomicI64,
    /// The password-hashing slots' counters (set once the slots exist).
    pub hashing: std::sync::OnceLock<std::sync::Arc<crate::limits::SlotCounts>>,
    pub latency: Latencies,
    /// Whether this instance runs on the cluster's engines (then the broker's acknowledgement
    /// times are shown too).
    pub cluster: bool,
}

/// The op of a socket request, as a label: one of the ops logic serves, or `other`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latency histograms of the logic role.
pub struct Latencies {
    registry: Registry,
    requests: Histograms<OpLabel>,
    /// The family's histogram of each op of [`crate::ops::OPS`] and, last, of `other`, kept once
    /// the op is first seen so that a request finds its own without the family's lock and label
    /// hash (an op shows on /metrics once it was served, as before).
    by_op: Vec<OnceLock<Histogram>>,
    /// Message appends until the store has the message durably.
    pub append: Histogram,
    /// Push batches until the gateway answered.
    pub push_batch: Histogram,
}

impl Default for Latencies {
    fn default() -> Self {
        let requests = Histograms::<OpLabel>::new_with_constructor(latency::histogram);
        let (append, push_batch) = (latency::histogram(), latency::histogram());
        let mut registry = Registry::default();
        registry.register(
            "switchboard_logic_request_seconds",
            "Socket requests handled by logic, by op: from arrival in logic to the reply",
            requests.clone(),
        );
        let by_op = (0..=crate::ops::OPS.len()).map(|_| OnceLock::new()).collect();
        registry.register(
            "switchboard_logic_store_append_seconds",
            "Message appends: until the store holds the message durably (cluster: the broker's ack)",
            append.clone(),
        );
        registry.register(
            "switchboard_logic_push_batch_seconds",
            "Push batches to one gateway: until the gateway answered",
            push_batch.clone(),
        );
        Self { registry, requests, by_op, append, push_batch }
    }
}

impl Latencies {
    /// Records a socket request of `op` that took `secs`.
    pub fn request(&self, op: &str, secs: f64) {
        let i = crate::ops::op_index(op).unwrap_or(crate::ops::OPS.len());
        self.by_op[i]
            .get_or_init(|| {
                let op = crate::ops::OPS.get(i).copied().unwrap_or("other");
                self.requests.get_or_create(&OpLabel { op }).clone()
            })
            .observe(secs);
    }
}

pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl LogicMetrics {
    /// The load this instance reports for balancing, 0.0..=1.0: requests in
    /// flight relative to 256 (a saturated instance reports 1.0).
    pub fn load(&self) -> f32 {
        (self.inflight.load(Ordering::Relaxed).max(0) as f32 / 256.0).min(1.0)
    }

    pub fn render(&self, out: &mut String) {
        let rows: [(&str, &str, &AtomicU64); 7] = [
            ("switchboard_logic_requests_total", "Socket requests handled by logic.", &self.requests),
            ("switchboard_logic_errors_total", "Socket requests answered with an error.", &self.errors),
            ("switchboard_logic_sends_total", "Messages stored by send.", &self.sends),
            ("switchboard_logic_pushes_total", "Push deliveries handed to gateways.", &self.pushes),
            ("switchboard_logic_push_failures_total", "Push RPCs that failed.", &self.push_failures),
            (
                "switchboard_logic_link_push_batches_total",
                "Push batches sent down gateways' links (the others went over Gateway.Push).",
                &self.link_pushes,
            ),
            ("switchboard_http_requests_total", "HTTP API requests.", &self.http_requests),
        ];
        for (name, help, v) in rows {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", v.load(Ordering::Relaxed));
        }
        if let Some(h) = self.hashing.get() {
            let peak = "switchboard_logic_password_hashes_peak";
            let waited = "switchboard_logic_password_hash_waits_total";
            let _ = writeln!(
                out,
                "# HELP {peak} Most password hashes (argon2) that ran at once.\n# TYPE {peak} gauge\n{peak} {}\n\
                 # HELP {waited} Password hashes that waited for a free slot.\n# TYPE {waited} counter\n{waited} {}",
                h.peak.load(Ordering::Relaxed),
                h.waited.load(Ordering::Relaxed)
            );
        }
        let name = "switchboard_logic_inflight_requests";
        let _ = writeln!(
            out,
            "# HELP {name} Socket requests in flight.\n# TYPE {name} gauge\n{name} {}",
            self.inflight.load(Ordering::Relaxed)
        );
        switchboard_storage::DRIVER_ERRORS.render(out);
        latency::render(&self.latency.registry, out);
        let shown = if self.cluster {
            switchboard_storage::metrics::Shown::Producer
        } else {
            switchboard_storage::metrics::Shown::Embedded
        };
        switchboard_storage::metrics::render(shown, out);
    }
}
