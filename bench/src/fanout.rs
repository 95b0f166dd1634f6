//! `fanout` mode: one sender and `--members` receiving connections in one group. The sender
//! (first token) creates the group, every member user joins it (once per user: a user's devices
//! all receive the group's pushes), then the sender sends group messages at `--rate` msgs/s (0:
//! as fast as `--inflight` outstanding `send`s allow) for `--warmup-secs` + `--secs`. Receivers
//! count `msg` pushes and ack them (one cumulative `ack` per read batch). Reports deliveries/s,
//! msgs/s, delivery latency (from the send time carried in each `cmid`), `send.ok` latency and
//! missing deliveries: expected = acknowledged sends x members, against first receipts.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
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
    /// Tokens, one per line: the first is the sender, the next `--members` the receivers
    /// (distinct user/device pairs; e.g. 100 users x 10 devices).
    #[arg(long)]
    pub tokens: PathBuf,
    /// Receiving connections.
    #[arg(long, default_value_t = 1000)]
    pub members: usize,
    /// Group messages per second (0: as fast as --inflight allows).
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Most `send`s awaiting `send.ok` (the gateway queues at most 64 requests per connection).
    #[arg(long, default_value_t = 16)]
    pub inflight: usize,
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
    /// Receiving connections, and the distinct users behind them.
    pub member_connections: usize,
    pub member_users: usize,
    pub sender_user: String,
    pub group: String,
    pub rate_target: f64,
    pub inflight: usize,
    pub warmup_secs: u64,
    pub measured_secs: f64,
    /// `send.ok` replies: over the whole run, and received within the window.
    pub msgs_sent: u64,
    pub send_ok_in_window: u64,
    pub msgs_per_sec: f64,
    pub deliveries_per_sec: f64,
    #[serde(flatten)]
    pub totals: DeliveryTotals,
    #[serde(flatten)]
    pub cpu: Cpu,
}

/// Entry point of `fanout`.
pub fn main(args: Args) -> anyhow::Result<()> {
    let report = run(&args)?;
    session::emit(&report, args.common.report.as_deref())
}

/// Runs the benchmark and returns the report.
pub fn run(args: &Args) -> anyhow::Result<Report> {
    let target = Target::parse(&args.common.url)?;
    session::check_bounds(args.members + 1, args.delivery.secs)?;
    if args.inflight == 0 || args.inflight > 64 {
        bail!("--inflight must be 1..=64 (the gateway's request queue)");
    }
    if !(args.rate >= 0.0 && args.rate <= 1e6) {
        bail!("--rate must be 0..=1000000");
    }
    let tokens = session::read_tokens(&args.tokens)?;
    if tokens.len() < args.members + 1 {
        bail!("{} tokens for 1 sender + {} members", tokens.len(), args.members);
    }
    let tokens = &tokens[..args.members + 1];
    session::check_distinct_devices(tokens)?;
    let started_unix = session::unix_now();
    let raw: Vec<&str> = tokens.iter().map(|t| t.raw.as_str()).collect();

    let mut client = session::new_client(&target)?;
    let ids = session::connect_all(&mut client, &raw, args.common.src_ips, 0, Duration::from_secs(120))?;
    let (sender, members) = (ids[0], &ids[1..]);
    eprintln!("[fanout] {} connections authenticated", ids.len());

    let created = session::call_all(
        &mut client,
        &[(sender, json!({"op": "group.create", "name": "bench fanout", "members": []}))],
        Duration::from_secs(30),
    )?;
    let group = created[0]["group"].as_str().with_context(|| format!("group.create failed: {}", created[0]))?;
    let conv = format!("g:{group}");
    // One join per member user: membership is per user and every device gets the pushes.
    let mut users = BTreeSet::new();
    let joins: Vec<_> = members
        .iter()
        .zip(&tokens[1..])
        .filter(|(_, t)| t.user != tokens[0].user && users.insert(t.user.clone()))
        .map(|(&id, _)| (id, json!({"op": "group.join", "group": group})))
        .collect();
    let member_users = tokens[1..].iter().map(|t| t.user.as_str()).collect::<BTreeSet<_>>().len();
    for r in session::call_all(&mut client, &joins, Duration::from_secs(120))? {
        if r["op"] != "group.join.ok" {
            bail!("group.join failed: {r}");
        }
    }
    eprintln!("[fanout] group {group}: {member_users} member users joined; sending");

    let run = session::run_id();
    let epoch = Instant::now();
    let start = epoch + Duration::from_millis(50);
    let from = start + Duration::from_secs(args.delivery.warmup_secs);
    let to = from + Duration::from_secs(args.delivery.secs);
    let mut h = FanH {
        sender,
        inboxes: (0..client.len()).map(|_| Inbox::default()).collect(),
        conv: conv.clone(),
        d: Deliveries::new(run, epoch, from, to),
        outstanding: Outstanding::default(),
        ok: Inbox::default(),
        sent_ok: 0,
        sent_ok_in_window: 0,
        send_errors: 0,
        send_ok_latency: Hist::default(),
        dropped: 0,
    };
    h.d.ack_interval = Duration::from_millis(args.delivery.ack_interval_ms);
    h.d.quiet_acks = args.delivery.quiet_acks;
    let mut last_sweep = Instant::now();
    let mut n = 0u64;
    let mut rid = 0u64;
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
        if now >= start {
            let due = if args.rate > 0.0 { ((now - start).as_secs_f64() * args.rate) as u64 + 1 } else { u64::MAX };
            while n < due && h.outstanding.len() < args.inflight && client.state(sender).is_some() {
                rid += 1;
                let cmid = scan::cmid(run, n, h.d.ns(now));
                let body = args.delivery.body(0, n);
                let frame = format!(
                    r#"{{"op":"send","rid":{rid},"group":"{group}","cmid":"{cmid}","type":"text","body":"{body}"}}"#
                );
                client.send_text(sender, frame.as_bytes());
                h.outstanding.push(rid, n, now);
                n += 1;
            }
        }
        let wait = if args.rate > 0.0 { Duration::from_millis(1) } else { Duration::from_millis(20) };
        client.poll(Some(wait.min(to - now)), &mut h)?;
        if !h.d.ack_interval.is_zero() && last_sweep.elapsed() >= Duration::from_millis(10) {
            last_sweep = Instant::now();
            h.sweep_acks(&mut client);
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            eprintln!(
                "[fanout {:>3}s] sent {} ok {} deliveries {} dup {} errors {} dropped {}",
                start.elapsed().as_secs(),
                n,
                h.sent_ok,
                h.d.unique,
                h.d.duplicates,
                h.d.errors + h.send_errors,
                h.dropped
            );
        }
    }
    let cpu = cpu.map_or_else(Cpu::default, |m: RunMeter| m.finish((to - from).as_secs_f64()));
    // Drain: the remaining send.ok replies, then the deliveries they promise.
    let drain_start = Instant::now();
    let drain_until = drain_start + Duration::from_secs(args.delivery.drain_secs);
    let k = members.len() as u64;
    while Instant::now() < drain_until && !client.is_empty() {
        if h.outstanding.is_empty() && h.d.unique >= h.sent_ok * k {
            break;
        }
        client.poll(Some(Duration::from_millis(20)), &mut h)?;
        h.sweep_acks(&mut client);
    }
    let drain_secs = drain_start.elapsed().as_secs_f64();
    client.close_all();

    let expected = h.sent_ok * k;
    let received_ok: u64 = members.iter().map(|&id| h.inboxes[id].count_of(&h.ok)).sum();
    let secs = (to - from).as_secs_f64();
    Ok(Report {
        mode: "fanout",
        label: args.common.label.clone(),
        url: args.common.url.clone(),
        started_unix,
        member_connections: members.len(),
        member_users,
        sender_user: tokens[0].user.clone(),
        group: group.to_string(),
        rate_target: args.rate,
        inflight: args.inflight,
        warmup_secs: args.delivery.warmup_secs,
        measured_secs: secs,
        msgs_sent: h.sent_ok,
        send_ok_in_window: h.sent_ok_in_window,
        msgs_per_sec: h.sent_ok_in_window as f64 / secs,
        deliveries_per_sec: h.d.in_window as f64 / secs,
        totals: h.d.totals(RunCounts {
            expected,
            received_ok,
            send_ok_latency: &h.send_ok_latency,
            send_errors: h.send_errors,
            dropped: h.dropped,
            drain_secs,
        }),
        cpu,
    })
}

struct FanH {
    sender: usize,
    inboxes: Vec<Inbox>,
    conv: String,
    d: Deliveries,
    outstanding: Outstanding,
    /// Message numbers answered `send.ok`.
    ok: Inbox,
    sent_ok: u64,
    sent_ok_in_window: u64,
    send_errors: u64,
    send_ok_latency: Hist,
    dropped: u64,
}

impl FanH {
    /// Sends the acks that `--ack-interval-ms` held back and are now due.
    fn sweep_acks(&mut self, client: &mut Client) {
        let now = Instant::now();
        for (id, inbox) in self.inboxes.iter_mut().enumerate() {
            if id != self.sender {
                if let Some(seq) = self.d.due_ack(inbox, now) {
                    client.send_text(id, &ack_frame(&self.conv, seq, self.d.quiet_acks));
                }
            }
        }
    }
}

impl Handler for FanH {
    fn frame(&mut self, cx: &mut Ctx, _opcode: u8, payload: &[u8]) {
        match scan::op(payload) {
            Some(b"msg") => {
                let inbox = &mut self.inboxes[cx.id];
                self.d.on_msg(inbox, payload, cx.now);
            }
            Some(b"send.ok") if cx.id == self.sender => {
                let Some((n, at)) = scan::u64_field(payload, "rid").and_then(|r| self.outstanding.take(r)) else {
                    self.d.on_error(br#"{"code":"unexpected send.ok"}"#);
                    return;
                };
                self.ok.mark(n);
                self.sent_ok += 1;
                if cx.now >= self.d.from && cx.now < self.d.to {
                    self.sent_ok_in_window += 1;
                }
                if at >= self.d.from && at < self.d.to {
                    self.send_ok_latency.record(cx.now.saturating_duration_since(at).as_nanos() as u64);
                }
            }
            Some(b"error") => {
                if cx.id == self.sender {
                    if let Some(r) = scan::u64_field(payload, "rid") {
                        if self.outstanding.take(r).is_some() {
                            self.send_errors += 1;
                        }
                    }
                }
                self.d.on_error(payload);
            }
            _ => {}
        }
    }

    fn read_done(&mut self, cx: &mut Ctx) {
        if cx.id != self.sender {
            let inbox = &mut self.inboxes[cx.id];
            self.d.ack(cx, inbox, &self.conv);
        }
    }

    fn closed(&mut self, id: usize, why: &str) {
        self.dropped += 1;
        if id == self.sender {
            self.outstanding.clear();
        }
        session::bump(&mut self.d.error_kinds, &format!("dropped: {}", why.chars().take(60).collect::<String>()));
    }
}
