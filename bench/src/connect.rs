//! `connect` mode: ramp to N authenticated connections at up to R connects/s, hold them for SECS
//! with a `ping` op every `--ping-secs` per connection, then report.
//!
//! With `--workers W` the parent spawns W copies of itself (`--child`), each with N/W connections,
//! its slice of the tokens and R/W connects/s; children write JSON lines on stdout (progress,
//! `ramped`, then the final result) and the parent merges them, samples the server's RSS and
//! prints one progress line on stderr.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use std::io::Write;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, Target};
use crate::procfs::rss_kib;
use crate::stats::{percentiles, Percentiles};

#[derive(clap::Args, Clone)]
pub struct Args {
    /// WebSocket URL (loopback only).
    #[arg(long, default_value = "ws://127.0.0.1:8090/ws")]
    url: String,
    /// File with one access token per line (one per connection).
    #[arg(long)]
    tokens: PathBuf,
    /// Connections to open (in total, over all workers).
    #[arg(long)]
    conns: usize,
    /// Connect attempts started per second (in total).
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Seconds to hold the connections once the ramp is over.
    #[arg(long, default_value_t = 60)]
    hold: u64,
    /// Seconds between `ping` ops on each held connection.
    #[arg(long, default_value_t = 25)]
    ping_secs: u64,
    /// Worker processes to spread the connections over (each needs one fd per connection).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// The server's pid: report its VmRSS before the ramp, at full load and per connection.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Source addresses to bind to, 127.0.0.2 ..= 127.0.0.(1+K) (0: let the kernel choose).
    #[arg(long, default_value_t = 8)]
    src_ips: usize,
    /// Seconds allowed for connect + handshake + auth.ok.
    #[arg(long, default_value_t = 10)]
    connect_timeout: u64,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Free-form label stored in the report (e.g. the server's name).
    #[arg(long, default_value = "")]
    label: String,
    /// Internal: run as a worker process, reporting JSON lines on stdout.
    #[arg(long, hide = true)]
    child: bool,
    /// Internal: index of this worker's first token and connection.
    #[arg(long, hide = true, default_value_t = 0)]
    offset: usize,
}

/// What a worker tells its coordinator.
#[derive(Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Event {
    Progress { connected: u64, failed: u64, dropped: u64 },
    Ramped,
    Result(WorkerResult),
}

/// One worker's raw results.
#[derive(Serialize, Deserialize, Default)]
struct WorkerResult {
    attempted: u64,
    connected: u64,
    failed: u64,
    failure_kinds: BTreeMap<String, u64>,
    dropped_during_ramp: u64,
    dropped_during_hold: u64,
    drop_kinds: BTreeMap<String, u64>,
    ramp_secs: f64,
    hold_secs: f64,
    pings_sent: u64,
    pongs: u64,
    still_open_at_end: u64,
    /// Connect latencies in nanoseconds.
    latencies_ns: Vec<u64>,
}

#[derive(Serialize)]
struct Rss {
    pid: u32,
    before_kib: Option<u64>,
    loaded_kib: Option<u64>,
    end_of_hold_kib: Option<u64>,
    peak_kib: Option<u64>,
    per_connection_bytes: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    mode: &'static str,
    label: String,
    url: String,
    started_unix: u64,
    conns: usize,
    rate_target: f64,
    workers: usize,
    src_ips: usize,
    hold_secs_target: u64,
    hold_secs_actual: f64,
    ping_secs: u64,
    attempted: u64,
    connected: u64,
    failed: u64,
    failure_kinds: BTreeMap<String, u64>,
    dropped_during_ramp: u64,
    dropped_during_hold: u64,
    drop_kinds: BTreeMap<String, u64>,
    still_open_at_end: u64,
    pings_sent: u64,
    pongs: u64,
    ramp_secs: f64,
    achieved_connect_rate: f64,
    connect_latency: Percentiles,
    server_rss: Option<Rss>,
}

/// Entry point of `connect`.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let target = Target::parse(&args.url)?;
    if args.child {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let worker = tokio::spawn(worker(args, target, tx));
        while let Some(ev) = rx.recv().await {
            let mut line = serde_json::to_vec(&ev)?;
            line.push(b'\n');
            let mut out = std::io::stdout().lock();
            out.write_all(&line)?;
            out.flush()?;
        }
        return worker.await?;
    }
    coordinate(args, target).await
}

/// Runs the workers (in process or as children), samples RSS, prints progress, merges, reports.
async fn coordinate(args: Args, target: Target) -> anyhow::Result<()> {
    let workers = args.workers.max(1);
    let tokens = client::read_tokens(&args.tokens)?;
    if tokens.len() < args.conns {
        bail!("{} tokens for {} connections: mint at least one per connection", tokens.len(), args.conns);
    }
    let started_unix = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let rss_before = args.server_pid.and_then(rss_kib);
    if let (Some(pid), None) = (args.server_pid, rss_before) {
        bail!("cannot read VmRSS of pid {pid}");
    }

    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Event)>();
    let mut children = Vec::new();
    if workers == 1 {
        let (wtx, mut wrx) = mpsc::unbounded_channel();
        let a = args.clone();
        let t = target.clone();
        children.push(tokio::spawn(async move { worker(a, t, wtx).await }));
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(ev) = wrx.recv().await {
                let _ = tx.send((0, ev));
            }
        });
    } else {
        let exe = std::env::current_exe()?;
        for w in 0..workers {
            let start = args.conns * w / workers;
            let n = args.conns * (w + 1) / workers - start;
            let mut cmd = tokio::process::Command::new(&exe);
            cmd.arg("connect")
                .args(["--url", &args.url])
                .arg("--tokens")
                .arg(&args.tokens)
                .args(["--conns", &n.to_string(), "--rate", &(args.rate / workers as f64).to_string()])
                .args(["--hold", &args.hold.to_string(), "--ping-secs", &args.ping_secs.to_string()])
                .args(["--src-ips", &args.src_ips.to_string(), "--connect-timeout", &args.connect_timeout.to_string()])
                .args(["--child", "--offset", &start.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true);
            let mut child = cmd.spawn().context("spawning worker")?;
            let stdout = child.stdout.take().context("worker stdout")?;
            let tx = tx.clone();
            children.push(tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Some(line) = lines.next_line().await? {
                    let ev: Event = serde_json::from_str(&line).context("bad line from worker")?;
                    let _ = tx.send((w, ev));
                }
                let status = child.wait().await?;
                if !status.success() {
                    bail!("worker {w} exited with {status}");
                }
                Ok(())
            }));
        }
    }
    drop(tx);

    let t0 = Instant::now();
    let mut progress = vec![(0u64, 0u64, 0u64); workers];
    let mut ramped = 0usize;
    let mut results: Vec<WorkerResult> = Vec::new();
    let mut loaded_at: Option<Instant> = None;
    let (mut rss_loaded, mut rss_end, mut rss_peak) = (None, None, rss_before);
    let hold = Duration::from_secs(args.hold);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Some((w, Event::Progress { connected, failed, dropped })) => progress[w] = (connected, failed, dropped),
                Some((_, Event::Ramped)) => {
                    ramped += 1;
                    if ramped == workers {
                        loaded_at = Some(Instant::now());
                    }
                }
                Some((_, Event::Result(r))) => results.push(r),
                None => break,
            },
            _ = tick.tick() => {
                let (c, f, d) = progress.iter().fold((0, 0, 0), |a, p| (a.0 + p.0, a.1 + p.1, a.2 + p.2));
                let rss = args.server_pid.and_then(rss_kib);
                if let Some(r) = rss {
                    rss_peak = rss_peak.max(Some(r));
                    // The first sample 2 s after the last worker ramped is "at full load"; later
                    // ones until 1 s before the hold ends keep replacing "end of hold" (after
                    // that the workers close their connections).
                    if let Some(at) = loaded_at {
                        let held = at.elapsed();
                        if held >= Duration::from_secs(2) && held + Duration::from_secs(1) < hold {
                                if rss_loaded.is_none() {
                                    rss_loaded = Some(r);
                                }
                            rss_end = Some(r);
                        }
                    }
                }
                let phase = if ramped < workers { "ramp" } else { "hold" };
                let rss_text = rss.map(|r| format!(" server_rss {} MiB", r / 1024)).unwrap_or_default();
                eprintln!(
                    "[{:>4}s] {phase} connected {c}/{} failed {f} dropped {d}{rss_text}",
                    t0.elapsed().as_secs(),
                    args.conns
                );
            }
        }
    }
    for c in children {
        c.await??;
    }
    if results.len() != workers {
        bail!("{} of {workers} workers reported", results.len());
    }

    let mut merged = WorkerResult::default();
    for r in results {
        merged.attempted += r.attempted;
        merged.connected += r.connected;
        merged.failed += r.failed;
        merged.dropped_during_ramp += r.dropped_during_ramp;
        merged.dropped_during_hold += r.dropped_during_hold;
        merged.pings_sent += r.pings_sent;
        merged.pongs += r.pongs;
        merged.still_open_at_end += r.still_open_at_end;
        merged.ramp_secs = merged.ramp_secs.max(r.ramp_secs);
        merged.hold_secs = if merged.hold_secs == 0.0 { r.hold_secs } else { merged.hold_secs.min(r.hold_secs) };
        for (k, v) in r.failure_kinds {
            *merged.failure_kinds.entry(k).or_default() += v;
        }
        for (k, v) in r.drop_kinds {
            *merged.drop_kinds.entry(k).or_default() += v;
        }
        merged.latencies_ns.extend(r.latencies_ns);
    }
    let server_rss = args.server_pid.map(|pid| Rss {
        pid,
        before_kib: rss_before,
        loaded_kib: rss_loaded,
        end_of_hold_kib: rss_end,
        peak_kib: rss_peak,
        per_connection_bytes: match (rss_before, rss_loaded) {
            (Some(b), Some(l)) if merged.connected > 0 => {
                Some((l as f64 - b as f64) * 1024.0 / (merged.connected - merged.dropped_during_ramp) as f64)
            }
            _ => None,
        },
    });
    let report = Report {
        mode: "connect",
        label: args.label.clone(),
        url: args.url.clone(),
        started_unix,
        conns: args.conns,
        rate_target: args.rate,
        workers,
        src_ips: args.src_ips,
        hold_secs_target: args.hold,
        hold_secs_actual: merged.hold_secs,
        ping_secs: args.ping_secs,
        attempted: merged.attempted,
        connected: merged.connected,
        failed: merged.failed,
        failure_kinds: merged.failure_kinds,
        dropped_during_ramp: merged.dropped_during_ramp,
        dropped_during_hold: merged.dropped_during_hold,
        drop_kinds: merged.drop_kinds,
        still_open_at_end: merged.still_open_at_end,
        pings_sent: merged.pings_sent,
        pongs: merged.pongs,
        ramp_secs: merged.ramp_secs,
        achieved_connect_rate: if merged.ramp_secs > 0.0 { merged.connected as f64 / merged.ramp_secs } else { 0.0 },
        connect_latency: percentiles(&mut merged.latencies_ns),
        server_rss,
    };
    let json = serde_json::to_string_pretty(&report)?;
    println!("{json}");
    if let Some(path) = &args.report {
        std::fs::write(path, format!("{json}\n")).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("report written to {}", path.display());
    }
    Ok(())
}

/// Counters shared by one worker's connection tasks.
#[derive(Default)]
struct Shared {
    connected: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    pings_sent: AtomicU64,
    pongs: AtomicU64,
}

/// How one connection attempt ended.
enum Outcome {
    Connected(u64),
    Failed(String),
}

/// How one held connection ended.
enum End {
    /// Closed by us at the end of the hold.
    Closed,
    /// Lost before the end of the hold; `true` when the ramp was already over.
    Dropped(String, bool),
}

/// Opens `args.conns` connections from token `args.offset` on, holds them, returns the result.
async fn worker(args: Args, target: Target, events: mpsc::UnboundedSender<Event>) -> anyhow::Result<()> {
    let tokens = client::read_tokens(&args.tokens)?;
    let tokens: Vec<String> = tokens.into_iter().skip(args.offset).take(args.conns).collect();
    if tokens.len() < args.conns {
        bail!("not enough tokens for worker at offset {}", args.offset);
    }
    let shared = Arc::new(Shared::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ramp_tx, ramp_rx) = watch::channel(false);
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Outcome>();
    let (end_tx, mut end_rx) = mpsc::unbounded_channel::<End>();
    let ping_every = Duration::from_secs(args.ping_secs.max(1));
    let timeout = Duration::from_secs(args.connect_timeout);

    let ramp_start = Instant::now();
    let spawner = {
        let shared = shared.clone();
        let target = target.clone();
        let (rate, offset, src_ips) = (args.rate.max(0.1), args.offset, args.src_ips);
        tokio::spawn(async move {
            for (i, token) in tokens.into_iter().enumerate() {
                tokio::time::sleep_until((ramp_start + Duration::from_secs_f64(i as f64 / rate)).into()).await;
                let src = (src_ips > 0).then(|| client::source_ip(offset + i, src_ips));
                let (target, shared, out_tx, end_tx) = (target.clone(), shared.clone(), out_tx.clone(), end_tx.clone());
                let (stop_rx, ramp_rx) = (stop_rx.clone(), ramp_rx.clone());
                // Spread the pings of the held connections evenly over one period.
                let phase = ping_every.mul_f64((i as f64 * 0.618_033_988_7).fract());
                tokio::spawn(async move {
                    let t = Instant::now();
                    match client::connect_auth(&target, src, &token, timeout).await {
                        Ok(ws) => {
                            shared.connected.fetch_add(1, Ordering::Relaxed);
                            let _ = out_tx.send(Outcome::Connected(t.elapsed().as_nanos() as u64));
                            drop(out_tx);
                            let end = hold(ws, &shared, stop_rx, ramp_rx, ping_every, phase).await;
                            if matches!(end, End::Dropped(..)) {
                                shared.dropped.fetch_add(1, Ordering::Relaxed);
                            }
                            let _ = end_tx.send(end);
                        }
                        Err(e) => {
                            shared.failed.fetch_add(1, Ordering::Relaxed);
                            let _ = out_tx.send(Outcome::Failed(client::failure_kind(&e)));
                        }
                    }
                });
            }
        })
    };
    let progress = {
        let (shared, events) = (shared.clone(), events.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let ev = Event::Progress {
                    connected: shared.connected.load(Ordering::Relaxed),
                    failed: shared.failed.load(Ordering::Relaxed),
                    dropped: shared.dropped.load(Ordering::Relaxed),
                };
                if events.send(ev).is_err() {
                    break;
                }
            }
        })
    };

    let mut result = WorkerResult::default();
    while let Some(o) = out_rx.recv().await {
        result.attempted += 1;
        match o {
            Outcome::Connected(ns) => {
                result.connected += 1;
                result.latencies_ns.push(ns);
            }
            Outcome::Failed(kind) => {
                result.failed += 1;
                *result.failure_kinds.entry(kind).or_default() += 1;
            }
        }
    }
    spawner.await?;
    result.ramp_secs = ramp_start.elapsed().as_secs_f64();
    let _ = ramp_tx.send(true);
    let _ = events.send(Event::Ramped);

    let hold_start = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.hold)).await;
    result.hold_secs = hold_start.elapsed().as_secs_f64();
    result.still_open_at_end = shared.connected.load(Ordering::Relaxed) - shared.dropped.load(Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let drain = async {
        while let Some(end) = end_rx.recv().await {
            if let End::Dropped(kind, during_hold) = end {
                if during_hold {
                    result.dropped_during_hold += 1;
                } else {
                    result.dropped_during_ramp += 1;
                }
                *result.drop_kinds.entry(kind).or_default() += 1;
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(30), drain).await.is_err() {
        eprintln!("worker at offset {}: some connections did not close within 30 s", args.offset);
    }
    progress.abort();
    result.pings_sent = shared.pings_sent.load(Ordering::Relaxed);
    result.pongs = shared.pongs.load(Ordering::Relaxed);
    let _ = events.send(Event::Result(result));
    Ok(())
}

/// Holds one connection: a `ping` op every `every` (first after `phase`), reading whatever comes,
/// until `stop` turns true (then a close handshake) or the connection is lost.
async fn hold(
    mut ws: client::Ws,
    shared: &Shared,
    mut stop: watch::Receiver<bool>,
    ramp_done: watch::Receiver<bool>,
    every: Duration,
    phase: Duration,
) -> End {
    let mut ticker = tokio::time::interval_at((Instant::now() + phase).into(), every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rid = 1u64;
    let lost = |why: String| End::Dropped(why, *ramp_done.borrow());
    loop {
        tokio::select! {
            _ = stop.changed() => {
                let _ = tokio::time::timeout(Duration::from_secs(5), ws.close(None)).await;
                return End::Closed;
            }
            _ = ticker.tick() => {
                rid += 1;
                if let Err(e) = ws.send(client::ping_frame(rid)).await {
                    return lost(format!("send: {e}"));
                }
                shared.pings_sent.fetch_add(1, Ordering::Relaxed);
            }
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    if let Ok(r) = serde_json::from_str::<client::Reply>(&t) {
                        match r.op.as_ref() {
                            "ping.ok" => { shared.pongs.fetch_add(1, Ordering::Relaxed); }
                            "kick" | "drain" => return lost(format!("server sent {}", r.op)),
                            "error" => return lost(format!("error {}", r.code.as_deref().unwrap_or("?"))),
                            _ => {}
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | None => return lost("closed by server".into()),
                Some(Ok(_)) => {}
                Some(Err(e)) => return lost(format!("read: {e}")),
            }
        }
    }
}
