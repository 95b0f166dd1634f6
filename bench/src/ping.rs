//! `ping` mode: open `--conns` authenticated connections, then keep `--inflight` `ping` ops in
//! flight on each for `--secs` (after `--warmup-secs`), and report frames/s and RTT percentiles.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::sync::Barrier;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, Target};
use crate::stats::{percentiles, Percentiles};

#[derive(clap::Args)]
pub struct Args {
    /// WebSocket URL (loopback only).
    #[arg(long, default_value = "ws://127.0.0.1:8090/ws")]
    url: String,
    /// File with one access token per line (one per connection).
    #[arg(long)]
    tokens: PathBuf,
    /// Connections.
    #[arg(long, default_value_t = 100)]
    conns: usize,
    /// Pings in flight per connection.
    #[arg(long, default_value_t = 16)]
    inflight: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Unmeasured seconds before the measurement.
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,
    /// Source addresses to bind to, 127.0.0.2 ..= 127.0.0.(1+K) (0: let the kernel choose).
    #[arg(long, default_value_t = 8)]
    src_ips: usize,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Free-form label stored in the report (e.g. the server's name).
    #[arg(long, default_value = "")]
    label: String,
}

#[derive(Serialize)]
struct Report {
    mode: &'static str,
    label: String,
    url: String,
    started_unix: u64,
    conns: usize,
    inflight: usize,
    warmup_secs: u64,
    measured_secs: f64,
    round_trips: u64,
    frames_per_sec: f64,
    errors: u64,
    rtt: Percentiles,
}

/// What one connection measured.
#[derive(Default)]
struct ConnResult {
    rtts_ns: Vec<u64>,
    errors: u64,
}

/// Entry point of `ping`.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let target = Target::parse(&args.url)?;
    let tokens = client::read_tokens(&args.tokens)?;
    if tokens.len() < args.conns {
        bail!("{} tokens for {} connections", tokens.len(), args.conns);
    }
    let started_unix = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let mut conns = Vec::with_capacity(args.conns);
    for (i, token) in tokens.iter().take(args.conns).enumerate() {
        let src = (args.src_ips > 0).then(|| client::source_ip(i, args.src_ips));
        conns.push(client::connect_auth(&target, src, token, Duration::from_secs(10)).await.context("connecting")?);
    }
    eprintln!("{} connections authenticated; warming up {} s", conns.len(), args.warmup_secs);

    let barrier = Arc::new(Barrier::new(conns.len() + 1));
    let start = Instant::now() + Duration::from_millis(100);
    let measure_from = start + Duration::from_secs(args.warmup_secs);
    let measure_to = measure_from + Duration::from_secs(args.secs);
    let inflight = args.inflight.max(1);
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|ws| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                pump(ws, inflight, start, measure_from, measure_to).await
            })
        })
        .collect();
    barrier.wait().await;
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let r = t.await?;
        errors += r.errors;
        all.extend(r.rtts_ns);
    }
    let measured_secs = (measure_to - measure_from).as_secs_f64();
    let round_trips = all.len() as u64;
    let report = Report {
        mode: "ping",
        label: args.label,
        url: args.url,
        started_unix,
        conns: args.conns,
        inflight,
        warmup_secs: args.warmup_secs,
        measured_secs,
        round_trips,
        frames_per_sec: round_trips as f64 / measured_secs,
        errors,
        rtt: percentiles(&mut all),
    };
    let json = serde_json::to_string_pretty(&report)?;
    println!("{json}");
    if let Some(path) = &args.report {
        std::fs::write(path, format!("{json}\n")).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("report written to {}", path.display());
    }
    Ok(())
}

/// Keeps `inflight` pings outstanding on one connection until `to`, recording the RTT of every
/// ping sent within [`from`, `to`).
async fn pump(mut ws: client::Ws, inflight: usize, start: Instant, from: Instant, to: Instant) -> ConnResult {
    let mut out = ConnResult::default();
    tokio::time::sleep_until(start.into()).await;
    // Send time of rid r lives in slot r % inflight: at most `inflight` are outstanding.
    let mut sent_at = vec![None::<Instant>; inflight];
    let mut next_rid = 2u64;
    let mut outstanding = 0usize;
    for _ in 0..inflight {
        sent_at[(next_rid as usize) % inflight] = Some(Instant::now());
        if ws.feed(client::ping_frame(next_rid)).await.is_err() {
            out.errors += 1;
            return out;
        }
        next_rid += 1;
        outstanding += 1;
    }
    if ws.flush().await.is_err() {
        out.errors += 1;
        return out;
    }
    let deadline = to + Duration::from_secs(5);
    while outstanding > 0 {
        let msg = match tokio::time::timeout_at(deadline.into(), ws.next()).await {
            Ok(Some(Ok(m))) => m,
            _ => {
                out.errors += 1;
                return out;
            }
        };
        let Message::Text(text) = msg else { continue };
        let Ok(reply) = serde_json::from_str::<client::Reply>(&text) else {
            out.errors += 1;
            continue;
        };
        if reply.op != "ping.ok" {
            out.errors += 1;
            continue;
        }
        let Some(rid) = reply.rid else { continue };
        let now = Instant::now();
        if let Some(t) = sent_at[(rid as usize) % inflight].take() {
            outstanding -= 1;
            if t >= from && t < to {
                out.rtts_ns.push((now - t).as_nanos() as u64);
            }
        }
        if now < to {
            sent_at[(next_rid as usize) % inflight] = Some(Instant::now());
            if ws.send(client::ping_frame(next_rid)).await.is_err() {
                out.errors += 1;
                return out;
            }
            next_rid += 1;
            outstanding += 1;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    out
}
