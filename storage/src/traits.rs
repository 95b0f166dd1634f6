//! The storage traits. Logic holds them as `Arc<dyn Trait>`; backends
//! implement them.

use std::collections::HashMap;

use async_trait::async_trait;

use crate::{
    AckCursor, Appended, ConnRef, FriendState, Group, Member, Message, NewMessage, PartitionOffset, ReadCursor,
    RequestOutcome, Result, Role, SequencedRecord, Session, User,
};

/// Accounts and sessions.
#[async_trait]
pub trait AccountStore: Send + Sync {
    /// Creates the user; `false` when the username is taken.
    async fn create_user(&self, user: &User) -> Result<bool>;
    async fn get_user(&self, username: &str) -> Result<Option<User>>;
    /// Inserts or replaces a session and indexes its refresh token hash.
    async fn put_session(&self, session: &Session) -> Result<()>;
    async fn get_session(&self, id: &str) -> Result<Option<Session>>;
    /// The session a refresh token hash was ever issued for (current or
    /// rotated-out), so reuse of an old token can be detected.
    async fn session_by_refresh(&self, refresh_hash: &str) -> Result<Option<Session>>;
    /// Replaces the session's refresh token if `old_hash` is still current
    /// and the session is not revoked; `false` otherwise.
    async fn rotate_refresh(&self, session_id: &str, old_hash: &str, new_hash: &str, expires_ms: u64) -> Result<bool>;
    async fn revoke_session(&self, id: &str) -> Result<()>;
    /// Deletes every session whose refresh token expired before `before_ms` (revoked or not)
    /// with every refresh token hash ever issued for it; how many sessions went.
    async fn prune_sessions(&self, before_ms: u64) -> Result<usize>;
    /// Sets or clears the ban flag; `false` when there is no such user.
    async fn set_banned(&self, username: &str, banned: bool) -> Result<bool>;
    /// Registers the push token of a device, replacing the device's earlier one; a token
    /// registered before by another device (of any user) moves to this one.
    async fn put_push_token(&self, token: &crate::PushToken) -> Result<()>;
    /// Removes the push token of `user`'s `device`; whether there was one.
    async fn remove_push_token(&self, user: &str, device: &str) -> Result<bool>;
    /// Every push token of `user`, ordered by device.
    async fn push_tokens(&self, user: &str) -> Result<Vec<crate::PushToken>>;
    /// Mutes `conv` for `user` until `until_ms` (`u64::MAX`: until unmuted), or unmutes it
    /// (`None`).
    async fn set_mute(&self, user: &str, conv: &str, until_ms: Option<u64>) -> Result<()>;
    /// `user`'s mutes, conversation -> until (ms), lapsed ones included.
    async fn mutes(&self, user: &str) -> Result<HashMap<String, u64>>;
}

/// The social graph.
#[async_trait]
pub trait SocialStore: Send + Sync {
    async fn friend_state(&self, user: &str, other: &str) -> Result<Option<FriendState>>;
    /// `from` asks `to`. If `to` had already asked `from`, both become friends; if either
    /// blocks the other, nothing changes ([`RequestOutcome::Blocked`]).
    async fn request_friend(&self, from: &str, to: &str, note: &str) -> Result<RequestOutcome>;
    /// `user` accepts the pending request of `from`; `false` if there is none.
    async fn accept_friend(&self, user: &str, from: &str) -> Result<bool>;
    /// `user` rejects the pending request of `from`; `false` if there is none.
    async fn reject_friend(&self, user: &str, from: &str) -> Result<bool>;
    /// Ends a friendship (or a pending request) in both directions; `false` if none existed.
    async fn delete_friend(&self, user: &str, other: &str) -> Result<bool>;
    /// Every relation of `user`, ordered by the other user's name.
    async fn relations(&self, user: &str) -> Result<Vec<(String, FriendState)>>;
    /// `user` blocks (`block`) or unblocks `other`; blocking also ends their friendship or
    /// pending request, both ways, in the same write. `false` when nothing changed.
    async fn set_block(&self, user: &str, other: &str, block: bool) -> Result<bool>;
    /// Whether `user` blocks `other`.
    async fn blocks(&self, user: &str, other: &str) -> Result<bool>;
    /// Everyone `user` blocks, ordered by name.
    async fn blocked(&self, user: &str) -> Result<Vec<String>>;
}

/// A message whose seq is fixed, on its way to being stored ([`MessageStore::place`]).
#[async_trait]
pub trait Placed: Send {
    /// Waits until the message is durable. Several sends of one conversation may wait at once.
    async fn durable(&mut self) -> Result<()>;
    /// Makes the durable message visible to readers and returns it. Callers finish the sends of
    /// a conversation in seq order, each once the one before it has finished (however that
    /// ended), so readers never see a seq before the ones under it.
    async fn finish(self: Box<Self>) -> Result<Appended>;
}

/// An append whose place was fixed when it was started ([`MessageStore::append_ordered`]).
struct Written {
    write: Option<std::pin::Pin<Box<dyn std::future::Future<Output = Result<Appended>> + Send + 'static>>>,
    appended: Option<Appended>,
}

#[async_trait]
impl Placed for Written {
    async fn durable(&mut self) -> Result<()> {
        if let Some(write) = self.write.take() {
            self.appended = Some(write.await?);
        }
        Ok(())
    }

    async fn finish(self: Box<Self>) -> Result<Appended> {
        self.appended.ok_or_else(|| crate::StorageError::Corrupt("an append finished before it was durable".into()))
    }
}

/// Durable messages with per-conversation sequence numbers.
#[async_trait]
pub trait MessageStore: Send + Sync {
    /// Durably appends a message with the next seq of its conversation, or
    /// returns the earlier message with the same (conv, from, cmid). `members`
    /// are added to the conversation's member index (who may read it and whose
    /// `sync` includes it).
    async fn append(&self, msg: NewMessage, members: &[String]) -> Result<Appended>;
    /// [`MessageStore::append`] for stores that fix a message's place in its conversation when
    /// the call returns (before the future is polled): appends started in some order get their
    /// seqs in that order. Lets callers order pushes without holding a lock while the write
    /// becomes durable. `None` when the store cannot promise it (the caller then holds its
    /// conversation lock across [`MessageStore::append`]); the message comes back unused.
    // The message comes back by value when unused: boxing it would cost the allocation per
    // send that taking it by value saves.
    #[allow(clippy::result_large_err)]
    fn append_ordered(
        &self,
        msg: NewMessage,
        _members: &[String],
    ) -> std::result::Result<
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Appended>> + Send + 'static>>,
        NewMessage,
    > {
        Err(msg)
    }
    /// [`MessageStore::append`] in steps, for stores that fix a message's place before it is
    /// durable (a cluster's seq reservation takes a round trip to Redis): the call ends once the
    /// seq is fixed, so appends whose calls ran one after another get their seqs in that order,
    /// and a caller holds its conversation lock across this call only; the rest ([`Placed`])
    /// runs outside it. `Err` with the message, unused, when the store has no such steps. By
    /// default, a store whose appends are ordered when started
    /// ([`MessageStore::append_ordered`]) is placed that way.
    async fn place(
        &self,
        msg: NewMessage,
        members: &[String],
    ) -> std::result::Result<Result<Box<dyn Placed>>, NewMessage> {
        let write = self.append_ordered(msg, members)?;
        Ok(Ok(Box::new(Written { write: Some(write), appended: None })))
    }
    /// The message `from` sent in `conv` with this cmid, if stored.
    async fn find_cmid(&self, conv: &str, from: &str, cmid: &str) -> Result<Option<Message>>;
    /// Messages with seq > `after_seq`, oldest first, at most `limit`.
    async fn range(&self, conv: &str, after_seq: u64, limit: usize) -> Result<Vec<Message>>;
    /// Messages with seq < `before_seq` (all when `None`), newest first, at most `limit`.
    async fn history(&self, conv: &str, before_seq: Option<u64>, limit: usize) -> Result<Vec<Message>>;
    /// The last message of each of `convs` (as [`MessageStore::history`] with limit 1 gives it),
    /// in their order: one read where the backend can batch them.
    async fn last_messages(&self, convs: &[String]) -> Result<Vec<Option<Message>>> {
        let mut out = Vec::with_capacity(convs.len());
        for conv in convs {
            out.push(self.history(conv, None, 1).await?.pop());
        }
        Ok(out)
    }
    /// The highest seq of a conversation (0 when empty).
    async fn last_seq(&self, conv: &str) -> Result<u64>;
    /// [`MessageStore::last_seq`] of each of `convs`, in their order: one read (a transaction,
    /// a query, a round trip) where the backend can batch them, so a user in many groups costs
    /// one lookup per conversation, not one round trip.
    async fn last_seqs(&self, convs: &[String]) -> Result<Vec<u64>> {
        let mut out = Vec::with_capacity(convs.len());
        for conv in convs {
            out.push(self.last_seq(conv).await?);
        }
        Ok(out)
    }
    /// Conversations `user` belongs to, with their last seq.
    async fn user_convs(&self, user: &str) -> Result<Vec<(String, u64)>>;
    /// Records that `device` of `user` received `conv` up to `seq` (never moves back).
    async fn set_ack(&self, user: &str, device: &str, conv: &str, seq: u64) -> Result<()>;
    /// The acked seq per conversation of one device.
    async fn acks(&self, user: &str, device: &str) -> Result<HashMap<String, u64>>;
    /// The highest seq of `conv` any device of `user` acked (0 when none did).
    async fn user_acked(&self, user: &str, conv: &str) -> Result<u64>;
    /// Records that `user` read `conv` up to `seq` (never moves back);
    /// returns the read seq now stored.
    async fn set_read(&self, user: &str, conv: &str, seq: u64) -> Result<u64>;
    /// The read seq per conversation of a user (all devices together).
    async fn reads(&self, user: &str) -> Result<HashMap<String, u64>>;
    /// [`MessageStore::set_ack`] for many cursors at once (one transaction where the backend
    /// has them; cursors never move back).
    async fn set_acks(&self, cursors: &[AckCursor]) -> Result<()> {
        for c in cursors {
            self.set_ack(&c.user, &c.device, &c.conv, c.seq).await?;
        }
        Ok(())
    }
    /// [`MessageStore::set_read`] for many cursors at once.
    async fn set_reads(&self, cursors: &[ReadCursor]) -> Result<()> {
        for c in cursors {
            self.set_read(&c.user, &c.conv, c.seq).await?;
        }
        Ok(())
    }
    /// The message of `conv` with this mid.
    async fn find_mid(&self, conv: &str, mid: &str) -> Result<Option<Message>>;
    /// Replaces a stored message by its recalled form (same conv, seq, mid,
    /// from, cmid, ts; `kind` "recalled"; empty string body). Returns the
    /// recalled message, or `None` when there is no message with that seq.
    async fn recall(&self, conv: &str, seq: u64) -> Result<Option<Message>>;
    /// The highest seq of each conversation at which a message mentions `user` (written with
    /// the message: a recall does not take it back).
    async fn mentions(&self, user: &str) -> Result<HashMap<String, u64>>;
    /// The newest messages of the query's conversations whose current text (an edit's, once
    /// edited; none once recalled) holds every term, newest first, at most `q.limit`.
    async fn search(&self, q: &crate::search::SearchQuery) -> Result<Vec<crate::search::Found>>;
}

/// Groups and their members.
#[async_trait]
pub trait GroupStore: Send + Sync {
    /// Creates the group with its owner (role owner) and `members` (role
    /// member; the owner and duplicates in the list are ignored); `false`
    /// when the id is taken.
    async fn create_group(&self, group: &Group, members: &[String]) -> Result<bool>;
    async fn group(&self, id: &str) -> Result<Option<Group>>;
    /// Adds a member with `role`; `false` if `user` already belongs.
    async fn add_member(&self, id: &str, user: &str, role: Role) -> Result<bool>;
    /// Removes a member; `false` if `user` did not belong.
    async fn remove_member(&self, id: &str, user: &str) -> Result<bool>;
    /// Changes a member's role; `false` if `user` does not belong.
    async fn set_role(&self, id: &str, user: &str, role: Role) -> Result<bool>;
    async fn role(&self, id: &str, user: &str) -> Result<Option<Role>>;
    /// Members and roles, ordered by user name.
    async fn members(&self, id: &str) -> Result<Vec<(String, Role)>>;
    /// The groups of `user` with the user's role, ordered by group id.
    async fn user_groups(&self, user: &str) -> Result<Vec<(Group, Role)>>;
    /// The ids of [`GroupStore::user_groups`] alone (the groups themselves are not read).
    async fn user_group_ids(&self, user: &str) -> Result<Vec<String>> {
        Ok(self.user_groups(user).await?.into_iter().map(|(g, _)| g.id).collect())
    }
    /// Sets whether the group is invite-only; `false` if there is no such group.
    async fn set_invite_only(&self, id: &str, invite_only: bool) -> Result<bool>;
}

/// The durable end of the cluster pipeline: the persist worker writes
/// records that already carry their seq (allocated upstream).
#[async_trait]
pub trait DurableLog: Send + Sync {
    /// Stores each record unless its (conv, seq) is already stored, indexes
    /// its members, and keeps the conversation's last seq and cmid index in
    /// step. Returns how many records were new. Safe to call again with the
    /// same batch (redelivery after a crash).
    async fn upsert_records(&self, records: &[SequencedRecord]) -> Result<u64> {
        self.upsert_records_at(records, &[]).await
    }
    /// [`DurableLog::upsert_records`], and records how far the reader got
    /// in each partition of `offsets` (replacing what was stored for it),
    /// atomically with the records where the backend has transactions.
    /// Offsets may be given without records (e.g. past undecodable ones).
    async fn upsert_records_at(&self, records: &[SequencedRecord], offsets: &[PartitionOffset]) -> Result<u64>;
    /// The stored next offset of each partition of `topic` that has one.
    async fn partition_offsets(&self, topic: &str) -> Result<HashMap<i32, i64>>;
}

/// Exclusive ownership of partitions among persist workers: a partition is
/// owned by the one [`LockSession`] holding its lock.
#[async_trait]
pub trait PartitionLocks: Send + Sync {
    /// A new session; the locks it takes live as long as it does, and are
    /// released when its owner dies, however it dies.
    async fn lock_session(&self) -> Result<Box<dyn LockSession>>;
}

/// One owner's locks (see [`PartitionLocks`]).
#[async_trait]
pub trait LockSession: Send {
    /// Takes the lock of `partition` of `topic` unless another session
    /// holds it; whether this session holds it now.
    async fn try_lock(&mut self, topic: &str, partition: i32) -> Result<bool>;
    /// The session ended (e.g. its connection broke): its locks are gone.
    fn is_closed(&self) -> bool;
}

/// Where users are connected right now (user -> connections). Ephemeral by
/// nature: a route lives as long as its connection.
#[async_trait]
pub trait RouteTable: Send + Sync {
    async fn add(&self, user: &str, conn: ConnRef) -> Result<()>;
    async fn remove(&self, user: &str, conn: &ConnRef) -> Result<()>;
    async fn get(&self, user: &str) -> Result<Vec<ConnRef>>;
    /// The connections of each of `users`, in the same order: one round trip for a fan-out.
    /// Shared lists, so a table that keeps them in memory hands them out without copying.
    async fn get_many(&self, users: &[String]) -> Result<Vec<std::sync::Arc<[ConnRef]>>> {
        let mut out = Vec::with_capacity(users.len());
        for u in users {
            out.push(self.get(u).await?.into());
        }
        Ok(out)
    }
    /// Removes a connection that its gateway reported gone.
    async fn remove_conn(&self, gateway: &str, conn_id: u64) -> Result<()>;
}

/// The registry of running gateways and logic instances with their
/// reported load, for balancing. Entries expire unless refreshed.
#[async_trait]
pub trait Registry: Send + Sync {
    /// Publishes an entry of `kind` ("gateway" or "logic") for `ttl_secs`; `true` when there was
    /// no entry of `m.id` (a first registration, or one that lapsed since the last).
    async fn register(&self, kind: &str, m: &Member, ttl_secs: u64) -> Result<bool>;
    /// Removes an entry (graceful shutdown).
    async fn deregister(&self, kind: &str, id: &str) -> Result<()>;
    /// The live entries of one kind.
    async fn members(&self, kind: &str) -> Result<Vec<Member>>;
    /// Claims `name` for `ttl` across the cluster: `true` for the first claim, `false` while an
    /// earlier one holds (what one instance does for all, such as a notification).
    async fn claim(&self, name: &str, ttl: std::time::Duration) -> Result<bool>;
}
