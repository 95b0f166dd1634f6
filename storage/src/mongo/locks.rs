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
use mongodb::bson::{doc, Document};
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

/// An update that sets the owner and an expiry [`LEASE`] after the server's now.
fn stamp(owner: &str, extra: Document) -> Vec<Document> {
    let mut set = doc! { "owner": owner, "expires": { "$add": ["$$NOW", LEASE.as_millis() as i64] } };
    set.extend(extra);
    vec![doc! { "$set": set }]
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
        match coll.update_many(filter, stamp(&owner, Document::new())).await {
            Ok(r) if r.matched_count == ids.len() as u64 => {
                *held.renewed.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
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
        // Free (no document, matched by the upsert), this session's, or run out.
        let filter = doc! {
            "_id": &id,
            "$or": [ { "owner": &self.owner }, { "$expr": { "$lt": ["$expires", "$$NOW"] } } ],
        };
        let update = stamp(&self.owner, doc! { "topic": topic, "part": partition });
        match self.coll.update_one(filter, update).upsert(true).await {
            Ok(_) => {
                let mut ids = self.held.ids.lock().unwrap_or_else(|p| p.into_inner());
                if !ids.contains(&id) {
                    ids.push(id);
                }
                Ok(true)
            }
            // Held by another owner: the upsert's insert met the existing `_id`.
            Err(e) if is_duplicate_key(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
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
