//! In-memory caches of the embedded store, both bounded by entries and dropped whole when full:
//! - [`GroupCache`]: member lists of groups, so the membership check of every `ack`, `read` and
//!   group `send` is a lookup in memory instead of a read transaction. The store's own writes are
//!   the only writers, and each invalidates its group after it commits.
//! - [`FriendCache`]: the relation of a pair of users, so the friendship check of every direct
//!   `send` is a lookup in memory. Like member lists, only the store's own writes change it, and
//!   each forgets the pair (both ways) after it commits.
//! - [`ConvCache`]: per conversation, what the writer thread needs to append the next message (last
//!   seq and ts, and which member list is indexed already), so an append skips three B-tree reads
//!   and, in a group, one conversation-index lookup per member.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::{FriendState, Role};

/// Most groups whose member lists are cached.
const MAX_GROUPS: usize = 50_000;
/// Most members over all cached lists (about 100 bytes each).
const MAX_MEMBERS: usize = 1_000_000;
/// Most relations cached (about 100 bytes each).
const MAX_RELATIONS: usize = 200_000;
/// Most conversations the writer remembers.
const MAX_CONVS: usize = 200_000;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every change is a single insert or remove: the maps are consistent after a panic too.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A group's members, sorted by user.
pub(crate) type Members = Arc<Vec<(String, Role)>>;

#[derive(Default)]
struct Groups {
    /// Bumped by every invalidation: a list read before it must not be cached after it.
    generation: u64,
    lists: HashMap<String, Members>,
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

type FastMap<K, V> = HashMap<K, V, foldhash::quality::RandomState>;

#[derive(Default)]
struct Relations {
    /// Bumped by every invalidation: a relation read before it must not be cached after it.
    generation: u64,
    /// user -> other -> the user's side of the relation (`None`: none); looked up by `&str`,
    /// hashed with foldhash (read on every direct send).
    map: FastMap<String, FastMap<String, Option<FriendState>>>,
    entries: usize,
}

#[derive(Default)]
pub(crate) struct FriendCache(Mutex<Relations>);

impl FriendCache {
    /// The cached relation of `user` to `other`, or the generation to hand
    /// [`FriendCache::insert`] after reading it from the database.
    pub fn get(&self, user: &str, other: &str) -> Result<Option<FriendState>, u64> {
        let r = lock(&self.0);
        match r.map.get(user).and_then(|m| m.get(other)) {
            Some(state) => Ok(state.clone()),
            None => Err(r.generation),
        }
    }

    /// Caches a relation read after [`FriendCache::get`] returned `generation`, unless a write
    /// changed any pair since.
    pub fn insert(&self, generation: u64, user: &str, other: &str, state: Option<FriendState>) {
        let mut r = lock(&self.0);
        if r.generation != generation {
            return;
        }
        if r.entries >= MAX_RELATIONS {
            r.map.clear();
            r.entries = 0;
        }
        if r.map.entry(user.to_owned()).or_default().insert(other.to_owned(), state).is_none() {
            r.entries += 1;
        }
    }

    /// Forgets the pair both ways, after a write to it committed.
    pub fn invalidate(&self, a: &str, b: &str) {
        let mut r = lock(&self.0);
        r.generation += 1;
        for (x, y) in [(a, b), (b, a)] {
            let Some(m) = r.map.get_mut(x) else { continue };
            let removed = m.remove(y).is_some();
            if m.is_empty() {
                r.map.remove(x);
            }
            if removed {
                r.entries -= 1;
            }
        }
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
/// transaction is lost.
#[derive(Default, Clone)]
pub(crate) struct ConvCache(Arc<Mutex<HashMap<String, ConvState>>>);

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

/// A hash of a member list (0 is never returned, so it can mean "none known").
pub(crate) fn members_hash(members: &[String]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    members.hash(&mut h);
    h.finish() | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A relation read before a write to any pair is not cached after it (the write could have
    /// changed it between the read and the insert); one read after it is, until the next write
    /// to that pair, which forgets it both ways.
    #[test]
    fn relations_read_before_a_write_are_not_cached() {
        let cache = FriendCache::default();
        let before = cache.get("ann", "bob").unwrap_err();
        cache.invalidate("ann", "bob");
        cache.insert(before, "ann", "bob", None);
        let after = cache.get("ann", "bob").unwrap_err();
        assert_ne!(before, after);
        cache.insert(after, "ann", "bob", Some(FriendState::Friends));
        cache.insert(after, "bob", "ann", Some(FriendState::Friends));
        assert_eq!(cache.get("ann", "bob"), Ok(Some(FriendState::Friends)));
        cache.invalidate("bob", "ann");
        assert!(cache.get("ann", "bob").is_err());
        assert!(cache.get("bob", "ann").is_err());
        assert_eq!(lock(&cache.0).entries, 0);
    }
}
