//! Read and ack cursors, coalesced in memory and written to the store in batches.
//!
//! Every delivered message is acked by each receiving device and every send moves the sender's
//! read mark: writing each of those durably, one transaction apiece, cost more than the message
//! itself. Here an ack or read mark only raises an in-memory cursor per (user, device, conv) or
//! (user, conv); a flusher writes all cursors that moved every `flush_interval`, in one batch per
//! store call. Readers (`sync`, `convs`) merge the unflushed cursors over the stored ones (waiting
//! out a flush under way, whose cursors are in neither), so this instance never answers with an
//! older cursor than it accepted.
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

/// The pending maps are looked up once or twice per message (the sender's read mark, each
/// receiver's ack), so they hash with foldhash (seeded per process) rather than SipHash.
type Map<V> = HashMap<String, V, foldhash::fast::RandomState>;

#[derive(Default)]
struct Pending {
    /// user -> device -> conv -> acked seq (nested so that a known device is found by `&str`,
    /// without building an owned key per ack)
    acks: Map<Map<Map<u64>>>,
    /// user -> conv -> read seq
    reads: Map<Map<u64>>,
    entries: usize,
}

/// The entry of `key` in `map`, allocating the key only when it is new.
fn entry<'a, V: Default>(map: &'a mut Map<V>, key: &str) -> &'a mut V {
    if !map.contains_key(key) {
        map.insert(key.to_owned(), V::default());
    }
    map.get_mut(key).expect("inserted above")
}

/// The coalescing cursor layer of one logic instance.
pub struct Cursors {
    store: Arc<dyn MessageStore>,
    pending: Mutex<Pending>,
    /// Held for writing by a flush (so flushes reach the store in the order they were taken)
    /// and for reading by readers: a cursor taken by a flush is in neither `pending` nor the
    /// store until that flush ends, so readers wait for it.
    flushing: tokio::sync::RwLock<()>,
}

fn raise<S: std::hash::BuildHasher>(map: &mut HashMap<String, u64, S>, conv: &str, seq: u64) -> (u64, bool) {
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
        Arc::new(Self { store, pending: Mutex::new(Pending::default()), flushing: tokio::sync::RwLock::new(()) })
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
        let mut guard = self.lock();
        let p = &mut *guard;
        let (_, new) = raise(entry(entry(&mut p.acks, user), device), conv, seq);
        p.entries += new as usize;
        Ok(())
    }

    /// Records that `user` read `conv` up to `seq`; returns the highest read mark this instance
    /// has taken for it since the last flush (at least `seq`).
    pub async fn read(&self, user: &str, conv: &str, seq: u64) -> Result<u64, ApiError> {
        self.backpressure().await?;
        let mut guard = self.lock();
        let p = &mut *guard;
        let (now, new) = raise(entry(&mut p.reads, user), conv, seq);
        p.entries += new as usize;
        Ok(now)
    }

    /// The acked seq per conversation of one device: the store's, raised by unflushed acks.
    pub async fn acks(&self, user: &str, device: &str) -> Result<HashMap<String, u64>, ApiError> {
        let _no_flush = self.flushing.read().await;
        let mut stored = self.store.acks(user, device).await?;
        if let Some(mine) = self.lock().acks.get(user).and_then(|d| d.get(device)) {
            for (conv, seq) in mine {
                raise(&mut stored, conv, *seq);
            }
        }
        Ok(stored)
    }

    /// The read seq per conversation of a user: the store's, raised by unflushed read marks.
    pub async fn reads(&self, user: &str) -> Result<HashMap<String, u64>, ApiError> {
        let _no_flush = self.flushing.read().await;
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
        let _one = self.flushing.write().await;
        let taken = std::mem::take(&mut *self.lock());
        if taken.entries == 0 {
            return Ok(());
        }
        let acks: Vec<AckCursor> = taken
            .acks
            .into_iter()
            .flat_map(|(user, devices)| {
                devices.into_iter().flat_map(move |(device, convs)| {
                    let user = user.clone();
                    convs.into_iter().map(move |(conv, seq)| AckCursor {
                        user: user.clone(),
                        device: device.clone(),
                        conv,
                        seq,
                    })
                })
            })
            .collect();
        let reads: Vec<ReadCursor> = taken
            .reads
            .into_iter()
            .flat_map(|(user, convs)| {
                convs.into_iter().map(move |(conv, seq)| ReadCursor { user: user.clone(), conv, seq })
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
            for c in &acks {
                let (_, new) = raise(entry(entry(&mut p.acks, &c.user), &c.device), &c.conv, c.seq);
                p.entries += new as usize;
            }
            for c in &reads {
                let (_, new) = raise(entry(&mut p.reads, &c.user), &c.conv, c.seq);
                p.entries += new as usize;
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use switchboard_storage::embedded::EmbeddedStore;

    use super::Cursors;

    /// Acks of several devices and read marks of several users, raised, coalesced and flushed
    /// into a real embedded store: each (user, device, conv) and (user, conv) reaches the store
    /// with its highest seq, readers merge what is not flushed yet, and nothing moves back.
    #[tokio::test]
    async fn cursors_coalesce_and_reach_the_store() {
        let dir = std::env::temp_dir().join(format!("sb-cursors-{}-{}", std::process::id(), line!()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Arc::new(EmbeddedStore::open(&dir).unwrap());
        let c = Cursors::new(store.clone());
        for (user, device, conv, seq) in [
            ("a", "d1", "c1", 3),
            ("a", "d1", "c1", 5),
            ("a", "d1", "c1", 4),
            ("a", "d2", "c1", 2),
            ("b", "d1", "c2", 9),
        ] {
            c.ack(user, device, conv, seq).await.unwrap();
        }
        assert_eq!(c.read("a", "c1", 6).await.unwrap(), 6);
        assert_eq!(c.read("a", "c1", 2).await.unwrap(), 6, "a read mark never moves back");
        assert_eq!(c.read("b", "c2", 1).await.unwrap(), 1);
        assert_eq!(c.pending(), 5, "three ack cursors and two read marks");
        // Before the flush, readers see the unflushed cursors over the (empty) store.
        assert_eq!(c.acks("a", "d1").await.unwrap().get("c1"), Some(&5));
        c.flush().await.unwrap();
        assert_eq!(c.pending(), 0);
        let acks = |user: &'static str, device: &'static str| {
            let store = store.clone();
            async move { switchboard_storage::MessageStore::acks(&*store, user, device).await.unwrap() }
        };
        assert_eq!(acks("a", "d1").await.get("c1"), Some(&5));
        assert_eq!(acks("a", "d2").await.get("c1"), Some(&2));
        assert_eq!(acks("b", "d1").await.get("c2"), Some(&9));
        assert!(acks("b", "d2").await.is_empty());
        let reads = switchboard_storage::MessageStore::reads(&*store, "a").await.unwrap();
        assert_eq!(reads.get("c1"), Some(&6));
        // A lower ack after the flush leaves the stored cursor where it was.
        c.ack("a", "d1", "c1", 1).await.unwrap();
        assert_eq!(c.acks("a", "d1").await.unwrap().get("c1"), Some(&5));
        c.flush().await.unwrap();
        assert_eq!(acks("a", "d1").await.get("c1"), Some(&5));
        drop(c);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A cursor being flushed is neither pending nor stored yet: a reader at that moment must
    /// still see it (a device that acked, reconnected and synced at once was re-sent what it
    /// had acked). Readers race flushes many times over on a multi-threaded runtime.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cursor_being_flushed_stays_visible() {
        let dir = std::env::temp_dir().join(format!("sb-cursors-{}-{}", std::process::id(), line!()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Arc::new(EmbeddedStore::open(&dir).unwrap());
        let c = Cursors::new(store.clone());
        for seq in 1..=300u64 {
            c.ack("a", "d1", "c1", seq).await.unwrap();
            c.read("a", "c1", seq).await.unwrap();
            let flush = tokio::spawn({
                let c = c.clone();
                async move { c.flush().await.unwrap() }
            });
            for _ in 0..3 {
                assert_eq!(c.acks("a", "d1").await.unwrap().get("c1"), Some(&seq), "ack {seq} seen while flushing");
                assert_eq!(c.reads("a").await.unwrap().get("c1"), Some(&seq), "read {seq} seen while flushing");
                tokio::task::yield_now().await;
            }
            flush.await.unwrap();
        }
        drop(c);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
