//! In-memory caches of the cluster's relational reads on the message path, kept coherent across
//! logic instances: [`CachedSocial`] (friendships, checked on every direct `send`, `typing` and
//! read receipt) and [`CachedGroups`] (member lists, read on every group `send` and every `ack`,
//! `read` and `history` of a group). Every write through any logic instance drops what it changed
//! on every instance: the writing instance at once, the others through a Redis pub/sub channel
//! per kind. While a subscription is down nothing is cached (and the cache is emptied when it
//! comes back, since announcements may have been missed in between); an entry also lives at most
//! [`TTL`], which bounds staleness should an announcement ever fail to go out. Each cache is
//! bounded (entries and, for member lists, members) and dropped whole when full.

use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio_stream::StreamExt;

use crate::redis::RedisStore;
use crate::{FriendState, Group, GroupStore, RequestOutcome, Result, Role, SocialStore};

use crate::caches::Shared;
pub use crate::caches::TTL;
/// Pause before subscribing again after a subscription broke.
const RESUBSCRIBE: Duration = Duration::from_secs(1);
/// Most relations cached (about 150 bytes each).
const MAX_RELATIONS: usize = 100_000;
/// Most member lists cached, and most members over all of them (about 100 bytes each).
const MAX_GROUPS: usize = 50_000;
const MAX_MEMBERS: usize = 1_000_000;

/// A cache that hears about changes on one pub/sub topic.
trait Listening: Send + Sync + 'static {
    /// Drops what the announcement `parts` names.
    fn changed(&self, parts: Vec<String>);
    /// Drops everything and caches from now on (`live`) or not.
    fn reset(&self, live: bool);
}

/// Keeps the subscription to `topic` up while the cache lives, forgetting what it announces.
async fn listen<T: Listening>(cache: Weak<T>, redis: RedisStore, topic: &'static str) {
    loop {
        match redis.changes(topic).await {
            Ok(mut changes) => {
                // Whatever changed while nobody listened: start empty.
                match cache.upgrade() {
                    Some(c) => c.reset(true),
                    None => return,
                }
                while let Some(parts) = changes.next().await {
                    let Some(c) = cache.upgrade() else { return };
                    c.changed(parts);
                }
                tracing::warn!(topic, "change subscription lost; not caching until it is back");
            }
            Err(e) => tracing::warn!(topic, error = %e, "subscribing to changes failed"),
        }
        match cache.upgrade() {
            Some(c) => c.reset(false),
            None => return,
        }
        tokio::time::sleep(RESUBSCRIBE).await;
    }
}

/// Tells the other instances that `parts` of `topic` changed (logged when it cannot).
async fn announce(redis: &RedisStore, topic: &str, parts: &[&str]) {
    if let Err(e) = redis.publish_change(topic, parts).await {
        tracing::warn!(topic, error = %e, "announcing a change failed; other instances may keep it up to the cache TTL");
    }
}

const SOCIAL: &str = "social";
const GROUPS: &str = "groups";

/// A [`SocialStore`] that caches `friend_state` over another one.
pub struct CachedSocial {
    inner: Arc<dyn SocialStore>,
    redis: RedisStore,
    cache: Shared<(String, String), Option<FriendState>>,
}

impl Listening for CachedSocial {
    fn changed(&self, parts: Vec<String>) {
        if let [a, b] = parts.as_slice() {
            self.forget(a, b);
        } else {
            self.cache.forget_all();
        }
    }

    fn reset(&self, live: bool) {
        self.cache.reset(live);
    }
}

impl CachedSocial {
    /// Wraps `inner` and starts listening for changes announced through `redis` (the listener
    /// stops when the returned store is dropped). Must be called within a tokio runtime.
    pub fn new(inner: Arc<dyn SocialStore>, redis: RedisStore) -> Arc<Self> {
        let me = Arc::new(Self { inner, redis: redis.clone(), cache: Shared::new(MAX_RELATIONS, MAX_RELATIONS) });
        tokio::spawn(listen(Arc::downgrade(&me), redis, SOCIAL));
        me
    }

    /// Whether changes are being heard, i.e. whether lookups are cached.
    pub fn listening(&self) -> bool {
        self.cache.listening()
    }

    /// Forgets the relation of `a` and `b`, both ways.
    fn forget(&self, a: &str, b: &str) {
        self.cache.forget([(a.to_owned(), b.to_owned()), (b.to_owned(), a.to_owned())]);
    }

    /// After a write to the relation of `a` and `b`: forget it here, then tell the others.
    async fn wrote(&self, a: &str, b: &str) {
        self.forget(a, b);
        announce(&self.redis, SOCIAL, &[a, b]).await;
    }
}

#[async_trait]
impl SocialStore for CachedSocial {
    async fn friend_state(&self, user: &str, other: &str) -> Result<Option<FriendState>> {
        let key = (user.to_owned(), other.to_owned());
        let generation = match self.cache.get(&key) {
            Ok(state) => return Ok(state),
            Err(generation) => generation,
        };
        let state = self.inner.friend_state(user, other).await?;
        self.cache.put(key, state.clone(), 1, generation);
        Ok(state)
    }

    async fn request_friend(&self, from: &str, to: &str, note: &str) -> Result<RequestOutcome> {
        let r = self.inner.request_friend(from, to, note).await;
        self.wrote(from, to).await;
        r
    }

    async fn accept_friend(&self, user: &str, from: &str) -> Result<bool> {
        let r = self.inner.accept_friend(user, from).await;
        self.wrote(user, from).await;
        r
    }

    async fn reject_friend(&self, user: &str, from: &str) -> Result<bool> {
        let r = self.inner.reject_friend(user, from).await;
        self.wrote(user, from).await;
        r
    }

    async fn delete_friend(&self, user: &str, other: &str) -> Result<bool> {
        let r = self.inner.delete_friend(user, other).await;
        self.wrote(user, other).await;
        r
    }

    async fn relations(&self, user: &str) -> Result<Vec<(String, FriendState)>> {
        self.inner.relations(user).await
    }

    async fn set_block(&self, user: &str, other: &str, block: bool) -> Result<bool> {
        let r = self.inner.set_block(user, other, block).await;
        self.wrote(user, other).await;
        r
    }

    async fn blocks(&self, user: &str, other: &str) -> Result<bool> {
        self.inner.blocks(user, other).await
    }

    async fn blocked(&self, user: &str) -> Result<Vec<String>> {
        self.inner.blocked(user).await
    }
}

/// A group's members and roles, ordered by user name (byte order).
type Members = Arc<Vec<(String, Role)>>;

/// A [`GroupStore`] that caches member lists (and answers `role` from them) over another one.
pub struct CachedGroups {
    inner: Arc<dyn GroupStore>,
    redis: RedisStore,
    cache: Shared<String, Members>,
}

impl Listening for CachedGroups {
    fn changed(&self, parts: Vec<String>) {
        self.cache.forget(parts);
    }

    fn reset(&self, live: bool) {
        self.cache.reset(live);
    }
}

impl CachedGroups {
    /// Wraps `inner` and starts listening for changes announced through `redis` (the listener
    /// stops when the returned store is dropped). Must be called within a tokio runtime.
    pub fn new(inner: Arc<dyn GroupStore>, redis: RedisStore) -> Arc<Self> {
        let me = Arc::new(Self { inner, redis: redis.clone(), cache: Shared::new(MAX_GROUPS, MAX_MEMBERS) });
        tokio::spawn(listen(Arc::downgrade(&me), redis, GROUPS));
        me
    }

    /// Whether changes are being heard, i.e. whether member lists are cached.
    pub fn listening(&self) -> bool {
        self.cache.listening()
    }

    /// The members of `id`, from the cache or the store.
    async fn list(&self, id: &str) -> Result<Members> {
        let generation = match self.cache.get(&id.to_owned()) {
            Ok(members) => return Ok(members),
            Err(generation) => generation,
        };
        let members: Members = Arc::new(self.inner.members(id).await?);
        self.cache.put(id.to_owned(), members.clone(), members.len().max(1), generation);
        Ok(members)
    }

    /// After a write to the members of `id`: forget them here, then tell the others.
    async fn wrote(&self, id: &str) {
        self.cache.forget([id.to_owned()]);
        announce(&self.redis, GROUPS, &[id]).await;
    }
}

#[async_trait]
impl GroupStore for CachedGroups {
    async fn create_group(&self, group: &Group, members: &[String]) -> Result<bool> {
        let r = self.inner.create_group(group, members).await;
        // An instance may have cached the id as a group without members.
        self.wrote(&group.id).await;
        r
    }

    async fn group(&self, id: &str) -> Result<Option<Group>> {
        self.inner.group(id).await
    }

    async fn add_member(&self, id: &str, user: &str, role: Role) -> Result<bool> {
        let r = self.inner.add_member(id, user, role).await;
        self.wrote(id).await;
        r
    }

    async fn remove_member(&self, id: &str, user: &str) -> Result<bool> {
        let r = self.inner.remove_member(id, user).await;
        self.wrote(id).await;
        r
    }

    async fn set_role(&self, id: &str, user: &str, role: Role) -> Result<bool> {
        let r = self.inner.set_role(id, user, role).await;
        self.wrote(id).await;
        r
    }

    async fn role(&self, id: &str, user: &str) -> Result<Option<Role>> {
        Ok(crate::caches::role_in(&self.list(id).await?, user))
    }

    async fn members(&self, id: &str) -> Result<Vec<(String, Role)>> {
        Ok(self.list(id).await?.as_ref().clone())
    }

    async fn user_groups(&self, user: &str) -> Result<Vec<(Group, Role)>> {
        self.inner.user_groups(user).await
    }

    async fn user_group_ids(&self, user: &str) -> Result<Vec<String>> {
        self.inner.user_group_ids(user).await
    }

    async fn set_invite_only(&self, id: &str, invite_only: bool) -> Result<bool> {
        self.inner.set_invite_only(id, invite_only).await
    }
}
