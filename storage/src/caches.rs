//! In-memory caches of the embedded store, both bounded by entries and dropped whole when full:
//! - [`GroupCache`]: member lists of groups, so the membership check of every `ack`, `read` and
//!   group `send` is a lookup in memory instead of a read transaction. The store's own writes are
//!   the only writers, and each invalidates its group after it commits.
//! - [`Shared`]: a generation-guarded cache of any key, used for the embedded store's
//!   friendships (the check of every direct `send`; the store's own social writes forget their
//!   pair both ways after they commit) and by the cluster's caches (`crate::cluster_caches`).
//! - [`ConvCache`]: per conversation, what the writer thread needs to append the next message (last
//!   seq and ts, and which member list is indexed already), so an append skips three B-tree reads
//!   and, in a group, one conversation-index lookup per member.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::Role;

/// Most groups whose member lists are cached.
const MAX_GROUPS: usize = 50_000;
/// Most members over all cached lists (about 100 bytes each).
const MAX_MEMBERS: usize = 1_000_000;
/// Most relations cached (about 100 bytes each).
pub(crate) const MAX_RELATIONS: usize = 200_000;
/// Longest a [`Shared`] entry is trusted.
pub const TTL: Duration = Duration::from_secs(30);
/// Most conversations the writer remembers.
const MAX_CONVS: usize = 200_000;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every change is a single insert or remove: the maps are consistent after a panic too.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A group's members, sorted by user.
pub(crate) type Members = Arc<Vec<(String, Role)>>;

/// The role of `user` in a member list sorted by user.
pub(crate) fn role_in(members: &[(String, Role)], user: &str) -> Option<Role> {
    members.binary_search_by(|(u, _)| u.as_str().cmp(user)).ok().map(|i| members[i].1)
}

#[derive(Default)]
struct Groups {
    /// Bumped by every invalidation: a list read before it must not be cached after it.
    generation: u64,
    lists: HashMap<String, Members, foldhash::quality::RandomState>,
    members: usize,
}

#[derive(Default)]
pub(crate) struct GroupCache(Mutex<Groups>);

impl GroupCache {
    /// Take before reading a list from the database; pass to [`GroupCache::insert`].
    pub fn generation(&self) -> u64 {
        lock(&self.0).generation
    }

    pub fn get(&self, id: &str) -> Option<Members> {
        lock(&self.0).lists.get(id).cloned()
    }

    /// Caches `members` of `id`, read after [`GroupCache::generation`] returned `generation`,
    /// unless a write invalidated any group since.
    pub fn insert(&self, generation: u64, id: &str, members: Members) {
        let mut g = lock(&self.0);
        if g.generation != generation {
            return;
        }
        if g.lists.len() >= MAX_GROUPS || g.members + members.len() > MAX_MEMBERS {
            g.lists.clear();
            g.members = 0;
        }
        g.members += members.len();
        if let Some(old) = g.lists.insert(id.to_owned(), members) {
            g.members -= old.len();
        }
    }

    /// Forgets `id`'s list, after a write to it committed.
    pub fn invalidate(&self, id: &str) {
        let mut g = lock(&self.0);
        g.generation += 1;
        if let Some(old) = g.lists.remove(id) {
            g.members -= old.len();
        }
    }
}

struct Entries<K, V> {
    /// Bumped by every invalidation: a value read before it must not be cached after it.
    generation: u64,
    /// Looked up per send (friend state, members): foldhash rather than SipHash.
    map: HashMap<K, (V, Instant, usize), foldhash::quality::RandomState>,
    weight: usize,
}

/// A cache kept coherent by its writers: its entries (each trusted at most [`TTL`]), whether
/// changes are heard (nothing is cached while not), and its bounds (entries and a weight, the
/// whole cache dropped when either is reached). A value read before any `forget` is not cached
/// after it (the generation guard).
pub(crate) struct Shared<K, V> {
    entries: Mutex<Entries<K, V>>,
    live: AtomicBool,
    max_entries: usize,
    max_weight: usize,
}

impl<K: Hash + Eq, V: Clone> Shared<K, V> {
    pub(crate) fn new(max_entries: usize, max_weight: usize) -> Self {
        let entries = Entries { generation: 0, map: HashMap::default(), weight: 0 };
        Self { entries: Mutex::new(entries), live: AtomicBool::new(false), max_entries, max_weight }
    }

    fn lock(&self) -> MutexGuard<'_, Entries<K, V>> {
        // Every change is a single insert, remove or clear: consistent after a panic too.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached value, or the generation to hand [`Shared::put`] after reading the store.
    pub(crate) fn get(&self, key: &K) -> std::result::Result<V, u64> {
        let e = self.lock();
        match e.map.get(key) {
            Some((v, at, _)) if at.elapsed() < TTL => Ok(v.clone()),
            _ => Err(e.generation),
        }
    }

    /// Caches `value` read from the store, unless changes are not heard or something was
    /// forgotten since `generation`.
    pub(crate) fn put(&self, key: K, value: V, weight: usize, generation: u64) {
        if !self.listening() {
            return;
        }
        let mut e = self.lock();
        if e.generation != generation {
            return;
        }
        if e.map.len() >= self.max_entries || e.weight + weight > self.max_weight {
            e.map.clear();
            e.weight = 0;
        }
        e.weight += weight;
        if let Some((_, _, old)) = e.map.insert(key, (value, Instant::now(), weight)) {
            e.weight -= old;
        }
    }

    pub(crate) fn forget(&self, keys: impl IntoIterator<Item = K>) {
        let mut e = self.lock();
        e.generation += 1;
        for k in keys {
            if let Some((_, _, w)) = e.map.remove(&k) {
                e.weight -= w;
            }
        }
    }

    pub(crate) fn forget_all(&self) {
        let mut e = self.lock();
        e.generation += 1;
        e.map.clear();
        e.weight = 0;
    }

    /// Drops everything; caches from now on (`live`) or not.
    pub(crate) fn reset(&self, live: bool) {
        self.forget_all();
        self.live.store(live, Ordering::Release);
    }

    pub(crate) fn listening(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }
}

impl<K: Hash + Eq, V: Clone> Shared<K, V> {
    /// A cache whose only writers are in this process and forget what they change themselves:
    /// it caches from the start.
    pub(crate) fn live(max_entries: usize, max_weight: usize) -> Self {
        let me = Self::new(max_entries, max_weight);
        me.reset(true);
        me
    }
}

/// What the writer knows of a conversation, as of its open transaction.
#[derive(Clone, Copy)]
pub(crate) struct ConvState {
    pub seq: u64,
    pub ts: u64,
    /// Hash of the member list whose conversation-index rows are known to exist.
    pub indexed: u64,
}

/// Used by the writer thread only (the mutex is never contended); cleared when the open
/// transaction is lost. Looked up per send, so hashed with foldhash rather than SipHash.
#[derive(Default, Clone)]
pub(crate) struct ConvCache(Arc<Mutex<HashMap<String, ConvState, foldhash::quality::RandomState>>>);

impl ConvCache {
    pub fn get(&self, conv: &str) -> Option<ConvState> {
        lock(&self.0).get(conv).copied()
    }

    pub fn put(&self, conv: &str, state: ConvState) {
        let mut m = lock(&self.0);
        if m.len() >= MAX_CONVS && !m.contains_key(conv) {
            m.clear();
        }
        m.insert(conv.to_owned(), state);
    }

    pub fn clear(&self) {
        lock(&self.0).clear();
    }
}

/// A hash of a member list in any order (0 is never returned, so it can mean "none known"): a
/// direct conversation's members come sender first, so its two members arrive in either order
/// as they talk, and an order-sensitive hash made every change of speaker look like a new member
/// list (two conversation-index lookups in the writer thread per such send).
pub(crate) fn members_hash(members: &[String]) -> u64 {
    let hasher = std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default();
    members.iter().fold(0u64, |sum, m| sum.wrapping_add(hasher.hash_one(m))) | 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FriendState;

    /// The same members in another order hash alike; other lists (a member more, or another
    /// member) do not.
    #[test]
    fn a_member_list_hashes_alike_in_any_order() {
        let list = |l: &[&str]| l.iter().map(|m| m.to_string()).collect::<Vec<_>>();
        let ab = members_hash(&list(&["alice", "bob"]));
        assert_eq!(ab, members_hash(&list(&["bob", "alice"])));
        assert_eq!(members_hash(&list(&["a", "b", "c"])), members_hash(&list(&["c", "a", "b"])));
        assert_ne!(ab, members_hash(&list(&["alice", "carol"])));
        assert_ne!(ab, members_hash(&list(&["alice", "bob", "carol"])));
        assert_ne!(ab, members_hash(&list(&["alice"])));
        assert_ne!(members_hash(&list(&["alice", "alice"])), members_hash(&list(&["alice"])));
        assert_ne!(members_hash(&[]), 0);
    }

    fn pair(a: &str, b: &str) -> (String, String) {
        (a.to_owned(), b.to_owned())
    }

    /// A relation read before a write to any pair is not cached after it (the write could have
    /// changed it between the read and the insert); one read after it is, until the next write
    /// to that pair, which forgets it both ways.
    #[test]
    fn relations_read_before_a_write_are_not_cached() {
        let cache: Shared<(String, String), Option<FriendState>> = Shared::live(10, 10);
        let before = cache.get(&pair("ann", "bob")).unwrap_err();
        cache.forget([pair("ann", "bob"), pair("bob", "ann")]);
        cache.put(pair("ann", "bob"), None, 1, before);
        let after = cache.get(&pair("ann", "bob")).unwrap_err();
        assert_ne!(before, after);
        cache.put(pair("ann", "bob"), Some(FriendState::Friends), 1, after);
        cache.put(pair("bob", "ann"), Some(FriendState::Friends), 1, after);
        assert_eq!(cache.get(&pair("ann", "bob")), Ok(Some(FriendState::Friends)));
        cache.forget([pair("bob", "ann"), pair("ann", "bob")]);
        assert!(cache.get(&pair("ann", "bob")).is_err());
        assert!(cache.get(&pair("bob", "ann")).is_err());
        assert_eq!(cache.lock().weight, 0);
    }
}
