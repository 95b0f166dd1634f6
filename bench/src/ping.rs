//! `ping` mode: open `--conns` authenticated connections, then keep `--inflight` `ping` ops in
//! flight on each for `--secs` (after `--warmup-secs`), and report frames/s (round trips), RTT
//! percentiles and the CPU time of the load process (and of the server with `--server-pid`), so a
//! report shows which side was the bottleneck.
//!
//! Runs on the single-threaded [`rawws`](crate::rawws) engine: replies on a connection come back
//! in order, so the RTT of a reply is `now - send time of the oldest outstanding ping`, kept in a
//! per-connection ring; the ping frame is encoded (and masked) once and copied. `--workers W`
//! runs W child processes of this binary with N/W connections each and merges their histograms.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::client::{CommonArgs, Target};
use crate::procfs::CpuMeter;
use crate::rawws::{self, Ctx, Handler};
use crate::scan;
use crate::session::{self, Kinds};
use crate::stats::{Hist, Percentiles};

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    #[command(flatten)]
    pub common: CommonArgs,
    /// File with one access token per line (one per connection).
    #[arg(long)]
    pub tokens: PathBuf,
    /// Connections (in total, over all workers).
    #[arg(long, default_value_t = 100)]
    pub conns: usize,
    /// Pings in flight per connection.
    #[arg(long, default_value_t = 16)]
    pub inflight: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10)]
    pub secs: u64,
    /// Unmeasured seconds before the measurement.
    #[arg(long, default_value_t = 2)]
    pub warmup_secs: u64,
    /// Worker processes (each a single-threaded event loop with conns/W connections).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// The server's pid: report its CPU seconds over the measured window too.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Internal: run as a worker process (JSON lines on stdout, "go" on stdin).
    #[arg(long, hide = true)]
    pub child: bool,
    /// Internal: index of this worker's first token and connection.
    #[arg(long, hide = true, default_value_t = 0)]
    pub offset: usize,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Report {
    pub mode: String,
    pub label: String,
    pub url: String,
    pub client: String,
    pub started_unix: u64,
    pub conns: usize,
    pub inflight: usize,
    pub workers: usize,
    pub warmup_secs: u64,
    pub measured_secs: f64,
    /// Replies received within the measured window.
    pub round_trips: u64,
    pub frames_per_sec: f64,
    /// Replies over the whole run (warm-up and drain included).
    pub total_round_trips: u64,
    pub errors: u64,
    pub error_kinds: Kinds,
    /// Connections lost during the run.
    pub dropped: u64,
    pub rtt: Percentiles,
    /// CPU seconds the load process(es) used in the measured window, and that over the window
    /// length (1.0 = one core busy).
    pub client_cpu_secs: f64,
    pub client_cpu_util: f64,
    pub server_pid: Option<u32>,
    pub server_cpu_secs: Option<f64>,
    pub server_cpu_util: Option<f64>,
    /// Frames per read syscall and per write syscall of the client in the window.
    pub client_frames_per_read: f64,
    pub client_frames_per_write: f64,
}

/// What one worker measured.
#[derive(Serialize, Deserialize, Default)]
struct WorkerResult {
    round_trips: u64,
    total: u64,
    errors: u64,
    error_kinds: Kinds,
    dropped: u64,
    hist: Hist,
    measured_secs: f64,
    cpu_secs: f64,
    server_cpu_secs: Option<f64>,
    reads: u64,
    writes: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Event {
    Ready,
    Progress { round_trips: u64, errors: u64, dropped: u64 },
    Result(Box<WorkerResult>),
}

/// Entry point of `ping` (prints and writes the report; as `--child`, runs one worker).
pub fn main(args: Args) -> anyhow::Result<()> {
    if args.child {
        return child(args);
    }
    let report = run(&args)?;
    session::emit(&report, args.common.report.as_deref())
}

/// Runs the benchmark (in process, or over `--workers` child processes) and returns the report.
pub fn run(args: &Args) -> anyhow::Result<Report> {
    let target = Target::parse(&args.common.url)?;
    session::check_bounds(args.conns.div_ceil(args.workers.max(1)), args.secs)?;
    if args.inflight == 0 || args.inflight > 4096 {
        bail!("--inflight must be 1..=4096");
    }
    let tokens = session::read_tokens(&args.tokens)?;
    if tokens.len() < args.conns {
        bail!("{} tokens for {} connections", tokens.len(), args.conns);
    }
    let started_unix = session::unix_now();
    let workers = args.workers.max(1);
    let merged = if workers == 1 {
        let raw: Vec<&str> = tokens.iter().take(args.conns).map(|t| t.raw.as_str()).collect();
        let mut last = Instant::now();
        worker(args, &target, &raw, 0, || Ok(()), &mut |r, e, d| {
            if last.elapsed() >= Duration::from_secs(1) {
                last = Instant::now();
                eprintln!("[ping] round trips {r} errors {e} dropped {d}");
            }
        })?
    } else {
        coordinate(args, workers)?
    };
    let secs = merged.measured_secs.max(1e-9);
    let frames_in_window = merged.round_trips as f64;
    Ok(Report {
        mode: "ping".into(),
        label: args.common.label.clone(),
        url: args.common.url.clone(),
        client: "rawws (mio, single-threaded per worker)".into(),
        started_unix,
        conns: args.conns,
        inflight: args.inflight,
        workers,
        warmup_secs: args.warmup_secs,
        measured_secs: merged.measured_secs,
        round_trips: merged.round_trips,
        frames_per_sec: merged.round_trips as f64 / secs,
        total_round_trips: merged.total,
        errors: merged.errors,
        error_kinds: merged.error_kinds,
        dropped: merged.dropped,
        rtt: merged.hist.percentiles(),
        client_cpu_secs: merged.cpu_secs,
        client_cpu_util: merged.cpu_secs / secs,
        server_pid: args.server_pid,
        server_cpu_secs: merged.server_cpu_secs,
        server_cpu_util: merged.server_cpu_secs.map(|c| c / secs),
        client_frames_per_read: if merged.reads > 0 { frames_in_window / merged.reads as f64 } else { 0.0 },
        client_frames_per_write: if merged.writes > 0 { frames_in_window / merged.writes as f64 } else { 0.0 },
    })
}

/// A worker process: connects, says `ready`, waits for `go` on stdin, runs, reports.
fn child(args: Args) -> anyhow::Result<()> {
    let target = Target::parse(&args.common.url)?;
    let tokens = session::read_tokens(&args.tokens)?;
    let raw: Vec<&str> = tokens.iter().skip(args.offset).take(args.conns).map(|t| t.raw.as_str()).collect();
    if raw.len() < args.conns {
        bail!("not enough tokens for the worker at offset {}", args.offset);
    }
    let say = |ev: &Event| -> anyhow::Result<()> {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer(&mut out, ev)?;
        out.write_all(b"\n")?;
        out.flush()?;
        Ok(())
    };
    let go = || {
        say(&Event::Ready)?;
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        if line.trim() != "go" {
            bail!("coordinator did not say go");
        }
        Ok(())
    };
    let mut last = Instant::now();
    let result = worker(&args, &target, &raw, args.offset, go, &mut |r, e, d| {
        if last.elapsed() >= Duration::from_secs(1) {
            last = Instant::now();
            let _ = say(&Event::Progress { round_trips: r, errors: e, dropped: d });
        }
    })?;
    say(&Event::Result(Box::new(result)))
}

/// Spawns the workers, starts them together, prints merged progress, merges their results.
fn coordinate(args: &Args, workers: usize) -> anyhow::Result<WorkerResult> {
    let exe = std::env::current_exe()?;
    let (tx, rx) = mpsc::channel::<(usize, anyhow::Result<Event>)>();
    let mut children = Vec::new();
    for w in 0..workers {
        let start = args.conns * w / workers;
        let n = args.conns * (w + 1) / workers - start;
        let mut child = Command::new(&exe)
            .arg("ping")
            .args(["--url", &args.common.url])
            .arg("--tokens")
            .arg(&args.tokens)
            .args(["--conns", &n.to_string(), "--inflight", &args.inflight.to_string()])
            .args(["--secs", &args.secs.to_string(), "--warmup-secs", &args.warmup_secs.to_string()])
            .args(["--src-ips", &args.common.src_ips.to_string(), "--child", "--offset", &start.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning a worker")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let ev = line.map_err(anyhow::Error::from).and_then(|l| Ok(serde_json::from_str::<Event>(&l)?));
                if tx.send((w, ev)).is_err() {
                    break;
                }
            }
        });
        children.push(child);
    }
    drop(tx);
    let kill_all = |children: &mut Vec<std::process::Child>| {
        for c in children.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    };
    let mut ready = 0;
    while ready < workers {
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok((_, Ok(Event::Ready))) => ready += 1,
            Ok((w, Err(e))) => {
                kill_all(&mut children);
                bail!("worker {w}: {e:#}");
            }
            Ok(_) => {}
            Err(_) => {
                kill_all(&mut children);
                bail!("{ready} of {workers} workers got ready (see their stderr)");
            }
        }
    }
    let mut server_cpu: Option<CpuMeter> = None;
    let window_start = Instant::now() + Duration::from_secs(args.warmup_secs);
    for c in &mut children {
        let stdin = c.stdin.as_mut().context("worker stdin")?;
        stdin.write_all(b"go\n")?;
        stdin.flush()?;
    }
    let mut server_cpu_secs = None;
    let mut progress = vec![(0u64, 0u64, 0u64); workers];
    let mut results: Vec<WorkerResult> = Vec::new();
    let mut last_print = Instant::now();
    while results.len() < workers {
        let ev = rx.recv_timeout(Duration::from_millis(50));
        let now = Instant::now();
        if server_cpu.is_none() && now >= window_start {
            server_cpu = Some(CpuMeter::server(args.server_pid));
        }
        if server_cpu_secs.is_none() && now >= window_start + Duration::from_secs(args.secs) {
            server_cpu_secs = server_cpu.and_then(|m| m.elapsed());
        }
        match ev {
            Ok((w, Ok(Event::Progress { round_trips, errors, dropped }))) => {
                progress[w] = (round_trips, errors, dropped)
            }
            Ok((_, Ok(Event::Result(r)))) => results.push(*r),
            Ok((_, Ok(Event::Ready))) => {}
            Ok((w, Err(e))) => {
                kill_all(&mut children);
                bail!("worker {w}: {e:#}");
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            let (r, e, d) = progress.iter().fold((0, 0, 0), |a, p| (a.0 + p.0, a.1 + p.1, a.2 + p.2));
            eprintln!("[ping] {workers} workers: round trips {r} errors {e} dropped {d}");
        }
    }
    for c in &mut children {
        let status = c.wait()?;
        if !status.success() {
            bail!("a worker exited with {status}");
        }
    }
    if results.len() != workers {
        bail!("{} of {workers} workers reported", results.len());
    }
    let mut m = WorkerResult { server_cpu_secs, ..Default::default() };
    for r in results {
        m.round_trips += r.round_trips;
        m.total += r.total;
        m.errors += r.errors;
        m.dropped += r.dropped;
        m.hist.merge(&r.hist);
        m.cpu_secs += r.cpu_secs;
        m.reads += r.reads;
        m.writes += r.writes;
        m.measured_secs = m.measured_secs.max(r.measured_secs);
        for (k, v) in r.error_kinds {
            *m.error_kinds.entry(k).or_default() += v;
        }
    }
    Ok(m)
}

/// One event loop: connects `tokens`, calls `go`, pings for warm-up + measured seconds, drains.
fn worker(
    args: &Args,
    target: &Target,
    tokens: &[&str],
    offset: usize,
    go: impl FnOnce() -> anyhow::Result<()>,
    progress: &mut dyn FnMut(u64, u64, u64),
) -> anyhow::Result<WorkerResult> {
    let mut client = session::new_client(target)?;
    // Source addresses continue the round robin of the other workers.
    let ids = session::connect_all(&mut client, tokens, args.common.src_ips, offset, Duration::from_secs(60))?;
    go()?;
    let inflight = args.inflight;
    let start = Instant::now();
    let from = start + Duration::from_secs(args.warmup_secs);
    let to = from + Duration::from_secs(args.secs);
    let mut h = PingH {
        frame: rawws::text_frame(br#"{"op":"ping","rid":1}"#),
        sent: (0..client.len()).map(|_| VecDeque::with_capacity(inflight)).collect(),
        from,
        to,
        hist: Hist::default(),
        round_trips: 0,
        total: 0,
        errors: 0,
        error_kinds: Kinds::new(),
        dropped: 0,
        outstanding: 0,
    };
    let now = Instant::now();
    for &id in &ids {
        for _ in 0..inflight {
            client.send_raw(id, &h.frame);
            h.sent[id].push_back(now);
            h.outstanding += 1;
        }
    }
    let mut cpu = None;
    let mut io0 = client.stats;
    let mut result = WorkerResult::default();
    loop {
        let now = Instant::now();
        if cpu.is_none() && now >= from {
            cpu = Some((CpuMeter::own(), CpuMeter::server(args.server_pid)));
            io0 = client.stats;
        }
        if now >= to {
            break;
        }
        client.poll(Some(Duration::from_millis(50).min(to - now)), &mut h)?;
        progress(h.total, h.errors, h.dropped);
    }
    if let Some((c, s)) = cpu {
        result.cpu_secs = c.elapsed().unwrap_or(0.0);
        result.server_cpu_secs = s.elapsed();
    }
    result.measured_secs = (to - from).as_secs_f64();
    result.reads = client.stats.reads - io0.reads;
    result.writes = client.stats.writes - io0.writes;
    // Collect the replies still in flight (not measured), then close.
    let drain_until = Instant::now() + Duration::from_secs(3);
    while h.outstanding > 0 && Instant::now() < drain_until && !client.is_empty() {
        client.poll(Some(Duration::from_millis(50)), &mut h)?;
    }
    client.close_all();
    result.round_trips = h.round_trips;
    result.total = h.total;
    result.errors = h.errors;
    result.error_kinds = h.error_kinds;
    result.dropped = h.dropped;
    result.hist = h.hist;
    Ok(result)
}

struct PingH {
    frame: Vec<u8>,
    /// Send instants of the outstanding pings, oldest first, per connection id.
    sent: Vec<VecDeque<Instant>>,
    from: Instant,
    to: Instant,
    hist: Hist,
    round_trips: u64,
    total: u64,
    errors: u64,
    error_kinds: Kinds,
    dropped: u64,
    outstanding: u64,
}

impl Handler for PingH {
    fn frame(&mut self, cx: &mut Ctx, _opcode: u8, payload: &[u8]) {
        let op = scan::op(payload);
        if op != Some(b"ping.ok") {
            self.errors += 1;
            let kind = match op {
                Some(b"error") => scan::str_field(payload, "code").unwrap_or(b"error"),
                Some(other) => other,
                None => b"unparsed",
            };
            session::bump(&mut self.error_kinds, &String::from_utf8_lossy(kind));
            return;
        }
        let q = &mut self.sent[cx.id];
        let Some(t) = q.pop_front() else {
            self.errors += 1;
            session::bump(&mut self.error_kinds, "unexpected ping.ok");
            return;
        };
        self.total += 1;
        self.outstanding -= 1;
        let now = cx.now;
        if now >= self.from && now < self.to {
            self.round_trips += 1;
            self.hist.record(now.saturating_duration_since(t).as_nanos() as u64);
        }
        if now < self.to {
            cx.send_raw(&self.frame);
            q.push_back(now);
            self.outstanding += 1;
        }
    }

    fn closed(&mut self, id: usize, why: &str) {
        self.dropped += 1;
        self.outstanding -= self.sent[id].len() as u64;
        self.sent[id].clear();
        session::bump(&mut self.error_kinds, &format!("dropped: {}", why.chars().take(60).collect::<String>()));
    }
}
