//! The message path of the cluster deployment, as a [`MessageStore`]:
//! seq and `cmid` in Redis, durability through the Kafka topic (a send is
//! acknowledged once the broker has the record), reads from the durable
//! store merged with Redis' recent-message cache so an acknowledged message
//! is visible before the persist worker has written it.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_trait::async_trait;

use crate::kafka::{Producer, Topics};
use crate::redis::{Alloc, RedisStore};
use crate::{now_ms, Appended, Message, MessageStore, NewMessage, Result, SequencedRecord, StorageError};

pub struct ClusterMessages {
    redis: RedisStore,
    producer: Producer,
    topics: Topics,
    durable: Arc<dyn MessageStore>,
}

impl ClusterMessages {
    pub fn new(redis: RedisStore, producer: Producer, topics: Topics, durable: Arc<dyn MessageStore>) -> Self {
        Self { redis, producer, topics, durable }
    }

    async fn publish(&self, msg: &Message, members: &[String]) -> Result<()> {
        let record = SequencedRecord { msg: msg.clone(), members: members.to_vec(), recall: false };
        self.producer.send(&self.topics.messages, &msg.conv, &serde_json::to_vec(&record)?).await
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
        Ok(self.durable.range(conv, seq.saturating_sub(1), 1).await?.into_iter().find(|m| m.seq == seq))
    }

    /// Seeds a missing counter from the durable store and the cache.
    async fn reseed(&self, conv: &str) -> Result<()> {
        let durable = self.durable.history(conv, None, 1).await?.pop();
        let (mut seq, mut ts) = durable.map(|m| (m.seq, m.ts)).unwrap_or((0, 0));
        if let Some(m) = self.redis.cached_range(conv, seq + 1, u64::MAX).await?.pop() {
            (seq, ts) = (m.seq, m.ts);
        }
        tracing::info!(conv, seq, "seeding seq counter");
        self.redis.seed(conv, seq, ts).await
    }
}

#[async_trait]
impl MessageStore for ClusterMessages {
    async fn append(&self, msg: NewMessage, members: &[String]) -> Result<Appended> {
        // Redis may have forgotten a cmid (TTL, restart) that the durable
        // store still has: look there before allocating a seq.
        if let Some(m) = self.durable.find_cmid(&msg.conv, &msg.from, &msg.cmid).await? {
            self.redis.remember_cmid(&m).await?;
            return Ok(Appended { msg: m, duplicate: true });
        }
        for _ in 0..3 {
            match self.redis.alloc(&msg.conv, &msg.from, &msg.cmid, now_ms()).await? {
                Alloc::NoCounter => self.reseed(&msg.conv).await?,
                Alloc::New { seq, ts } => {
                    let m = msg.stored_as(seq, ts);
                    self.redis.stash(&m).await?;
                    self.publish(&m, members).await?;
                    self.redis.cache(&m, members).await?;
                    self.redis.mark_done(&m).await?;
                    return Ok(Appended { msg: m, duplicate: false });
                }
                Alloc::Known { seq, done: true, .. } => {
                    let Some(m) = self.get(&msg.conv, seq).await? else {
                        return Err(StorageError::Corrupt(format!("cmid of {}#{seq} has no message", msg.conv)));
                    };
                    return Ok(Appended { msg: m, duplicate: true });
                }
                Alloc::Known { seq, done: false, .. } => {
                    // An earlier attempt allocated the seq but has no broker
                    // ack (yet): publish the same message (the store dedupes).
                    let Some(m) = self.redis.stashed(&msg.conv, seq).await? else {
                        // the first attempt finished meanwhile
                        return match self.get(&msg.conv, seq).await? {
                            Some(m) => Ok(Appended { msg: m, duplicate: true }),
                            None => Err(StorageError::Corrupt(format!("pending {}#{seq} was not stashed", msg.conv))),
                        };
                    };
                    self.publish(&m, members).await?;
                    self.redis.cache(&m, members).await?;
                    self.redis.mark_done(&m).await?;
                    return Ok(Appended { msg: m, duplicate: false });
                }
            }
        }
        Err(StorageError::Redis(format!("could not seed the seq counter of {}", msg.conv)))
    }

    async fn find_cmid(&self, conv: &str, from: &str, cmid: &str) -> Result<Option<Message>> {
        if let Some((seq, _, true)) = self.redis.cmid(conv, from, cmid).await? {
            if let Some(m) = self.get(conv, seq).await? {
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

    async fn recall(&self, conv: &str, seq: u64) -> Result<Option<Message>> {
        let Some(m) = self.get(conv, seq).await? else { return Ok(None) };
        let recalled = crate::recalled_form(m);
        // Keyed by conv like the original, so the persist worker applies it
        // after the original; it stores the recalled form either way.
        let record = SequencedRecord { msg: recalled.clone(), members: Vec::new(), recall: true };
        self.producer.send(&self.topics.messages, conv, &serde_json::to_vec(&record)?).await?;
        self.redis.replace_cached(&recalled).await?;
        Ok(Some(recalled))
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
