//! `switchboard-bench`: the command line of the load generator (see the library for the modes).

use clap::{Parser, Subcommand};
use switchboard_bench::{baseline, connect, fanout, fsync, messaging, ping, plot, sync};

#[derive(Parser)]
#[command(name = "switchboard-bench", version, about = "Load generator for Switchboard (loopback only)")]
struct Cli {
    /// Tokio worker threads for `baseline-server` (default: the CPUs this process may run on).
    /// `connect`, `ping`, `fanout` and `messaging` run one single-threaded event loop per process.
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Ramp to N authenticated connections, hold them, report latency, drops and server RSS.
    Connect(connect::Args),
    /// Pipelined ping round trips: frames/s, RTT percentiles, client and server CPU.
    Ping(ping::Args),
    /// One sender, K members in a group: deliveries/s, delivery latency, missing deliveries.
    Fanout(fanout::Args),
    /// Pairs of friends messaging each other at a fixed rate: throughput, latency, errors.
    Messaging(messaging::Args),
    /// A user in many conversations, few changed: `sync` round-trip percentiles.
    Sync(sync::Args),
    /// A write-ahead log's `fdatasync` on this disk: a growing file against a recycled one.
    Fsync(fsync::Args),
    /// The PNG of a `messaging` offered-load sweep from its reports.
    Plot(plot::Args),
    /// A plain tokio-tungstenite server answering `auth` and `ping` (the baseline).
    BaselineServer(baseline::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let tokio = |threads: Option<usize>| {
        let mut rt = tokio::runtime::Builder::new_multi_thread();
        if let Some(n) = threads {
            rt.worker_threads(n.max(1));
        }
        rt.enable_all().build()
    };
    match cli.mode {
        Mode::Connect(a) => connect::main(a),
        Mode::BaselineServer(a) => tokio(cli.threads)?.block_on(baseline::run(a)),
        Mode::Ping(a) => ping::main(a),
        Mode::Fanout(a) => fanout::main(a),
        Mode::Messaging(a) => messaging::main(a),
        Mode::Sync(a) => sync::main(a),
        Mode::Plot(a) => plot::main(a),
        Mode::Fsync(a) => fsync::main(a),
    }
}
