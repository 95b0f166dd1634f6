//! The receiving side shared by `fanout` and `messaging`: counting `msg` pushes per connection
//! (first receipt vs. re-push), delivery latency from the send time carried in the `cmid`, and
//! the cumulative `ack` sent once per read batch.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::procfs::{self, CpuMeter};
use crate::rawws::Ctx;
use crate::scan;
use crate::session::Kinds;
use crate::stalls::{StallSummary, Stalls};
use crate::stats::{Hist, Percentiles};

/// The run's timing, acks and body size, shared by `fanout` and `messaging`.
#[derive(clap::Args, Clone, Debug)]
pub struct DeliveryArgs {
    /// Measured seconds.
    #[arg(long, default_value_t = 10)]
    pub secs: u64,
    /// Sending seconds before the measurement.
    #[arg(long, default_value_t = 1)]
    pub warmup_secs: u64,
    /// Most seconds to wait after sending for outstanding replies and deliveries.
    #[arg(long, default_value_t = 10)]
    pub drain_secs: u64,
    /// Least milliseconds between two acks of one connection (0: one cumulative ack per read
    /// batch that brought new messages). Pending acks are sent by a sweep once due.
    #[arg(long, default_value_t = 0)]
    pub ack_interval_ms: u64,
    /// Send acks with `"quiet": true` (the server answers only a refused ack, not `ack.ok`).
    #[arg(long)]
    pub quiet_acks: bool,
    /// Text body length in bytes (at least 1), all `x`: one search term per message.
    #[arg(long, default_value_t = 16)]
    pub body_bytes: usize,
    /// Instead of `--body-bytes`, a body of this many words drawn from a 2,000-word vocabulary,
    /// common words far more often than rare ones (as chat text has them), different for each
    /// message: what the server's search index sees in a real conversation.
    #[arg(long, default_value_t = 0)]
    pub body_words: usize,
}

impl DeliveryArgs {
    /// The text body of message `n` of connection `conn`.
    pub fn body(&self, conn: usize, n: u64) -> String {
        if self.body_words == 0 {
            return "x".repeat(self.body_bytes.max(1));
        }
        let mut x = (conn as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ n.wrapping_mul(0xD1B5_4A32_D192_ED03) | 1;
        let mut out = String::new();
        for i in 0..self.body_words {
            // xorshift64*, then u³ on [0, 1): the commonest word is ~8 % of the text, the 100
            // commonest ~37 %
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let u = (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64;
            if i > 0 {
                out.push(' ');
            }
            word(&mut out, (u * u * u * VOCABULARY as f64) as usize);
        }
        out
    }
}

/// Words of `--body-words`.
const VOCABULARY: usize = 2_000;

/// Appends word `i` of the vocabulary: two or three syllables, distinct for each `i`.
fn word(out: &mut String, i: usize) {
    const SYL: [&str; 24] = [
        "ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "ve", "do", "an", "el", "in", "or", "um", "be", "ga", "fi",
        "zo", "ha", "ju", "qu", "we", "xy",
    ];
    out.push_str(SYL[i % 24]);
    out.push_str(SYL[(i / 24) % 24]);
    if i >= 24 * 24 {
        out.push_str(SYL[(i / 576) % 24]);
    }
}

/// Which message numbers one connection has received, and its ack state for one conversation.
#[derive(Default)]
pub struct Inbox {
    bits: Vec<u64>,
    pub max_seq: u64,
    pub acked_seq: u64,
    last_ack: Option<Instant>,
}

impl Inbox {
    /// Marks message `n`; true when it is new.
    pub fn mark(&mut self, n: u64) -> bool {
        let (w, b) = ((n / 64) as usize, n % 64);
        if self.bits.len() <= w {
            self.bits.resize(w + 1, 0);
        }
        let new = self.bits[w] & (1 << b) == 0;
        self.bits[w] |= 1 << b;
        new
    }

    pub fn has(&self, n: u64) -> bool {
        self.bits.get((n / 64) as usize).is_some_and(|w| w & (1 << (n % 64)) != 0)
    }

    /// Messages of `ok` (a sender's set of acknowledged message numbers) received here.
    pub fn count_of(&self, ok: &Inbox) -> u64 {
        self.bits.iter().zip(&ok.bits).map(|(a, b)| (a & b).count_ones() as u64).sum()
    }

    /// Number of marked messages.
    pub fn len(&self) -> u64 {
        self.bits.iter().map(|w| w.count_ones() as u64).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The report fields `fanout` and `messaging` share, flattened into each report.
#[derive(Serialize, Debug, Clone)]
pub struct DeliveryTotals {
    /// First receipts of `msg` pushes within the window.
    pub deliveries_in_window: u64,
    /// Over the whole run, after the drain.
    pub deliveries_total: u64,
    pub expected_deliveries: u64,
    pub missing_deliveries: u64,
    /// Re-pushes of messages a connection already had (the server re-pushes unacked ones).
    pub duplicate_deliveries: u64,
    pub acks_sent: u64,
    pub ack_interval_ms: u64,
    pub delivery_latency: Percentiles,
    /// When the deliveries slower than 10 ms were sent (100 ms windows).
    pub delivery_stalls: StallSummary,
    pub send_ok_latency: Percentiles,
    pub send_errors: u64,
    /// Error frames of every kind (send errors included).
    pub errors: u64,
    pub error_kinds: Kinds,
    /// Connections lost during the run.
    pub dropped: u64,
    pub drain_secs: f64,
}

/// What a mode adds to [`Deliveries::totals`]: its own counts of the run.
pub struct RunCounts<'a> {
    pub expected: u64,
    /// First receipts of messages whose `send.ok` arrived.
    pub received_ok: u64,
    pub send_ok_latency: &'a Hist,
    pub send_errors: u64,
    pub dropped: u64,
    pub drain_secs: f64,
}

/// The receivers' counters.
pub struct Deliveries {
    run_prefix: Vec<u8>,
    epoch: Instant,
    /// The measured window, as instants.
    pub from: Instant,
    pub to: Instant,
    /// Delivery latency of messages sent within the window (first receipts).
    pub latency: Hist,
    /// The same deliveries by window of send time.
    pub stalls: Stalls,
    /// First receipts, in total and within the window.
    pub unique: u64,
    pub in_window: u64,
    /// Re-pushes of messages already received on that connection.
    pub duplicates: u64,
    /// `msg` pushes of other runs or unparsable ones.
    pub foreign: u64,
    pub acks_sent: u64,
    /// Least time between two acks of one connection (zero: one per read batch).
    pub ack_interval: Duration,
    /// Acks ask for no `ack.ok` (`--quiet-acks`).
    pub quiet_acks: bool,
    pub errors: u64,
    pub error_kinds: Kinds,
}

impl Deliveries {
    pub fn new(run: u32, epoch: Instant, from: Instant, to: Instant) -> Self {
        Self {
            run_prefix: scan::run_prefix(run),
            epoch,
            from,
            to,
            latency: Hist::default(),
            stalls: Stalls::new(from, 10_000_000),
            unique: 0,
            in_window: 0,
            duplicates: 0,
            foreign: 0,
            acks_sent: 0,
            ack_interval: Duration::ZERO,
            quiet_acks: false,
            errors: 0,
            error_kinds: Kinds::new(),
        }
    }

    /// Send time of a message as carried in its `cmid`: ns since `epoch`.
    pub fn ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    /// Handles a `msg` push received at `now` on a connection with inbox `inbox`. Returns the
    /// message number when this is its first receipt here.
    pub fn on_msg(&mut self, inbox: &mut Inbox, payload: &[u8], now: Instant) -> Option<u64> {
        let parsed = scan::str_field(payload, "cmid").and_then(|c| scan::parse_cmid(c, &self.run_prefix));
        let Some((n, sent_ns)) = parsed else {
            self.foreign += 1;
            return None;
        };
        if let Some(seq) = scan::u64_field(payload, "seq") {
            inbox.max_seq = inbox.max_seq.max(seq);
        }
        if !inbox.mark(n) {
            self.duplicates += 1;
            return None;
        }
        self.unique += 1;
        if now >= self.from && now < self.to {
            self.in_window += 1;
        }
        let (from_ns, to_ns) = (self.ns(self.from), self.ns(self.to));
        if sent_ns >= from_ns && sent_ns < to_ns {
            let latency = self.ns(now).saturating_sub(sent_ns);
            self.latency.record(latency);
            self.stalls.record(sent_ns - from_ns, latency);
        }
        Some(n)
    }

    /// Counts an `error` frame.
    pub fn on_error(&mut self, payload: &[u8]) {
        self.errors += 1;
        let code = scan::str_field(payload, "code").unwrap_or(b"?");
        crate::session::bump(&mut self.error_kinds, &String::from_utf8_lossy(code));
    }

    /// The `seq` to ack now on a connection, if any: when its highest `seq` went up and the
    /// last ack is at least `ack_interval` old.
    pub fn due_ack(&mut self, inbox: &mut Inbox, now: Instant) -> Option<u64> {
        if inbox.max_seq <= inbox.acked_seq {
            return None;
        }
        if let Some(last) = inbox.last_ack {
            if now.saturating_duration_since(last) < self.ack_interval {
                return None;
            }
        }
        inbox.acked_seq = inbox.max_seq;
        inbox.last_ack = Some(now);
        self.acks_sent += 1;
        Some(inbox.max_seq)
    }

    /// Sends the cumulative `ack` of `conv` at the end of a read batch, if one is due.
    pub fn ack(&mut self, cx: &mut Ctx, inbox: &mut Inbox, conv: &str) {
        if let Some(seq) = self.due_ack(inbox, cx.now) {
            cx.send_text(&ack_frame(conv, seq, self.quiet_acks));
        }
    }
}

/// The text of an `ack` (without `rid`: its `ack.ok` is not needed; `quiet`: not even sent).
pub fn ack_frame(conv: &str, seq: u64, quiet: bool) -> Vec<u8> {
    let quiet = if quiet { r#","quiet":true"# } else { "" };
    format!(r#"{{"op":"ack","conv":"{conv}","seq":{seq}{quiet}}}"#).into_bytes()
}

/// CPU figures of a run.
#[derive(Serialize, Debug, Clone, Default)]
pub struct Cpu {
    /// CPU seconds the load process used in the measured window, and that over the window
    /// (1.0 = one core busy).
    pub client_cpu_secs: f64,
    pub client_cpu_util: f64,
    pub server_pid: Option<u32>,
    pub server_cpu_secs: Option<f64>,
    pub server_cpu_util: Option<f64>,
    /// CPU seconds the hypervisor took from this machine in the window (all CPUs): a run with
    /// much of it has stalls that no code here causes.
    pub host_steal_secs: Option<f64>,
}

/// Meters a run's measured window: the load process, the server and the host's steal.
pub struct RunMeter {
    own: CpuMeter,
    server: CpuMeter,
    server_pid: Option<u32>,
    steal: Option<f64>,
}

impl RunMeter {
    pub fn start(server_pid: Option<u32>) -> Self {
        Self { own: CpuMeter::own(), server: CpuMeter::server(server_pid), server_pid, steal: procfs::steal_secs() }
    }

    /// The figures over a window of `secs`.
    pub fn finish(&self, secs: f64) -> Cpu {
        let (c, s) = (self.own.elapsed().unwrap_or(0.0), self.server.elapsed());
        Cpu {
            client_cpu_secs: c,
            client_cpu_util: c / secs,
            server_pid: self.server_pid,
            server_cpu_secs: s,
            server_cpu_util: s.map(|s| s / secs),
            host_steal_secs: procfs::steal_secs().zip(self.steal).map(|(b, a)| b - a),
        }
    }
}

/// A send request's reply bookkeeping: the rids in flight on one connection, oldest first
/// (replies come back in request order; an early error may overtake, so lookups search).
#[derive(Default)]
pub struct Outstanding {
    q: std::collections::VecDeque<(u64, u64, Instant)>,
}

impl Outstanding {
    pub fn push(&mut self, rid: u64, n: u64, at: Instant) {
        self.q.push_back((rid, n, at));
    }

    /// Removes `rid`: its message number and send instant.
    pub fn take(&mut self, rid: u64) -> Option<(u64, Instant)> {
        let i = self.q.iter().position(|e| e.0 == rid)?;
        self.q.remove(i).map(|(_, n, at)| (n, at))
    }

    pub fn len(&self) -> usize {
        self.q.len()
    }

    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }

    pub fn clear(&mut self) -> usize {
        let n = self.q.len();
        self.q.clear();
        n
    }
}

impl Deliveries {
    /// The shared report fields at the end of a run.
    pub fn totals(&mut self, run: RunCounts<'_>) -> DeliveryTotals {
        DeliveryTotals {
            deliveries_in_window: self.in_window,
            deliveries_total: self.unique,
            expected_deliveries: run.expected,
            missing_deliveries: run.expected.saturating_sub(run.received_ok),
            duplicate_deliveries: self.duplicates,
            acks_sent: self.acks_sent,
            ack_interval_ms: self.ack_interval.as_millis() as u64,
            delivery_latency: self.latency.percentiles(),
            delivery_stalls: self.stalls.summary(),
            send_ok_latency: run.send_ok_latency.percentiles(),
            send_errors: run.send_errors,
            errors: self.errors,
            error_kinds: std::mem::take(&mut self.error_kinds),
            dropped: run.dropped,
            drain_secs: run.drain_secs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct A {
        #[command(flatten)]
        d: DeliveryArgs,
    }

    #[test]
    fn bodies_are_padding_or_skewed_words() {
        let pad = A::parse_from(["a", "--body-bytes", "5"]).d;
        assert_eq!(pad.body(3, 9), "xxxxx");
        let words = A::parse_from(["a", "--body-words", "8"]).d;
        assert_eq!(words.body(2, 40), words.body(2, 40));
        assert_ne!(words.body(2, 40), words.body(2, 41));
        assert_ne!(words.body(2, 40), words.body(3, 40));
        let mut counts = std::collections::HashMap::new();
        for n in 0..500 {
            let text = words.body(n % 7, n as u64);
            assert_eq!(text.split(' ').count(), 8);
            for w in text.split(' ') {
                *counts.entry(w.to_owned()).or_insert(0) += 1;
            }
        }
        // 4,000 words: many distinct ones, the commonest far above the typical
        let mut n: Vec<i32> = counts.into_values().collect();
        n.sort_unstable();
        assert!(n.len() > 300, "{} distinct", n.len());
        assert!(n[n.len() - 1] > 20 * n[n.len() / 2], "top {} median {}", n[n.len() - 1], n[n.len() / 2]);
    }

    #[test]
    fn inbox_counts() {
        let mut a = Inbox::default();
        assert!(a.mark(3));
        assert!(!a.mark(3));
        assert!(a.mark(200));
        let mut ok = Inbox::default();
        ok.mark(3);
        ok.mark(4);
        assert_eq!(a.count_of(&ok), 1);
        assert_eq!(a.len(), 2);
        assert!(a.has(200) && !a.has(4));
    }

    #[test]
    fn first_receipts_and_repushes() {
        let t0 = Instant::now();
        let to = t0 + std::time::Duration::from_secs(10);
        let mut d = Deliveries::new(0x7, t0, t0, to);
        let mut inbox = Inbox::default();
        let push = |n: u64, seq: u64| {
            format!(r#"{{"msg":{{"cmid":"{}","conv":"g:x","seq":{seq}}},"op":"msg"}}"#, scan::cmid(0x7, n, 1000))
        };
        let now = t0 + std::time::Duration::from_millis(1);
        assert_eq!(d.on_msg(&mut inbox, push(0, 1).as_bytes(), now), Some(0));
        assert_eq!(d.on_msg(&mut inbox, push(1, 2).as_bytes(), now), Some(1));
        assert_eq!(d.on_msg(&mut inbox, push(0, 1).as_bytes(), now), None);
        assert_eq!((d.unique, d.duplicates, inbox.max_seq), (2, 1, 2));
        assert_eq!(d.latency.count, 2);
        let other_run = format!(r#"{{"msg":{{"cmid":"{}","seq":9}},"op":"msg"}}"#, scan::cmid(0x8, 0, 0));
        assert_eq!(d.on_msg(&mut inbox, other_run.as_bytes(), now), None);
        assert_eq!(d.foreign, 1);
    }
}
