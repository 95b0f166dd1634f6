//! Histograms and counters of the storage layer's own work, process-wide (like
//! [`crate::DRIVER_ERRORS`]): how long the broker takes to acknowledge a produced record, the
//! persist worker's batches (records per batch, time to write one), and the embedded store's
//! log writes, checkpoints and cmid lookups. Rendered on the `/metrics` of the roles that do
//! that work (logic, persist) by [`render`].

use std::sync::LazyLock;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Seconds: 100 µs, 200 µs, … ~13 s (the roles' latency buckets).
fn seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.000_1, 2.0, 18))
}

/// Time from handing a record to the producer until the broker acknowledged it (what every
/// cluster `send.ok` waits for).
pub static KAFKA_PRODUCE: LazyLock<Histogram> = LazyLock::new(seconds);
/// Time to write one persist batch to the durable store (with its offsets), retries included.
pub static PERSIST_WRITE: LazyLock<Histogram> = LazyLock::new(seconds);
/// Records per persist batch: 1, 2, 4, … 4096.
pub static PERSIST_BATCH: LazyLock<Histogram> = LazyLock::new(|| Histogram::new(exponential_buckets(1.0, 2.0, 13)));

/// Time to write one batch of the embedded store's log and `fdatasync` it (what every
/// all-in-one `send.ok` waits for; a slow disk shows here first).
pub static EMBEDDED_LOG_SYNC: LazyLock<Histogram> = LazyLock::new(seconds);
/// Records per batch of the embedded store's log: 1, 2, 4, … 4096.
pub static EMBEDDED_LOG_BATCH: LazyLock<Histogram> =
    LazyLock::new(|| Histogram::new(exponential_buckets(1.0, 2.0, 13)));
/// Time to commit one checkpoint of the embedded store's log into its B-trees.
pub static EMBEDDED_CHECKPOINT: LazyLock<Histogram> = LazyLock::new(seconds);

/// Sends whose new cmid the filter of stored cmids ruled out (no lookup in the log's tail or the
/// index).
pub static EMBEDDED_CMID_SKIPPED: LazyLock<Counter> = LazyLock::new(Counter::default);
/// Sends whose cmid the filter could not rule out (it said "maybe", was still filling, or is
/// off): looked up in the tail, then the index.
pub static EMBEDDED_CMID_PROBED: LazyLock<Counter> = LazyLock::new(Counter::default);

/// Counts one send's cmid check: `probed` when the filter could not rule the cmid out.
pub(crate) fn count_cmid_lookup(probed: bool) {
    if probed { &EMBEDDED_CMID_PROBED } else { &EMBEDDED_CMID_SKIPPED }.inc();
}

/// Which of the histograms a role shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shown {
    /// A logic instance: the broker's acknowledgements.
    Producer,
    /// The persist worker: its batches.
    Persist,
    /// A logic instance on the embedded store: its log and checkpoints.
    Embedded,
}

/// Appends the histograms of `shown` in Prometheus text format (OpenMetrics text without its
/// closing `# EOF`, as the roles' own histograms).
pub fn render(shown: Shown, out: &mut String) {
    let mut registry = Registry::default();
    match shown {
        Shown::Producer => registry.register(
            "switchboard_kafka_produce_seconds",
            "Time until the broker acknowledged a produced record",
            KAFKA_PRODUCE.clone(),
        ),
        Shown::Persist => {
            registry.register(
                "switchboard_persist_write_seconds",
                "Time to write one batch to the durable store, retries included",
                PERSIST_WRITE.clone(),
            );
            registry.register("switchboard_persist_batch_records", "Records per batch written", PERSIST_BATCH.clone());
        }
        Shown::Embedded => {
            registry.register(
                "switchboard_embedded_log_sync_seconds",
                "Time to write and fdatasync one batch of the embedded store's log",
                EMBEDDED_LOG_SYNC.clone(),
            );
            registry.register(
                "switchboard_embedded_log_batch_records",
                "Records per batch of the embedded store's log",
                EMBEDDED_LOG_BATCH.clone(),
            );
            registry.register(
                "switchboard_embedded_checkpoint_seconds",
                "Time to commit one checkpoint into the embedded store's B-trees",
                EMBEDDED_CHECKPOINT.clone(),
            );
            registry.register(
                "switchboard_embedded_cmid_probe_skipped",
                "Sends whose new cmid skipped every lookup (the in-memory filter knew it unused)",
                EMBEDDED_CMID_SKIPPED.clone(),
            );
            registry.register(
                "switchboard_embedded_cmid_probed",
                "Sends whose cmid was looked up (the filter said maybe, was still filling, or is off)",
                EMBEDDED_CMID_PROBED.clone(),
            );
        }
    }
    let mut text = String::new();
    if encode(&mut text, &registry).is_ok() {
        out.push_str(text.strip_suffix("# EOF\n").unwrap_or(&text));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_render_with_their_counts() {
        PERSIST_BATCH.observe(3.0);
        PERSIST_WRITE.observe(0.002);
        let mut out = String::new();
        render(Shown::Persist, &mut out);
        assert!(out.contains("# TYPE switchboard_persist_batch_records histogram"), "{out}");
        assert!(out.contains("switchboard_persist_batch_records_bucket{le=\"4.0\"}"), "{out}");
        assert!(out.contains("switchboard_persist_write_seconds_count"), "{out}");
        assert!(!out.contains("kafka") && !out.contains("# EOF"), "{out}");
    }
}
