//! The persist worker: reads sequenced records from the message topic in a
//! consumer group, writes them to the durable store in batches with
//! idempotent upserts, and commits offsets only after the write. A record
//! that cannot be decoded goes to the dead-letter topic instead of blocking
//! its partition.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::Message as _;

use crate::kafka::{consumer, Producer, Topics};
use crate::{DurableLog, Result, SequencedRecord};

/// Counters of a persist worker.
#[derive(Debug, Default)]
pub struct PersistStats {
    pub records: AtomicU64,
    pub stored: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub batches: AtomicU64,
}

pub struct PersistWorker {
    consumer: StreamConsumer,
    dead_letter: Producer,
    topics: Topics,
    store: Arc<dyn DurableLog>,
    max_batch: usize,
    pub stats: Arc<PersistStats>,
}

impl PersistWorker {
    pub fn new(
        brokers: &str,
        group: &str,
        topics: Topics,
        store: Arc<dyn DurableLog>,
        max_batch: usize,
    ) -> Result<Self> {
        Ok(Self {
            consumer: consumer(brokers, group, &topics.messages)?,
            dead_letter: Producer::new(brokers, Duration::from_secs(10))?,
            topics,
            store,
            max_batch: max_batch.max(1),
            stats: Arc::default(),
        })
    }

    /// Runs until `stop` resolves. A failed store write is retried (the
    /// offsets stay uncommitted), so nothing is skipped.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) -> Result<()> {
        tokio::pin!(stop);
        loop {
            let first = tokio::select! {
                _ = &mut stop => return Ok(()),
                m = self.consumer.recv() => m?.detach(),
            };
            let mut batch = vec![first];
            // Gather whatever else is ready, briefly, to write in bulk.
            while batch.len() < self.max_batch {
                match tokio::time::timeout(Duration::from_millis(5), self.consumer.recv()).await {
                    Ok(m) => batch.push(m?.detach()),
                    Err(_) => break,
                }
            }
            let mut records = Vec::with_capacity(batch.len());
            for m in &batch {
                self.stats.records.fetch_add(1, Ordering::Relaxed);
                match m.payload().map(serde_json::from_slice::<SequencedRecord>) {
                    Some(Ok(r)) => records.push(r),
                    _ => {
                        tracing::warn!(partition = m.partition(), offset = m.offset(), "poison record to dead-letter");
                        let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default();
                        self.dead_letter.send(&self.topics.dead_letter, &key, m.payload().unwrap_or_default()).await?;
                        self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            let stored = loop {
                match self.store.upsert_records(&records).await {
                    Ok(n) => break n,
                    Err(e) => {
                        tracing::warn!(error = %e, "store write failed; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            };
            self.stats.stored.fetch_add(stored, Ordering::Relaxed);
            self.stats.batches.fetch_add(1, Ordering::Relaxed);
            self.consumer.commit_consumer_state(CommitMode::Sync)?;
        }
    }
}
