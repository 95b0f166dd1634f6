//! Latency histograms (prometheus-client), rendered after a role's counters on `/metrics` in
//! the same Prometheus text format. Buckets double from 100 µs to about 13 s.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Bucket bounds in seconds: 100 µs, 200 µs, … ~13 s.
pub fn buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.000_1, 2.0, 18)
}

/// A new histogram with [`buckets`].
pub fn histogram() -> Histogram {
    Histogram::new(buckets())
}

/// Encodes `registry` for a `/metrics` page that already holds other families: OpenMetrics text
/// without its closing `# EOF`, which is the Prometheus text format for histograms.
pub fn render(registry: &Registry, out: &mut String) {
    let mut text = String::new();
    if encode(&mut text, registry).is_ok() {
        out.push_str(text.strip_suffix("# EOF\n").unwrap_or(&text));
    }
}
