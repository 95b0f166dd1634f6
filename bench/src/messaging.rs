//! `messaging` mode: `--conns` connections in pairs of distinct users who are friends; each
//! connection sends `--rate` direct messages per second to its peer for `--warmup-secs` +
//! `--secs`, and acks what it receives (one cumulative `ack` per read batch). Reports delivered
//! msgs/s, delivery latency (from the send time carried in each `cmid`), `send.ok` latency,
//! missing deliveries and errors.
//!
//! Setup: the users named in the tokens are registered over HTTP (`POST /v1/auth/register`; an
//! existing user is fine), then the first of each pair sends `friend.request` and the second
//! `friend.accept` (`already_friends` from an earlier run is fine).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde::Serialize;
use serde_json::json;

use crate::client::{CommonArgs, Target};
use crate::deliver::{
    ack_frame, Cpu, Deliveries, DeliveryArgs, DeliveryTotals, Inbox, Outstanding, RunCounts, RunMeter,
};
use crate::rawws::{Client, Ctx, Handler};
use crate::scan;
use crate::session;
use crate::stats::Hist;

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    #[command(flatten)]
    pub common: CommonArgs,
    /// HTTP API base URL (loopback only), for registering the users.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub http_url: String,
    /// Skip the registration (the users exist already).
    #[arg(long)]
    pub no_register: bool,
    /// Tokens, one per line, of distinct users; connection 2i and 2i+1 form a pair.
    #[arg(long)]
    pub tokens: PathBuf,
    /// Connections (even).
    #[arg(long, default_value_t = 200)]
    pub conns: usize,
    /// Messages per second each connection sends to its peer.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Most `send`s awaiting `send.ok` per connection (the gateway queues at most 64 requests
    /// per connection); a due send beyond it is skipped and counted.
    #[arg(long, default_value_t = 32)]
    pub max_outstanding: usize,
    #[command(flatten)]
    pub delivery: DeliveryArgs,
    /// The server's pid: report its CPU seconds over the measured window too.
    #[arg(long)]
    pub server_pid: Option<u32>,
}

#[derive(Serialize, Debug, Clone)]
pub struct Report {
    pub mode: &'static str,
    pub label: String,
    pub url: String,
    pub started_unix: u64,
    pub conns: usize,
    pub pairs: usize,
    pub users_registered_now: usize,
    pub friendships_created_now: usize,
    pub rate_per_conn: f64,
    pub rate_target_total: f64,
    pub warmup_secs: u64,
    pub measured_secs: f64,
    /// `send.ok` replies: over the whole run, and received within the window.
    pub msgs_sent: u64,
    pub send_ok_in_window: u64,
    pub msgs_sent_per_sec: f64,
    /// Due sends skipped because --max-outstanding were awaiting `send.ok`.
    pub sends_skipped: u64,
    pub delivered_per_sec: f64,
    #[serde(flatten)]
    pub totals: DeliveryTotals,
    #[serde(flatten)]
    pub cpu: Cpu,
}

/// Entry point of `messaging`.
pub fn main(args: Args) -> anyhow::Result<()> {
    let report = run(&args)?;
    session::emit(&report, args.common.report.as_deref())
}

/// Runs the benchmark and returns the report.
pub fn run(args: &Args) -> anyhow::Result<Report> {
    let target = Target::parse(&args.common.url)?;
    let http = session::parse_http(&args.http_url)?;
    session::check_bounds(args.conns, args.delivery.secs)?;
    if !args.conns.is_multiple_of(2) {
        bail!("--conns must be even (pairs)");
    }
    if !(args.rate > 0.0 && args.rate <= 10_000.0) {
        bail!("--rate must be in (0, 10000] per connection");
    }
    if args.max_outstanding == 0 || args.max_outstanding > 64 {
        bail!("--max-outstanding must be 1..=64");
    }
    let tokens = session::read_tokens(&args.tokens)?;
    if tokens.len() < args.conns {
        bail!("{} tokens for {} connections", tokens.len(), args.conns);
    }
    let tokens = &tokens[..args.conns];
    let mut seen = HashSet::new();
    for t in tokens {
        if !seen.insert(t.user.as_str()) {
            bail!("user {} has two tokens: messaging needs one connection per user", t.user);
        }
    }
    let started_unix = session::unix_now();
    let users: Vec<String> = tokens.iter().map(|t| t.user.clone()).collect();
    let registered = if args.no_register {
        0
    } else {
        eprintln!("[messaging] registering {} users", users.len());
        session::register_users(http, &users, Duration::from_secs(300))?
    };

    let mut client = session::new_client(&target)?;
    let raw: Vec<&str> = tokens.iter().map(|t| t.raw.as_str()).collect();
    let ids = session::connect_all(&mut client, &raw, args.common.src_ips, 0, Duration::from_secs(120))?;
    eprintln!("[messaging] {} connections authenticated; making friends", ids.len());
    let pairs = args.conns / 2;
    let peer = |i: usize| i ^ 1;

    let requests: Vec<_> = (0..pairs)
        .map(|p| (ids[2 * p], json!({"op": "friend.request", "to": users[2 * p + 1], "note": "bench"})))
        .collect();
    let mut accepts = Vec::new();
    for (p, r) in session::call_all(&mut client, &requests, Duration::from_secs(120))?.into_iter().enumerate() {
        match (r["op"].as_str(), r["code"].as_str()) {
            (Some("friend.request.ok"), _) => {
                accepts.push((ids[2 * p + 1], json!({"op": "friend.accept", "from": users[2 * p]})))
            }
            (Some("error"), Some("already_friends")) => {}
            _ => bail!("friend.request {} -> {}: {r}", users[2 * p], users[2 * p + 1]),
        }
    }
    let mut created = 0;
    for r in session::call_all(&mut client, &accepts, Duration::from_secs(120))? {
        match (r["op"].as_str(), r["code"].as_str()) {
            (Some("friend.accept.ok"), _) => created += 1,
            // No pending request: the request itself made them friends (the other side had
            // asked first in an earlier run).
            (Some("error"), Some("bad_request")) => {}
            _ => bail!("friend.accept: {r}"),
        }
    }
    eprintln!("[messaging] {pairs} pairs are friends ({created} new); sending");

    let run = session::run_id();
    let epoch = Instant::now();
    let start = epoch + Duration::from_millis(50);
    let from = start + Duration::from_secs(args.delivery.warmup_secs);
    let to = from + Duration::from_secs(args.delivery.secs);
    let n_conns = client.len();
    let mut h = MsgH {
        conns: (0..n_conns)
            .map(|id| {
                let i = id - ids[0];
                let (me, other) = (&users[i], &users[peer(i)]);
                let conv = if me <= other { format!("d:{me}:{other}") } else { format!("d:{other}:{me}") };
                Side { conv, inbox: Inbox::default(), ok: Inbox::default(), outstanding: Outstanding::default() }
            })
            .collect(),
        first: ids[0],
        d: Deliveries::new(run, epoch, from, to),
        sent_ok: 0,
        sent_ok_in_window: 0,
        send_errors: 0,
        send_ok_latency: Hist::default(),
        dropped: 0,
    };
    h.d.ack_interval = Duration::from_millis(args.delivery.ack_interval_ms);
    h.d.quiet_acks = args.delivery.quiet_acks;
    let mut last_sweep = Instant::now();
    let period = Duration::from_secs_f64(1.0 / args.rate);
    // Each connection's next send, phases spread evenly over one period.
    let mut due: BinaryHeap<Reverse<(Instant, usize)>> =
        (0..args.conns).map(|i| Reverse((start + period.mul_f64(i as f64 / args.conns as f64), i))).collect();
    let mut next_n = vec![0u64; args.conns];
    let mut rid = 0u64;
    let mut skipped = 0u64;
    let mut cpu = None;
    let mut last_print = Instant::now();
    loop {
        let now = Instant::now();
        if now >= to {
            break;
        }
        if cpu.is_none() && now >= from {
            cpu = Some(RunMeter::start(args.server_pid));
        }
        while let Some(&Reverse((at, i))) = due.peek() {
            if at > now {
                break;
            }
            due.pop();
            due.push(Reverse((at + period, i)));
            let id = ids[i];
            if client.state(id).is_none() {
                continue;
            }
            let side = &mut h.conns[id - h.first];
            if side.outstanding.len() >= args.max_outstanding {
                skipped += 1;
                continue;
            }
            rid += 1;
            let n = next_n[i];
            next_n[i] += 1;
            let cmid = scan::cmid(run, n, h.d.ns(now));
            let to_user = &users[peer(i)];
            let body = args.delivery.body(i, n);
            let frame = format!(
                r#"{{"op":"send","rid":{rid},"to":"{to_user}","cmid":"{cmid}","type":"text","body":"{body}"}}"#
            );
            client.send_text(id, frame.as_bytes());
            side.outstanding.push(rid, n, now);
        }
        let wait = due.peek().map(|Reverse((at, _))| at.saturating_duration_since(now)).unwrap_or_default();
        client.poll(Some(wait.clamp(Duration::from_micros(100), Duration::from_millis(20)).min(to - now)), &mut h)?;
        if !h.d.ack_interval.is_zero() && last_sweep.elapsed() >= Duration::from_millis(10) {
            last_sweep = Instant::now();
            h.sweep_acks(&mut client);
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            eprintln!(
                "[messaging {:>3}s] sent {} ok {} delivered {} dup {} skipped {skipped} errors {} dropped {}",
                start.elapsed().as_secs(),
                next_n.iter().sum::<u64>(),
                h.sent_ok,
                h.d.unique,
                h.d.duplicates,
                h.d.errors,
                h.dropped
            );
        }
    }
    let secs = (to - from).as_secs_f64();
    let cpu = cpu.map_or_else(Cpu::default, |m: RunMeter| m.finish(secs));
    let drain_start = Instant::now();
    let drain_until = drain_start + Duration::from_secs(args.delivery.drain_secs);
    while Instant::now() < drain_until && !client.is_empty() {
        if h.conns.iter().all(|s| s.outstanding.is_empty()) && h.d.unique >= h.sent_ok {
            break;
        }
        client.poll(Some(Duration::from_millis(20)), &mut h)?;
        h.sweep_acks(&mut client);
    }
    let drain_secs = drain_start.elapsed().as_secs_f64();
    client.close_all();

    // Each connection should have every message its peer got send.ok for.
    let received_ok: u64 = (0..args.conns).map(|i| h.conns[i].inbox.count_of(&h.conns[peer(i)].ok)).sum();
    Ok(Report {
        mode: "messaging",
        label: args.common.label.clone(),
        url: args.common.url.clone(),
        started_unix,
        conns: args.conns,
        pairs,
        users_registered_now: registered,
        friendships_created_now: created,
        rate_per_conn: args.rate,
        rate_target_total: args.rate * args.conns as f64,
        warmup_secs: args.delivery.warmup_secs,
        measured_secs: secs,
        msgs_sent: h.sent_ok,
        send_ok_in_window: h.sent_ok_in_window,
        msgs_sent_per_sec: h.sent_ok_in_window as f64 / secs,
        sends_skipped: skipped,
        delivered_per_sec: h.d.in_window as f64 / secs,
        totals: h.d.totals(RunCounts {
            expected: h.sent_ok,
            received_ok,
            send_ok_latency: &h.send_ok_latency,
            send_errors: h.send_errors,
            dropped: h.dropped,
            drain_secs,
        }),
        cpu,
    })
}

/// One connection's two roles.
struct Side {
    conv: String,
    /// Messages received from the peer.
    inbox: Inbox,
    /// Own messages answered `send.ok`.
    ok: Inbox,
    outstanding: Outstanding,
}

struct MsgH {
    conns: Vec<Side>,
    first: usize,
    d: Deliveries,
    sent_ok: u64,
    sent_ok_in_window: u64,
    send_errors: u64,
    send_ok_latency: Hist,
    dropped: u64,
}

impl MsgH {
    /// Sends the acks that `--ack-interval-ms` held back and are now due.
    fn sweep_acks(&mut self, client: &mut Client) {
        let now = Instant::now();
        for (i, side) in self.conns.iter_mut().enumerate() {
            if let Some(seq) = self.d.due_ack(&mut side.inbox, now) {
                client.send_text(self.first + i, &ack_frame(&side.conv, seq, self.d.quiet_acks));
            }
        }
    }
}

impl Handler for MsgH {
    fn frame(&mut self, cx: &mut Ctx, _opcode: u8, payload: &[u8]) {
        let side = &mut self.conns[cx.id - self.first];
        match scan::op(payload) {
            Some(b"msg") => {
                self.d.on_msg(&mut side.inbox, payload, cx.now);
            }
            Some(b"send.ok") => {
                let Some((n, at)) = scan::u64_field(payload, "rid").and_then(|r| side.outstanding.take(r)) else {
                    self.d.on_error(br#"{"code":"unexpected send.ok"}"#);
                    return;
                };
                side.ok.mark(n);
                self.sent_ok += 1;
                if cx.now >= self.d.from && cx.now < self.d.to {
                    self.sent_ok_in_window += 1;
                }
                if at >= self.d.from && at < self.d.to {
                    self.send_ok_latency.record(cx.now.saturating_duration_since(at).as_nanos() as u64);
                }
            }
            Some(b"error") => {
                if let Some(r) = scan::u64_field(payload, "rid") {
                    if side.outstanding.take(r).is_some() {
                        self.send_errors += 1;
                    }
                }
                self.d.on_error(payload);
            }
            _ => {}
        }
    }

    fn read_done(&mut self, cx: &mut Ctx) {
        let side = &mut self.conns[cx.id - self.first];
        self.d.ack(cx, &mut side.inbox, &side.conv);
    }

    fn closed(&mut self, id: usize, why: &str) {
        self.dropped += 1;
        self.conns[id - self.first].outstanding.clear();
        session::bump(&mut self.d.error_kinds, &format!("dropped: {}", why.chars().take(60).collect::<String>()));
    }
}
