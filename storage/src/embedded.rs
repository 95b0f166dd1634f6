//! The embedded backend: every store trait over one redb database file in
//! the data directory, plus a write-ahead log of message appends beside it.
//! Writes go through [`crate::group_commit`]: a write returns only after an
//! fsync covers it (the log's for an append, a recall or a cursor, the
//! database's otherwise), so a successful `append` is durable, while
//! concurrent writes share fsyncs. Reads run inline on the calling task (see
//! [`EmbeddedStore::read`]); the message reads also look at the [`Tail`] of
//! logged changes that the B-trees may not hold yet.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadTransaction, ReadableTable, ReadableTableMetadata, Table, TableHandle, WriteTransaction};

use crate::caches::{members_hash, role_in, ConvCache, ConvState, GroupCache, Members, Shared, MAX_RELATIONS};
use crate::cmid_filter::{CmidFilter, Scan};
use crate::embedded_keys::Utf8;
use crate::embedded_mids::{seq_of_mid, MIDS};
use crate::embedded_search::IndexTables;
pub use crate::group_commit::CheckpointPolicy;
use crate::group_commit::{End, GroupCommit, Log, Logged, Reader};
use crate::tail::{merge, merge_cursors, Entry, Gen, Tail};
use crate::wal::Segments;
use crate::{
    now_ms, AccountStore, AckCursor, Appended, FriendState, Group, GroupStore, Message, MessageStore, NewMessage,
    ReadCursor, RequestOutcome, Result, Role, Session, SocialStore, StorageError, User,
};

use End::{Abort, Commit};

/// The tables, their string keys compared as bytes ([`Utf8`]; a database keyed the older way is
/// moved over when opened, [`crate::embedded_keys`]).
pub(crate) mod tables {
    use redb::TableDefinition;

    use crate::embedded_keys::Utf8;

    pub(crate) const USERS: TableDefinition<Utf8, &[u8]> = TableDefinition::new("users.v2");
    pub(crate) const SESSIONS: TableDefinition<Utf8, &[u8]> = TableDefinition::new("sessions.v2");
    /// refresh token hash -> session id, for every token ever issued.
    pub(crate) const REFRESH: TableDefinition<Utf8, &str> = TableDefinition::new("refresh.v2");
    /// (user, other) -> FriendState as JSON.
    pub(crate) const FRIENDS: TableDefinition<(Utf8, Utf8), &[u8]> = TableDefinition::new("friends.v2");
    /// (conv, seq) -> Message as JSON.
    pub(crate) const MESSAGES: TableDefinition<(Utf8, u64), &[u8]> = TableDefinition::new("messages.v2");
    /// conv -> last seq.
    pub(crate) const CONV_SEQ: TableDefinition<Utf8, u64> = TableDefinition::new("conv_seq.v2");
    /// (conv, from, cmid) -> seq.
    pub(crate) const CMIDS: TableDefinition<(Utf8, Utf8, Utf8), u64> = TableDefinition::new("cmids.v2");
    /// (user, conv) -> () membership index.
    pub(crate) const USER_CONVS: TableDefinition<(Utf8, Utf8), ()> = TableDefinition::new("user_convs.v2");
    /// (user, device, conv) -> acked seq.
    pub(crate) const ACKS: TableDefinition<(Utf8, Utf8, Utf8), u64> = TableDefinition::new("acks.v2");
    /// (user, conv) -> read seq.
    pub(crate) const READS: TableDefinition<(Utf8, Utf8), u64> = TableDefinition::new("reads.v2");
    /// group id -> Group as JSON.
    pub(crate) const GROUPS: TableDefinition<Utf8, &[u8]> = TableDefinition::new("groups.v2");
    /// (group, user) -> role.
    pub(crate) const GROUP_MEMBERS: TableDefinition<(Utf8, Utf8), &str> = TableDefinition::new("group_members.v2");
    /// (user, group) -> role (the reverse index of `GROUP_MEMBERS`).
    pub(crate) const USER_GROUPS: TableDefinition<(Utf8, Utf8), &str> = TableDefinition::new("user_groups.v2");
    /// (user, device) -> PushToken as JSON.
    pub(crate) const PUSH_TOKENS: TableDefinition<(Utf8, Utf8), &[u8]> = TableDefinition::new("push_tokens.v2");
    /// push token -> (user, device) holding it.
    pub(crate) const TOKEN_OWNERS: TableDefinition<Utf8, (&str, &str)> = TableDefinition::new("token_owners.v2");
    /// (user, conv) -> muted until (ms).
    pub(crate) const MUTES: TableDefinition<(Utf8, Utf8), u64> = TableDefinition::new("mutes.v2");
    /// (user, other): `user` blocks `other`.
    pub(crate) const BLOCKS: TableDefinition<(Utf8, Utf8), ()> = TableDefinition::new("blocks.v2");
}
pub(crate) use tables::*;

/// All stores over one redb file. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    writer: Arc<GroupCommit>,
    tail: Tail,
    convs: ConvCache,
    /// The filter of the cmids stored, so a new one skips the index probe, with the scan that
    /// fills it at open (`None`: configured off).
    cmids: Option<Arc<Scan>>,
    groups: Arc<GroupCache>,
    /// (user, other) -> the user's side of their relation.
    friends: Arc<Shared<(String, String), Option<FriendState>>>,
    /// Declared last, so dropped last: by the time the last clone drops it, the writer and scan
    /// threads were joined and the database closed.
    closed: Arc<Closed>,
}

/// Marks its store closed when dropped (see [`EmbeddedStore::closed_watch`]).
struct Closed(Arc<std::sync::atomic::AtomicBool>);

impl Drop for Closed {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// Whether every clone of an [`EmbeddedStore`] is gone and its database closed (its threads
/// joined, its file unlocked): another store may open the directory then.
#[derive(Clone)]
pub struct ClosedWatch(Arc<std::sync::atomic::AtomicBool>);

impl ClosedWatch {
    pub fn is_closed(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl EmbeddedStore {
    /// Tells when this store (all of its clones) has closed.
    pub fn closed_watch(&self) -> ClosedWatch {
        ClosedWatch(self.closed.0.clone())
    }

    /// Opens (or creates) `dir/switchboard.redb` with the default checkpoint policy, creating
    /// `dir` if needed.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with(dir, CheckpointPolicy::default())
    }

    /// Opens (or creates) `dir/switchboard.redb` and its write-ahead log segments
    /// `dir/appends-<n>.wal`, replaying into the database whatever the log holds that it does
    /// not (what was acknowledged since the last checkpoint before a crash).
    pub fn open_with(dir: &Path, policy: CheckpointPolicy) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| StorageError::embedded(format!("{}: {e}", dir.display())))?;
        let db = Database::create(dir.join("switchboard.redb"))?;
        let tx = db.begin_write()?;
        crate::embedded_keys::carry_legacy(&tx)?;
        {
            tx.open_table(USERS)?;
            tx.open_table(SESSIONS)?;
            tx.open_table(REFRESH)?;
            tx.open_table(FRIENDS)?;
            tx.open_table(MESSAGES)?;
            tx.open_table(CONV_SEQ)?;
            tx.open_table(CMIDS)?;
            tx.open_table(USER_CONVS)?;
            tx.open_table(ACKS)?;
            tx.open_table(READS)?;
            tx.open_table(GROUPS)?;
            tx.open_table(GROUP_MEMBERS)?;
            tx.open_table(USER_GROUPS)?;
            tx.open_table(BLOCKS)?;
            tx.open_table(PUSH_TOKENS)?;
            tx.open_table(TOKEN_OWNERS)?;
            tx.open_table(MUTES)?;
            // The mid index arrived after the messages table: fill it for messages stored
            // before it existed (newer messages are found by timestamp, `embedded_mids`).
            let mids_existed = tx.list_tables()?.any(|t| t.name() == MIDS.name());
            let mut mids = tx.open_table(MIDS)?;
            let messages = tx.open_table(MESSAGES)?;
            if !mids_existed && !messages.is_empty()? {
                for row in messages.iter()? {
                    let m: Message = serde_json::from_slice(row?.1.value())?;
                    mids.insert((m.conv.as_str(), m.mid.as_str()), m.seq)?;
                }
            }
            drop(mids);
            // So do the mention marks and the search index.
            crate::embedded_search::create(&tx, &messages)?;
        }
        tx.commit()?;
        let (records, last) = Segments::recover(dir)?;
        if !records.is_empty() {
            let tx = db.begin_write()?;
            replay(&tx, &records)?;
            tx.commit()?;
            tracing::info!(records = records.len(), "embedded store: replayed the write-ahead log");
        }
        Segments::retire_through(dir, last)?;
        let segments = Segments::start(dir, last + 1)?;
        let db = Arc::new(db);
        let tail = Tail::default();
        let convs = ConvCache::default();
        let lost = convs.clone();
        let log = Log {
            segments,
            dir: dir.to_owned(),
            tail: tail.clone(),
            apply,
            policy,
            lost: Box::new(move || lost.clear()),
        };
        let writer = Arc::new(GroupCommit::start(db.clone(), log)?);
        let cmids = match CmidFilter::new(policy.cmid_filter_bytes) {
            Some(filter) => Some(Arc::new(Scan::start(filter, db.clone(), policy.nice)?)),
            None => None,
        };
        Ok(Self {
            db,
            writer,
            tail,
            convs,
            cmids,
            groups: Arc::default(),
            friends: Arc::new(Shared::live(MAX_RELATIONS, MAX_RELATIONS)),
            closed: Arc::new(Closed(Arc::default())),
        })
    }

    /// Runs `f` in a read transaction, on the calling task. Reads are short
    /// B-tree lookups on pages redb mostly has cached, far cheaper than the
    /// hop to the blocking pool and back that running them there would cost
    /// on every request; writes, which fsync, go to the writer thread.
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&ReadTransaction) -> Result<T> + Send + 'static,
    {
        f(&self.db.begin_read()?)
    }

    /// Runs `f` in a write transaction on the writer thread, committing it
    /// when `f` says [`End::Commit`]; on [`End::Abort`] or an error the
    /// transaction is dropped, which aborts it. Resolves once durable.
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<End<T>> + Send + 'static,
    {
        self.writer.write(f).await
    }
}

fn get_json<T: serde::de::DeserializeOwned>(bytes: Option<redb::AccessGuard<'_, &[u8]>>) -> Result<Option<T>> {
    match bytes {
        Some(b) => Ok(Some(serde_json::from_slice(b.value())?)),
        None => Ok(None),
    }
}

fn put_json<'k, K: redb::Key + 'static>(
    table: &mut Table<K, &'static [u8]>,
    key: impl Borrow<K::SelfType<'k>>,
    value: &impl serde::Serialize,
) -> Result<()> {
    table.insert(key, serde_json::to_vec(value)?.as_slice())?;
    Ok(())
}

/// Lets `f` change the JSON value at `key` and writes it back if `f`
/// returns `true`. The value written, or `None` when there was no value or
/// `f` declined.
fn update_json<'k, K: redb::Key + 'static, T: serde::Serialize + serde::de::DeserializeOwned>(
    table: &mut Table<K, &'static [u8]>,
    key: impl Borrow<K::SelfType<'k>> + Copy,
    f: impl FnOnce(&mut T) -> bool,
) -> Result<Option<T>> {
    let Some(mut value) = get_json::<T>(table.get(key)?)? else { return Ok(None) };
    if !f(&mut value) {
        return Ok(None);
    }
    put_json(table, key, &value)?;
    Ok(Some(value))
}

/// The rows of a table keyed by (first, second) whose first part is
/// `first`, in key order, each mapped by `f` from (second, value).
pub(crate) fn rows_under<V: redb::Value + 'static, R>(
    table: &impl ReadableTable<(Utf8, Utf8), V>,
    first: &str,
    mut f: impl FnMut(&str, V::SelfType<'_>) -> Result<R>,
) -> Result<Vec<R>> {
    let mut out = Vec::new();
    for row in table.range((first, "")..)? {
        let (k, v) = row?;
        let (owner, second) = k.value();
        if owner != first {
            break;
        }
        out.push(f(second, v.value())?);
    }
    Ok(out)
}

/// Decodes message rows (JSON values).
fn messages<'a, K: redb::Key + 'static>(
    rows: impl Iterator<
        Item = std::result::Result<
            (redb::AccessGuard<'a, K>, redb::AccessGuard<'a, &'static [u8]>),
            redb::StorageError,
        >,
    >,
) -> Result<Vec<Message>> {
    rows.map(|row| Ok(serde_json::from_slice(row?.1.value())?)).collect()
}

#[async_trait]
impl AccountStore for EmbeddedStore {
    async fn create_user(&self, user: &User) -> Result<bool> {
        let user = user.clone();
        self.write(move |tx| {
            let mut t = tx.open_table(USERS)?;
            if t.get(user.username.as_str())?.is_some() {
                return Ok(Abort(false));
            }
            put_json(&mut t, user.username.as_str(), &user)?;
            Ok(Commit(true))
        })
        .await
    }

    async fn get_user(&self, username: &str) -> Result<Option<User>> {
        let name = username.to_owned();
        self.read(move |tx| get_json(tx.open_table(USERS)?.get(name.as_str())?)).await
    }

    async fn put_session(&self, session: &Session) -> Result<()> {
        let s = session.clone();
        self.write(move |tx| {
            put_json(&mut tx.open_table(SESSIONS)?, s.id.as_str(), &s)?;
            tx.open_table(REFRESH)?.insert(s.refresh_hash.as_str(), s.id.as_str())?;
            Ok(Commit(()))
        })
        .await
    }

    async fn get_session(&self, id: &str) -> Result<Option<Session>> {
        let id = id.to_owned();
        self.read(move |tx| get_json(tx.open_table(SESSIONS)?.get(id.as_str())?)).await
    }

    async fn session_by_refresh(&self, refresh_hash: &str) -> Result<Option<Session>> {
        let h = refresh_hash.to_owned();
        self.read(move |tx| {
            let Some(id) = tx.open_table(REFRESH)?.get(h.as_str())?.map(|v| v.value().to_owned()) else {
                return Ok(None);
            };
            get_json(tx.open_table(SESSIONS)?.get(id.as_str())?)
        })
        .await
    }

    async fn rotate_refresh(&self, session_id: &str, old_hash: &str, new_hash: &str, expires_ms: u64) -> Result<bool> {
        let (id, old, new) = (session_id.to_owned(), old_hash.to_owned(), new_hash.to_owned());
        self.write(move |tx| {
            let rotated = update_json(&mut tx.open_table(SESSIONS)?, id.as_str(), |s: &mut Session| {
                if s.revoked || s.refresh_hash != old {
                    return false;
                }
                s.refresh_hash = new.clone();
                s.refresh_expires_ms = expires_ms;
                true
            })?;
            if rotated.is_none() {
                return Ok(Abort(false));
            }
            tx.open_table(REFRESH)?.insert(new.as_str(), id.as_str())?;
            Ok(Commit(true))
        })
        .await
    }

    async fn prune_sessions(&self, before_ms: u64) -> Result<usize> {
        self.write(move |tx| {
            let mut sessions = tx.open_table(SESSIONS)?;
            let mut gone = std::collections::HashSet::new();
            for row in sessions.iter()? {
                let (id, value) = row?;
                let s: Session = serde_json::from_slice(value.value())?;
                if s.refresh_expires_ms < before_ms {
                    gone.insert(id.value().to_owned());
                }
            }
            if gone.is_empty() {
                return Ok(Abort(0));
            }
            for id in &gone {
                sessions.remove(id.as_str())?;
            }
            let mut refresh = tx.open_table(REFRESH)?;
            let stale: Vec<String> = refresh
                .iter()?
                .filter_map(|row| match row {
                    Ok((hash, id)) => gone.contains(id.value()).then(|| Ok(hash.value().to_owned())),
                    Err(e) => Some(Err(e)),
                })
                .collect::<std::result::Result<_, _>>()?;
            for hash in &stale {
                refresh.remove(hash.as_str())?;
            }
            Ok(Commit(gone.len()))
        })
        .await
    }

    async fn revoke_session(&self, id: &str) -> Result<()> {
        let id = id.to_owned();
        self.write(move |tx| {
            update_json(&mut tx.open_table(SESSIONS)?, id.as_str(), |s: &mut Session| {
                s.revoked = true;
                true
            })?;
            Ok(Commit(()))
        })
        .await
    }

    async fn set_banned(&self, username: &str, banned: bool) -> Result<bool> {
        let name = username.to_owned();
        self.write(move |tx| {
            let mut users = tx.open_table(USERS)?;
            let current: Option<User> = get_json(users.get(name.as_str())?)?;
            let Some(mut user) = current else { return Ok(Abort(false)) };
            if user.banned != banned {
                user.banned = banned;
                put_json(&mut users, name.as_str(), &user)?;
            }
            Ok(Commit(true))
        })
        .await
    }

    async fn put_push_token(&self, token: &crate::PushToken) -> Result<()> {
        let t = token.clone();
        self.write(move |tx| {
            let (mut tokens, mut owners) = (tx.open_table(PUSH_TOKENS)?, tx.open_table(TOKEN_OWNERS)?);
            let owner = owners.get(t.token.as_str())?.map(|v| {
                let (u, d) = v.value();
                (u.to_owned(), d.to_owned())
            });
            if let Some((u, d)) = owner {
                tokens.remove((u.as_str(), d.as_str()))?;
            }
            let earlier: Option<crate::PushToken> = get_json(tokens.get((t.user.as_str(), t.device.as_str()))?)?;
            if let Some(earlier) = earlier {
                owners.remove(earlier.token.as_str())?;
            }
            put_json(&mut tokens, (t.user.as_str(), t.device.as_str()), &t)?;
            owners.insert(t.token.as_str(), (t.user.as_str(), t.device.as_str()))?;
            Ok(Commit(()))
        })
        .await
    }

    async fn remove_push_token(&self, user: &str, device: &str) -> Result<bool> {
        let (user, device) = (user.to_owned(), device.to_owned());
        self.write(move |tx| {
            let mut tokens = tx.open_table(PUSH_TOKENS)?;
            let earlier: Option<crate::PushToken> = get_json(tokens.remove((user.as_str(), device.as_str()))?)?;
            let Some(earlier) = earlier else { return Ok(Abort(false)) };
            tx.open_table(TOKEN_OWNERS)?.remove(earlier.token.as_str())?;
            Ok(Commit(true))
        })
        .await
    }

    async fn push_tokens(&self, user: &str) -> Result<Vec<crate::PushToken>> {
        let user = user.to_owned();
        self.read(move |tx| {
            rows_under(&tx.open_table(PUSH_TOKENS)?, &user, |_, v: &[u8]| Ok(serde_json::from_slice(v)?))
        })
        .await
    }

    async fn set_mute(&self, user: &str, conv: &str, until_ms: Option<u64>) -> Result<()> {
        let (user, conv) = (user.to_owned(), conv.to_owned());
        self.write(move |tx| {
            let mut t = tx.open_table(MUTES)?;
            match until_ms {
                Some(until) => t.insert((user.as_str(), conv.as_str()), until)?,
                None => t.remove((user.as_str(), conv.as_str()))?,
            };
            Ok(Commit(()))
        })
        .await
    }

    async fn mutes(&self, user: &str) -> Result<HashMap<String, u64>> {
        let user = user.to_owned();
        self.read(move |tx| {
            Ok(rows_under(&tx.open_table(MUTES)?, &user, |conv, until| Ok((conv.to_owned(), until)))?
                .into_iter()
                .collect())
        })
        .await
    }
}

/// Sets the relation of `a` to `b` and of `b` to `a`.
fn put_pair(t: &mut Table<(Utf8, Utf8), &[u8]>, a: &str, b: &str, ab: &FriendState, ba: &FriendState) -> Result<()> {
    put_json(t, (a, b), ab)?;
    put_json(t, (b, a), ba)
}

/// Removes the relation in both directions; whether `a -> b` existed.
fn remove_pair(t: &mut Table<(Utf8, Utf8), &[u8]>, a: &str, b: &str) -> Result<bool> {
    let existed = t.remove((a, b))?.is_some();
    t.remove((b, a))?;
    Ok(existed)
}

impl EmbeddedStore {
    /// `user` accepts (both become friends) or rejects (both relations go)
    /// the pending request of `from`; `false` if there is none.
    async fn answer_request(&self, user: &str, from: &str, accept: bool) -> Result<bool> {
        let (a, b) = (user.to_owned(), from.to_owned());
        self.pair_write(user, from, move |tx| {
            let mut t = tx.open_table(FRIENDS)?;
            let current: Option<FriendState> = get_json(t.get((a.as_str(), b.as_str()))?)?;
            if !matches!(current, Some(FriendState::Incoming { .. })) {
                return Ok(Abort(false));
            }
            if accept {
                put_pair(&mut t, &a, &b, &FriendState::Friends, &FriendState::Friends)?;
            } else {
                remove_pair(&mut t, &a, &b)?;
            }
            Ok(Commit(true))
        })
        .await
    }
}

#[async_trait]
impl SocialStore for EmbeddedStore {
    async fn friend_state(&self, user: &str, other: &str) -> Result<Option<FriendState>> {
        let key = (user.to_owned(), other.to_owned());
        let generation = match self.friends.get(&key) {
            Ok(state) => return Ok(state),
            Err(generation) => generation,
        };
        let (a, b) = key.clone();
        let state: Option<FriendState> =
            self.read(move |tx| get_json(tx.open_table(FRIENDS)?.get((a.as_str(), b.as_str()))?)).await?;
        self.friends.put(key, state.clone(), 1, generation);
        Ok(state)
    }

    async fn request_friend(&self, from: &str, to: &str, note: &str) -> Result<RequestOutcome> {
        let (a, b, note) = (from.to_owned(), to.to_owned(), note.to_owned());
        self.pair_write(from, to, move |tx| {
            let blocks = tx.open_table(BLOCKS)?;
            if blocks.get((a.as_str(), b.as_str()))?.is_some() || blocks.get((b.as_str(), a.as_str()))?.is_some() {
                return Ok(Abort(RequestOutcome::Blocked));
            }
            let mut t = tx.open_table(FRIENDS)?;
            let current: Option<FriendState> = get_json(t.get((a.as_str(), b.as_str()))?)?;
            Ok(Commit(match current {
                Some(FriendState::Friends) => return Ok(Abort(RequestOutcome::AlreadyFriends)),
                Some(FriendState::Incoming { .. }) => {
                    put_pair(&mut t, &a, &b, &FriendState::Friends, &FriendState::Friends)?;
                    RequestOutcome::BecameFriends
                }
                Some(FriendState::Outgoing { .. }) | None => {
                    let (ab, ba) = (FriendState::Outgoing { note: note.clone() }, FriendState::Incoming { note });
                    put_pair(&mut t, &a, &b, &ab, &ba)?;
                    RequestOutcome::Pending
                }
            }))
        })
        .await
    }

    async fn accept_friend(&self, user: &str, from: &str) -> Result<bool> {
        self.answer_request(user, from, true).await
    }

    async fn reject_friend(&self, user: &str, from: &str) -> Result<bool> {
        self.answer_request(user, from, false).await
    }

    async fn delete_friend(&self, user: &str, other: &str) -> Result<bool> {
        let (a, b) = (user.to_owned(), other.to_owned());
        self.pair_write(user, other, move |tx| Ok(Commit(remove_pair(&mut tx.open_table(FRIENDS)?, &a, &b)?))).await
    }

    async fn relations(&self, user: &str) -> Result<Vec<(String, FriendState)>> {
        let a = user.to_owned();
        self.read(move |tx| {
            rows_under(&tx.open_table(FRIENDS)?, &a, |other, v| Ok((other.to_owned(), serde_json::from_slice(v)?)))
        })
        .await
    }

    async fn set_block(&self, user: &str, other: &str, block: bool) -> Result<bool> {
        let (a, b) = (user.to_owned(), other.to_owned());
        self.pair_write(user, other, move |tx| {
            let mut blocks = tx.open_table(BLOCKS)?;
            if !block {
                return Ok(match blocks.remove((a.as_str(), b.as_str()))? {
                    Some(_) => Commit(true),
                    None => Abort(false),
                });
            }
            if blocks.insert((a.as_str(), b.as_str()), ())?.is_some() {
                return Ok(Abort(false));
            }
            remove_pair(&mut tx.open_table(FRIENDS)?, &a, &b)?;
            Ok(Commit(true))
        })
        .await
    }

    async fn blocks(&self, user: &str, other: &str) -> Result<bool> {
        let (a, b) = (user.to_owned(), other.to_owned());
        self.read(move |tx| Ok(tx.open_table(BLOCKS)?.get((a.as_str(), b.as_str()))?.is_some())).await
    }

    async fn blocked(&self, user: &str) -> Result<Vec<String>> {
        let a = user.to_owned();
        self.read(move |tx| rows_under(&tx.open_table(BLOCKS)?, &a, |other, ()| Ok(other.to_owned()))).await
    }
}

/// The tables a message append writes, each opened once (an open and its close each cost a
/// lookup in the transaction's table tree).
struct MessageTables<'t> {
    messages: Table<'t, (Utf8, u64), &'static [u8]>,
    conv_seq: Table<'t, Utf8, u64>,
    cmids: Table<'t, (Utf8, Utf8, Utf8), u64>,
    mids: Table<'t, (Utf8, Utf8), u64>,
    user_convs: Table<'t, (Utf8, Utf8), ()>,
}

impl<'t> MessageTables<'t> {
    fn open(tx: &'t WriteTransaction) -> Result<Self> {
        Ok(Self {
            messages: tx.open_table(MESSAGES)?,
            conv_seq: tx.open_table(CONV_SEQ)?,
            cmids: tx.open_table(CMIDS)?,
            mids: tx.open_table(MIDS)?,
            user_convs: tx.open_table(USER_CONVS)?,
        })
    }

    /// The seq of message `mid` of `conv`, including the messages this transaction wrote.
    fn seq_of_mid(&self, conv: &str, mid: &str) -> Result<Option<u64>> {
        seq_of_mid(&self.mids, &self.messages, conv, mid)
    }

    /// Writes a stored message (`json` is its encoding) and its index rows, with the first
    /// conversation-index rows of `indexed` members.
    fn put(&mut self, m: &Message, json: &[u8], indexed: &[String]) -> Result<()> {
        let conv = m.conv.as_str();
        self.messages.insert((conv, m.seq), json)?;
        self.conv_seq.insert(conv, m.seq)?;
        self.cmids.insert((conv, m.from.as_str(), m.cmid.as_str()), m.seq)?;
        for user in indexed {
            self.user_convs.insert((user.as_str(), conv), ())?;
        }
        Ok(())
    }
}

/// Log record tags: a message append, raised ack cursors, raised read marks, a recall.
const APPEND: u8 = b'M';
const ACKS_RAISED: u8 = b'A';
const READS_RAISED: u8 = b'R';
const RECALLED: u8 = b'X';

/// A log record of an append: [`APPEND`], the message's JSON length (u32 LE), its JSON, then the
/// members indexed with it as a JSON array.
fn encode_record(json: &[u8], indexed: &[String]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(5 + json.len() + 16);
    out.push(APPEND);
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(json);
    serde_json::to_writer(&mut out, indexed)?;
    Ok(out)
}

/// A message's stored encoding, written into a buffer sized for it at once (not grown from
/// empty through several reallocations as it is written).
fn encode_message(m: &Message) -> Result<Vec<u8>> {
    let strings = m.conv.len() + m.mid.len() + m.from.len() + m.cmid.len() + m.kind.len();
    let mut out = Vec::with_capacity(128 + strings + crate::tail::value_bytes(&m.body));
    serde_json::to_writer(&mut out, m)?;
    Ok(out)
}

/// A log record of cursors (or of a recalled message): its tag, then the value as JSON, in a
/// buffer of `capacity` bytes to start with.
fn encode_tagged(tag: u8, value: &impl serde::Serialize, capacity: usize) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(capacity);
    out.push(tag);
    serde_json::to_writer(&mut out, value)?;
    Ok(out)
}

fn decode_append(record: &[u8]) -> Result<(Message, &[u8], Vec<String>)> {
    let corrupt = || StorageError::Corrupt("write-ahead log record too short".into());
    let len = u32::from_le_bytes(record.get(..4).ok_or_else(corrupt)?.try_into().expect("4 bytes")) as usize;
    let json = record.get(4..4 + len).ok_or_else(corrupt)?;
    Ok((serde_json::from_slice(json)?, json, serde_json::from_slice(&record[4 + len..])?))
}

/// Writes the logged appends that `tx` does not hold yet (a seq above its conversation's last),
/// in log order, and applies the logged recalls and cursors (both idempotent).
fn replay(tx: &WriteTransaction, records: &[Vec<u8>]) -> Result<()> {
    let mut tables = MessageTables::open(tx)?;
    let mut index = IndexTables::open(tx)?;
    for record in records {
        match record.split_first() {
            Some((&APPEND, rest)) => {
                let (m, json, indexed) = decode_append(rest)?;
                let last = tables.conv_seq.get(m.conv.as_str())?.map_or(0, |v| v.value());
                if m.seq <= last {
                    continue;
                }
                if m.seq != last + 1 {
                    return Err(StorageError::Corrupt(format!(
                        "write-ahead log: {}#{} follows #{last}: a record is missing",
                        m.conv, m.seq
                    )));
                }
                tables.put(&m, json, &indexed)?;
                index.message(&m, true, &m.mentions, |mid| tables.seq_of_mid(&m.conv, mid))?;
            }
            Some((&RECALLED, json)) => {
                let m: Message = serde_json::from_slice(json)?;
                tables.messages.insert((m.conv.as_str(), m.seq), json)?;
            }
            Some((&ACKS_RAISED, rest)) => {
                raise_acks(tx, &serde_json::from_slice::<Vec<AckCursor>>(rest)?)?;
            }
            Some((&READS_RAISED, rest)) => {
                raise_reads(tx, &serde_json::from_slice::<Vec<ReadCursor>>(rest)?)?;
            }
            _ => return Err(StorageError::Corrupt("write-ahead log record of unknown kind".into())),
        }
    }
    index.finish()
}

/// A checkpoint: writes a frozen tail generation into the B-trees, each table's rows in key
/// order (neighbouring inserts touch the same pages), a conversation's last seq once.
fn apply(tx: &WriteTransaction, gen: &Gen) -> Result<()> {
    let mut tables = MessageTables::open(tx)?;
    let mut convs: Vec<_> = gen.convs.iter().collect();
    convs.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let mut cmids = Vec::new();
    for (conv, c) in &convs {
        for (seq, held) in &c.by_seq {
            tables.messages.insert((conv.as_str(), *seq), &held.json[..])?;
            if held.appended {
                cmids.push((conv.as_str(), held.msg.from.as_str(), held.msg.cmid.as_str(), *seq));
            }
        }
        if c.last > 0 {
            tables.conv_seq.insert(conv.as_str(), c.last)?;
        }
    }
    cmids.sort_unstable();
    for (conv, from, cmid, seq) in cmids {
        tables.cmids.insert((conv, from, cmid), seq)?;
    }
    // The derived indexes, each conversation's messages in seq order (an edit after its target).
    let mut index = IndexTables::open(tx)?;
    for (conv, c) in &convs {
        for held in c.by_seq.values() {
            index.message(&held.msg, held.appended, &held.mentions, |mid| tables.seq_of_mid(conv, mid))?;
        }
    }
    index.finish()?;
    let mut indexed: Vec<(&str, &str)> =
        gen.indexed.iter().flat_map(|(u, cs)| cs.iter().map(move |c| (u.as_str(), c.as_str()))).collect();
    indexed.sort_unstable();
    for key in indexed {
        tables.user_convs.insert(key, ())?;
    }
    drop(tables);
    let mut acks: Vec<AckCursor> = gen
        .acks
        .iter()
        .flat_map(|((u, d), cs)| {
            cs.iter().map(move |(c, &seq)| AckCursor { user: u.clone(), device: d.clone(), conv: c.clone(), seq })
        })
        .collect();
    acks.sort_unstable_by(|a, b| (&a.user, &a.device, &a.conv).cmp(&(&b.user, &b.device, &b.conv)));
    raise_acks(tx, &acks)?;
    let mut reads: Vec<ReadCursor> = gen
        .reads
        .iter()
        .flat_map(|(u, cs)| cs.iter().map(move |(c, &seq)| ReadCursor { user: u.clone(), conv: c.clone(), seq }))
        .collect();
    reads.sort_unstable_by(|a, b| (&a.user, &a.conv).cmp(&(&b.user, &b.conv)));
    raise_reads(tx, &reads)?;
    Ok(())
}

/// Raises the stored ack cursors to `cursors`.
fn raise_acks(tx: &WriteTransaction, cursors: &[AckCursor]) -> Result<()> {
    let mut t = tx.open_table(ACKS)?;
    for c in cursors {
        let key = (c.user.as_str(), c.device.as_str(), c.conv.as_str());
        let current = t.get(key)?.map(|v| v.value()).unwrap_or(0);
        if c.seq > current {
            t.insert(key, c.seq)?;
        }
    }
    Ok(())
}

/// Raises the stored read marks to `cursors`.
fn raise_reads(tx: &WriteTransaction, cursors: &[ReadCursor]) -> Result<()> {
    let mut t = tx.open_table(READS)?;
    for c in cursors {
        let key = (c.user.as_str(), c.conv.as_str());
        let current = t.get(key)?.map(|v| v.value()).unwrap_or(0);
        if c.seq > current {
            t.insert(key, c.seq)?;
        }
    }
    Ok(())
}

/// The message `conv`#`seq` as the log thread sees it: the tail (with its batch in progress),
/// then the B-trees.
fn logged_message(reader: &Reader, tail: &Tail, conv: &str, seq: u64) -> Result<Option<Arc<Message>>> {
    if let Some(m) = tail.at(conv, seq, true) {
        return Ok(Some(m));
    }
    let stored: Option<Message> = reader.with(MESSAGES, |t| get_json(t.get((conv, seq))?))?;
    Ok(stored.map(Arc::new))
}

/// The write of one appended message: the next seq of its conversation (or the earlier message
/// with the same cmid), on the log thread.
fn append_job(
    msg: NewMessage,
    members: Vec<String>,
    cache: ConvCache,
    tail: Tail,
    filter: Option<Arc<CmidFilter>>,
) -> impl FnOnce(&Reader) -> Result<Logged<Appended>> + Send + 'static {
    move |reader| {
        let conv = msg.conv.as_str();
        // The filter holds every cmid appended since open (the tail's included) and, once
        // complete, every one stored before: "not stored" needs neither the tail nor the index.
        let slot = filter.as_ref().map(|f| (f, f.slot(conv, &msg.from, &msg.cmid)));
        let stored_maybe = slot.is_none_or(|(f, s)| f.may_hold(s));
        crate::metrics::count_cmid_lookup(stored_maybe);
        let earlier = if !stored_maybe {
            None
        } else if let Some(m) = tail.by_cmid(conv, &msg.from, &msg.cmid, true) {
            Some(m)
        } else {
            match reader.with(CMIDS, |t| Ok(t.get((conv, msg.from.as_str(), msg.cmid.as_str()))?.map(|v| v.value())))? {
                Some(seq) => Some(
                    logged_message(reader, &tail, conv, seq)?
                        .ok_or_else(|| StorageError::Corrupt(format!("cmid index points at missing {conv}#{seq}")))?,
                ),
                None => None,
            }
        };
        if let Some(earlier) = earlier {
            return Ok(Logged::Unchanged(Appended { msg: (*earlier).clone(), duplicate: true, json: None }));
        }
        let known = cache.get(conv);
        // The tail is asked only when the cache does not know the conversation.
        let (last, last_ts) = match known.map(|k| (k.seq, k.ts)).or_else(|| tail.last(conv, true)) {
            Some(last) => last,
            None => {
                let last = reader.with(CONV_SEQ, |t| Ok(t.get(conv)?.map(|v| v.value()).unwrap_or(0)))?;
                let ts = match last {
                    0 => 0,
                    n => logged_message(reader, &tail, conv, n)?.map_or(0, |m| m.ts),
                };
                (last, ts)
            }
        };
        // ts never goes backwards inside a conversation, so seq order
        // and time order agree even if the wall clock steps back.
        let stored = msg.stored_as(last + 1, now_ms().max(last_ts));
        let hash = members_hash(&members);
        let mut indexed = Vec::new();
        if known.is_none_or(|k| k.indexed != hash) {
            let mut missing = Vec::new();
            for m in members {
                if !tail.indexed(&m, &stored.conv) {
                    missing.push(m);
                }
            }
            if !missing.is_empty() {
                reader.with(USER_CONVS, |t| {
                    for m in missing {
                        if t.get((m.as_str(), stored.conv.as_str()))?.is_none() {
                            indexed.push(m);
                        }
                    }
                    Ok(())
                })?;
            }
        }
        let json = encode_message(&stored)?;
        let record = encode_record(&json, &indexed)?;
        // The same conversation, sender and cmid as `msg`: its slot is reused.
        if let Some((f, s)) = slot {
            f.insert(s);
        }
        cache.put(&stored.conv, ConvState { seq: stored.seq, ts: stored.ts, indexed: hash });
        let bytes = record.len();
        let msg = Arc::new(stored);
        let json = bytes::Bytes::from(json);
        let entry = Entry::Message { msg: msg.clone(), json: json.clone(), indexed, bytes };
        let value = Appended { msg: Arc::unwrap_or_clone(msg), duplicate: false, json: Some(json) };
        Ok(Logged::Appended { value, record, entry })
    }
}

impl EmbeddedStore {
    fn append_job(
        &self,
        msg: NewMessage,
        members: &[String],
    ) -> impl FnOnce(&Reader) -> Result<Logged<Appended>> + Send + 'static {
        let filter = self.cmids.as_ref().map(|s| s.filter.clone());
        append_job(msg, members.to_vec(), self.convs.clone(), self.tail.clone(), filter)
    }

    /// The message of `conv` whose seq `index` finds in a read transaction (a cmid or mid
    /// index), as the tail has it if it changed there. Tried again if a checkpoint committed
    /// meanwhile, since the tail may then have let go of a change the transaction predates.
    async fn indexed_message<F>(&self, conv: &str, index: F) -> Result<Option<Message>>
    where
        F: Fn(&ReadTransaction) -> Result<Option<u64>> + Send + Sync + 'static,
    {
        let index = Arc::new(index);
        loop {
            let before = self.writer.commits();
            let (c, index) = (conv.to_owned(), index.clone());
            let stored = self
                .read(move |tx| {
                    let seq = index(tx)?;
                    Ok(match seq {
                        Some(seq) => get_json::<Message>(tx.open_table(MESSAGES)?.get((c.as_str(), seq))?)?,
                        None => None,
                    })
                })
                .await?;
            let fresher = stored.as_ref().and_then(|m| self.tail.at(conv, m.seq, false));
            if self.writer.commits() == before {
                return Ok(fresher.map(|m| (*m).clone()).or(stored));
            }
        }
    }
}

#[async_trait]
impl MessageStore for EmbeddedStore {
    // The message comes back by value when unused: boxing it would cost the allocation per
    // send that taking it by value saves.
    #[allow(clippy::result_large_err)]
    fn append_ordered(
        &self,
        msg: NewMessage,
        members: &[String],
    ) -> std::result::Result<
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Appended>> + Send + 'static>>,
        NewMessage,
    > {
        let job = self.append_job(msg, members);
        Ok(Box::pin(self.writer.append(job)))
    }

    async fn append(&self, msg: NewMessage, members: &[String]) -> Result<Appended> {
        self.writer.append(self.append_job(msg, members)).await
    }

    async fn find_cmid(&self, conv: &str, from: &str, cmid: &str) -> Result<Option<Message>> {
        if let Some(m) = self.tail.by_cmid(conv, from, cmid, false) {
            return Ok(Some((*m).clone()));
        }
        let (c, from, cmid) = (conv.to_owned(), from.to_owned(), cmid.to_owned());
        self.indexed_message(conv, move |tx| {
            Ok(tx.open_table(CMIDS)?.get((c.as_str(), from.as_str(), cmid.as_str()))?.map(|v| v.value()))
        })
        .await
    }

    async fn range(&self, conv: &str, after_seq: u64, limit: usize) -> Result<Vec<Message>> {
        let start = after_seq.saturating_add(1);
        let tail = self.tail.messages(conv, start..);
        let conv = conv.to_owned();
        let mut out = self
            .read(move |tx| {
                messages(
                    tx.open_table(MESSAGES)?.range((conv.as_str(), start)..=(conv.as_str(), u64::MAX))?.take(limit),
                )
            })
            .await?;
        if !tail.is_empty() {
            out = merge(out, tail);
            out.truncate(limit);
        }
        Ok(out)
    }

    async fn history(&self, conv: &str, before_seq: Option<u64>, limit: usize) -> Result<Vec<Message>> {
        let end = before_seq.unwrap_or(u64::MAX);
        let tail = self.tail.messages(conv, ..end);
        let conv = conv.to_owned();
        let mut out = self
            .read(move |tx| {
                messages(tx.open_table(MESSAGES)?.range((conv.as_str(), 0)..(conv.as_str(), end))?.rev().take(limit))
            })
            .await?;
        if !tail.is_empty() {
            out.reverse();
            out = merge(out, tail);
            out.reverse();
            out.truncate(limit);
        }
        Ok(out)
    }

    async fn last_seq(&self, conv: &str) -> Result<u64> {
        let tail = self.tail.last(conv, false).map_or(0, |(seq, _)| seq);
        let conv = conv.to_owned();
        let stored = self
            .read(move |tx| Ok(tx.open_table(CONV_SEQ)?.get(conv.as_str())?.map(|v| v.value()).unwrap_or(0)))
            .await?;
        Ok(stored.max(tail))
    }

    async fn last_messages(&self, convs: &[String]) -> Result<Vec<Option<Message>>> {
        if convs.is_empty() {
            return Ok(Vec::new());
        }
        let tail = self.tail.newest(convs);
        let convs = convs.to_vec();
        let stored = self
            .read(move |tx| {
                let table = tx.open_table(MESSAGES)?;
                let last = |c: &str| Ok(messages(table.range((c, 0)..=(c, u64::MAX))?.rev().take(1))?.pop());
                convs.iter().map(|c| last(c)).collect::<Result<Vec<_>>>()
            })
            .await?;
        // As `history`: the tail's copy of a seq wins over the stored one.
        Ok(stored
            .into_iter()
            .zip(tail)
            .map(|(stored, tail)| match (stored, tail) {
                (Some(s), Some(t)) if s.seq > t.seq => Some(s),
                (_, Some(t)) => Some(Message::clone(&t)),
                (s, None) => s,
            })
            .collect())
    }

    async fn last_seqs(&self, convs: &[String]) -> Result<Vec<u64>> {
        if convs.is_empty() {
            return Ok(Vec::new());
        }
        let tail = self.tail.lasts(convs);
        let convs = convs.to_vec();
        let stored = self
            .read(move |tx| {
                let seqs = tx.open_table(CONV_SEQ)?;
                convs.iter().map(|c| Ok(seqs.get(c.as_str())?.map_or(0, |v| v.value()))).collect::<Result<Vec<_>>>()
            })
            .await?;
        Ok(stored.into_iter().zip(tail).map(|(s, t)| s.max(t)).collect())
    }

    async fn user_convs(&self, user: &str) -> Result<Vec<(String, u64)>> {
        let (new, lasts) = self.tail.user_view(user);
        let user = user.to_owned();
        let mut out = self
            .read(move |tx| {
                let seqs = tx.open_table(CONV_SEQ)?;
                rows_under(&tx.open_table(USER_CONVS)?, &user, |conv, ()| {
                    Ok((conv.to_owned(), seqs.get(conv)?.map(|v| v.value()).unwrap_or(0)))
                })
            })
            .await?;
        if lasts.is_empty() {
            return Ok(out);
        }
        for (conv, seq) in &mut out {
            if let Some(&last) = lasts.get(conv.as_str()) {
                *seq = (*seq).max(last);
            }
        }
        for conv in new {
            if !out.iter().any(|(c, _)| *c == conv) {
                let seq = lasts.get(conv.as_str()).copied().unwrap_or(0);
                out.push((conv, seq));
            }
        }
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    async fn set_ack(&self, user: &str, device: &str, conv: &str, seq: u64) -> Result<()> {
        let c = AckCursor { user: user.to_owned(), device: device.to_owned(), conv: conv.to_owned(), seq };
        self.set_acks(&[c]).await
    }

    async fn acks(&self, user: &str, device: &str) -> Result<HashMap<String, u64>> {
        let tail = self.tail.acks(user, device);
        let (u, d) = (user.to_owned(), device.to_owned());
        let mut stored = self
            .read(move |tx| {
                let t = tx.open_table(ACKS)?;
                let mut out = HashMap::new();
                for row in t.range((u.as_str(), d.as_str(), "")..)? {
                    let (k, v) = row?;
                    let (owner, dev, conv) = k.value();
                    if owner != u || dev != d {
                        break;
                    }
                    out.insert(conv.to_owned(), v.value());
                }
                Ok(out)
            })
            .await?;
        merge_cursors(&mut stored, tail);
        Ok(stored)
    }

    async fn user_acked(&self, user: &str, conv: &str) -> Result<u64> {
        let tail = self.tail.user_acked(user, conv);
        let (u, c) = (user.to_owned(), conv.to_owned());
        let stored = self
            .read(move |tx| {
                let t = tx.open_table(ACKS)?;
                let mut max = 0;
                for row in t.range((u.as_str(), "", "")..)? {
                    let (k, v) = row?;
                    let (owner, _, conv) = k.value();
                    if owner != u {
                        break;
                    }
                    if conv == c {
                        max = max.max(v.value());
                    }
                }
                Ok(max)
            })
            .await?;
        Ok(stored.max(tail))
    }

    async fn set_read(&self, user: &str, conv: &str, seq: u64) -> Result<u64> {
        let c = ReadCursor { user: user.to_owned(), conv: conv.to_owned(), seq };
        self.set_reads(&[c]).await?;
        // as with acks, a read of 0 records nothing
        Ok(self.reads(user).await?.get(conv).copied().unwrap_or(0))
    }

    /// Logged like an append (durable in the log, visible through the tail), so the cursor
    /// flushes do not force a B-tree commit each.
    async fn set_acks(&self, cursors: &[AckCursor]) -> Result<()> {
        let moved: Vec<AckCursor> = cursors.iter().filter(|c| c.seq > 0).cloned().collect();
        self.log_cursors(moved, ACKS_RAISED, Entry::Acks).await
    }

    /// As [`EmbeddedStore::set_acks`].
    async fn set_reads(&self, cursors: &[ReadCursor]) -> Result<()> {
        let moved: Vec<ReadCursor> = cursors.iter().filter(|c| c.seq > 0).cloned().collect();
        self.log_cursors(moved, READS_RAISED, Entry::Reads).await
    }

    async fn reads(&self, user: &str) -> Result<HashMap<String, u64>> {
        let tail = self.tail.reads(user);
        let u = user.to_owned();
        let mut stored: HashMap<String, u64> = self
            .read(move |tx| {
                Ok(rows_under(&tx.open_table(READS)?, &u, |conv, seq| Ok((conv.to_owned(), seq)))?
                    .into_iter()
                    .collect())
            })
            .await?;
        merge_cursors(&mut stored, tail);
        Ok(stored)
    }

    async fn find_mid(&self, conv: &str, mid: &str) -> Result<Option<Message>> {
        if let Some(m) = self.tail.by_mid(conv, mid) {
            return Ok(Some((*m).clone()));
        }
        let (c, mid) = (conv.to_owned(), mid.to_owned());
        self.indexed_message(conv, move |tx| seq_of_mid(&tx.open_table(MIDS)?, &tx.open_table(MESSAGES)?, &c, &mid))
            .await
    }

    /// Logged like an append: the recalled form replaces the message in the tail at once and in
    /// the B-trees at the next checkpoint.
    async fn recall(&self, conv: &str, seq: u64) -> Result<Option<Message>> {
        let (conv, tail) = (conv.to_owned(), self.tail.clone());
        self.writer
            .append(move |reader| {
                let Some(m) = logged_message(reader, &tail, &conv, seq)? else {
                    return Ok(Logged::Unchanged(None));
                };
                let recalled = crate::recalled_form((*m).clone());
                let json = serde_json::to_vec(&recalled)?;
                let mut record = Vec::with_capacity(1 + json.len());
                record.push(RECALLED);
                record.extend_from_slice(&json);
                let msg = Arc::new(recalled.clone());
                let entry = Entry::Recalled { msg, json: json.into(), bytes: record.len() };
                Ok(Logged::Appended { value: Some(recalled), record, entry })
            })
            .await
    }

    async fn mentions(&self, user: &str) -> Result<HashMap<String, u64>> {
        let tail = self.tail.mentions_of(user);
        let u = user.to_owned();
        let mut stored = self.read(move |tx| crate::embedded_search::mentions(tx, &u)).await?;
        for (conv, seq) in tail {
            let v = stored.entry(conv).or_insert(0);
            *v = (*v).max(seq);
        }
        Ok(stored)
    }

    async fn search(&self, q: &crate::search::SearchQuery) -> Result<Vec<crate::search::Found>> {
        // The tail before the read transaction (see the tail's own rules).
        let tail: Vec<Arc<Message>> = q.convs.iter().flat_map(|c| self.tail.messages(c, ..)).collect();
        // Enough per conversation that the tail's newer copies cannot leave the page short.
        let query = crate::search::SearchQuery { limit: q.limit + tail.len(), ..q.clone() };
        let stored = self.read(move |tx| crate::embedded_search::candidates(tx, &query)).await?;
        crate::embedded_search::merge_tail(q, stored, tail, |conv, mid| async move { self.find_mid(&conv, &mid).await })
            .await
    }
}

fn parse_role(s: &str) -> Result<Role> {
    Role::parse(s).ok_or_else(|| StorageError::Corrupt(format!("unknown group role {s:?}")))
}

/// Records `user`'s role in group `id`, in both membership indexes.
fn put_member(tx: &WriteTransaction, id: &str, user: &str, role: Role) -> Result<()> {
    tx.open_table(GROUP_MEMBERS)?.insert((id, user), role.as_str())?;
    tx.open_table(USER_GROUPS)?.insert((user, id), role.as_str())?;
    Ok(())
}

/// Whether `user` belongs to group `id`.
fn is_member(tx: &WriteTransaction, id: &str, user: &str) -> Result<bool> {
    Ok(tx.open_table(GROUP_MEMBERS)?.get((id, user))?.is_some())
}

impl EmbeddedStore {
    /// Gives `user` `role` in group `id` if `user` already belongs
    /// (`member`) or does not yet (`!member`); `false` otherwise.
    async fn put_role_if(&self, id: &str, user: &str, role: Role, member: bool) -> Result<bool> {
        let (gid, user) = (id.to_owned(), user.to_owned());
        self.group_write(id, move |tx| {
            if is_member(tx, &gid, &user)? != member {
                return Ok(Abort(false));
            }
            put_member(tx, &gid, &user, role)?;
            Ok(Commit(true))
        })
        .await
    }

    /// A write to group `id`, run to its end even if the caller goes away, then the group's
    /// cached member list forgotten: a cancelled caller can never leave a stale list cached.
    async fn group_write<T, F>(&self, id: &str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<End<T>> + Send + 'static,
    {
        let (writer, groups, id) = (self.writer.clone(), self.groups.clone(), id.to_owned());
        tokio::spawn(async move {
            let done = writer.write(f).await;
            groups.invalidate(&id);
            done
        })
        .await?
    }

    /// A write to the relation of `a` and `b`, run to its end even if the caller goes away, then
    /// the pair's cached relation forgotten (both ways), like [`EmbeddedStore::group_write`].
    async fn pair_write<T, F>(&self, a: &str, b: &str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<End<T>> + Send + 'static,
    {
        let (writer, friends, a, b) = (self.writer.clone(), self.friends.clone(), a.to_owned(), b.to_owned());
        tokio::spawn(async move {
            let done = writer.write(f).await;
            friends.forget([(a.clone(), b.clone()), (b, a)]);
            done
        })
        .await?
    }

    /// Logs cursors (tagged `tag`) for the tail as `entry`; the next checkpoint raises the
    /// stored ones to them.
    async fn log_cursors<C: serde::Serialize + Send + 'static>(
        &self,
        cursors: Vec<C>,
        tag: u8,
        entry: fn(Vec<C>) -> Entry,
    ) -> Result<()> {
        if cursors.is_empty() {
            return Ok(());
        }
        self.writer
            .append(move |_| {
                // A cursor's JSON is its three names and a seq: ~80 bytes for common names.
                let record = encode_tagged(tag, &cursors, 16 + 80 * cursors.len())?;
                Ok(Logged::Appended { value: (), record, entry: entry(cursors) })
            })
            .await
    }

    /// The members of group `id`, sorted by user: from the cache, or read and cached.
    async fn member_list(&self, id: &str) -> Result<Members> {
        if let Some(list) = self.groups.get(id) {
            return Ok(list);
        }
        let generation = self.groups.generation();
        let gid = id.to_owned();
        let list: Members = Arc::new(
            self.read(move |tx| {
                rows_under(&tx.open_table(GROUP_MEMBERS)?, &gid, |user, role| Ok((user.to_owned(), parse_role(role)?)))
            })
            .await?,
        );
        self.groups.insert(generation, id, list.clone());
        Ok(list)
    }
}

#[async_trait]
impl GroupStore for EmbeddedStore {
    async fn create_group(&self, group: &Group, members: &[String]) -> Result<bool> {
        let id = group.id.clone();
        let (group, members) = (group.clone(), members.to_vec());
        self.group_write(&id, move |tx| {
            let mut groups = tx.open_table(GROUPS)?;
            if groups.get(group.id.as_str())?.is_some() {
                return Ok(Abort(false));
            }
            put_json(&mut groups, group.id.as_str(), &group)?;
            put_member(tx, &group.id, &group.owner, Role::Owner)?;
            for m in &members {
                if !is_member(tx, &group.id, m)? {
                    put_member(tx, &group.id, m, Role::Member)?;
                }
            }
            Ok(Commit(true))
        })
        .await
    }

    async fn group(&self, id: &str) -> Result<Option<Group>> {
        let id = id.to_owned();
        self.read(move |tx| get_json(tx.open_table(GROUPS)?.get(id.as_str())?)).await
    }

    async fn add_member(&self, id: &str, user: &str, role: Role) -> Result<bool> {
        self.put_role_if(id, user, role, false).await
    }

    async fn remove_member(&self, id: &str, user: &str) -> Result<bool> {
        let (gid, user) = (id.to_owned(), user.to_owned());
        self.group_write(id, move |tx| {
            if tx.open_table(GROUP_MEMBERS)?.remove((gid.as_str(), user.as_str()))?.is_none() {
                return Ok(Abort(false));
            }
            tx.open_table(USER_GROUPS)?.remove((user.as_str(), gid.as_str()))?;
            Ok(Commit(true))
        })
        .await
    }

    async fn set_role(&self, id: &str, user: &str, role: Role) -> Result<bool> {
        self.put_role_if(id, user, role, true).await
    }

    async fn role(&self, id: &str, user: &str) -> Result<Option<Role>> {
        Ok(role_in(&self.member_list(id).await?, user))
    }

    async fn members(&self, id: &str) -> Result<Vec<(String, Role)>> {
        Ok(self.member_list(id).await?.as_ref().clone())
    }

    async fn user_groups(&self, user: &str) -> Result<Vec<(Group, Role)>> {
        let user = user.to_owned();
        self.read(move |tx| {
            let groups = tx.open_table(GROUPS)?;
            rows_under(&tx.open_table(USER_GROUPS)?, &user, |id, role| {
                let group: Option<Group> = get_json(groups.get(id)?)?;
                let Some(group) = group else {
                    return Err(StorageError::Corrupt(format!("membership of {user} in missing group {id}")));
                };
                Ok((group, parse_role(role)?))
            })
        })
        .await
    }

    async fn user_group_ids(&self, user: &str) -> Result<Vec<String>> {
        let user = user.to_owned();
        self.read(move |tx| rows_under(&tx.open_table(USER_GROUPS)?, &user, |id, _| Ok(id.to_owned()))).await
    }

    async fn set_invite_only(&self, id: &str, invite_only: bool) -> Result<bool> {
        let gid = id.to_owned();
        self.group_write(id, move |tx| {
            let mut groups = tx.open_table(GROUPS)?;
            let group: Option<Group> = get_json(groups.get(gid.as_str())?)?;
            let Some(group) = group else { return Ok(Abort(false)) };
            put_json(&mut groups, gid.as_str(), &Group { invite_only, ..group })?;
            Ok(Commit(true))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store is closed once its last clone is dropped, from whichever thread, and from then
    /// on its directory opens again at once (the database was closed before the mark).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_is_closed_when_its_last_clone_is_dropped() {
        let dir = std::env::temp_dir().join(format!("sb-closed-{}", crate::contract::prefix()));
        for round in 0..20 {
            let store = EmbeddedStore::open(&dir).unwrap();
            let cmid = format!("c{round}");
            store.append(crate::contract::text("d:a:b", "a", &cmid, "hi"), &["a".to_string()]).await.unwrap();
            let watch = store.closed_watch();
            let other = store.clone();
            drop(store);
            assert!(!watch.is_closed(), "a clone still holds it");
            // The last clone goes on another thread, as a call still under way would.
            std::thread::spawn(move || drop(other));
            while !watch.is_closed() {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        }
        let store = EmbeddedStore::open(&dir).unwrap();
        assert_eq!(store.last_seq("d:a:b").await.unwrap(), 20);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Messages are found by mid without a row of the mid index (by their timestamp, once a
    /// checkpoint wrote them and after a restart); a database from before the index existed
    /// gets it filled once, and its rows are still read.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mids_are_found_by_timestamp_and_older_databases_get_their_index() {
        let dir = std::env::temp_dir().join(format!("sb-mids-{}", crate::contract::prefix()));
        let msg = |cmid: &str| crate::contract::text("d:a:b", "a", cmid, "hi");
        // First from the tail (no checkpoint for an hour), then from the B-trees.
        let hour = std::time::Duration::from_secs(3600);
        let store = EmbeddedStore::open_with(&dir, CheckpointPolicy { interval: hour, ..Default::default() }).unwrap();
        let mut stored = Vec::new();
        for i in 0..20 {
            stored.push(store.append(msg(&format!("c{i}")), &["a".to_string()]).await.unwrap().msg);
        }
        for m in &stored {
            assert_eq!(store.find_mid("d:a:b", &m.mid).await.unwrap().as_ref(), Some(m));
            assert_eq!(store.find_mid("d:a:c", &m.mid).await.unwrap(), None);
        }
        assert_eq!(store.find_mid("d:a:b", &format!("{:011x}{:016x}", stored[0].ts, 7)).await.unwrap(), None);
        drop(store);
        let policy =
            CheckpointPolicy { interval: std::time::Duration::from_millis(20), bytes: 1 << 20, ..Default::default() };
        let store = EmbeddedStore::open_with(&dir, policy).unwrap();
        stored.push(store.append(msg("c20"), &["a".to_string()]).await.unwrap().msg);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        for m in &stored {
            assert_eq!(store.find_mid("d:a:b", &m.mid).await.unwrap().as_ref(), Some(m));
        }
        drop(store);
        let mid_rows = || {
            let db = Database::create(dir.join("switchboard.redb")).unwrap();
            let tx = db.begin_read().unwrap();
            tx.open_table(MIDS).unwrap().len().unwrap()
        };
        assert_eq!(mid_rows(), 0, "a checkpoint writes no mid index rows");
        let store = EmbeddedStore::open(&dir).unwrap();
        for m in &stored {
            assert_eq!(store.find_mid("d:a:b", &m.mid).await.unwrap().as_ref(), Some(m));
        }
        assert_eq!(store.find_mid("d:a:b", &format!("{:011x}{:016x}", stored[0].ts, 7)).await.unwrap(), None);
        // a database written before the mid index existed
        drop(store);
        let db = Database::create(dir.join("switchboard.redb")).unwrap();
        let tx = db.begin_write().unwrap();
        tx.delete_table(MIDS).unwrap();
        tx.commit().unwrap();
        drop(db);
        drop(EmbeddedStore::open(&dir).unwrap());
        assert_eq!(mid_rows(), 21);
        let store = EmbeddedStore::open(&dir).unwrap();
        assert_eq!(store.find_mid("d:a:b", &stored[3].mid).await.unwrap().as_ref(), Some(&stored[3]));
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A recall is seen by every read at once (from the tail), after its checkpoint (from the
    /// B-trees) and after a restart; a log written by an older version (`appends.wal`) is
    /// replayed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn recalls_and_older_logs_are_read_back() {
        let dir = std::env::temp_dir().join(format!("sb-recall-{}", crate::contract::prefix()));
        let policy =
            CheckpointPolicy { interval: std::time::Duration::from_millis(20), bytes: 1 << 20, ..Default::default() };
        let store = EmbeddedStore::open_with(&dir, policy).unwrap();
        let new = |cmid: &str| NewMessage {
            conv: "d:a:b".into(),
            from: "a".into(),
            cmid: cmid.into(),
            kind: "text".into(),
            body: serde_json::json!(cmid),
            reply_to: None,
            mentions: Vec::new(),
        };
        let first = store.append(new("c1"), &["a".to_string(), "b".to_string()]).await.unwrap().msg;
        let check = |store: EmbeddedStore, mid: String| async move {
            let m = store.find_mid("d:a:b", &mid).await.unwrap().unwrap();
            assert_eq!(m.kind, "recalled");
            assert_eq!(store.find_cmid("d:a:b", "a", "c1").await.unwrap().unwrap().kind, "recalled");
            assert_eq!(store.range("d:a:b", 0, 1).await.unwrap()[0].kind, "recalled");
            assert!(store.history("d:a:b", None, 10).await.unwrap().iter().any(|m| m.kind == "recalled"));
            let again = store.append(new("c1"), &[]).await.unwrap();
            assert!(again.duplicate && again.msg.kind == "recalled");
        };
        assert_eq!(store.recall("d:a:b", first.seq).await.unwrap().unwrap().kind, "recalled");
        check(store.clone(), first.mid.clone()).await;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        check(store.clone(), first.mid.clone()).await;
        assert_eq!(store.recall("d:a:b", 99).await.unwrap(), None);
        drop(store);
        // an older version's single log file, holding an append the B-trees lack
        let later = Message { seq: 2, cmid: "c2".into(), mid: "m-2".into(), ..first.clone() };
        let json = serde_json::to_vec(&later).unwrap();
        let mut framed = Vec::new();
        crate::wal::frame(&mut framed, &encode_record(&json, &[]).unwrap(), 0);
        std::fs::write(dir.join("appends.wal"), framed).unwrap();
        let store = EmbeddedStore::open(&dir).unwrap();
        check(store.clone(), first.mid.clone()).await;
        assert_eq!(store.find_cmid("d:a:b", "a", "c2").await.unwrap().unwrap().seq, 2);
        assert_eq!(store.append(new("c3"), &[]).await.unwrap().msg.seq, 3);
        assert!(!dir.join("appends.wal").exists());
        drop(store);
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Many writers at once share fsyncs (group commit) without sharing fate:
    /// every append gets its own seq, a duplicate cmid in the same batch is
    /// still recognised, and everything is there after the file is reopened.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_are_each_atomic_and_durable() {
        let dir = std::env::temp_dir().join(format!("sb-group-commit-{}", crate::contract::prefix()));
        let store = EmbeddedStore::open(&dir).unwrap();
        let new = |i: usize| NewMessage {
            conv: "g:load".into(),
            from: format!("u{}", i % 7),
            cmid: format!("c{i}"),
            kind: "text".into(),
            body: serde_json::json!(i),
            reply_to: None,
            mentions: Vec::new(),
        };
        let tasks: Vec<_> = (0..400)
            .map(|i| {
                let store = store.clone();
                // every 10th task repeats an earlier cmid of the same sender
                let msg = if i % 10 == 9 { new(i - 7) } else { new(i) };
                tokio::spawn(async move { store.append(msg, &["u0".to_string()]).await.unwrap() })
            })
            .collect();
        let mut fresh = Vec::new();
        for t in tasks {
            let a = t.await.unwrap();
            if !a.duplicate {
                fresh.push(a.msg.seq);
            }
        }
        fresh.sort_unstable();
        assert_eq!(fresh, (1..=360).collect::<Vec<u64>>(), "one seq per distinct cmid, no gaps");
        drop(store);
        let store = EmbeddedStore::open(&dir).unwrap();
        assert_eq!(store.last_seq("g:load").await.unwrap(), 360);
        assert_eq!(store.range("g:load", 0, 1000).await.unwrap().len(), 360);
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A cmid retried after a restart is found once the filter of stored cmids is filled from
    /// the database (the filter alone answers for new cmids then), with the filter off, and
    /// without waiting for the scan; new cmids get new seqs throughout.
    /// A new message comes back with its stored encoding (what it serialises to, so a push can
    /// be built around it); a duplicate without one.
    #[tokio::test]
    async fn an_append_hands_back_the_stored_encoding() {
        let dir = std::env::temp_dir().join(format!("sb-append-json-{}", crate::contract::prefix()));
        let store = EmbeddedStore::open(&dir).unwrap();
        let members = ["a".to_string(), "b".to_string()];
        let msg = crate::contract::text("d:a:b", "a", "c1", "h\u{e9} \"x\"\n");
        let first = store.append(msg.clone(), &members).await.unwrap();
        assert_eq!(first.json.as_deref(), Some(serde_json::to_vec(&first.msg).unwrap().as_slice()));
        let again = store.append(msg, &members).await.unwrap();
        assert!(again.duplicate && again.json.is_none());
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retried_cmids_are_found_through_the_filter_after_a_restart() {
        let dir = std::env::temp_dir().join(format!("sb-cmid-filter-{}", crate::contract::prefix()));
        let msg = |cmid: &str| crate::contract::text("d:a:b", "a", cmid, "hi");
        let members = ["a".to_string(), "b".to_string()];
        let fast = CheckpointPolicy { interval: std::time::Duration::from_millis(20), ..Default::default() };
        let store = EmbeddedStore::open_with(&dir, fast).unwrap();
        let mut first = Vec::new();
        for i in 0..300 {
            first.push(store.append(msg(&format!("c{i}")), &members).await.unwrap().msg);
        }
        drop(store);
        for (round, filter_bytes) in [(0, 1 << 16), (1, 0), (2, 1 << 16)] {
            let store =
                EmbeddedStore::open_with(&dir, CheckpointPolicy { cmid_filter_bytes: filter_bytes, ..fast }).unwrap();
            if round == 0 {
                let filter = store.cmids.as_ref().unwrap().filter.clone();
                while !filter.complete() {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
            }
            for m in &first {
                let again = store.append(msg(&m.cmid), &members).await.unwrap();
                assert!(again.duplicate, "round {round}: {} stored twice", m.cmid);
                assert_eq!(again.msg.seq, m.seq);
            }
            let new = store.append(msg(&format!("new-{round}")), &members).await.unwrap();
            assert!(!new.duplicate);
            assert_eq!(new.msg.seq, 301 + round);
            drop(store);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Once no append has come for a while the log thread closes its read transaction: one left
    /// open would keep the pages every later commit frees (plain writes here, as account changes
    /// are while nobody sends) from being reused, and the file would grow with each commit.
    #[tokio::test]
    async fn an_idle_log_lets_later_commits_reuse_freed_pages() {
        let dir = std::env::temp_dir().join(format!("sb-idle-reader-{}", crate::contract::prefix()));
        let store = EmbeddedStore::open(&dir).unwrap();
        // The log thread opens its read transaction for this append (the cmid lookup).
        store.append(crate::contract::text("g:idle", "u", "c1", "hi"), &[]).await.unwrap();
        let mute = |i: u64| {
            let store = store.clone();
            async move { store.set_mute("u", &format!("g:m{}", i % 8), Some(u64::MAX - i)).await.unwrap() }
        };
        for i in 0..100 {
            mute(i).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let size = || std::fs::metadata(dir.join("switchboard.redb")).unwrap().len();
        let before = size();
        for i in 0..1500 {
            mute(i).await;
        }
        let grown = size() - before;
        assert!(grown < 1 << 20, "the file grew by {grown} bytes over 1,500 rewrites of 8 rows");
        drop(store);
        std::fs::remove_dir_all(&dir).ok();
    }

    /// The checkpoint thread runs at the niceness its policy adds (the process's is 0 here), so a
    /// busy core runs the threads answering sends first.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn the_checkpoint_thread_runs_niced() {
        let dir = std::env::temp_dir().join(format!("sb-nice-{}", crate::contract::prefix()));
        let store = EmbeddedStore::open_with(&dir, CheckpointPolicy { nice: 7, ..Default::default() }).unwrap();
        // Other tests' stores run in this process too: look for one B-tree thread at 7.
        let niced = std::fs::read_dir("/proc/self/task").unwrap().filter_map(|t| {
            let t = t.ok()?.path();
            let comm = std::fs::read_to_string(t.join("comm")).ok()?;
            let stat = std::fs::read_to_string(t.join("stat")).ok()?;
            // Field 19 (nice), counted after the parenthesised command name.
            let nice: i32 = stat.rsplit_once(')')?.1.split_whitespace().nth(16)?.parse().ok()?;
            (comm.trim() == "sb-redb-writer").then_some(nice)
        });
        assert!(niced.into_iter().any(|n| n == 7), "no checkpoint thread at niceness 7");
        drop(store);
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A checkpoint budget of one byte: every batch hands its generation to the B-tree thread
    /// and the next one waits for that commit (backpressure). Appends from many tasks still all
    /// succeed, gapless, readable meanwhile and after reopening.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appends_wait_for_a_full_tail_instead_of_failing() {
        let dir = std::env::temp_dir().join(format!("sb-backpressure-{}", crate::contract::prefix()));
        let policy =
            CheckpointPolicy { interval: std::time::Duration::from_secs(3600), bytes: 1, ..Default::default() };
        let store = EmbeddedStore::open_with(&dir, policy).unwrap();
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let store = store.clone();
                tokio::spawn(async move {
                    for i in 0..40 {
                        let msg = NewMessage {
                            conv: format!("g:bp{}", t % 2),
                            from: format!("u{t}"),
                            cmid: format!("c{i}"),
                            kind: "text".into(),
                            body: serde_json::json!(i),
                            reply_to: None,
                            mentions: Vec::new(),
                        };
                        let a = store.append(msg, &[format!("u{t}")]).await.unwrap();
                        assert!(store.range(&a.msg.conv, a.msg.seq - 1, 1).await.unwrap()[0].seq == a.msg.seq);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        for c in 0..2 {
            let all = store.range(&format!("g:bp{c}"), 0, 1000).await.unwrap();
            assert_eq!(all.iter().map(|m| m.seq).collect::<Vec<_>>(), (1..=160).collect::<Vec<u64>>());
        }
        drop(store);
        let store = EmbeddedStore::open(&dir).unwrap();
        assert_eq!(store.last_seq("g:bp1").await.unwrap(), 160);
        assert_eq!(store.user_convs("u3").await.unwrap(), vec![("g:bp1".to_string(), 160)]);
        drop(store);
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Closing the store while the log thread waits for a checkpoint (backpressure) stops it:
    /// the stop must not be lost in that wait (it once was, and the close hung). Many rounds, so
    /// the close lands in the wait in some of them; each close must end within seconds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_closed_during_backpressure_stops() {
        let dir = std::env::temp_dir().join(format!("sb-close-bp-{}", crate::contract::prefix()));
        let policy =
            CheckpointPolicy { interval: std::time::Duration::from_secs(3600), bytes: 1, ..Default::default() };
        for round in 0..25u64 {
            let store = EmbeddedStore::open_with(&dir, policy).unwrap();
            // Each task hands its clone to a plain thread as soon as its last append returns;
            // the last one dropped there closes the store (a hung close then fails the test
            // instead of blocking the runtime).
            let (closer, clones) = std::sync::mpsc::channel::<EmbeddedStore>();
            let closing = std::thread::spawn(move || clones.into_iter().for_each(drop));
            let tasks: Vec<_> = (0..4)
                .map(|t| {
                    let (store, closer) = (store.clone(), closer.clone());
                    tokio::spawn(async move {
                        for i in 0..8 {
                            let msg = NewMessage {
                                conv: "g:close".into(),
                                from: format!("u{t}"),
                                cmid: format!("r{round}-{i}"),
                                kind: "text".into(),
                                body: serde_json::json!(i),
                                reply_to: None,
                                mentions: Vec::new(),
                            };
                            store.append(msg, &[]).await.unwrap();
                        }
                        closer.send(store).unwrap();
                    })
                })
                .collect();
            drop((store, closer));
            for t in tasks {
                t.await.unwrap();
            }
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while !closing.is_finished() {
                assert!(std::time::Instant::now() < deadline, "round {round}: the store never closed");
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            let store = EmbeddedStore::open_with(&dir, policy).unwrap();
            assert_eq!(store.last_seq("g:close").await.unwrap(), 32 * (round + 1));
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    /// The child of [`appends_acknowledged_before_a_sigkill_survive_it`]: appends in four
    /// conversations (some of them groups of many members) from many tasks, with a checkpoint
    /// every 48 KiB so the kill may land anywhere (in a log write, in a checkpoint, between
    /// them), and prints each acknowledged append.
    async fn crash_child(dir: &Path) {
        let policy =
            CheckpointPolicy { interval: std::time::Duration::from_secs(60), bytes: 48 << 10, ..Default::default() };
        let store = EmbeddedStore::open_with(dir, policy).unwrap();
        let members: Vec<String> = (0..40).map(|i| format!("m{i}")).collect();
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let (store, members) = (store.clone(), members.clone());
                tokio::spawn(async move {
                    for i in 0.. {
                        let conv = format!("g:c{}", (t + i) % 4);
                        let msg = NewMessage {
                            conv: conv.clone(),
                            from: format!("m{t}"),
                            cmid: format!("t{t}-{i}"),
                            kind: "text".into(),
                            body: serde_json::json!("x".repeat(200 + i % 300)),
                            reply_to: None,
                            mentions: Vec::new(),
                        };
                        let a = store.append(msg, &members[..2 + (i % 38)]).await.unwrap();
                        println!("acked {} {} {} {}", conv, a.msg.seq, a.msg.from, a.msg.cmid);
                        if i % 11 == 3 {
                            // recalled while in the tail, in a frozen generation or committed
                            let back = if i % 2 == 0 { 0 } else { 40 };
                            let seq = a.msg.seq.saturating_sub(back).max(1);
                            store.recall(&conv, seq).await.unwrap().unwrap();
                            println!("recalled {conv} {seq}");
                        }
                        if i % 50 == 0 {
                            store.set_read(&format!("m{t}"), &conv, a.msg.seq).await.unwrap();
                        }
                        if i % 7 == 0 {
                            let user = format!("m{t}");
                            let c = crate::AckCursor {
                                user: user.clone(),
                                device: "d".into(),
                                conv: conv.clone(),
                                seq: a.msg.seq,
                            };
                            store.set_acks(&[c]).await.unwrap();
                            let r = crate::ReadCursor { user: user.clone(), conv: conv.clone(), seq: a.msg.seq };
                            store.set_reads(&[r]).await.unwrap();
                            println!("cursor {user} {conv} {}", a.msg.seq);
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    }

    /// SIGKILL in the middle of appends: after reopening, every append acknowledged before the
    /// kill is there with its seq, every conversation is gapless, and the next append takes the
    /// next seq (none is handed out twice).
    #[test]
    fn appends_acknowledged_before_a_sigkill_survive_it() {
        const NAME: &str = "embedded::tests::appends_acknowledged_before_a_sigkill_survive_it";
        if let Some(dir) = std::env::var_os("SB_CRASH_CHILD_DIR") {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(crash_child(Path::new(&dir)));
            return;
        }
        use std::io::BufRead;
        let dir = std::env::temp_dir().join(format!("sb-crash-{}", crate::contract::prefix()));
        for round in 0..3 {
            let mut child = crate::contract::spawn_test_child(NAME, "SB_CRASH_CHILD_DIR", &dir);
            let out = std::io::BufReader::new(child.stdout.take().unwrap());
            let mut acked = Vec::new();
            let mut cursors = Vec::new();
            let mut recalled = Vec::new();
            let mut lines = out.lines();
            // a different moment each round
            let kill_after = 1500 + round * 1700;
            for line in lines.by_ref() {
                let line = line.unwrap();
                if let Some(rest) = line.strip_prefix("recalled ") {
                    let (conv, seq) = rest.split_once(' ').unwrap();
                    recalled.push((conv.to_owned(), seq.parse::<u64>().unwrap()));
                }
                if let Some(rest) = line.strip_prefix("cursor ") {
                    cursors.push(rest.split(' ').map(str::to_owned).collect::<Vec<_>>());
                }
                if let Some(rest) = line.strip_prefix("acked ") {
                    acked.push(rest.split(' ').map(str::to_owned).collect::<Vec<_>>());
                    if acked.len() == kill_after {
                        child.kill().unwrap();
                    }
                }
            }
            child.wait().unwrap();
            assert!(acked.len() >= kill_after, "the child stopped early: {}", acked.len());
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let store = EmbeddedStore::open(&dir).unwrap();
                for a in &acked {
                    let m = store.find_cmid(&a[0], &a[2], &a[3]).await.unwrap();
                    assert_eq!(m.map(|m| m.seq.to_string()), Some(a[1].clone()), "acknowledged {a:?} kept its seq");
                }
                assert!(!cursors.is_empty());
                assert!(!recalled.is_empty());
                for (conv, seq) in &recalled {
                    let m = store.range(conv, seq - 1, 1).await.unwrap();
                    assert_eq!(m[0].kind, "recalled", "recall of {conv}#{seq} kept");
                    let by_cmid = store.find_cmid(conv, &m[0].from, &m[0].cmid).await.unwrap().unwrap();
                    assert_eq!(by_cmid.kind, "recalled", "{conv}#{seq} by cmid");
                }
                for c in &cursors {
                    let seq: u64 = c[2].parse().unwrap();
                    let acks = store.acks(&c[0], "d").await.unwrap();
                    assert!(acks.get(&c[1]).is_some_and(|&s| s >= seq), "ack {c:?} kept: {acks:?}");
                    let reads = store.reads(&c[0]).await.unwrap();
                    assert!(reads.get(&c[1]).is_some_and(|&s| s >= seq), "read {c:?} kept: {reads:?}");
                }
                for c in 0..4 {
                    let conv = format!("g:c{c}");
                    let last = store.last_seq(&conv).await.unwrap();
                    let all = store.range(&conv, 0, usize::MAX).await.unwrap();
                    assert_eq!(all.iter().map(|m| m.seq).collect::<Vec<_>>(), (1..=last).collect::<Vec<_>>());
                    let convs = store.user_convs("m1").await.unwrap();
                    assert!(convs.contains(&(conv.clone(), last)), "m1's index holds {conv}#{last}: {convs:?}");
                }
                let next = NewMessage {
                    conv: "g:c0".into(),
                    from: "m0".into(),
                    cmid: format!("after-{round}"),
                    kind: "text".into(),
                    body: serde_json::json!("after"),
                    reply_to: None,
                    mentions: Vec::new(),
                };
                let last = store.last_seq("g:c0").await.unwrap();
                assert_eq!(store.append(next, &[]).await.unwrap().msg.seq, last + 1);
            });
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
