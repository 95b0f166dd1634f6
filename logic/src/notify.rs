//! Offline notifications: when a user's devices leave a conversation's new messages unacked and
//! unread for `delay`, one notification for that conversation goes to a webhook (the place to
//! plug in APNs, FCM or Web Push senders).
//!
//! Every content message stored by this instance opens (or joins) a pending entry per recipient
//! and conversation; the entry is due `delay` after its first message, so a burst collapses into
//! one notification. An ack or read mark that covers the entry's last message drops it. When it
//! comes due, what the user has seen is read again (acks of every device in the store, the read
//! mark, acks this instance took since), so an ack taken by another logic instance counts too.
//! The webhook gets a JSON body signed with HMAC-SHA256 (`X-Switchboard-Signature: sha256=<hex>`
//! over the body), is retried with doubling pauses, and what still fails is appended to a
//! dead-letter file (JSON lines) and counted. Pending entries live in memory, bounded in bytes:
//! a process that dies loses its due notifications (never a message).

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use switchboard_storage::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Logic;

/// Where and how notifications are sent.
#[derive(Debug, Clone)]
pub struct NotifyConfig {
    /// `http://host:port/path` of the webhook.
    pub url: String,
    /// Key of the body's HMAC-SHA256 signature.
    pub secret: Vec<u8>,
    /// How long messages may stay unseen before their conversation is notified.
    pub delay: Duration,
    /// Attempts per notification, the first included.
    pub attempts: u32,
    /// Pause before the first retry (doubling, at most a minute).
    pub backoff: Duration,
    /// Bytes of pending entries kept at most; more are dropped and counted.
    pub max_pending_bytes: usize,
    /// Where notifications that exhausted their attempts are appended (JSON lines).
    pub dead_letter: Option<PathBuf>,
}

impl NotifyConfig {
    /// Default of [`NotifyConfig::delay`].
    pub const DEFAULT_DELAY: Duration = Duration::from_secs(30);
    /// Default of [`NotifyConfig::attempts`].
    pub const DEFAULT_ATTEMPTS: u32 = 5;
    /// Default of [`NotifyConfig::backoff`].
    pub const DEFAULT_BACKOFF: Duration = Duration::from_secs(1);
    /// Default of [`NotifyConfig::max_pending_bytes`].
    pub const DEFAULT_MAX_PENDING_BYTES: usize = 16 << 20;
}

/// Answers the webhook waits for at most, per attempt.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Notifications being sent at once; more wait.
const SENDING: usize = 16;
/// How often due entries are looked for.
const TICK: Duration = Duration::from_millis(100);
/// Characters of a text message shown in the notification.
const PREVIEW_CHARS: usize = 100;

struct Entry {
    last_seq: u64,
    count: u64,
    /// Highest seq the user is known to have seen (acks and reads this instance took).
    seen: u64,
    last: Value,
    due: Instant,
    bytes: usize,
}

/// Bytes a queue item of this key is counted for.
fn queued_bytes(key: &(String, String)) -> usize {
    key.0.len() + key.1.len() + 64
}

#[derive(Default)]
struct Pending {
    entries: HashMap<(String, String), Entry>,
    /// Entries in the order they come due (all share one delay); a key whose entry is gone
    /// or was renewed is skipped.
    queue: VecDeque<(Instant, (String, String))>,
    /// Bytes of the entries and of the queue's items (an item stays until it comes due, even
    /// when its entry was dropped before).
    bytes: usize,
}

#[derive(Default)]
struct Stats {
    sent: AtomicU64,
    failed: AtomicU64,
    dead: AtomicU64,
    seen: AtomicU64,
    dropped: AtomicU64,
    /// Left to another logic instance that notified the same conversation in the window.
    shared: AtomicU64,
    /// Not sent: the user muted the conversation.
    muted: AtomicU64,
}

/// The notifier of one logic instance (inactive without a webhook).
pub struct Notifier {
    config: Option<NotifyConfig>,
    pending: Mutex<Pending>,
    stats: Stats,
    /// Notifications being settled or sent; an entry stays pending (and counted) until one is free.
    sending: Arc<tokio::sync::Semaphore>,
}

/// The webhook's address, split.
struct Target {
    host: String,
    port: u16,
    path: String,
}

fn parse_url(url: &str) -> Option<Target> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = rest.split_once('/').map_or((rest, "/".to_owned()), |(a, p)| (a, format!("/{p}")));
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h.to_owned(), p.parse().ok()?),
        None => (authority.to_owned(), 80),
    };
    (!host.is_empty()).then_some(Target { host, port, path })
}

/// Checks a webhook URL (only `http://`; put a relay in front of an `https://` endpoint).
pub fn valid_url(url: &str) -> bool {
    parse_url(url).is_some()
}

/// A message as the notification shows it: who, what, and the start of a text.
fn preview(m: &Message) -> Value {
    let text = match (&m.body, m.kind.as_str()) {
        (Value::String(s), "text") => s.chars().take(PREVIEW_CHARS).collect(),
        (b, kind) => {
            let name: String =
                b.get("name").and_then(Value::as_str).unwrap_or_default().chars().take(PREVIEW_CHARS).collect();
            format!("[{kind}] {name}")
        }
    };
    json!({"mid": m.mid, "seq": m.seq, "from": m.from, "type": m.kind, "text": text, "ts": m.ts})
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `sha256=<hex>` of `body` under `secret`: what a receiver recomputes to trust a notification.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex(&mac.finalize().into_bytes()))
}

impl Notifier {
    pub fn new(config: Option<NotifyConfig>) -> Self {
        Self {
            config,
            pending: Mutex::default(),
            stats: Stats::default(),
            sending: Arc::new(tokio::sync::Semaphore::new(SENDING)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A content message was stored: every recipient but its sender may need telling.
    pub fn message(&self, m: &Message, members: &[String]) {
        let Some(config) = &self.config else { return };
        let last = preview(m);
        let last_bytes = last.to_string().len();
        let mut p = self.lock();
        for user in members.iter().filter(|u| **u != m.from) {
            let key = (user.clone(), m.conv.clone());
            let bytes = 2 * (user.len() + m.conv.len()) + last_bytes + 160;
            if let Some(e) = p.entries.get_mut(&key) {
                e.last_seq = e.last_seq.max(m.seq);
                e.count += 1;
                e.last = last.clone();
                let before = std::mem::replace(&mut e.bytes, bytes);
                p.bytes = p.bytes - before + bytes;
                continue;
            }
            if p.bytes + bytes > config.max_pending_bytes {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let due = Instant::now() + config.delay;
            p.bytes += bytes + queued_bytes(&key);
            p.queue.push_back((due, key.clone()));
            p.entries.insert(key, Entry { last_seq: m.seq, count: 1, seen: 0, last: last.clone(), due, bytes });
        }
    }

    /// `user` acked or read `conv` up to `seq` (on any device).
    pub fn seen(&self, user: &str, conv: &str, seq: u64) {
        if self.config.is_none() {
            return;
        }
        let mut p = self.lock();
        let key = (user.to_owned(), conv.to_owned());
        let Some(e) = p.entries.get_mut(&key) else { return };
        e.seen = e.seen.max(seq);
        if e.seen >= e.last_seq {
            let bytes = e.bytes;
            p.entries.remove(&key);
            p.bytes -= bytes;
            self.stats.seen.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A message was recalled: a pending notification that would show it shows the recall.
    pub fn recalled(&self, conv: &str, mid: &str) {
        if self.config.is_none() {
            return;
        }
        let mut p = self.lock();
        for ((_, c), e) in p.entries.iter_mut() {
            if c == conv && e.last["mid"] == mid {
                e.last["type"] = "recalled".into();
                e.last["text"] = "".into();
            }
        }
    }

    /// Entries due now, taken out, at most `max`.
    fn take_due(&self, max: usize) -> Vec<((String, String), Entry)> {
        let now = Instant::now();
        let mut p = self.lock();
        let mut out = Vec::new();
        while out.len() < max && p.queue.front().is_some_and(|(due, _)| *due <= now) {
            let (due, key) = p.queue.pop_front().expect("a front entry");
            p.bytes -= queued_bytes(&key);
            if p.entries.get(&key).is_some_and(|e| e.due == due) {
                let e = p.entries.remove(&key).expect("an entry just seen");
                p.bytes -= e.bytes;
                out.push((key, e));
            }
        }
        out
    }

    /// Appends the counters in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let rows: [(&str, &str, u64); 8] = [
            (
                "switchboard_notify_sent_total",
                "Notifications the webhook accepted.",
                self.stats.sent.load(Ordering::Relaxed),
            ),
            (
                "switchboard_notify_failed_total",
                "Webhook attempts that failed (retried or dead-lettered).",
                self.stats.failed.load(Ordering::Relaxed),
            ),
            (
                "switchboard_notify_dead_letters_total",
                "Notifications that exhausted their attempts.",
                self.stats.dead.load(Ordering::Relaxed),
            ),
            (
                "switchboard_notify_seen_total",
                "Pending notifications dropped because a device acked or the user read in time.",
                self.stats.seen.load(Ordering::Relaxed),
            ),
            (
                "switchboard_notify_dropped_total",
                "Notifications not kept: the pending bytes were full.",
                self.stats.dropped.load(Ordering::Relaxed),
            ),
            (
                "switchboard_notify_shared_total",
                "Notifications left to another logic instance that sent one for the conversation in the window.",
                self.stats.shared.load(Ordering::Relaxed),
            ),
            (
                "switchboard_notify_muted_total",
                "Notifications not sent: the user muted the conversation.",
                self.stats.muted.load(Ordering::Relaxed),
            ),
            (
                "switchboard_notify_pending",
                "Conversations waiting for their notification delay.",
                self.lock().entries.len() as u64,
            ),
        ];
        for (name, help, v) in rows {
            let kind = if name.ends_with("_total") { "counter" } else { "gauge" };
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        }
    }
}

/// Sends what comes due until `stop` resolves.
pub async fn run(logic: Arc<Logic>, stop: impl std::future::Future<Output = ()>) {
    if logic.notifier.config.is_none() {
        return;
    }
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(TICK) => {}
        }
        // Only as many as can be sent now leave the (bounded) pending entries.
        let free = logic.notifier.sending.available_permits();
        for ((user, conv), e) in logic.notifier.take_due(free) {
            let Ok(slot) = logic.notifier.sending.clone().try_acquire_owned() else { break };
            let logic = logic.clone();
            tokio::spawn(async move {
                settle(&logic, user, conv, e).await;
                drop(slot);
            });
        }
    }
}

/// Reads what the user has seen of the conversation now, and notifies when that is short of the
/// entry's last message.
async fn settle(logic: &Logic, user: String, conv: String, e: Entry) {
    let n = &logic.notifier;
    let stored = async {
        let acked = logic.stores.messages.user_acked(&user, &conv).await?;
        let read = logic.cursors.reads(&user).await.ok().and_then(|r| r.get(&conv).copied()).unwrap_or(0);
        Ok::<u64, switchboard_storage::StorageError>(acked.max(read))
    };
    let seen = match stored.await {
        Ok(s) => s.max(e.seen),
        Err(err) => {
            tracing::warn!(error = %err, "reading what was seen; notifying anyway");
            e.seen
        }
    };
    if seen >= e.last_seq {
        n.stats.seen.fetch_add(1, Ordering::Relaxed);
        return;
    }
    match logic.stores.accounts.mutes(&user).await {
        Ok(mutes) if mutes.get(&conv).is_some_and(|&until| crate::ops::muted(until)) => {
            n.stats.muted.fetch_add(1, Ordering::Relaxed);
            return;
        }
        Ok(_) => {}
        Err(err) => tracing::warn!(error = %err, "reading mutes; notifying anyway"),
    }
    // In a cluster every logic instance may hold an entry for this conversation: the first to
    // claim it notifies, once per delay.
    if let (Some(registry), Some(config)) = (&logic.stores.registry, &n.config) {
        match registry.claim(&format!("notify:{user}:{conv}"), config.delay).await {
            Ok(true) => {}
            Ok(false) => {
                n.stats.shared.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(err) => tracing::warn!(error = %err, "claiming a notification; notifying anyway"),
        }
    }
    let unseen = e.count.min(e.last_seq - seen);
    // The devices to reach, for the webhook to pass on to their push services.
    let devices: Vec<Value> = match logic.stores.accounts.push_tokens(&user).await {
        Ok(tokens) => {
            tokens.into_iter().map(|t| json!({"device": t.device, "platform": t.platform, "token": t.token})).collect()
        }
        Err(err) => {
            tracing::warn!(error = %err, "reading push tokens; notifying without them");
            Vec::new()
        }
    };
    let body = json!({"user": user, "conv": conv, "count": unseen, "last": e.last, "devices": devices,
                      "ts": switchboard_storage::now_ms()});
    deliver(logic, body.to_string()).await;
}

/// Posts one notification, retried; dead-letters it when every attempt failed.
async fn deliver(logic: &Logic, body: String) {
    let n = &logic.notifier;
    let Some(config) = &n.config else { return };
    let mut pause = config.backoff;
    for attempt in 1..=config.attempts.max(1) {
        match post(config, &body).await {
            Ok(()) => {
                n.stats.sent.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(why) => {
                n.stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(attempt, error = %why, "notification webhook failed");
            }
        }
        if attempt < config.attempts {
            tokio::time::sleep(pause).await;
            pause = pause.saturating_mul(2).min(Duration::from_secs(60));
        }
    }
    // Counted once its line is written (or failed to be): whoever sees the count finds the line.
    if let Some(path) = &config.dead_letter {
        let line = format!("{body}\n");
        let written = async {
            let mut f = tokio::fs::OpenOptions::new().create(true).append(true).open(path).await?;
            f.write_all(line.as_bytes()).await?;
            f.sync_data().await
        };
        if let Err(e) = written.await {
            tracing::error!(error = %e, path = %path.display(), "writing a dead-lettered notification");
        }
    }
    n.stats.dead.fetch_add(1, Ordering::Relaxed);
}

/// One HTTP/1.1 POST; `Ok` on a 2xx answer.
async fn post(config: &NotifyConfig, body: &str) -> Result<(), String> {
    let t = parse_url(&config.url).ok_or("bad webhook URL")?;
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect((t.host.as_str(), t.port)).await.map_err(|e| e.to_string())?;
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: {}:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             X-Switchboard-Signature: {}\r\nConnection: close\r\n\r\n",
            t.path,
            t.host,
            t.port,
            body.len(),
            signature(&config.secret, body.as_bytes())
        );
        s.write_all(head.as_bytes()).await.map_err(|e| e.to_string())?;
        s.write_all(body.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut answer = Vec::new();
        let mut buf = [0u8; 512];
        while !answer.contains(&b'\n') {
            let n = s.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
        }
        let status = String::from_utf8_lossy(&answer);
        match status.split(' ').nth(1).and_then(|c| c.parse::<u16>().ok()) {
            Some(code) if (200..300).contains(&code) => Ok(()),
            Some(code) => Err(format!("answered {code}")),
            None => Err("no HTTP answer".to_owned()),
        }
    };
    tokio::time::timeout(ATTEMPT_TIMEOUT, attempt).await.map_err(|_| "timed out".to_owned())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_split() {
        let t = parse_url("http://127.0.0.1:8080/hooks/sb?x=1").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.path.as_str()), ("127.0.0.1", 8080, "/hooks/sb?x=1"));
        let t = parse_url("http://push.internal").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.path.as_str()), ("push.internal", 80, "/"));
        assert!(parse_url("https://push.example/").is_none());
        assert!(parse_url("http://:80/").is_none());
        assert!(parse_url("http://host:notaport/").is_none());
    }

    #[test]
    fn signatures_are_hmac_sha256() {
        // RFC 4231, test case 2
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn bursts_collapse_and_acks_drop_them() {
        let config = NotifyConfig {
            url: "http://127.0.0.1:9/".into(),
            secret: b"k".to_vec(),
            delay: Duration::ZERO,
            attempts: 1,
            backoff: Duration::ZERO,
            max_pending_bytes: 1 << 20,
            dead_letter: None,
        };
        let n = Notifier::new(Some(config));
        let msg = |seq: u64, conv: &str| Message {
            conv: conv.into(),
            mid: format!("m{seq}"),
            seq,
            from: "ann".into(),
            cmid: format!("c{seq}"),
            kind: "text".into(),
            body: json!("hi"),
            ts: seq,
            reply_to: None,
            mentions: Vec::new(),
        };
        let members = ["ann".to_string(), "bob".to_string()];
        n.message(&msg(1, "d:ann:bob"), &members);
        n.message(&msg(2, "d:ann:bob"), &members);
        n.message(&msg(1, "d:ann:cat"), &["ann".to_string(), "cat".to_string()]);
        n.seen("cat", "d:ann:cat", 1);
        assert!(n.lock().bytes > 0);
        let due = n.take_due(usize::MAX);
        assert_eq!(due.len(), 1, "the sender is never told, a seen conversation is dropped");
        let ((user, conv), e) = &due[0];
        assert_eq!((user.as_str(), conv.as_str(), e.count, e.last_seq), ("bob", "d:ann:bob", 2, 2));
        assert_eq!(n.lock().bytes, 0, "entries and queue items are all accounted for");
    }

    #[test]
    fn the_byte_bound_covers_entries_seen_before_they_came_due() {
        let config = NotifyConfig {
            url: "http://127.0.0.1:9/".into(),
            secret: b"k".to_vec(),
            delay: Duration::from_secs(3600),
            attempts: 1,
            backoff: Duration::ZERO,
            max_pending_bytes: 4096,
            dead_letter: None,
        };
        let n = Notifier::new(Some(config));
        for i in 0..1000u64 {
            let user = format!("u{i}");
            let m = Message {
                conv: format!("d:ann:{user}"),
                mid: format!("m{i}"),
                seq: 1,
                from: "ann".into(),
                cmid: format!("c{i}"),
                kind: "text".into(),
                body: json!("hi"),
                ts: i,
                reply_to: None,
                mentions: Vec::new(),
            };
            n.message(&m, &["ann".to_string(), user.clone()]);
            n.seen(&user, &m.conv, 1);
        }
        assert!(n.lock().bytes <= 4096);
        assert!(n.stats.dropped.load(Ordering::Relaxed) > 900, "the queue's items count until they come due");
    }
}
