//! The message path of the cluster deployment, as a [`MessageStore`]:
//! seq and `cmid` in Redis, durability through the Kafka topic (a send is
//! acknowledged once the broker has the record), reads from the durable
//! store merged with Redis' recent-message cache so an acknowledged message
//! is visible before the persist worker has written it.
//!
//! A send reserves its seq together with the whole message in one Redis
//! step, publishes it, then marks it done (and caches it) in another. An
//! instance that dies between the two leaves a pending reservation: a retry
//! of the same cmid publishes exactly the reserved message and completes it;
//! if nobody does within a timeout, a sweeper claims the seq and publishes a
//! **void** record for it ([`void_message`]), so the conversation never keeps
//! a hole. The persist worker stores the first record of a (conv, seq) in
//! the conversation's partition and skips later ones, so a void never
//! replaces a message the broker had before it; a claim for a void makes
//! the later completion of that reservation fail, so no attempt reports a
//! seq as sent that may end up void. A retry that meets a voided seq
//! reads from the durable store which record won: its message (then it is
//! sent, at that seq) or the void (then it gets a fresh seq).

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::kafka::{Producer, Topics};
use crate::record_batch::{Acked, RecordBatcher};
use crate::redis::{Alloc, CmidRecord, CmidState, CompleteRequest, Completion, RedisStore};
use crate::redis_batch::ScriptBatcher;
use crate::{
    now_ms, Appended, DurableLog, Message, MessageStore, NewMessage, Placed, Result, SequencedRecord, StorageError,
};

/// The `type` of a void record: a seq that will never hold a message.
pub const VOID: &str = "void";

/// How long a retry that meets a voided seq waits for the durable store to
/// show which record of that seq won (then it answers `Busy`). Logic holds
/// the conversation's order lock meanwhile, so this stays short; it only
/// happens to a retry later than the void timeout.
const RESOLVE_WAIT: Duration = Duration::from_secs(3);
/// Rounds of allocation an append goes through before giving up (each
/// round ends in success or in a changed cmid record).
const ROUNDS: usize = 6;
/// Overdue reservations one sweep looks at.
const SWEEP_BATCH: usize = 500;
/// Conversations remembered as needing the durable store's cmid lookup (about 100 bytes each).
const MAX_UNSURE: usize = 100_000;

/// The void record of `seq` in `conv`: `type` "void", empty body and
/// sender, `cmid` "void:<seq>" (unique, so it never collides with a
/// client's cmid in the durable store's cmid index), and the `ts` reserved
/// with the seq (so ts stays monotonic in seq order).
pub fn void_message(conv: &str, seq: u64, ts: u64) -> Message {
    Message {
        conv: conv.to_owned(),
        mid: crate::mid_of(ts, seq),
        seq,
        from: String::new(),
        cmid: format!("void:{seq}"),
        kind: VOID.to_owned(),
        body: serde_json::Value::String(String::new()),
        ts,
        reply_to: None,
        mentions: Vec::new(),
    }
}

/// Where [`ClusterMessages::append_then_crash`] stops, as a logic instance
/// killed with SIGKILL mid-send would.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// The seq is reserved (with the message); nothing was published.
    AfterReserve,
    /// The broker acknowledged the message; Redis still says pending.
    AfterPublish,
}

pub struct ClusterMessages {
    /// Conversations where Redis answered [`Alloc::Unsure`]: their sends look in the durable
    /// store first, without asking again (a conversation never becomes complete again).
    unsure: std::sync::Mutex<std::collections::HashSet<String>>,
    redis: RedisStore,
    /// Reserves and completes seqs, many sends per script call.
    scripts: ScriptBatcher,
    producer: Producer,
    /// Publishes the message topic's records, many sends per record.
    records: RecordBatcher,
    topics: Topics,
    durable: Arc<dyn MessageStore>,
    /// Where the persist worker records how far it stored the topic; with it, a counter is only
    /// seeded once everything the broker holds is stored (see [`ClusterMessages::reseed`]).
    persisted: Option<Arc<dyn DurableLog>>,
}

/// How long seeding a lost counter waits for the persist worker to store the topic's tail.
const SEED_WAIT: Duration = Duration::from_secs(30);

impl ClusterMessages {
    /// Starts the record and script batchers: call on a Tokio runtime.
    pub fn new(redis: RedisStore, producer: Producer, topics: Topics, durable: Arc<dyn MessageStore>) -> Self {
        let records = RecordBatcher::start(producer.clone(), topics.messages.clone());
        let scripts = ScriptBatcher::start(redis.clone());
        Self { unsure: Default::default(), redis, scripts, producer, records, topics, durable, persisted: None }
    }

    /// Seeds lost counters only from a complete store: `log` is the durable store as the
    /// persist worker writes it (with its partition offsets).
    pub fn with_persisted_log(mut self, log: Arc<dyn DurableLog>) -> Self {
        self.persisted = Some(log);
        self
    }

    /// Waits until the persist worker has stored every record the broker held when this was
    /// called (each partition's stored offset reaches its high watermark), so the durable store
    /// then knows every seq and cmid ever acknowledged. Only after Redis lost its data: an
    /// `epoch` key, settled by the first wait after a loss, tells a new conversation's missing
    /// counter from a lost one (Redis must not evict keys: `maxmemory-policy noeviction`). `Busy` when that takes longer than
    /// [`SEED_WAIT`] (the worker is down or far behind): the send is refused, never given a seq
    /// that may be taken.
    async fn wait_persisted(&self) -> Result<()> {
        let Some(log) = &self.persisted else { return Ok(()) };
        // Without a loss since the last wait, a missing counter is a new conversation's: nothing
        // of it can be in the topic, so there is nothing to wait for.
        if self.redis.epoch_settled().await? {
            return Ok(());
        }
        let epoch = self.redis.open_epoch().await?;
        let topic = &self.topics.messages;
        let marks = self.producer.high_watermarks(topic).await?;
        let deadline = Instant::now() + SEED_WAIT;
        loop {
            let stored = log.partition_offsets(topic).await?;
            let behind: Vec<i32> = marks
                .iter()
                .filter(|(p, hw)| *hw > 0 && stored.get(p).copied().unwrap_or(0) < *hw)
                .map(|(p, _)| *p)
                .collect();
            if behind.is_empty() {
                return self.redis.settle_epoch(&epoch).await;
            }
            if Instant::now() >= deadline {
                return Err(StorageError::Busy(format!(
                    "partitions {behind:?} of {topic} are not stored yet; a lost seq counter is seeded only after"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn publish(&self, msg: &Message, members: &[String]) -> Result<()> {
        self.submit(msg, members).await?.await
    }

    /// Hands `msg`'s record to the batcher (in order after every record handed over before);
    /// the answer waits for the broker's acknowledgement.
    async fn submit(&self, msg: &Message, members: &[String]) -> Result<Acked> {
        let record = SequencedRecord { msg: msg.clone(), members: members.to_vec(), recall: false };
        self.records.submit(&msg.conv, serde_json::to_vec(&record)?).await
    }

    /// [`MessageStore::place`]: a new cmid in a conversation whose cmids Redis all holds (the
    /// common case) is reserved and handed to the batcher, the rest waits outside the caller's
    /// lock. Anything else (a retry, a conversation Redis is unsure of, a lost counter) runs the
    /// whole [`MessageStore::append`] here.
    async fn place_new(&self, msg: &NewMessage, members: &[String]) -> Result<Box<dyn Placed>> {
        if !self.is_unsure(&msg.conv) {
            if let Alloc::New(rec) = self.alloc(msg, None, true).await? {
                let m = rec.message().ok_or_else(|| StorageError::Corrupt("reserved without content".into()))?;
                let done = self.redis.complete_request(&m, members)?;
                let acked = self.submit(&m, members).await?;
                let scripts = self.scripts.clone();
                return Ok(Box::new(Publishing { scripts, msg: m, done, acked: Some(acked) }));
            }
        }
        let appended = self.append(msg.clone(), members).await?;
        Ok(Box::new(Settled(appended)))
    }

    async fn publish_void(&self, conv: &str, seq: u64, ts: u64) -> Result<()> {
        self.publish(&void_message(conv, seq, ts), &[]).await
    }

    /// One message by seq, from the cache or the durable store.
    async fn get(&self, conv: &str, seq: u64) -> Result<Option<Message>> {
        let mut cached = None;
        for m in self.redis.cached_range(conv, seq, seq).await? {
            merge_one(&mut cached, m);
        }
        if cached.is_some() {
            return Ok(cached);
        }
        self.durable_at(conv, seq).await
    }

    async fn durable_at(&self, conv: &str, seq: u64) -> Result<Option<Message>> {
        Ok(self.durable.range(conv, seq.saturating_sub(1), 1).await?.into_iter().find(|m| m.seq == seq))
    }

    /// Seeds a missing counter (Redis lost it) from the durable store and the cache, once the
    /// durable store holds everything the broker has (records still in the topic would otherwise
    /// keep seqs the new counter hands out again).
    async fn reseed(&self, conv: &str) -> Result<()> {
        self.wait_persisted().await?;
        let durable = self.durable.history(conv, None, 1).await?.pop();
        let (mut seq, mut ts) = durable.map(|m| (m.seq, m.ts)).unwrap_or((0, 0));
        if let Some(m) = self.redis.cached_range(conv, seq + 1, u64::MAX).await?.pop() {
            (seq, ts) = (m.seq, m.ts);
        }
        tracing::info!(conv, seq, "seeding seq counter");
        self.redis.seed(conv, seq, ts).await
    }

    /// [`RedisStore::alloc`], seeding a missing counter first.
    async fn alloc(&self, msg: &NewMessage, replace: Option<&str>, complete_only: bool) -> Result<Alloc> {
        for _ in 0..3 {
            match self.scripts.alloc(self.redis.alloc_request(msg, replace, complete_only)?).await? {
                Alloc::NoCounter => {
                    self.reseed(&msg.conv).await?;
                    // The store is complete now: a cmid Redis forgot with its counter is there.
                    if let Some(m) = self.durable.find_cmid(&msg.conv, &msg.from, &msg.cmid).await? {
                        self.redis.remember_cmid(&m).await?;
                    }
                }
                known_or_new => return Ok(known_or_new),
            }
        }
        Err(StorageError::redis(format!("could not seed the seq counter of {}", msg.conv)))
    }

    /// The earlier message of `msg`'s cmid in the durable store, remembered in Redis again.
    async fn durable_duplicate(&self, msg: &NewMessage) -> Result<Option<Appended>> {
        let Some(m) = self.durable.find_cmid(&msg.conv, &msg.from, &msg.cmid).await? else { return Ok(None) };
        self.redis.remember_cmid(&m).await?;
        Ok(Some(Appended { msg: m, duplicate: true, json: None }))
    }

    fn is_unsure(&self, conv: &str) -> bool {
        self.unsure.lock().unwrap_or_else(|p| p.into_inner()).contains(conv)
    }

    fn mark_unsure(&self, conv: &str) {
        let mut set = self.unsure.lock().unwrap_or_else(|p| p.into_inner());
        if set.len() >= MAX_UNSURE {
            // Forgetting costs one more `Unsure` answer per conversation, nothing else.
            set.clear();
        }
        set.insert(conv.to_owned());
    }

    /// Publishes a reserved message and completes its reservation; `None`
    /// when the reservation was claimed for a void (or resolved) meanwhile,
    /// so this attempt may not report it as sent.
    async fn deliver(&self, m: Message, members: &[String]) -> Result<Option<Appended>> {
        self.publish(&m, members).await?;
        Ok(match self.scripts.complete(self.redis.complete_request(&m, members)?).await? {
            Completion::Done => Some(Appended { msg: m, duplicate: false, json: None }),
            Completion::Already => Some(Appended { msg: m, duplicate: true, json: None }),
            Completion::Void | Completion::Moved => None,
        })
    }

    /// The message of a pending reservation without content (written by an
    /// earlier version): the one that version stashed, else this retry's
    /// own. `None` when the record changed meanwhile.
    async fn adopt(&self, msg: &NewMessage, rec: &CmidRecord) -> Result<Option<Message>> {
        let stashed = self.redis.legacy_stashed(&msg.conv, rec.seq).await?;
        let own = stashed
            .filter(|m| m.from == msg.from && m.cmid == msg.cmid)
            .unwrap_or_else(|| msg.clone().stored_as(rec.seq, rec.ts));
        let now = self.redis.adopt(rec, &own, now_ms()).await?;
        Ok(now.filter(|r| r.seq == rec.seq && r.state == CmidState::Pending).and_then(|r| r.message()))
    }

    /// A retry met a voided seq: which record of it did the durable store
    /// keep? Its message: sent, at that seq (`Some`). The void: `None`, the
    /// cmid needs a fresh seq.
    async fn resolve_void(&self, msg: &NewMessage, rec: &CmidRecord) -> Result<Option<Appended>> {
        // The sweeper that claimed the seq may have died before publishing
        // the void: publish it (again; only the first record counts).
        self.publish_void(&msg.conv, rec.seq, rec.ts).await?;
        let deadline = Instant::now() + RESOLVE_WAIT;
        loop {
            if let Some(m) = self.durable_at(&msg.conv, rec.seq).await? {
                if m.kind == VOID && m.from.is_empty() {
                    return Ok(None);
                }
                if m.from != msg.from || m.cmid != msg.cmid {
                    return Err(StorageError::Corrupt(format!("{}#{} holds another cmid", msg.conv, rec.seq)));
                }
                let first = self.redis.void_lost(rec, &m).await?;
                return Ok(Some(Appended { msg: m, duplicate: !first, json: None }));
            }
            if Instant::now() >= deadline {
                return Err(StorageError::Busy(format!("{}#{} is being voided", msg.conv, rec.seq)));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Voids every seq reserved more than `after` ago that no attempt has
    /// completed: claims it (from then on no attempt can complete it) and
    /// publishes its void record. Safe to run on every logic instance at
    /// once. Returns how many voids this call published.
    pub async fn sweep(&self, after: Duration) -> Result<usize> {
        let now = now_ms();
        let cutoff = now.saturating_sub(after.as_millis() as u64);
        let mut voided = 0;
        for key in self.redis.overdue(cutoff, SWEEP_BATCH).await? {
            let Some(rec) = self.redis.claim_void(&key, cutoff, now).await? else { continue };
            let Some(conv) = rec.conv() else { continue };
            tracing::warn!(conv, seq = rec.seq, "voiding a seq that no send completed");
            self.publish_void(conv, rec.seq, rec.ts).await?;
            self.redis.void_published(&key, &rec).await?;
            voided += 1;
        }
        Ok(voided)
    }

    /// Runs [`ClusterMessages::sweep`] every quarter of `after` (between
    /// 100 ms and 5 s) until `stop` resolves.
    pub async fn run_sweeper(&self, after: Duration, stop: impl Future<Output = ()>) {
        let period = (after / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(period) => {}
            }
            if let Err(e) = self.sweep(after).await {
                tracing::warn!(error = %e, "voiding overdue seqs failed");
            }
        }
    }

    /// Test support: goes through a send of a new cmid as far as `at`, then
    /// stops as a process killed there would. Returns the reserved message.
    #[doc(hidden)]
    pub async fn append_then_crash(&self, msg: NewMessage, members: &[String], at: CrashPoint) -> Result<Message> {
        let Alloc::New(rec) = self.alloc(&msg, None, false).await? else {
            return Err(StorageError::Corrupt(format!("cmid {} is known already", msg.cmid)));
        };
        let m = rec.message().ok_or_else(|| StorageError::Corrupt("a new reservation without content".into()))?;
        if at == CrashPoint::AfterPublish {
            self.publish(&m, members).await?;
        }
        Ok(m)
    }
}

#[async_trait]
impl MessageStore for ClusterMessages {
    async fn append(&self, msg: NewMessage, members: &[String]) -> Result<Appended> {
        // Redis may have forgotten a cmid (TTL, restart) that the durable store still has. It
        // allocates without the store's word only in a conversation whose every cmid it holds;
        // elsewhere it answers `Unsure` (remembered per conversation) and the store is asked first.
        let mut store_checked = false;
        if self.is_unsure(&msg.conv) {
            if let Some(a) = self.durable_duplicate(&msg).await? {
                return Ok(a);
            }
            store_checked = true;
        }
        // A voided record this append may replace by a fresh reservation.
        let mut replace: Option<String> = None;
        for _ in 0..ROUNDS {
            let rec = match self.alloc(&msg, replace.as_deref(), !store_checked).await? {
                Alloc::Unsure => {
                    self.mark_unsure(&msg.conv);
                    if let Some(a) = self.durable_duplicate(&msg).await? {
                        return Ok(a);
                    }
                    store_checked = true;
                    continue;
                }
                Alloc::New(rec) => {
                    let m = rec.message().ok_or_else(|| StorageError::Corrupt("reserved without content".into()))?;
                    match self.deliver(m, members).await? {
                        Some(a) => return Ok(a),
                        None => continue,
                    }
                }
                Alloc::Known(rec) => rec,
                Alloc::NoCounter => continue,
            };
            match rec.state {
                CmidState::Done => {
                    let Some(m) = self.get(&msg.conv, rec.seq).await? else {
                        return Err(StorageError::Corrupt(format!("cmid of {}#{} has no message", msg.conv, rec.seq)));
                    };
                    return Ok(Appended { msg: m, duplicate: true, json: None });
                }
                CmidState::Pending => {
                    // An earlier attempt reserved the seq but has no broker
                    // ack (yet): publish the same message (the store
                    // dedupes by (conv, seq)).
                    tracing::warn!(conv = msg.conv, seq = rec.seq, "completing a seq an earlier attempt reserved");
                    let m = match rec.message() {
                        Some(m) => Some(m),
                        None => self.adopt(&msg, &rec).await?,
                    };
                    if let Some(m) = m {
                        if let Some(a) = self.deliver(m, members).await? {
                            return Ok(a);
                        }
                    }
                }
                CmidState::Void => match self.resolve_void(&msg, &rec).await? {
                    Some(a) => return Ok(a),
                    None => replace = Some(rec.raw().to_owned()),
                },
            }
        }
        Err(StorageError::Busy(format!("the send of cmid {} in {} did not settle", msg.cmid, msg.conv)))
    }

    async fn place(
        &self,
        msg: NewMessage,
        members: &[String],
    ) -> std::result::Result<Result<Box<dyn Placed>>, NewMessage> {
        Ok(self.place_new(&msg, members).await)
    }

    async fn find_cmid(&self, conv: &str, from: &str, cmid: &str) -> Result<Option<Message>> {
        if let Some(rec) = self.redis.cmid(conv, from, cmid).await?.filter(|r| r.state == CmidState::Done) {
            if let Some(m) = self.get(conv, rec.seq).await? {
                return Ok(Some(m));
            }
        }
        self.durable.find_cmid(conv, from, cmid).await
    }

    async fn range(&self, conv: &str, after_seq: u64, limit: usize) -> Result<Vec<Message>> {
        let mut by_seq: BTreeMap<u64, Message> =
            self.durable.range(conv, after_seq, limit).await?.into_iter().map(|m| (m.seq, m)).collect();
        let hi = after_seq.saturating_add(limit as u64);
        for m in self.redis.cached_range(conv, after_seq + 1, hi).await? {
            merge(&mut by_seq, m);
        }
        Ok(by_seq.into_values().take(limit).collect())
    }

    async fn history(&self, conv: &str, before_seq: Option<u64>, limit: usize) -> Result<Vec<Message>> {
        let mut by_seq: BTreeMap<u64, Message> =
            self.durable.history(conv, before_seq, limit).await?.into_iter().map(|m| (m.seq, m)).collect();
        let top = match before_seq {
            Some(b) => b.saturating_sub(1),
            None => self.last_seq(conv).await?,
        };
        let lo = top.saturating_sub(limit as u64).saturating_add(1);
        if top > 0 {
            for m in self.redis.cached_range(conv, lo, top).await? {
                merge(&mut by_seq, m);
            }
        }
        Ok(by_seq.into_values().rev().take(limit).collect())
    }

    async fn last_seq(&self, conv: &str) -> Result<u64> {
        let durable = self.durable.last_seq(conv).await?;
        Ok(self.redis.counter(conv).await?.unwrap_or(0).max(durable))
    }

    async fn last_messages(&self, convs: &[String]) -> Result<Vec<Option<Message>>> {
        // As `history(conv, None, 1)` for each: the durable last message, or the cached copy
        // at the conversation's top seq (persist may not have written it yet) — three batched
        // reads in all.
        let tops = self.last_seqs(convs).await?;
        let durable = self.durable.last_messages(convs).await?;
        let at: Vec<(&str, u64)> = convs.iter().map(String::as_str).zip(tops).collect();
        let cached = self.redis.cached_at(&at).await?;
        Ok(durable
            .into_iter()
            .zip(cached)
            .map(|(mut slot, copies)| {
                for m in copies {
                    match slot.as_ref().map(|s| s.seq.cmp(&m.seq)) {
                        Some(std::cmp::Ordering::Greater) => {}
                        Some(std::cmp::Ordering::Equal) => merge_one(&mut slot, m),
                        _ => slot = Some(m),
                    }
                }
                slot
            })
            .collect())
    }

    async fn last_seqs(&self, convs: &[String]) -> Result<Vec<u64>> {
        let durable = self.durable.last_seqs(convs).await?;
        let counters = self.redis.counters(convs).await?;
        Ok(durable.into_iter().zip(counters).map(|(d, c)| c.unwrap_or(0).max(d)).collect())
    }

    async fn user_convs(&self, user: &str) -> Result<Vec<(String, u64)>> {
        let mut all: HashMap<String, u64> = self.durable.user_convs(user).await?.into_iter().collect();
        for c in self.redis.convs_of(user).await? {
            all.entry(c).or_insert(0);
        }
        let convs: Vec<String> = all.keys().cloned().collect();
        for (c, counter) in convs.iter().zip(self.redis.counters(&convs).await?) {
            if let (Some(n), Some(v)) = (counter, all.get_mut(c)) {
                *v = (*v).max(n);
            }
        }
        Ok(all.into_iter().collect())
    }

    async fn set_ack(&self, user: &str, device: &str, conv: &str, seq: u64) -> Result<()> {
        self.durable.set_ack(user, device, conv, seq).await
    }

    async fn acks(&self, user: &str, device: &str) -> Result<HashMap<String, u64>> {
        self.durable.acks(user, device).await
    }

    async fn user_acked(&self, user: &str, conv: &str) -> Result<u64> {
        self.durable.user_acked(user, conv).await
    }

    async fn set_read(&self, user: &str, conv: &str, seq: u64) -> Result<u64> {
        self.durable.set_read(user, conv, seq).await
    }

    async fn reads(&self, user: &str) -> Result<HashMap<String, u64>> {
        self.durable.reads(user).await
    }

    async fn set_acks(&self, cursors: &[crate::AckCursor]) -> Result<()> {
        self.durable.set_acks(cursors).await
    }

    async fn set_reads(&self, cursors: &[crate::ReadCursor]) -> Result<()> {
        self.durable.set_reads(cursors).await
    }

    async fn find_mid(&self, conv: &str, mid: &str) -> Result<Option<Message>> {
        if let Some(m) = self.durable.find_mid(conv, mid).await? {
            // the cache may hold a newer form (a recall not yet persisted)
            return Ok(Some(self.get(conv, m.seq).await?.unwrap_or(m)));
        }
        // Not persisted yet: recalls only reach back minutes, so a message
        // the durable store lacks is in the recent cache (or nowhere).
        let mut found = None;
        for m in self.redis.cached_range(conv, 0, u64::MAX).await? {
            if m.mid == mid {
                merge_one(&mut found, m);
            }
        }
        Ok(found)
    }

    /// As the durable store has them: a mention counts once persisted.
    async fn mentions(&self, user: &str) -> Result<HashMap<String, u64>> {
        self.durable.mentions(user).await
    }

    /// As the durable store has them: a message is found once persisted (an edit or a recall
    /// applies then).
    async fn search(&self, q: &crate::search::SearchQuery) -> Result<Vec<crate::search::Found>> {
        self.durable.search(q).await
    }

    async fn recall(&self, conv: &str, seq: u64) -> Result<Option<Message>> {
        let Some(m) = self.get(conv, seq).await? else { return Ok(None) };
        if m.kind == VOID {
            // a void holds no message to recall
            return Ok(None);
        }
        let recalled = crate::recalled_form(m);
        // Keyed by conv like the original, so the persist worker applies it
        // after the original; it stores the recalled form either way.
        let record = SequencedRecord { msg: recalled.clone(), members: Vec::new(), recall: true };
        self.records.send(conv, serde_json::to_vec(&record)?).await?;
        self.redis.replace_cached(&recalled).await?;
        Ok(Some(recalled))
    }
}

/// A reserved message handed to the broker ([`ClusterMessages::place_new`]).
struct Publishing {
    scripts: ScriptBatcher,
    msg: Message,
    /// Its completion, once the broker has it.
    done: CompleteRequest,
    acked: Option<Acked>,
}

#[async_trait]
impl Placed for Publishing {
    async fn durable(&mut self) -> Result<()> {
        match self.acked.take() {
            Some(acked) => acked.await,
            None => Ok(()),
        }
    }

    /// Marks the reservation done and caches the message. A reservation claimed for a void
    /// meanwhile (the send took longer than the void timeout) is not reported as sent: the
    /// answer is `Busy`, and the client's retry of the cmid learns which record won.
    async fn finish(self: Box<Self>) -> Result<Appended> {
        let Publishing { scripts, msg, done, acked } = *self;
        debug_assert!(acked.is_none(), "finished before it was durable");
        match scripts.complete(done).await? {
            Completion::Done => Ok(Appended { msg, duplicate: false, json: None }),
            Completion::Already => Ok(Appended { msg, duplicate: true, json: None }),
            Completion::Void | Completion::Moved => Err(StorageError::Busy(format!(
                "{}#{} was claimed for a void before its send completed; retry the cmid",
                msg.conv, msg.seq
            ))),
        }
    }
}

/// An append that [`ClusterMessages::place_new`] ran to its end.
struct Settled(Appended);

#[async_trait]
impl Placed for Settled {
    async fn durable(&mut self) -> Result<()> {
        Ok(())
    }

    async fn finish(self: Box<Self>) -> Result<Appended> {
        Ok(self.0)
    }
}

/// Whether `m` should replace `current` as the form of one seq: a recalled
/// form always wins (it is final); otherwise the later source (the cache,
/// merged after the durable store) does.
fn newer(current: &Message, m: &Message) -> bool {
    current.kind != RECALLED || m.kind == RECALLED
}

const RECALLED: &str = "recalled";

fn merge_one(slot: &mut Option<Message>, m: Message) {
    match slot {
        Some(current) if !newer(current, &m) => {}
        _ => *slot = Some(m),
    }
}

/// Merges a cached message into messages read from the durable store.
fn merge(by_seq: &mut BTreeMap<u64, Message>, m: Message) {
    match by_seq.entry(m.seq) {
        Entry::Vacant(e) => {
            e.insert(m);
        }
        Entry::Occupied(mut e) => {
            if newer(e.get(), &m) {
                e.insert(m);
            }
        }
    }
}
