//! `connect` mode: ramp to N authenticated connections at up to R connects/s, hold them for SECS
//! with a `ping` op every `--ping-secs` per connection, then report.
//!
//! Runs on the single-threaded [`rawws`](crate::rawws) engine in lean mode, so an idle held
//! connection costs the client a couple of hundred bytes (no buffers while idle; reads go through
//! one shared scratch buffer). Connection attempts are started at the target rate with no limit
//! on how many are in flight (connect → upgrade → `auth` → `auth.ok`); attempts that take longer
//! than `--connect-timeout` fail as `timeout` (a FIFO of deadlines, since they are started in
//! order). The pings of the held connections are spread over one period and driven by a bucketed
//! timer wheel.
//!
//! With `--workers W` the parent spawns W copies of itself (`--child`), each with N/W
//! connections, its slice of the tokens and R/W connects/s; children write JSON lines on stdout
//! (progress, `ramped`, then the final result) and the parent merges them, samples the server's
//! RSS and prints one progress line a second on stderr. The parent waits for every worker (up to
//! a deadline well past ramp + hold), keeps going when one fails, and lists the failed workers
//! in the report (and then exits non-zero).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::client::{self, CommonArgs, Target};
use crate::procfs::rss_kib;
use crate::rawws::{Ctx, Handler};
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
    /// Connections to open (in total, over all workers).
    #[arg(long)]
    pub conns: usize,
    /// Connect attempts started per second (in total).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Seconds to hold the connections once the ramp is over.
    #[arg(long, default_value_t = 60)]
    pub hold: u64,
    /// Seconds between `ping` ops on each held connection.
    #[arg(long, default_value_t = 25)]
    pub ping_secs: u64,
    /// Worker processes to spread the connections over (each needs one fd per connection).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// The server's pid: report its VmRSS before the ramp, at full load and per connection.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Seconds allowed for connect + handshake + auth.ok.
    #[arg(long, default_value_t = 10)]
    pub connect_timeout: u64,
    /// Internal: run as a worker process, reporting JSON lines on stdout.
    #[arg(long, hide = true)]
    pub child: bool,
    /// Internal: index of this worker's first token and connection.
    #[arg(long, hide = true, default_value_t = 0)]
    pub offset: usize,
}

/// What a worker tells its coordinator.
#[derive(Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Event {
    Progress {
        connected: u64,
        failed: u64,
        dropped: u64,
        #[serde(default)]
        rss_kib: Option<u64>,
    },
    Ramped,
    Result(Box<WorkerResult>),
}

/// One worker's raw results.
#[derive(Serialize, Deserialize, Default)]
struct WorkerResult {
    attempted: u64,
    connected: u64,
    failed: u64,
    failure_kinds: Kinds,
    dropped_during_ramp: u64,
    dropped_during_hold: u64,
    drop_kinds: Kinds,
    ramp_secs: f64,
    hold_secs: f64,
    pings_sent: u64,
    pongs: u64,
    still_open_at_end: u64,
    /// Connect latencies (connect + upgrade + auth.ok) in nanoseconds.
    latency: Hist,
    /// The worker process's VmRSS when it started, 1 s before the end of the hold (with every
    /// connection held) and at most.
    rss_start_kib: Option<u64>,
    rss_held_kib: Option<u64>,
    rss_peak_kib: Option<u64>,
    /// Its RssAnon (private memory, without the binary's pages) at the same two moments.
    #[serde(default)]
    anon_start_kib: Option<u64>,
    #[serde(default)]
    anon_held_kib: Option<u64>,
}

/// The server's VmRSS over the run.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Rss {
    pub pid: u32,
    pub before_kib: Option<u64>,
    pub loaded_kib: Option<u64>,
    pub end_of_hold_kib: Option<u64>,
    pub peak_kib: Option<u64>,
    pub per_connection_bytes: Option<f64>,
}

/// The load workers' memory, summed over the workers that reported (with one in-process
/// worker, the whole coordinator process).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ClientRss {
    /// VmRSS when each worker started (before reading its tokens).
    pub start_kib: u64,
    /// VmRSS 1 s before the end of each worker's hold.
    pub held_kib: u64,
    /// Sum of each worker's own peak VmRSS.
    pub peak_kib: u64,
    /// RssAnon (private anonymous memory: heap, stacks; not the binary's file-backed pages,
    /// which are paged in as code runs, shared between the workers and do not grow with the
    /// connections) at start and held.
    pub anon_start_kib: u64,
    pub anon_held_kib: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Report {
    pub mode: String,
    pub label: String,
    pub url: String,
    pub client: String,
    pub started_unix: u64,
    pub conns: usize,
    pub rate_target: f64,
    pub workers: usize,
    pub src_ips: usize,
    pub hold_secs_target: u64,
    pub hold_secs_actual: f64,
    pub ping_secs: u64,
    pub connect_timeout_secs: u64,
    pub attempted: u64,
    pub connected: u64,
    pub failed: u64,
    pub failure_kinds: Kinds,
    pub dropped_during_ramp: u64,
    pub dropped_during_hold: u64,
    pub drop_kinds: Kinds,
    pub still_open_at_end: u64,
    pub pings_sent: u64,
    pub pongs: u64,
    pub ramp_secs: f64,
    pub achieved_connect_rate: f64,
    pub connect_latency: Percentiles,
    pub server_rss: Option<Rss>,
    pub client_rss: Option<ClientRss>,
    /// (held − start) of the workers' RssAnon over the connections still open at the end: the
    /// client memory that scales with the connections (kernel socket memory is not included).
    pub client_rss_per_connection_bytes: Option<f64>,
    /// The same from VmRSS (includes the binary's pages first touched during the run).
    pub client_vmrss_per_connection_bytes: Option<f64>,
    /// Workers whose result was merged.
    pub workers_reported: usize,
    /// Workers that failed (exit status, bad output, no result, or past the deadline).
    pub failed_workers: Vec<String>,
}

/// Most connections one worker process opens (the machine's fd limit is 20,000 per process).
pub const MAX_CONNS_PER_WORKER: usize = session::MAX_CONNS;

/// Entry point of `connect`: runs it, prints and writes the report; fails (after writing the
/// report) when a worker failed.
pub fn main(args: Args) -> anyhow::Result<()> {
    if args.child {
        return child(args);
    }
    let report = run(&args)?;
    session::emit(&report, args.common.report.as_deref())?;
    if !report.failed_workers.is_empty() {
        bail!(
            "{} of {} workers failed: {}",
            report.failed_workers.len(),
            report.workers,
            report.failed_workers.join("; ")
        );
    }
    Ok(())
}

/// Checks the arguments.
fn check(args: &Args) -> anyhow::Result<()> {
    let workers = args.workers.max(1);
    if args.conns == 0 {
        bail!("--conns must be at least 1");
    }
    if args.conns.div_ceil(workers) > MAX_CONNS_PER_WORKER {
        bail!(
            "{} connections over {workers} worker(s) is more than {MAX_CONNS_PER_WORKER} per process: \
             raise --workers",
            args.conns
        );
    }
    if args.hold > session::MAX_SECS {
        bail!("--hold must be at most {}", session::MAX_SECS);
    }
    if args.rate.is_nan() || args.rate <= 0.0 {
        bail!("--rate must be positive");
    }
    Ok(())
}

/// Writes a line on stderr, ignoring errors (a closed stderr must not end the run).
fn note(text: std::fmt::Arguments) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

/// What the coordinator hears about worker `w`.
enum Msg {
    Ev(Event),
    /// A line that is not an event, or a read error.
    Bad(String),
    /// The worker is done: `Some(why)` if it failed.
    End(Option<String>),
}

/// Runs the workers (in process or as children), samples RSS, prints progress, merges, returns
/// the report (with the failed workers listed in it).
pub fn run(args: &Args) -> anyhow::Result<Report> {
    check(args)?;
    let target = Target::parse(&args.common.url)?;
    let workers = args.workers.max(1);
    let available = count_tokens(&args.tokens)?;
    if available < args.conns {
        bail!("{available} tokens for {} connections: mint at least one per connection", args.conns);
    }
    let started_unix = session::unix_now();
    let rss_before = args.server_pid.and_then(rss_kib);
    if let (Some(pid), None) = (args.server_pid, rss_before) {
        bail!("cannot read VmRSS of pid {pid}");
    }

    let (tx, rx) = mpsc::channel::<(usize, Msg)>();
    let mut pids: Vec<Option<u32>> = Vec::new();
    if workers == 1 {
        let (a, t, tx) = (args.clone(), target.clone(), tx.clone());
        std::thread::Builder::new().name("connect-worker".into()).spawn(move || {
            let r = worker(&a, &t, 0, a.conns, &mut |ev| {
                let _ = tx.send((0, Msg::Ev(ev)));
            });
            let end = match r {
                Ok(r) => {
                    let _ = tx.send((0, Msg::Ev(Event::Result(Box::new(r)))));
                    None
                }
                Err(e) => Some(format!("{e:#}")),
            };
            let _ = tx.send((0, Msg::End(end)));
        })?;
        pids.push(None);
    } else {
        let exe = std::env::current_exe()?;
        for w in 0..workers {
            let start = args.conns * w / workers;
            let n = args.conns * (w + 1) / workers - start;
            let spawned = Command::new(&exe)
                .arg("connect")
                .args(["--url", &args.common.url])
                .arg("--tokens")
                .arg(&args.tokens)
                .args(["--conns", &n.to_string(), "--rate", &(args.rate / workers as f64).to_string()])
                .args(["--hold", &args.hold.to_string(), "--ping-secs", &args.ping_secs.to_string()])
                .args(["--src-ips", &args.common.src_ips.to_string()])
                .args(["--connect-timeout", &args.connect_timeout.to_string()])
                .args(["--child", "--offset", &start.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn();
            let mut child = match spawned {
                Ok(c) => c,
                Err(e) => {
                    let _ = tx.send((w, Msg::End(Some(format!("spawning: {e}")))));
                    pids.push(None);
                    continue;
                }
            };
            pids.push(Some(child.id()));
            let stdout = child.stdout.take().context("worker stdout")?;
            let tx = tx.clone();
            std::thread::Builder::new().name(format!("connect-reader-{w}")).spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let msg = match line {
                        Ok(l) => match serde_json::from_str::<Event>(&l) {
                            Ok(ev) => Msg::Ev(ev),
                            Err(e) => Msg::Bad(format!("bad line ({e}): {}", l.chars().take(120).collect::<String>())),
                        },
                        Err(e) => {
                            let _ = tx.send((w, Msg::Bad(format!("reading its output: {e}"))));
                            break;
                        }
                    };
                    let _ = tx.send((w, msg));
                }
                let end = match child.wait() {
                    Ok(s) if s.success() => None,
                    Ok(s) => Some(format!("exited with {s}")),
                    Err(e) => Some(format!("wait: {e}")),
                };
                let _ = tx.send((w, Msg::End(end)));
            })?;
        }
    }
    drop(tx);

    // Every worker is bounded by its ramp (its share of the attempts at its share of the rate,
    // each resolved within the connect timeout) plus the hold; give it plenty on top.
    let bound = args.conns as f64 / args.rate + (args.connect_timeout + args.hold) as f64;
    let deadline = Instant::now() + Duration::from_secs_f64(bound * 1.2 + 120.0);

    let t0 = Instant::now();
    let mut progress = vec![(0u64, 0u64, 0u64, None::<u64>); workers];
    let mut ramped = vec![false; workers];
    let mut ended = vec![false; workers];
    let mut results: Vec<Option<WorkerResult>> = (0..workers).map(|_| None).collect();
    let mut failures: Vec<Option<String>> = vec![None; workers];
    let mut loaded_at: Option<Instant> = None;
    let (mut rss_loaded, mut rss_end, mut rss_peak) = (None, None, rss_before);
    let hold = Duration::from_secs(args.hold);
    let mut next_tick = t0 + Duration::from_secs(1);
    let mut killed_at: Option<Instant> = None;
    while ended.iter().any(|e| !e) {
        let now = Instant::now();
        if now >= deadline && killed_at.is_none() {
            killed_at = Some(now);
            for w in (0..workers).filter(|&w| !ended[w]) {
                failures[w].get_or_insert_with(|| "still running at the coordinator's deadline (killed)".into());
                if let Some(pid) = pids[w] {
                    // SAFETY: kill(2) on a child this process spawned and has not reaped yet
                    // (its reader thread reaps it after its stdout closes).
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                }
            }
        }
        if killed_at.is_some_and(|k| now >= k + Duration::from_secs(10)) {
            break; // an in-process worker cannot be killed; report without it
        }
        match rx.recv_timeout(next_tick.saturating_duration_since(now)) {
            Ok((w, Msg::Ev(Event::Progress { connected, failed, dropped, rss_kib }))) => {
                progress[w] = (connected, failed, dropped, rss_kib)
            }
            Ok((w, Msg::Ev(Event::Ramped))) => ramped[w] = true,
            Ok((w, Msg::Ev(Event::Result(r)))) => results[w] = Some(*r),
            Ok((w, Msg::Bad(why))) => {
                note(format_args!("worker {w}: {why}"));
                failures[w].get_or_insert(why);
            }
            Ok((w, Msg::End(why))) => {
                ended[w] = true;
                if let Some(why) = why {
                    note(format_args!("worker {w} failed: {why}"));
                    failures[w] = Some(match failures[w].take() {
                        Some(first) => format!("{why} (after: {first})"),
                        None => why,
                    });
                } else if results[w].is_none() {
                    failures[w].get_or_insert_with(|| "ended without a result".into());
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if loaded_at.is_none() && (0..workers).all(|w| ramped[w] || ended[w]) {
            loaded_at = Some(Instant::now());
        }
        if Instant::now() >= next_tick {
            next_tick += Duration::from_secs(1);
            let (c, f, d) = progress.iter().fold((0, 0, 0), |a, p| (a.0 + p.0, a.1 + p.1, a.2 + p.2));
            let client_rss: u64 = progress.iter().filter_map(|p| p.3).sum();
            let rss = args.server_pid.and_then(rss_kib);
            if let Some(r) = rss {
                rss_peak = rss_peak.max(Some(r));
                // The first sample 2 s after the last worker ramped is "at full load"; later
                // ones until 1 s before the hold ends keep replacing "end of hold" (after that
                // the workers close their connections).
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
            let phase = if loaded_at.is_none() { "ramp" } else { "hold" };
            let rss_text = rss.map(|r| format!(" server_rss {} MiB", r / 1024)).unwrap_or_default();
            let failed_workers = failures.iter().filter(|f| f.is_some()).count();
            let fw_text = if failed_workers > 0 { format!(" FAILED WORKERS {failed_workers}") } else { String::new() };
            note(format_args!(
                "[{:>4}s] {phase} connected {c}/{} failed {f} dropped {d} client_rss {} MiB{rss_text}{fw_text}",
                t0.elapsed().as_secs(),
                args.conns,
                client_rss / 1024
            ));
        }
    }

    let mut failed_workers = Vec::new();
    let mut m = WorkerResult::default();
    let mut reported = 0;
    let mut c_rss = ClientRss { start_kib: 0, held_kib: 0, peak_kib: 0, anon_start_kib: 0, anon_held_kib: 0 };
    let (mut rss_conns, mut rss_ok) = (0, true);
    for (w, r) in results.into_iter().enumerate() {
        if let Some(why) = &failures[w] {
            failed_workers.push(format!("worker {w}: {why}"));
        }
        let Some(r) = r else { continue };
        reported += 1;
        m.attempted += r.attempted;
        m.connected += r.connected;
        m.failed += r.failed;
        m.dropped_during_ramp += r.dropped_during_ramp;
        m.dropped_during_hold += r.dropped_during_hold;
        m.pings_sent += r.pings_sent;
        m.pongs += r.pongs;
        m.still_open_at_end += r.still_open_at_end;
        m.ramp_secs = m.ramp_secs.max(r.ramp_secs);
        m.hold_secs = if m.hold_secs == 0.0 { r.hold_secs } else { m.hold_secs.min(r.hold_secs) };
        for (k, v) in r.failure_kinds {
            *m.failure_kinds.entry(k).or_default() += v;
        }
        for (k, v) in r.drop_kinds {
            *m.drop_kinds.entry(k).or_default() += v;
        }
        m.latency.merge(&r.latency);
        match (r.rss_start_kib, r.rss_held_kib, r.rss_peak_kib, r.anon_start_kib, r.anon_held_kib) {
            (Some(s), Some(h), Some(p), Some(a_s), Some(a_h)) => {
                c_rss.start_kib += s;
                c_rss.held_kib += h;
                c_rss.peak_kib += p;
                c_rss.anon_start_kib += a_s;
                c_rss.anon_held_kib += a_h;
                rss_conns += r.still_open_at_end;
            }
            _ => rss_ok = false,
        }
    }
    let held_after_ramp = m.connected.saturating_sub(m.dropped_during_ramp);
    let server_rss = args.server_pid.map(|pid| Rss {
        pid,
        before_kib: rss_before,
        loaded_kib: rss_loaded,
        end_of_hold_kib: rss_end,
        peak_kib: rss_peak,
        per_connection_bytes: match (rss_before, rss_loaded) {
            (Some(b), Some(l)) if held_after_ramp > 0 => Some((l as f64 - b as f64) * 1024.0 / held_after_ramp as f64),
            _ => None,
        },
    });
    let client_rss = (rss_ok && reported > 0).then_some(c_rss);
    let per_conn = |start: u64, held: u64| (held as f64 - start as f64) * 1024.0 / rss_conns as f64;
    let measured = client_rss.as_ref().filter(|_| rss_conns > 0);
    let client_rss_per_connection_bytes = measured.map(|c| per_conn(c.anon_start_kib, c.anon_held_kib));
    let client_vmrss_per_connection_bytes = measured.map(|c| per_conn(c.start_kib, c.held_kib));
    Ok(Report {
        mode: "connect".into(),
        label: args.common.label.clone(),
        url: args.common.url.clone(),
        client: "rawws (mio, single-threaded per worker, lean buffers)".into(),
        started_unix,
        conns: args.conns,
        rate_target: args.rate,
        workers,
        src_ips: args.common.src_ips,
        hold_secs_target: args.hold,
        hold_secs_actual: m.hold_secs,
        ping_secs: args.ping_secs,
        connect_timeout_secs: args.connect_timeout,
        attempted: m.attempted,
        connected: m.connected,
        failed: m.failed,
        failure_kinds: m.failure_kinds,
        dropped_during_ramp: m.dropped_during_ramp,
        dropped_during_hold: m.dropped_during_hold,
        drop_kinds: m.drop_kinds,
        still_open_at_end: m.still_open_at_end,
        pings_sent: m.pings_sent,
        pongs: m.pongs,
        ramp_secs: m.ramp_secs,
        achieved_connect_rate: if m.ramp_secs > 0.0 { m.connected as f64 / m.ramp_secs } else { 0.0 },
        connect_latency: m.latency.percentiles(),
        server_rss,
        client_rss,
        client_rss_per_connection_bytes,
        client_vmrss_per_connection_bytes,
        workers_reported: reported,
        failed_workers,
    })
}

/// A worker process: runs, writes progress and its result as JSON lines on stdout. A closed
/// stdout (the coordinator is gone) is noted on stderr once; the run goes on (the connections
/// stay held for the server-side measurement), and the process then exits non-zero.
fn child(args: Args) -> anyhow::Result<()> {
    let target = Target::parse(&args.common.url)?;
    let mut broken: Option<String> = None;
    let say = |ev: &Event, broken: &mut Option<String>| {
        if broken.is_some() {
            return;
        }
        let mut line = match serde_json::to_vec(ev) {
            Ok(l) => l,
            Err(e) => {
                *broken = Some(format!("encoding: {e}"));
                return;
            }
        };
        line.push(b'\n');
        let mut out = std::io::stdout().lock();
        if let Err(e) = out.write_all(&line).and_then(|_| out.flush()) {
            note(format_args!("connect worker at offset {}: cannot write to the coordinator: {e}", args.offset));
            *broken = Some(e.to_string());
        }
    };
    let result = worker(&args, &target, args.offset, args.conns, &mut |ev| say(&ev, &mut broken))?;
    say(&Event::Result(Box::new(result)), &mut broken);
    if let Some(e) = broken {
        bail!("connect worker at offset {}: result not delivered to the coordinator: {e}", args.offset);
    }
    Ok(())
}

/// Counts the non-empty lines of a tokens file without keeping them.
fn count_tokens(path: &Path) -> anyhow::Result<usize> {
    let f = std::fs::File::open(path).with_context(|| format!("reading tokens from {}", path.display()))?;
    let mut r = BufReader::with_capacity(1 << 16, f);
    let (mut n, mut line) = (0, String::new());
    while r.read_line(&mut line)? > 0 {
        if !line.trim().is_empty() {
            n += 1;
        }
        line.clear();
    }
    Ok(n)
}

/// One worker's tokens, packed in one allocation (freed in one go after the ramp).
struct Tokens {
    text: String,
    ends: Vec<u32>,
}

impl Tokens {
    /// Tokens `skip .. skip + take` (counting non-empty lines) of `path`.
    fn read(path: &Path, skip: usize, take: usize) -> anyhow::Result<Self> {
        let f = std::fs::File::open(path).with_context(|| format!("reading tokens from {}", path.display()))?;
        let mut r = BufReader::with_capacity(1 << 16, f);
        // Room for typical tokens up front: one large allocation, returned to the system when
        // it is freed after the ramp (a buffer grown step by step could stay in the heap).
        let mut t = Tokens { text: String::with_capacity(take.saturating_mul(256)), ends: Vec::with_capacity(take) };
        let (mut i, mut line) = (0, String::new());
        while t.ends.len() < take && r.read_line(&mut line)? > 0 {
            let tok = line.trim();
            if !tok.is_empty() {
                if i >= skip {
                    t.text.push_str(tok);
                    t.ends.push(u32::try_from(t.text.len()).context("tokens too long")?);
                }
                i += 1;
            }
            line.clear();
        }
        if t.ends.len() < take {
            bail!("not enough tokens for the worker at offset {skip}: {} of {take}", t.ends.len());
        }
        Ok(t)
    }

    fn get(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.text[start..self.ends[i] as usize]
    }
}

/// This process's VmRSS and RssAnon in KiB.
fn own_memory() -> (Option<u64>, Option<u64>) {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return (None, None) };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    };
    (field("VmRSS:"), field("RssAnon:"))
}

/// Raises this process's open-file soft limit to its hard limit (best effort).
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

/// Where a connection attempt stands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Status {
    /// Connecting, upgrading or waiting for `auth.ok`.
    Pending,
    Held,
    Gone,
}

/// The bench's state of one client connection id (ids are reused; `attempt` tells apart the
/// entries of the deadline queue and the wheel that belong to an earlier connection).
#[derive(Clone, Copy)]
struct Slot {
    /// The attempt's index in this worker (= its token's index).
    attempt: u32,
    status: Status,
    /// When the attempt started, in ns since the worker's epoch.
    start_ns: u64,
}

/// A timer wheel of `(connection id, attempt)` entries: one bucket per `gran`, enough buckets
/// for one ping period, so every entry in a bucket is due when the bucket's time comes.
struct Wheel {
    slots: Vec<Vec<(u32, u32)>>,
    epoch: Instant,
    gran_ns: u64,
    /// The next tick to process.
    cursor: u64,
}

impl Wheel {
    fn new(epoch: Instant, period: Duration) -> Self {
        let gran = Duration::from_millis(10).max(period / 4096);
        let n = (period.as_nanos() / gran.as_nanos()) as usize + 3;
        Wheel { slots: (0..n).map(|_| Vec::new()).collect(), epoch, gran_ns: gran.as_nanos() as u64, cursor: 0 }
    }

    fn tick(&self, at: Instant) -> u64 {
        (at.saturating_duration_since(self.epoch).as_nanos() as u64) / self.gran_ns
    }

    /// The time of tick `t`.
    fn at(&self, t: u64) -> Instant {
        self.epoch + Duration::from_nanos(t * self.gran_ns)
    }

    /// Schedules `e` at `at` (at the next tick if `at` is past; at most one revolution ahead).
    fn insert(&mut self, at: Instant, e: (u32, u32)) {
        let n = self.slots.len() as u64;
        let t = self.tick(at).clamp(self.cursor, self.cursor + n - 1);
        self.slots[(t % n) as usize].push(e);
    }

    /// The entries of the next tick due by `now`, with that tick's time.
    fn due(&mut self, now: Instant) -> Option<(Instant, Vec<(u32, u32)>)> {
        if self.cursor > self.tick(now) {
            return None;
        }
        let t = self.cursor;
        self.cursor += 1;
        let n = self.slots.len() as u64;
        Some((self.at(t), std::mem::take(&mut self.slots[(t % n) as usize])))
    }

    /// Gives back the vector of the tick just processed (keeps its capacity for the next round).
    fn recycle(&mut self, mut v: Vec<(u32, u32)>) {
        let n = self.slots.len() as u64;
        let slot = &mut self.slots[((self.cursor + n - 1) % n) as usize];
        if slot.is_empty() {
            v.clear();
            *slot = v;
        }
    }
}

/// The handler of one worker's connections.
struct ConnH {
    slots: Vec<Slot>,
    /// Until the end of the ramp.
    tokens: Option<Tokens>,
    epoch: Instant,
    ramp_over: bool,
    ping_every: Duration,
    /// Index of this worker's first connection overall (spreads the ping phases).
    offset: usize,
    wheel: Wheel,
    /// Attempts not resolved yet.
    pending: u64,
    dropped: u64,
    r: WorkerResult,
}

impl ConnH {
    fn started(&mut self, id: usize, attempt: usize, now: Instant) {
        if id >= self.slots.len() {
            self.slots.resize(id + 1, Slot { attempt: 0, status: Status::Gone, start_ns: 0 });
        }
        let start_ns = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        self.slots[id] = Slot { attempt: attempt as u32, status: Status::Pending, start_ns };
        self.pending += 1;
        self.r.attempted += 1;
    }

    /// An attempt failed (`id` is `None` if it never got one).
    fn fail(&mut self, id: Option<usize>, kind: &str) {
        if let Some(id) = id {
            self.slots[id].status = Status::Gone;
            self.pending -= 1;
        }
        self.r.failed += 1;
        session::bump(&mut self.r.failure_kinds, &kind.chars().take(80).collect::<String>());
    }

    /// A held connection was lost.
    fn lost(&mut self, id: usize, kind: &str) {
        self.slots[id].status = Status::Gone;
        self.dropped += 1;
        if self.ramp_over {
            self.r.dropped_during_hold += 1;
        } else {
            self.r.dropped_during_ramp += 1;
        }
        session::bump(&mut self.r.drop_kinds, &kind.chars().take(80).collect::<String>());
    }

    /// Offset of connection `attempt`'s first ping into the period (golden-ratio spread).
    fn phase(&self, attempt: u32) -> Duration {
        self.ping_every.mul_f64(((self.offset + attempt as usize) as f64 * 0.618_033_988_7).fract())
    }
}

impl Handler for ConnH {
    fn opened(&mut self, cx: &mut Ctx) {
        let Some(slot) = self.slots.get(cx.id) else { return };
        if slot.status != Status::Pending {
            return;
        }
        let Some(tokens) = &self.tokens else { return };
        let token = tokens.get(slot.attempt as usize);
        let quoted = serde_json::to_string(token).unwrap_or_default();
        cx.send_text(format!(r#"{{"op":"auth","rid":1,"token":{quoted}}}"#).as_bytes());
    }

    fn frame(&mut self, cx: &mut Ctx, _opcode: u8, payload: &[u8]) {
        let Some(&slot) = self.slots.get(cx.id) else { return };
        let op = scan::op(payload);
        match slot.status {
            Status::Pending => match op {
                Some(b"auth.ok") if scan::u64_field(payload, "rid") == Some(1) => {
                    self.slots[cx.id].status = Status::Held;
                    self.pending -= 1;
                    self.r.connected += 1;
                    let now_ns = cx.now.saturating_duration_since(self.epoch).as_nanos() as u64;
                    self.r.latency.record(now_ns.saturating_sub(slot.start_ns));
                    let first = cx.now + self.phase(slot.attempt);
                    self.wheel.insert(first, (cx.id as u32, slot.attempt));
                }
                Some(b"error") => {
                    let code = String::from_utf8_lossy(scan::str_field(payload, "code").unwrap_or(b"?")).into_owned();
                    self.fail(Some(cx.id), &format!("auth error {code}"));
                    cx.close();
                }
                _ => {}
            },
            Status::Held => match op {
                Some(b"ping.ok") => self.r.pongs += 1,
                Some(kind @ (b"kick" | b"drain")) => {
                    let kind = format!("server sent {}", String::from_utf8_lossy(kind));
                    self.lost(cx.id, &kind);
                    cx.close();
                }
                Some(b"error") => {
                    let code = String::from_utf8_lossy(scan::str_field(payload, "code").unwrap_or(b"?")).into_owned();
                    self.lost(cx.id, &format!("error {code}"));
                    cx.close();
                }
                _ => {}
            },
            Status::Gone => {}
        }
    }

    fn closed(&mut self, id: usize, why: &str) {
        match self.slots.get(id).map(|s| s.status) {
            Some(Status::Pending) => self.fail(Some(id), why),
            Some(Status::Held) => self.lost(id, why),
            _ => {}
        }
    }
}

/// One event loop: opens `n` connections with tokens `offset..offset + n` at `args.rate`
/// attempts/s, holds them `args.hold` seconds with pings, closes them, returns the result.
/// `say` gets a progress event a second and `Ramped`.
fn worker(
    args: &Args,
    target: &Target,
    offset: usize,
    n: usize,
    say: &mut dyn FnMut(Event),
) -> anyhow::Result<WorkerResult> {
    let (rss_start, anon_start) = own_memory();
    raise_fd_limit();
    let tokens = Tokens::read(&args.tokens, offset, n)?;
    let mut client = session::new_client(target)?;
    client.set_lean(true);
    client.reserve(n);
    let epoch = Instant::now();
    let ping_every = Duration::from_secs(args.ping_secs.max(1));
    let timeout = Duration::from_secs(args.connect_timeout);
    let rate = args.rate;
    let mut h = ConnH {
        slots: Vec::with_capacity(n),
        tokens: Some(tokens),
        epoch,
        ramp_over: false,
        ping_every,
        offset,
        wheel: Wheel::new(epoch, ping_every),
        pending: 0,
        dropped: 0,
        r: WorkerResult {
            rss_start_kib: rss_start,
            rss_peak_kib: rss_start,
            anon_start_kib: anon_start,
            ..Default::default()
        },
    };
    // Deadlines of the attempts in flight, in start order (so in deadline order).
    let mut deadlines: VecDeque<(Instant, u32, u32)> = VecDeque::new();
    let mut next = 0usize;
    let mut hold_start: Option<Instant> = None;
    let hold = Duration::from_secs(args.hold);
    let mut next_progress = epoch + Duration::from_secs(1);
    let mut rid = 1u64;
    loop {
        let now = Instant::now();
        if hold_start.is_none() {
            // Start the attempts that are due (bounded per turn so the loop keeps serving).
            let mut burst = 0;
            while next < n && burst < 1024 && epoch + Duration::from_secs_f64(next as f64 / rate) <= now {
                let src = (args.common.src_ips > 0).then(|| client::source_ip(offset + next, args.common.src_ips));
                match client.open(src) {
                    Ok(id) => {
                        h.started(id, next, now);
                        deadlines.push_back((now + timeout, id as u32, next as u32));
                    }
                    Err(e) => {
                        h.r.attempted += 1;
                        h.fail(None, &format!("open: {e}"));
                    }
                }
                next += 1;
                burst += 1;
            }
            while let Some(&(at, id, attempt)) = deadlines.front() {
                if at > now {
                    break;
                }
                deadlines.pop_front();
                let slot = h.slots[id as usize];
                if slot.attempt == attempt && slot.status == Status::Pending {
                    h.fail(Some(id as usize), "timeout");
                    client.close(id as usize);
                }
            }
            if next == n && h.pending == 0 {
                h.r.ramp_secs = epoch.elapsed().as_secs_f64();
                h.ramp_over = true;
                h.tokens = None;
                deadlines = VecDeque::new();
                hold_start = Some(Instant::now());
                let rss = own_memory().0;
                say(Event::Progress { connected: h.r.connected, failed: h.r.failed, dropped: h.dropped, rss_kib: rss });
                say(Event::Ramped);
            }
        }
        if let Some(start) = hold_start {
            let end = start + hold;
            // With every connection held: 1 s before the end (or half-way through a short hold).
            if h.r.rss_held_kib.is_none() && now + (hold / 2).min(Duration::from_secs(1)) >= end {
                (h.r.rss_held_kib, h.r.anon_held_kib) = own_memory();
                h.r.rss_peak_kib = h.r.rss_peak_kib.max(h.r.rss_held_kib);
            }
            if now >= end {
                break;
            }
        }
        while let Some((due, ids)) = h.wheel.due(now) {
            for &(id, attempt) in &ids {
                let slot = h.slots[id as usize];
                if slot.attempt != attempt || slot.status != Status::Held {
                    continue;
                }
                rid += 1;
                client.send_text(id as usize, format!(r#"{{"op":"ping","rid":{rid}}}"#).as_bytes());
                h.r.pings_sent += 1;
                h.wheel.insert(due + ping_every, (id, attempt));
            }
            h.wheel.recycle(ids);
        }
        if now >= next_progress {
            next_progress += Duration::from_secs(1);
            let rss = own_memory().0;
            h.r.rss_peak_kib = h.r.rss_peak_kib.max(rss);
            say(Event::Progress { connected: h.r.connected, failed: h.r.failed, dropped: h.dropped, rss_kib: rss });
        }
        // Sleep until the next attempt, wheel tick or progress tick (at most 50 ms).
        let mut wake = now + Duration::from_millis(50);
        if hold_start.is_none() && next < n {
            wake = wake.min(epoch + Duration::from_secs_f64(next as f64 / rate));
        }
        if let Some(&(at, ..)) = deadlines.front() {
            wake = wake.min(at);
        }
        if let Some(start) = hold_start {
            wake = wake.min(start + hold);
        }
        wake = wake.min(h.wheel.at(h.wheel.cursor)).min(next_progress);
        let wait = wake.saturating_duration_since(Instant::now());
        client.poll(Some(wait), &mut h)?;
    }
    let start = hold_start.unwrap_or(epoch);
    h.r.hold_secs = start.elapsed().as_secs_f64();
    h.r.still_open_at_end = h.r.connected - h.dropped;
    client.close_all();
    Ok(h.r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wheel_fires_each_entry_once_per_period_in_order() {
        let epoch = Instant::now();
        let period = Duration::from_secs(1);
        let mut w = Wheel::new(epoch, period);
        for i in 0..100u32 {
            w.insert(epoch + period.mul_f64(i as f64 / 100.0), (i, i));
        }
        let mut fired = Vec::new();
        // Three periods in 5 ms steps, rescheduling each entry one period after its tick.
        let mut t = epoch;
        while t < epoch + period * 3 {
            while let Some((due, v)) = w.due(t) {
                for &e in &v {
                    assert!(due <= t);
                    fired.push((e.0, due));
                    w.insert(due + period, e);
                }
                w.recycle(v);
            }
            t += Duration::from_millis(5);
        }
        assert_eq!(fired.len(), 300, "every entry fires once per period");
        for i in 0..100u32 {
            let times: Vec<Instant> = fired.iter().filter(|f| f.0 == i).map(|f| f.1).collect();
            assert_eq!(times.len(), 3);
            for pair in times.windows(2) {
                let gap = pair[1] - pair[0];
                assert!(gap >= period - Duration::from_millis(10) && gap <= period + Duration::from_millis(10));
            }
        }
    }

    #[test]
    fn wheel_clamps_past_and_far_entries() {
        let epoch = Instant::now();
        let mut w = Wheel::new(epoch, Duration::from_millis(100));
        let now = epoch + Duration::from_millis(500);
        while let Some((_, v)) = w.due(now) {
            w.recycle(v);
        }
        w.insert(epoch, (1, 1)); // in the past: next tick
        w.insert(now + Duration::from_secs(60), (2, 2)); // too far: one revolution ahead
        let (_, v) = w.due(now + Duration::from_millis(10)).unwrap();
        assert_eq!(v, vec![(1, 1)]);
        w.recycle(v);
        let mut seen = Vec::new();
        while let Some((_, v)) = w.due(now + Duration::from_secs(1)) {
            seen.extend_from_slice(&v);
            w.recycle(v);
        }
        assert_eq!(seen, vec![(2, 2)]);
    }

    #[test]
    fn tokens_slice_and_count() {
        let dir = std::env::temp_dir().join(format!("sb-connect-tokens-{}", std::process::id()));
        std::fs::write(&dir, "a.b.c\n\n d.e.f \ng.h.i\nj.k.l\n").unwrap();
        assert_eq!(count_tokens(&dir).unwrap(), 4);
        let t = Tokens::read(&dir, 1, 2).unwrap();
        assert_eq!((t.get(0), t.get(1)), ("d.e.f", "g.h.i"));
        assert!(Tokens::read(&dir, 3, 2).is_err());
        let _ = std::fs::remove_file(&dir);
    }
}
