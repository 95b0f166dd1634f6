//! Gateway counters (atomics), the logic call latency histogram, each shard's connections and
//! event-loop time, and their Prometheus text rendering.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use switchboard_proto::latency;

/// Process-wide gateway metrics, updated lock-free by the shards.
#[derive(Debug, Default)]
pub struct GatewayMetrics {
    pub(crate) connections: AtomicI64,
    pub(crate) frames_in: AtomicU64,
    pub(crate) frames_out: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) slow_consumer_closed: AtomicU64,
    pub(crate) accepted: AtomicU64,
    pub(crate) call_timeouts: AtomicU64,
    /// Client acks answered by the gateway itself (see `acks`).
    pub(crate) acks_local: AtomicU64,
    /// `f32` bits of the last CPU load sample.
    pub(crate) cpu_load: AtomicU32,
    pub(crate) latency: Latency,
    /// The logic pool of a split deployment, whose per-instance state is rendered too.
    pub(crate) pool: std::sync::OnceLock<Arc<crate::pool::LogicPool>>,
}

/// A shard, as a label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShardLabel {
    shard: String,
}

/// Latency histograms of the gateway, and the per-shard families.
#[derive(Debug)]
pub(crate) struct Latency {
    registry: Registry,
    /// Client requests relayed to logic: until logic's reply reached the gateway.
    pub(crate) logic_calls: Histogram,
    shard_loop: Family<ShardLabel, Histogram, fn() -> Histogram>,
    shard_connections: Family<ShardLabel, Gauge>,
}

impl Default for Latency {
    fn default() -> Self {
        let logic_calls = latency::histogram();
        let shard_loop = Family::<ShardLabel, Histogram, fn() -> Histogram>::new_with_constructor(latency::histogram);
        let shard_connections = Family::<ShardLabel, Gauge>::default();
        let mut registry = Registry::default();
        registry.register(
            "switchboard_gateway_logic_call_seconds",
            "Client requests relayed to logic: until logic's reply reached the gateway",
            logic_calls.clone(),
        );
        registry.register(
            "switchboard_gateway_loop_seconds",
            "Event-loop lag: how long each wake-up of a shard spent on what was ready (socket events, \
             mailbox, timers), which is how long a new event may wait behind it",
            shard_loop.clone(),
        );
        registry.register(
            "switchboard_gateway_shard_connections",
            "Open connections per shard",
            shard_connections.clone(),
        );
        Self { registry, logic_calls, shard_loop, shard_connections }
    }
}

/// The meters one shard updates (handles into the process-wide families).
pub(crate) struct ShardMeters {
    /// Time of each wake-up.
    pub loop_time: Histogram,
    /// Open connections of the shard.
    pub connections: Gauge,
}

impl GatewayMetrics {
    /// Open connections right now.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed).max(0) as u64
    }

    /// Call offers ended by the ring timeout so far.
    pub fn call_timeouts(&self) -> u64 {
        self.call_timeouts.load(Ordering::Relaxed)
    }

    /// This process's CPU use over the last sampling second divided by the number of cores,
    /// in `0.0..=1.0` (0.0 before the first sample).
    pub fn cpu_load(&self) -> f32 {
        f32::from_bits(self.cpu_load.load(Ordering::Relaxed))
    }

    pub(crate) fn set_cpu_load(&self, load: f32) {
        let load = if load.is_finite() { load.clamp(0.0, 1.0) } else { 0.0 };
        self.cpu_load.store(load.to_bits(), Ordering::Relaxed);
    }

    /// Appends Prometheus text-format lines for every gateway metric.
    pub fn render(&self, out: &mut String) {
        let rows: [(&str, &str, &str, u64); 8] = [
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
            (
                "switchboard_gateway_call_timeouts_total",
                "counter",
                "Call offers that rang out unanswered (ring timeout).",
                self.call_timeouts(),
            ),
            (
                "switchboard_gateway_acks_local_total",
                "counter",
                "Client acks answered by the gateway (handed to logic coalesced).",
                self.acks_local.load(Ordering::Relaxed),
            ),
        ];
        for (name, kind, help, value) in rows {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {value}");
        }
        let name = "switchboard_gateway_cpu_load";
        let _ = writeln!(out, "# HELP {name} Process CPU use over the last second divided by the number of cores.");
        let _ = writeln!(out, "# TYPE {name} gauge");
        let _ = writeln!(out, "{name} {}", self.cpu_load());
        latency::render(&self.latency.registry, out);
        if let Some(pool) = self.pool.get() {
            render_pool(&pool.stats(), out);
        }
    }

    /// The meters of shard `idx`.
    pub(crate) fn shard_meters(&self, idx: usize) -> ShardMeters {
        let label = ShardLabel { shard: idx.to_string() };
        ShardMeters {
            loop_time: self.latency.shard_loop.get_or_create(&label).clone(),
            connections: self.latency.shard_connections.get_or_create(&label).clone(),
        }
    }

    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The state of each logic instance of the pool, labelled by endpoint URL.
fn render_pool(stats: &[crate::pool::EndpointStats], out: &mut String) {
    type Value = fn(&crate::pool::EndpointStats) -> f64;
    let rows: [(&str, &str, &str, Value); 5] = [
        ("switchboard_gateway_logic_calls_total", "counter", "Calls made to each logic instance.", |s| s.calls as f64),
        ("switchboard_gateway_logic_inflight", "gauge", "Calls in flight to each logic instance.", |s| {
            s.inflight as f64
        }),
        (
            "switchboard_gateway_logic_breaker_open",
            "gauge",
            "1 while a logic instance's circuit breaker is open.",
            |s| u8::from(s.breaker_open) as f64,
        ),
        (
            "switchboard_gateway_logic_failures",
            "gauge",
            "Consecutive transport failures of each logic instance.",
            |s| s.failures as f64,
        ),
        ("switchboard_gateway_logic_load", "gauge", "Load each logic instance last reported (0 to 1).", |s| {
            s.load as f64
        }),
    ];
    for (name, kind, help, value) in rows {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for s in stats {
            let endpoint = s.url.replace('\\', "\\\\").replace('"', "\\\"");
            let _ = writeln!(out, "{name}{{endpoint=\"{endpoint}\"}} {}", value(s));
        }
    }
}

/// Background thread refreshing [`GatewayMetrics::cpu_load`]; stopped by [`CpuSampler::stop`]
/// or on drop.
pub(crate) struct CpuSampler {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CpuSampler {
    /// Starts sampling this process's CPU use every `interval`.
    pub fn start(metrics: Arc<GatewayMetrics>, interval: Duration) -> std::io::Result<CpuSampler> {
        let (tx, rx) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new().name("sb-gw-cpu".into()).spawn(move || {
            let Ok(pid) = sysinfo::get_current_pid() else {
                tracing::warn!("cpu load: cannot get the current pid");
                return;
            };
            let Ok(mut sys) = sysinfo::System::new() else {
                tracing::warn!("cpu load: sysinfo unavailable");
                return;
            };
            let kind = sysinfo::ProcessRefreshKind::nothing().with_cpu();
            let fallback_cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            loop {
                sys.refresh_processes_specifics(sysinfo::ProcessesToUpdate::Some(&[pid]), false, kind);
                if let Some(p) = sys.process(pid) {
                    let cores = match sys.cpus().len() {
                        0 => fallback_cores,
                        n => n,
                    };
                    metrics.set_cpu_load(p.cpu_usage() / (100.0 * cores as f32));
                }
                match rx.recv_timeout(interval) {
                    Err(RecvTimeoutError::Timeout) => continue,
                    _ => break,
                }
            }
        })?;
        Ok(CpuSampler { stop: Some(tx), thread: Some(thread) })
    }

    /// Stops the thread and waits for it (at most one refresh).
    pub fn stop(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::warn!("cpu sampler panicked");
            }
        }
    }
}

impl Drop for CpuSampler {
    fn drop(&mut self) {
        // Signal only; the thread exits on its own within one refresh.
        self.stop.take();
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
        assert!(s.contains("switchboard_gateway_call_timeouts_total 0\n"));
        assert!(s.contains("switchboard_gateway_acks_local_total 0\n"));
        assert!(s.contains("# TYPE switchboard_gateway_cpu_load gauge"));
        assert!(s.contains("switchboard_gateway_cpu_load 0\n"));
        assert_eq!(s.matches("# HELP").count(), 10);
        assert!(s.contains("# TYPE switchboard_gateway_logic_call_seconds histogram"));
        assert!(s.contains("switchboard_gateway_logic_call_seconds_count 0\n"));
        let shard = m.shard_meters(1);
        shard.loop_time.observe(0.000_05);
        shard.connections.inc();
        s.clear();
        m.render(&mut s);
        assert!(s.contains("# TYPE switchboard_gateway_loop_seconds histogram"), "{s}");
        assert!(s.contains("switchboard_gateway_loop_seconds_count{shard=\"1\"} 1\n"), "{s}");
        assert!(s.contains("switchboard_gateway_shard_connections{shard=\"1\"} 1\n"), "{s}");
        m.set_cpu_load(0.25);
        s.clear();
        m.render(&mut s);
        assert!(s.contains("switchboard_gateway_cpu_load 0.25\n"));
        m.set_cpu_load(7.0);
        assert_eq!(m.cpu_load(), 1.0);
    }

    #[test]
    fn samples_cpu_load_of_this_process() {
        let m = Arc::new(GatewayMetrics::default());
        let mut sampler = CpuSampler::start(m.clone(), Duration::from_millis(200)).unwrap();
        // Burn CPU on this thread for a while; the load must become positive.
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while m.cpu_load() == 0.0 && started.elapsed() < Duration::from_secs(5) {
            for i in 0..100_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
            std::hint::black_box(x);
        }
        let load = m.cpu_load();
        assert!(load > 0.0 && load <= 1.0, "{load}");
        sampler.stop();
    }
}
