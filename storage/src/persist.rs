//! The persist worker: reads sequenced records from the message topic and
//! writes them to the durable store in batches with idempotent upserts.
//!
//! There is no consumer group. The worker assigns itself the partitions it
//! owns and keeps how far it got in each of them in the durable store, in
//! the same write as the records ([`DurableLog::upsert_records_at`]); it
//! starts each partition where the store says (from the beginning when the
//! store has nothing), so a worker killed at any point resumes without
//! skipping a record, and a record written twice is absorbed by the upserts.
//!
//! A partition is owned by the worker holding its lock ([`PartitionLocks`];
//! in PostgreSQL a session advisory lock on a connection of the worker's
//! own, which the server releases as soon as that connection closes, also
//! after SIGKILL). Every `claim_every` a worker tries to take the locks of
//! the partitions it does not own and reassigns its consumer: a restarted
//! worker resumes at once, and the partitions of a dead one are taken over
//! within seconds by any other. With one worker, it owns every partition.
//!
//! A record that cannot be decoded goes to the dead-letter topic, and its
//! offset is passed with the next write like any other. Failures of the
//! store, the broker and the lock session are retried with backoff; after
//! `give_up_after` of nothing but failures of one kind, [`PersistWorker::run`]
//! returns the error, for the process to exit non-zero and be restarted.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use rdkafka::{Message as _, Offset, TopicPartitionList};

use crate::kafka::{assigning_consumer, Brokers, Producer, Topics};
use crate::now_ms;
use crate::record_batch::split;
use crate::{DurableLog, LockSession, PartitionLocks, PartitionOffset, Result, SequencedRecord, StorageError};

/// Counters of a persist worker.
#[derive(Debug, Default)]
pub struct PersistStats {
    pub records: AtomicU64,
    pub stored: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub batches: AtomicU64,
    /// Partitions the worker owns (and reads) now.
    pub partitions: AtomicU64,
    /// Failed attempts that were retried (store, broker, locks).
    pub retries: AtomicU64,
    /// Records of the owned partitions not stored yet, as of the last check (every claim round).
    pub lag_records: AtomicU64,
    /// Whether `lag_records` was measured yet (it is not shown before).
    pub lag_known: std::sync::atomic::AtomicBool,
    /// Age of the newest message of the last batch stored, when it was stored (milliseconds).
    pub delay_ms: AtomicU64,
}

impl PersistStats {
    /// Appends the counters in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let rows: [(&str, &str, &str, &AtomicU64); 6] = [
            ("switchboard_persist_records_total", "counter", "Records read from the message topic.", &self.records),
            ("switchboard_persist_stored_total", "counter", "Messages written to the store.", &self.stored),
            (
                "switchboard_persist_dead_lettered_total",
                "counter",
                "Records that could not be stored, sent to the dead-letter topic.",
                &self.dead_lettered,
            ),
            ("switchboard_persist_batches_total", "counter", "Batches written (one transaction each).", &self.batches),
            ("switchboard_persist_partitions", "gauge", "Partitions this worker owns and reads.", &self.partitions),
            ("switchboard_persist_retries_total", "counter", "Failed attempts that were retried.", &self.retries),
        ];
        for (name, kind, help, v) in rows {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}", v.load(Ordering::Relaxed));
        }
        let name = "switchboard_persist_lag_records";
        let _ = writeln!(
            out,
            "# HELP {name} Records of the owned partitions not stored yet (checked every claim round).\n# TYPE {name} gauge"
        );
        if self.lag_known.load(Ordering::Relaxed) {
            let _ = writeln!(out, "{name} {}", self.lag_records.load(Ordering::Relaxed));
        }
        let name = "switchboard_persist_delay_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Age of the newest message of the last batch stored, when it was stored.\n# TYPE {name} gauge\n{name} {}",
            self.delay_ms.load(Ordering::Relaxed) as f64 / 1000.0
        );
    }
}

/// How a persist worker batches, claims and gives up.
#[derive(Debug, Clone)]
pub struct PersistConfig {
    /// Records written per batch at most.
    pub max_batch: usize,
    /// How often the worker tries to take the partitions it does not own.
    pub claim_every: Duration,
    /// How long one kind of failure may go on, retried, before `run` fails.
    pub give_up_after: Duration,
}

impl Default for PersistConfig {
    fn default() -> Self {
        Self { max_batch: 500, claim_every: Duration::from_secs(1), give_up_after: Duration::from_secs(60) }
    }
}

/// How often the partition count is re-read while every known partition is owned.
const METADATA_EVERY: Duration = Duration::from_secs(30);
/// Longest wait for the broker's metadata.
const METADATA_TIMEOUT: Duration = Duration::from_secs(5);
/// First and longest pause between retries.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Failures further apart than this start a new run of failures.
const FAILURES_APART: Duration = Duration::from_secs(30);

pub struct PersistWorker {
    consumer: Arc<StreamConsumer>,
    dead_letter: Producer,
    topics: Topics,
    log: Arc<dyn DurableLog>,
    locks: Arc<dyn PartitionLocks>,
    config: PersistConfig,
    pub stats: Arc<PersistStats>,
}

/// What the worker owns: its lock session and, per owned partition, the
/// offset of the next record to store (`None`: from the beginning).
#[derive(Default)]
struct Ownership {
    session: Option<Box<dyn LockSession>>,
    next: BTreeMap<i32, Option<i64>>,
    /// The topic's partitions, as last read from the broker, and when.
    partitions: Vec<i32>,
    read_at: Option<Instant>,
}

/// A run of failures of one kind: the pause before the next attempt, and
/// the end of patience.
struct Retry {
    what: &'static str,
    give_up_after: Duration,
    first: Option<Instant>,
    last: Option<Instant>,
    pause: Duration,
}

impl Retry {
    fn new(what: &'static str, give_up_after: Duration) -> Self {
        Self { what, give_up_after, first: None, last: None, pause: RETRY_MIN }
    }

    fn succeeded(&mut self) {
        self.first = None;
        self.pause = RETRY_MIN;
    }

    /// Counts a failure: the pause before trying again, or the error once
    /// this kind has failed for longer than `give_up_after`.
    fn failed(&mut self, e: StorageError, stats: &PersistStats) -> Result<Duration> {
        let now = Instant::now();
        if self.last.is_some_and(|l| now.duration_since(l) > FAILURES_APART) {
            self.succeeded();
        }
        self.last = Some(now);
        let first = *self.first.get_or_insert(now);
        if now.duration_since(first) >= self.give_up_after {
            tracing::error!(error = %e, what = self.what, "persist worker gives up");
            return Err(StorageError::GaveUp {
                what: self.what,
                secs: self.give_up_after.as_secs(),
                last: Box::new(e),
            });
        }
        let pause = self.pause;
        self.pause = (self.pause * 2).min(RETRY_MAX);
        stats.retries.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %e, what = self.what, ?pause, "persist worker retries");
        Ok(pause)
    }
}

/// Sleeps for `d`; `true` when `stop` resolved first.
async fn pause<S: Future<Output = ()>>(stop: &mut Pin<&mut S>, d: Duration) -> bool {
    tokio::select! {
        _ = stop.as_mut() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

impl PersistWorker {
    /// A worker reading `topics.messages` from `brokers` into `log`, owning
    /// partitions through `locks`.
    pub fn new(
        brokers: impl Into<Brokers>,
        topics: Topics,
        log: Arc<dyn DurableLog>,
        locks: Arc<dyn PartitionLocks>,
        config: PersistConfig,
    ) -> Result<Self> {
        let brokers = brokers.into();
        Ok(Self {
            consumer: Arc::new(assigning_consumer(&brokers, &format!("{}.persist-assign", topics.messages))?),
            dead_letter: Producer::new(&brokers, Duration::from_secs(10))?,
            topics,
            log,
            locks,
            config: PersistConfig { max_batch: config.max_batch.max(1), ..config },
            stats: Arc::default(),
        })
    }

    /// Runs until `stop` resolves (`Ok`), or until one kind of failure has
    /// lasted `give_up_after` (its error). Nothing is skipped: a record's
    /// offset is stored only with (or after) the record.
    pub async fn run(self, stop: impl Future<Output = ()>) -> Result<()> {
        tokio::pin!(stop);
        let limit = self.config.give_up_after;
        let (mut claims, mut reads, mut writes) =
            (Retry::new("claiming partitions", limit), Retry::new("reading", limit), Retry::new("storing", limit));
        let mut own = Ownership::default();
        let mut claim_at = Instant::now();
        let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
        loop {
            if Instant::now() >= claim_at {
                claim_at = match self.claim(&mut own).await {
                    Ok(()) => {
                        claims.succeeded();
                        Instant::now() + self.config.claim_every
                    }
                    Err(e) => Instant::now() + claims.failed(e, &self.stats)?.min(self.config.claim_every),
                };
                self.stats.partitions.store(own.next.len() as u64, Ordering::Relaxed);
                self.measure_lag(&own, &measuring);
            }
            let first = tokio::select! {
                _ = stop.as_mut() => return Ok(()),
                _ = tokio::time::sleep_until(claim_at.into()) => continue,
                m = self.consumer.recv(), if !own.next.is_empty() => m.map(|m| m.detach()),
            };
            let first = match first {
                Ok(m) => m,
                Err(e @ KafkaError::MessageConsumptionFatal(_)) => return Err(e.into()),
                Err(e) => {
                    let d = reads.failed(e.into(), &self.stats)?;
                    if pause(&mut stop, d).await {
                        return Ok(());
                    }
                    continue;
                }
            };
            reads.succeeded();
            let mut batch = vec![first];
            // Gather whatever else is ready, briefly, to write in bulk.
            while batch.len() < self.config.max_batch {
                match tokio::time::timeout(Duration::from_millis(5), self.consumer.recv()).await {
                    Ok(Ok(m)) => batch.push(m.detach()),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "reading the message topic");
                        break;
                    }
                    Err(_) => break,
                }
            }
            if !self.store(&mut own, batch, &mut writes, &mut stop).await? {
                return Ok(());
            }
        }
    }

    /// Stores one batch of the owned partitions and their next offsets in
    /// one write, retried until it succeeds; `false` when `stop` resolved.
    async fn store<S: Future<Output = ()>>(
        &self,
        own: &mut Ownership,
        batch: Vec<OwnedMessage>,
        writes: &mut Retry,
        stop: &mut Pin<&mut S>,
    ) -> Result<bool> {
        let mut records = Vec::with_capacity(batch.len());
        let mut next: BTreeMap<i32, i64> = BTreeMap::new();
        for m in &batch {
            let p = m.partition();
            // Not (or no longer) ours: its owner stores it. A record of
            // ours below the stored offset (fetched before a reassignment)
            // is stored again, harmlessly: skipping by offset would lose
            // records if the topic were ever recreated with fresh offsets.
            if !own.next.contains_key(&p) {
                continue;
            }
            next.insert(p, m.offset() + 1);
            self.stats.records.fetch_add(1, Ordering::Relaxed);
            // Only a record that goes to the dead-letter topic needs its key as text.
            let key = || m.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default();
            let mut lines = 0;
            for line in split(m.payload().unwrap_or_default()) {
                lines += 1;
                match serde_json::from_slice::<SequencedRecord>(line) {
                    Ok(r) => records.push(r),
                    Err(e) => {
                        tracing::warn!(partition = p, offset = m.offset(), error = %e, "poison record to dead-letter");
                        if !self.dead_letter(&key(), line, writes, stop).await? {
                            return Ok(false);
                        }
                    }
                }
            }
            if lines == 0 {
                tracing::warn!(partition = p, offset = m.offset(), "empty record to dead-letter");
                if !self.dead_letter(&key(), &[], writes, stop).await? {
                    return Ok(false);
                }
            }
        }
        if next.is_empty() {
            return Ok(true);
        }
        let offsets: Vec<PartitionOffset> = next
            .iter()
            .map(|(&partition, &next_offset)| PartitionOffset {
                topic: self.topics.messages.clone(),
                partition,
                next_offset,
            })
            .collect();
        let started = Instant::now();
        let stored = loop {
            match self.log.upsert_records_at(&records, &offsets).await {
                Ok(n) => break n,
                Err(e) => {
                    let d = writes.failed(e, &self.stats)?;
                    if pause(stop, d).await {
                        return Ok(false);
                    }
                }
            }
        };
        writes.succeeded();
        crate::metrics::PERSIST_WRITE.observe(started.elapsed().as_secs_f64());
        crate::metrics::PERSIST_BATCH.observe(records.len() as f64);
        for (p, n) in next {
            own.next.insert(p, Some(n));
        }
        self.stats.stored.fetch_add(stored, Ordering::Relaxed);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        if let Some(newest) = records.iter().map(|r| r.msg.ts).max() {
            self.stats.delay_ms.store(now_ms().saturating_sub(newest), Ordering::Relaxed);
        }
        Ok(true)
    }

    /// Sends an undecodable message (one line of a record) to the dead-letter topic, retried
    /// until the broker takes it; `false` when `stop` resolved.
    async fn dead_letter<S: Future<Output = ()>>(
        &self,
        key: &str,
        payload: &[u8],
        writes: &mut Retry,
        stop: &mut Pin<&mut S>,
    ) -> Result<bool> {
        loop {
            match self.dead_letter.send(&self.topics.dead_letter, key, payload).await {
                Ok(()) => break,
                Err(e) => {
                    let d = writes.failed(e, &self.stats)?;
                    if pause(stop, d).await {
                        return Ok(false);
                    }
                }
            }
        }
        self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Takes the locks of the partitions nobody holds and assigns the
    /// consumer every owned partition at its stored offset. A broken lock
    /// session loses every partition (another worker may hold them now).
    async fn claim(&self, own: &mut Ownership) -> Result<()> {
        if own.session.as_ref().is_some_and(|s| s.is_closed()) {
            tracing::warn!("persist lock session closed; releasing every partition");
            self.release_all(own);
        }
        if own.session.is_none() {
            own.session = Some(self.locks.lock_session().await?);
        }
        let stale = own.read_at.is_none_or(|t| t.elapsed() >= METADATA_EVERY);
        if stale || own.partitions.iter().any(|p| !own.next.contains_key(p)) {
            own.partitions = self.partitions().await?;
            own.read_at = Some(Instant::now());
        }
        let topic = self.topics.messages.as_str();
        let mut claimed = BTreeSet::new();
        for &p in &own.partitions {
            if own.next.contains_key(&p) {
                continue;
            }
            let session = own.session.as_mut().expect("opened above");
            match session.try_lock(topic, p).await {
                Ok(true) => {
                    claimed.insert(p);
                }
                Ok(false) => {}
                Err(e) => {
                    // Unsure what this session still holds: let it all go.
                    self.release_all(own);
                    return Err(e);
                }
            }
        }
        if claimed.is_empty() {
            return Ok(());
        }
        // Locks this session holds are taken again (not lost) when a read
        // below fails and the claim is retried.
        let stored = self.log.partition_offsets(topic).await?;
        let mut next = own.next.clone();
        for &p in &claimed {
            next.insert(p, stored.get(&p).copied());
        }
        let mut list = TopicPartitionList::with_capacity(next.len());
        for (&p, &n) in &next {
            list.add_partition_offset(topic, p, n.map_or(Offset::Beginning, Offset::Offset))?;
        }
        self.consumer.assign(&list)?;
        tracing::info!(topic, claimed = ?claimed, owned = ?next.keys().collect::<Vec<_>>(), "persist worker owns partitions");
        own.next = next;
        Ok(())
    }

    /// Forgets every partition and the session (dropping it closes its
    /// connection, which releases whatever locks it still held).
    fn release_all(&self, own: &mut Ownership) {
        own.session = None;
        if !own.next.is_empty() {
            own.next.clear();
            if let Err(e) = self.consumer.unassign() {
                tracing::warn!(error = %e, "unassigning the message topic");
            }
        }
    }

    /// Sets [`PersistStats::lag_records`] from the broker's high watermarks of the owned
    /// partitions whose next offset is known (left as it was when the broker does not answer),
    /// on a thread of its own: the worker goes on storing meanwhile. One at a time (`busy`).
    fn measure_lag(&self, own: &Ownership, busy: &Arc<std::sync::atomic::AtomicBool>) {
        if busy.swap(true, Ordering::AcqRel) {
            return;
        }
        let next: Vec<(i32, i64)> = own.next.iter().filter_map(|(&p, n)| n.map(|n| (p, n))).collect();
        let (consumer, topic) = (self.consumer.clone(), self.topics.messages.clone());
        let (stats, busy) = (self.stats.clone(), busy.clone());
        tokio::task::spawn_blocking(move || {
            let lag = next.into_iter().try_fold(0u64, |lag, (p, next)| {
                let (_, high) = consumer.fetch_watermarks(&topic, p, METADATA_TIMEOUT)?;
                Ok::<u64, rdkafka::error::KafkaError>(lag + high.saturating_sub(next).max(0) as u64)
            });
            match lag {
                Ok(lag) => {
                    stats.lag_records.store(lag, Ordering::Relaxed);
                    stats.lag_known.store(true, Ordering::Relaxed);
                }
                Err(e) => tracing::debug!(error = %e, "reading the topic's watermarks"),
            }
            busy.store(false, Ordering::Release);
        });
    }

    /// The partitions of the message topic, from the broker.
    async fn partitions(&self) -> Result<Vec<i32>> {
        let (consumer, topic) = (self.consumer.clone(), self.topics.messages.clone());
        let found = tokio::task::spawn_blocking(move || -> Result<Vec<i32>> {
            let meta = consumer.fetch_metadata(Some(&topic), METADATA_TIMEOUT)?;
            let t = meta.topics().iter().find(|t| t.name() == topic);
            let t = t.ok_or_else(|| StorageError::kafka(format!("no metadata for topic {topic}")))?;
            if let Some(e) = t.error() {
                return Err(StorageError::kafka(format!("metadata of topic {topic}: {e:?}")));
            }
            Ok(t.partitions().iter().map(|p| p.id()).collect())
        })
        .await??;
        if found.is_empty() {
            return Err(StorageError::kafka(format!("topic {} has no partitions", self.topics.messages)));
        }
        Ok(found)
    }
}
