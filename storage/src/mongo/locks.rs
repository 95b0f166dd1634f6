//! [`PartitionLocks`] on MongoDB: leases instead of PostgreSQL's session advisory locks.
//!
//! A partition's lock is a document of `persist_locks` (`_id` `topic\0partition`; topic, part,
//! owner, expires). A session takes it when it is free, its own, or its lease ran out, and
//! stamps it with an expiry [`LEASE`] ahead, all on the server's clock (`$$NOW`), so the
//! workers' clocks never have to agree. A task of the session renews every lease it holds each
//! [`RENEW_EVERY`]; the session counts as closed ([`LockSession::is_closed`]) once a renewal
//! finds a lease taken by another owner, or no renewal succeeded for [`LEASE`] less a margin
//! (the leases may have run out). A worker that dies, however it dies, stops renewing: its
//! partitions are free [`LEASE`] later. A session dropped by a live worker gives its leases
//! back at once.
//!
//! A lease is weaker than a lock held by a connection: a worker frozen past its lease (a long
//! pause) may write a batch after another took the partition over. The persist worker's writes
//! are idempotent upserts, and a regressed offset only makes a partition's records be read
//! again, so that costs a redelivery, never a lost or doubled message.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use mongodb::bson::{doc, DateTime, Document};
use mongodb::options::ReturnDocument;
use mongodb::Collection;

use super::{is_duplicate_key, key, MongoStore};
use crate::{LockSession, PartitionLocks, Result};

/// How long a lease lasts unless renewed.
pub const LEASE: Duration = Duration::from_secs(10);
/// How often a session renews its leases.
pub const RENEW_EVERY: Duration = Duration::from_secs(2);
/// A session whose last successful renewal is older than [`LEASE`] less this counts as closed.
const MARGIN: Duration = Duration::from_secs(2);

/// What a session and its renewal task share.
struct Held {
    /// `_id`s of the leases this session holds.
    ids: Mutex<Vec<String>>,
    closed: AtomicBool,
    /// When a renewal (or a take) last succeeded.
    renewed: Mutex<Instant>,
}

/// One owner's leases (see the module docs).
pub struct MongoLockSession {
    coll: Collection<Document>,
    owner: String,
    held: Arc<Held>,
    renewer: tokio::task::JoinHandle<()>,
}

/// An update that moves a lease's expiry to [`LEASE`] after the server's now.
fn renewal() -> Vec<Document> {
    vec![doc! { "$set": { "expires": { "$add": ["$$NOW", LEASE.as_millis() as i64] } } }]
}

#[async_trait]
impl PartitionLocks for MongoStore {
    async fn lock_session(&self) -> Result<Box<dyn LockSession>> {
        let owner = format!("{:016x}", rand::random::<u64>());
        let held = Arc::new(Held {
            ids: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
            renewed: Mutex::new(Instant::now()),
        });
        let renewer = tokio::spawn(renew(self.persist_locks.clone(), owner.clone(), held.clone()));
        Ok(Box::new(MongoLockSession { coll: self.persist_locks.clone(), owner, held, renewer }))
    }
}

/// Renews the session's leases until one is lost or the session is dropped.
async fn renew(coll: Collection<Document>, owner: String, held: Arc<Held>) {
    let mut tick = tokio::time::interval(RENEW_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let ids = held.ids.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if ids.is_empty() {
            *held.renewed.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
            continue;
        }
        let filter = doc! { "_id": { "$in": &ids }, "owner": &owner };
        // Counted from before the request: the server stamps the expiry while it runs.
        let asked = Instant::now();
        match coll.update_many(filter, renewal()).await {
            Ok(r) if r.matched_count == ids.len() as u64 => {
                *held.renewed.lock().unwrap_or_else(|p| p.into_inner()) = asked;
            }
            Ok(r) => {
                tracing::warn!(held = ids.len(), renewed = r.matched_count, "persist lease taken by another worker");
                held.closed.store(true, Ordering::Relaxed);
                return;
            }
            Err(e) => tracing::warn!(error = %e, "renewing persist leases failed; retrying"),
        }
    }
}

#[async_trait]
impl LockSession for MongoLockSession {
    async fn try_lock(&mut self, topic: &str, partition: i32) -> Result<bool> {
        let id = key(&[topic, &partition.to_string()]);
        // The filter names the `_id` alone (MongoDB allows no `$expr` in an upsert's filter); the
        // pipeline takes the lease when it is this session's or ran out (a new document has
        // neither owner nor expiry), and leaves it as it is otherwise. The document after the
        // update tells who holds it.
        let free = doc! { "$or": [
            { "$eq": ["$owner", &self.owner] },
            { "$lt": [{ "$ifNull": ["$expires", DateTime::from_millis(0)] }, "$$NOW"] },
        ] };
        let update = vec![doc! { "$set": {
            "owner": { "$cond": [&free, &self.owner, "$owner"] },
            "expires": { "$cond": [&free, { "$add": ["$$NOW", LEASE.as_millis() as i64] }, "$expires"] },
            "topic": topic,
            "part": partition,
        } }];
        let held = match self
            .coll
            .find_one_and_update(doc! { "_id": &id }, update)
            .upsert(true)
            .return_document(ReturnDocument::After)
            .await
        {
            Ok(after) => after.is_some_and(|d| d.get_str("owner").is_ok_and(|o| o == self.owner)),
            // Another session inserted the same lock first.
            Err(e) if is_duplicate_key(&e) => false,
            Err(e) => return Err(e.into()),
        };
        if held {
            let mut ids = self.held.ids.lock().unwrap_or_else(|p| p.into_inner());
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        Ok(held)
    }

    fn is_closed(&self) -> bool {
        if self.held.closed.load(Ordering::Relaxed) {
            return true;
        }
        let renewed = *self.held.renewed.lock().unwrap_or_else(|p| p.into_inner());
        let held = !self.held.ids.lock().unwrap_or_else(|p| p.into_inner()).is_empty();
        held && renewed.elapsed() >= LEASE.saturating_sub(MARGIN)
    }
}

impl Drop for MongoLockSession {
    fn drop(&mut self) {
        self.renewer.abort();
        // Give the leases back now rather than when they run out (best effort: a worker that
        // dies without getting here frees them after the lease).
        let (coll, owner) = (self.coll.clone(), self.owner.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = coll.delete_many(doc! { "owner": &owner }).await {
                    tracing::debug!(error = %e, "giving back persist leases");
                }
            });
        }
    }
}
