//! The cluster's friendship checks without a PostgreSQL read per message: [`CachedSocial`] keeps
//! the relations logic looked up (`friend_state`, asked on every direct `send`, `typing` and
//! read receipt) in memory, and every change to a relation made through any logic instance drops
//! that pair everywhere: the instance that wrote it at once, the others through a Redis pub/sub
//! channel. While the subscription is down nothing is cached (and the cache is emptied when it
//! comes back, since announcements may have been missed in between); an entry also lives at most
//! [`TTL`], which bounds staleness should an announcement ever fail to go out. Bounded by entries
//! and dropped whole when full.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio_stream::StreamExt;

use crate::redis::RedisStore;
use crate::{FriendState, RequestOutcome, Result, SocialStore};

/// Most relations cached (about 150 bytes each).
const MAX_ENTRIES: usize = 100_000;
/// Longest an entry is trusted.
pub const TTL: Duration = Duration::from_secs(30);
/// Pause before subscribing again after the subscription broke.
const RESUBSCRIBE: Duration = Duration::from_secs(1);

type Pair = (String, String);

#[derive(Default)]
struct Cache {
    /// Bumped by every invalidation: a relation read before it must not be cached after it.
    generation: u64,
    entries: HashMap<Pair, (Option<FriendState>, Instant)>,
}

/// A [`SocialStore`] that caches `friend_state` over another one.
pub struct CachedSocial {
    inner: Arc<dyn SocialStore>,
    redis: RedisStore,
    cache: Mutex<Cache>,
    /// The invalidation subscription is up (only then is anything cached).
    live: AtomicBool,
}

impl CachedSocial {
    /// Wraps `inner` and starts listening for changes announced through `redis` (the listener
    /// stops when the returned store is dropped). Must be called within a tokio runtime.
    pub fn new(inner: Arc<dyn SocialStore>, redis: RedisStore) -> Arc<Self> {
        let me = Arc::new(Self { inner, redis, cache: Mutex::default(), live: AtomicBool::new(false) });
        tokio::spawn(listen(Arc::downgrade(&me)));
        me
    }

    fn cache(&self) -> MutexGuard<'_, Cache> {
        // Every change is a single insert, remove or clear: consistent after a panic too.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether changes are being heard, i.e. whether lookups are cached.
    pub fn listening(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    /// Forgets the relation of `a` and `b`, both ways.
    fn forget(&self, a: &str, b: &str) {
        let mut c = self.cache();
        c.generation += 1;
        c.entries.remove(&(a.to_owned(), b.to_owned()));
        c.entries.remove(&(b.to_owned(), a.to_owned()));
    }

    fn forget_all(&self) {
        let mut c = self.cache();
        c.generation += 1;
        c.entries.clear();
    }

    /// After a write to the relation of `a` and `b`: forget it here, then tell the others.
    async fn changed(&self, a: &str, b: &str) {
        self.forget(a, b);
        if let Err(e) = self.redis.publish_social(a, b).await {
            tracing::warn!(error = %e, "announcing a relation change failed; other instances may keep it up to the cache TTL");
        }
    }
}

/// Keeps the subscription up while the store lives, forgetting what it announces.
async fn listen(store: Weak<CachedSocial>) {
    loop {
        let Some(s) = store.upgrade() else { return };
        let changes = s.redis.social_changes().await;
        drop(s);
        match changes {
            Ok(mut changes) => {
                // Whatever changed while nobody listened: start empty.
                if let Some(s) = store.upgrade() {
                    s.forget_all();
                    s.live.store(true, Ordering::Release);
                }
                while let Some((a, b)) = changes.next().await {
                    let Some(s) = store.upgrade() else { return };
                    s.forget(&a, &b);
                }
                tracing::warn!("relation change subscription lost; not caching until it is back");
            }
            Err(e) => tracing::warn!(error = %e, "subscribing to relation changes failed"),
        }
        let Some(s) = store.upgrade() else { return };
        s.live.store(false, Ordering::Release);
        s.forget_all();
        drop(s);
        tokio::time::sleep(RESUBSCRIBE).await;
    }
}

#[async_trait]
impl SocialStore for CachedSocial {
    async fn friend_state(&self, user: &str, other: &str) -> Result<Option<FriendState>> {
        let key = (user.to_owned(), other.to_owned());
        let generation = {
            let c = self.cache();
            if let Some((state, at)) = c.entries.get(&key) {
                if at.elapsed() < TTL {
                    return Ok(state.clone());
                }
            }
            c.generation
        };
        let state = self.inner.friend_state(user, other).await?;
        if self.listening() {
            let mut c = self.cache();
            if c.generation == generation {
                if c.entries.len() >= MAX_ENTRIES {
                    c.entries.clear();
                }
                c.entries.insert(key, (state.clone(), Instant::now()));
            }
        }
        Ok(state)
    }

    async fn request_friend(&self, from: &str, to: &str, note: &str) -> Result<RequestOutcome> {
        let r = self.inner.request_friend(from, to, note).await;
        self.changed(from, to).await;
        r
    }

    async fn accept_friend(&self, user: &str, from: &str) -> Result<bool> {
        let r = self.inner.accept_friend(user, from).await;
        self.changed(user, from).await;
        r
    }

    async fn reject_friend(&self, user: &str, from: &str) -> Result<bool> {
        let r = self.inner.reject_friend(user, from).await;
        self.changed(user, from).await;
        r
    }

    async fn delete_friend(&self, user: &str, other: &str) -> Result<bool> {
        let r = self.inner.delete_friend(user, other).await;
        self.changed(user, other).await;
        r
    }

    async fn relations(&self, user: &str) -> Result<Vec<(String, FriendState)>> {
        self.inner.relations(user).await
    }

    async fn set_block(&self, user: &str, other: &str, block: bool) -> Result<bool> {
        let r = self.inner.set_block(user, other, block).await;
        self.changed(user, other).await;
        r
    }

    async fn blocks(&self, user: &str, other: &str) -> Result<bool> {
        self.inner.blocks(user, other).await
    }

    async fn blocked(&self, user: &str) -> Result<Vec<String>> {
        self.inner.blocked(user).await
    }
}
