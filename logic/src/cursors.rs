//! Read and ack cursors, coalesced in memory and written to the store in batches.
//!
//! Every delivered message is acked by each receiving device and every send moves the sender's
//! read mark: writing each of those durably, one transaction apiece, cost more than the message
//! itself. Here an ack or read mark only raises an in-memory cursor per (user, device, conv) or
//! (user, conv); a flusher writes all cursors that moved every `flush_interval`, in one batch per
//! store call. Readers (`sync`, `convs`) merge the unflushed cursors over the stored ones, so this
//! instance never answers with an older cursor than it accepted.
//!
//! Crash guarantee (docs/protocol.md): a cursor accepted less than one flush interval before the
//! process died may be lost, so a device may be re-pushed (or re-synced) messages it had already
//! acked; clients drop them by (conv, seq). A cursor never moves back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchboard_storage::{AckCursor, MessageStore, ReadCursor};

use crate::error::ApiError;

/// Unflushed cursors beyond which an update waits for a flush (bounds memory when the store
/// is slow or down).
const MAX_PENDING: usize = 1_000_000;

#[derive(Default)]
struct Pending {
    /// (user, device) -> conv -> acked seq
    acks: HashMap<(String, String), HashMap<String, u64>>,
    /// user -> conv -> read seq
    reads: HashMap<String, HashMap<String, u64>>,
    entries: usize,
}

/// The coalescing cursor layer of one logic instance.
pub struct Cursors {
    store: Arc<dyn MessageStore>,
    pending: Mutex<Pending>,
    /// Serialises flushes so cursors reach the store in the order they were taken.
    flushing: tokio::sync::Mutex<()>,
}

fn raise(map: &mut HashMap<String, u64>, conv: &str, seq: u64) -> (u64, bool) {
    match map.get_mut(conv) {
        Some(v) => {
            *v = (*v).max(seq);
            (*v, false)
        }
        None => {
            map.insert(conv.to_owned(), seq);
            (seq, true)
        }
    }
}

impl Cursors {
    pub fn new(store: Arc<dyn MessageStore>) -> Arc<Self> {
        Arc::new(Self { store, pending: Mutex::new(Pending::default()), flushing: tokio::sync::Mutex::new(()) })
    }

    /// Cursors raised and not yet flushed to the store.
    pub fn pending(&self) -> usize {
        self.lock().entries
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn backpressure(&self) -> Result<(), ApiError> {
        if self.lock().entries >= MAX_PENDING {
            self.flush().await?;
        }
        Ok(())
    }

    /// Records that `device` of `user` received `conv` up to `seq`.
    pub async fn ack(&self, user: &str, device: &str, conv: &str, seq: u64) -> Result<(), ApiError> {
        self.backpressure().await?;
        let mut p = self.lock();
        let map = p.acks.entry((user.to_owned(), device.to_owned())).or_default();
        let (_, new) = raise(map, conv, seq);
        p.entries += new as usize;
        Ok(())
    }

    /// Records that `user` read `conv` up to `seq`; returns the highest read mark this instance
    /// has taken for it since the last flush (at least `seq`).
    pub async fn read(&self, user: &str, conv: &str, seq: u64) -> Result<u64, ApiError> {
        self.backpressure().await?;
        let mut p = self.lock();
        // A user with a pending mark already costs no allocation.
        if !p.reads.contains_key(user) {
            p.reads.insert(user.to_owned(), HashMap::new());
        }
        let Some(marks) = p.reads.get_mut(user) else { return Ok(seq) };
        let (now, new) = raise(marks, conv, seq);
        p.entries += new as usize;
        Ok(now)
    }

    /// The acked seq per conversation of one device: the store's, raised by unflushed acks.
    pub async fn acks(&self, user: &str, device: &str) -> Result<HashMap<String, u64>, ApiError> {
        let mut stored = self.store.acks(user, device).await?;
        if let Some(mine) = self.lock().acks.get(&(user.to_owned(), device.to_owned())) {
            for (conv, seq) in mine {
                raise(&mut stored, conv, *seq);
            }
        }
        Ok(stored)
    }

    /// The read seq per conversation of a user: the store's, raised by unflushed read marks.
    pub async fn reads(&self, user: &str) -> Result<HashMap<String, u64>, ApiError> {
        let mut stored = self.store.reads(user).await?;
        if let Some(mine) = self.lock().reads.get(user) {
            for (conv, seq) in mine {
                raise(&mut stored, conv, *seq);
            }
        }
        Ok(stored)
    }

    /// Writes every cursor that moved since the last flush. On failure the cursors are kept
    /// (merged with newer ones) for the next flush.
    pub async fn flush(&self) -> Result<(), ApiError> {
        let _one = self.flushing.lock().await;
        let taken = std::mem::take(&mut *self.lock());
        if taken.entries == 0 {
            return Ok(());
        }
        let acks: Vec<AckCursor> = taken
            .acks
            .iter()
            .flat_map(|((user, device), convs)| {
                convs.iter().map(move |(conv, seq)| AckCursor {
                    user: user.clone(),
                    device: device.clone(),
                    conv: conv.clone(),
                    seq: *seq,
                })
            })
            .collect();
        let reads: Vec<ReadCursor> = taken
            .reads
            .iter()
            .flat_map(|(user, convs)| {
                convs.iter().map(move |(conv, seq)| ReadCursor { user: user.clone(), conv: conv.clone(), seq: *seq })
            })
            .collect();
        let mut result = Ok(());
        if !acks.is_empty() {
            result = self.store.set_acks(&acks).await;
        }
        if result.is_ok() && !reads.is_empty() {
            result = self.store.set_reads(&reads).await;
        }
        if let Err(e) = result {
            // Put them back under any newer cursors (max wins, so order does not matter).
            let mut guard = self.lock();
            let p = &mut *guard;
            for ((user, device), convs) in taken.acks {
                let map = p.acks.entry((user, device)).or_default();
                for (conv, seq) in convs {
                    let (_, new) = raise(map, &conv, seq);
                    p.entries += new as usize;
                }
            }
            for (user, convs) in taken.reads {
                let map = p.reads.entry(user).or_default();
                for (conv, seq) in convs {
                    let (_, new) = raise(map, &conv, seq);
                    p.entries += new as usize;
                }
            }
            return Err(e.into());
        }
        Ok(())
    }

    /// Flushes every `interval` until `stop` resolves, then once more.
    pub async fn run_flusher(self: Arc<Self>, interval: Duration, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                _ = tick.tick() => {
                    if let Err(e) = self.flush().await {
                        tracing::warn!(error = %e, "flushing cursors failed; retrying");
                    }
                }
            }
        }
        if let Err(e) = self.flush().await {
            tracing::error!(error = %e, "final cursor flush failed");
        }
    }
}
