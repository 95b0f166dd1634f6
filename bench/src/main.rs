//! `switchboard-bench`: the load generator of Switchboard.
//!
//! Modes:
//! - `connect`: ramp to N authenticated WebSocket connections at a bounded rate, hold them with
//!   periodic `ping` ops, report connect latency, failures, drops, connect rate and server RSS;
//!   optionally spread over several worker processes (one per fd budget).
//! - `ping`: pipelined `ping` round trips, k in flight per connection: frames/s and RTT percentiles.
//! - `baseline-server`: a plain tokio-tungstenite server answering `auth` and `ping`, the baseline.
//!
//! Every target must be on loopback (127.0.0.0/8) and every run is bounded in count and time.

mod baseline;
mod client;
mod connect;
mod ping;
mod procfs;
mod stats;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "switchboard-bench", version, about = "Load generator for Switchboard (loopback only)")]
struct Cli {
    /// Tokio worker threads (default: the CPUs this process may run on).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Ramp to N authenticated connections, hold them, report latency, drops and server RSS.
    Connect(connect::Args),
    /// Pipelined ping round trips: frames/s and RTT percentiles.
    Ping(ping::Args),
    /// A plain tokio-tungstenite server answering `auth` and `ping` (the baseline).
    BaselineServer(baseline::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli.threads {
        rt.worker_threads(n.max(1));
    }
    let rt = rt.enable_all().build()?;
    rt.block_on(async move {
        match cli.mode {
            Mode::Connect(a) => connect::run(a).await,
            Mode::Ping(a) => ping::run(a).await,
            Mode::BaselineServer(a) => baseline::run(a).await,
        }
    })
}
