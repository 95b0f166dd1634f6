//! The embedded backend: every store trait over one redb database file in
//! the data directory. A commit is fsynced before it returns, so a
//! successful `append` is durable. redb calls block, so each runs on the
//! blocking pool.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::{
    new_mid, now_ms, AccountStore, Appended, FriendState, Group, GroupStore, Message, MessageStore, NewMessage,
    RequestOutcome, Result, Role, Session, SocialStore, StorageError, User,
};

const USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("users");
const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
/// refresh token hash -> session id, for every token ever issued.
const REFRESH: TableDefinition<&str, &str> = TableDefinition::new("refresh");
/// (user, other) -> FriendState as JSON.
const FRIENDS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("friends");
/// (conv, seq) -> Message as JSON.
const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");
/// conv -> last seq.
const CONV_SEQ: TableDefinition<&str, u64> = TableDefinition::new("conv_seq");
/// (conv, from, cmid) -> seq.
const CMIDS: TableDefinition<(&str, &str, &str), u64> = TableDefinition::new("cmids");
/// (user, conv) -> () membership index.
const USER_CONVS: TableDefinition<(&str, &str), ()> = TableDefinition::new("user_convs");
/// (user, device, conv) -> acked seq.
const ACKS: TableDefinition<(&str, &str, &str), u64> = TableDefinition::new("acks");
/// (user, conv) -> read seq.
const READS: TableDefinition<(&str, &str), u64> = TableDefinition::new("reads");
/// (conv, mid) -> seq.
const MIDS: TableDefinition<(&str, &str), u64> = TableDefinition::new("mids");
/// group id -> Group as JSON.
const GROUPS: TableDefinition<&str, &[u8]> = TableDefinition::new("groups");
/// (group, user) -> role.
const GROUP_MEMBERS: TableDefinition<(&str, &str), &str> = TableDefinition::new("group_members");
/// (user, group) -> role (the reverse index of `GROUP_MEMBERS`).
const USER_GROUPS: TableDefinition<(&str, &str), &str> = TableDefinition::new("user_groups");

/// All stores over one redb file. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
}

impl EmbeddedStore {
    /// Opens (or creates) `dir/switchboard.redb`, creating `dir` if needed.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| StorageError::Embedded(format!("{}: {e}", dir.display())))?;
        let db = Database::create(dir.join("switchboard.redb"))?;
        let tx = db.begin_write()?;
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
            // The mid index arrived after the messages table: fill it for
            // messages stored before it existed.
            let mut mids = tx.open_table(MIDS)?;
            let messages = tx.open_table(MESSAGES)?;
            if mids.is_empty()? && !messages.is_empty()? {
                for row in messages.iter()? {
                    let m: Message = serde_json::from_slice(row?.1.value())?;
                    mids.insert((m.conv.as_str(), m.mid.as_str()), m.seq)?;
                }
            }
        }
        tx.commit()?;
        Ok(Self { db: Arc::new(db) })
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db)).await?
    }
}

fn get_json<T: serde::de::DeserializeOwned>(bytes: Option<redb::AccessGuard<'_, &[u8]>>) -> Result<Option<T>> {
    match bytes {
        Some(b) => Ok(Some(serde_json::from_slice(b.value())?)),
        None => Ok(None),
    }
}

#[async_trait]
impl AccountStore for EmbeddedStore {
    async fn create_user(&self, user: &User) -> Result<bool> {
        let user = user.clone();
        self.blocking(move |db| {
            let tx = db.begin_write()?;
            {
                let mut t = tx.open_table(USERS)?;
                if t.get(user.username.as_str())?.is_some() {
                    return Ok(false);
                }
                t.insert(user.username.as_str(), serde_json::to_vec(&user)?.as_slice())?;
            }
            tx.commit()?;
            Ok(true)
        })
        .await
    }

    async fn get_user(&self, username: &str) -> Result<Option<User>> {
        let name = username.to_owned();
        self.blocking(move |db| get_json(db.begin_read()?.open_table(USERS)?.get(name.as_str())?)).await
    }

    async fn put_session(&self, session: &Session) -> Result<()> {
        let s = session.clone();
        self.blocking(move |db| {
            let tx = db.begin_write()?;
            {
                tx.open_table(SESSIONS)?.insert(s.id.as_str(), serde_json::to_vec(&s)?.as_slice())?;
                tx.open_table(REFRESH)?.insert(s.refresh_hash.as_str(), s.id.as_str())?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn get_session(&self, id: &str) -> Result<Option<Session>> {
        let id = id.to_owned();
        self.blocking(move |db| get_json(db.begin_read()?.open_table(SESSIONS)?.get(id.as_str())?)).await
    }

    async fn session_by_refresh(&self, refresh_hash: &str) -> Result<Option<Session>> {
        let h = refresh_hash.to_owned();
        self.blocking(move |db| {
            let tx = db.begin_read()?;
            let Some(id) = tx.open_table(REFRESH)?.get(h.as_str())?.map(|v| v.value().to_owned()) else {
                return Ok(None);
            };
            get_json(tx.open_table(SESSIONS)?.get(id.as_str())?)
        })
        .await
    }

    async fn rotate_refresh(&self, session_id: &str, old_hash: &str, new_hash: &str, expires_ms: u64) -> Result<bool> {
        let (id, old, new) = (session_id.to_owned(), old_hash.to_owned(), new_hash.to_owned());
        self.blocking(move |db| {
            let tx = db.begin_write()?;
            {
                let mut sessions = tx.open_table(SESSIONS)?;
                let current: Option<Session> = get_json(sessions.get(id.as_str())?)?;
                let Some(mut s) = current else { return Ok(false) };
                if s.revoked || s.refresh_hash != old {
                    return Ok(false);
                }
                s.refresh_hash = new.clone();
                s.refresh_expires_ms = expires_ms;
                sessions.insert(id.as_str(), serde_json::to_vec(&s)?.as_slice())?;
                tx.open_table(REFRESH)?.insert(new.as_str(), id.as_str())?;
            }
            tx.commit()?;
            Ok(true)
        })
        .await
    }

    async fn revoke_session(&self, id: &str) -> Result<()> {
        let id = id.to_owned();
        self.blocking(move |db| {
            let tx = db.begin_write()?;
            {
                let mut sessions = tx.open_table(SESSIONS)?;
                let current: Option<Session> = get_json(sessions.get(id.as_str())?)?;
                if let Some(mut s) = current {
                    s.revoked = true;
                    sessions.insert(id.as_str(), serde_json::to_vec(&s)?.as_slice())?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn set_banned(&self, username: &str, banned: bool) -> Result<bool> {
        let name = username.to_owned();
        self.blocking(move |db| {
            let tx = db.begin_write()?;
            {
                let mut users = tx.open_table(USERS)?;
                let current: Option<User> = get_json(users.get(name.as_str())?)?;
                let Some(mut user) = current else { return Ok(false) };
                if user.banned != banned {
                    user.banned = banned;
                    users.insert(name.as_str(), serde_json::to_vec(&user)?.as_slice())?;
                }
            }
            tx.commit()?;
            Ok(true)
        })
        .await
    }
}

fn put_relation(t: &mut redb::Table<(&str, &str), &[u8]>, a: &str, b: &str, s: &FriendState) -> Result<()> {
    t.insert((a, b), serde_json::to_vec(s)?.as_slice())?;
    Ok(())
}

fn relation(t: &redb::Table<(&str, &str), &[u8]>, a: &str, b: &str) -> Result<Option<FriendState>> {
    get_json(t.get((a, b))?)
}

#[async_trait]
impl SocialStore for EmbeddedStore {
    async fn friend_state(&self, user: &str, other: &str) -> Result<Option<FriendState>> {
        let (a, b) = (user.to_owned(), other.to_owned());
        self.blocking(move |db| get_json(db.begin_read()?.open_table(FRIENDS)?.get((a.as_str(), b.as_str()))?)).await
    }

    async fn request_friend(&self, from: &str, to: &str, note: &str) -> Result<RequestOutcome> {
        let (a, b, note) = (from.to_owned(), to.to_owned(), note.to_owned());
        self.blocking(move |db| {
            let tx = db.begin_write()?;
            let outcome = {
                let mut t = tx.open_table(FRIENDS)?;
                match relation(&t, &a, &b)? {
                    Some(FriendState::Friends) => return Ok(RequestOutcome::AlreadyFriends),
                    Some(FriendState::Incoming { .. }) => {
                        put_relation(&mut t, &a, &b, &FriendState::Friends)?;
                        put_relation(&mut t, &b, &a, &FriendState::Friends)?;
                        RequestOutcome::BecameFriends
                    }
                    Some(FriendState::Outgoing { .. }) | None => {
                        put_relation(&mut t, &a, &b, &FriendState::Outgoing { note: note.clone() })?;
                        put_relation(&mut t, &b, &a, &FriendState::Incoming { note })?;
                        RequestOutcome::Pending
                    }
                }
            };
            tx.commit()?;
            Ok(outcome)
        })
        .await
    }

    async fn accept_friend(&self, user: &str, from: &str) -> Result<bool> {
        let (a, b) = (user.to_owned(), from.to_owned());
        self.blocking(move |db| {
            let tx = db.begin_write()?;
            {
                let mut t = tx.open_table(FRIENDS)?;
                if !matches!(relation(&t, &a, &b)?, Some(FriendState::Incoming { .. })) {
                    return Ok(false);
                }
                put_relation(&mut t, &a, &b, &FriendState::Friends)?;
                put_relation(&mut t, &b, &a, &FriendState::Friends)?;
            }
            tx.commit()?;
            Ok(true)
        })
        .await
    }

    async fn reject_friend(&self, user: &str, from: &str) -> Result<bool> {
        let (a, b) = (user.to_owned(), from.to_owned());
        self.blocking(move |db| {
            let tx = db.begin_write()?;
            {
                let mut t = tx.open_table(FRIENDS)?;
                if !matches!(relation(&t, &a, &b)?, Some(FriendState::Incoming { .. })) {
                    return Ok(false);
                }
                t.remove((a.as_str(), b.as_str()))?;
                t.remove((b.as_str(), a.as_str()))?;
            }
            tx.commit()?;
            Ok(true)
        })
        .await
    }

    async fn delete_friend(&self, user: &str, other: &str) -> Result<bool> {
        let (a, b) = (user.to_owned(), other.to_owned());
        self.blocking(move |db| {
            let tx = db.begin_write()?;
            let existed = {
                let mut t = tx.open_table(FRIENDS)?;
                let existed = t.remove((a.as_str(), b.as_str()))?.is_some();
                t.remove((b.as_str(), a.as_str()))?;
                existed
            };
            tx.commit()?;
            Ok(existed)
        })
        .await
    }

    async fn relations(&self, user: &str) -> Result<Vec<(String, FriendState)>> {
        let a = user.to_owned();
        self.blocking(move |db| {
            let t = db.begin_read()?.open_table(FRIENDS)?;
            let mut out = Vec::new();
            for row in t.range((a.as_str(), "")..)? {
                let (k, v) = row?;
                let (owner, other) = k.value();
                if owner != a {
                    break;
                }
                out.push((other.to_owned(), serde_json::from_slice(v.value())?));
            }
            Ok(out)
        })
        .await
    }
}

#[async_trait]
impl MessageStore for EmbeddedStore {
    async fn append(&self, msg: NewMessage, members: &[String]) -> Result<Appended> {
        let members = members.to_vec();
        self.blocking(move |db| {
            let tx = db.begin_write()?;
            let stored = {
                let mut cmids = tx.open_table(CMIDS)?;
                let mut messages = tx.open_table(MESSAGES)?;
                let cmid_key = (msg.conv.as_str(), msg.from.as_str(), msg.cmid.as_str());
                if let Some(seq) = cmids.get(cmid_key)?.map(|v| v.value()) {
                    let Some(bytes) = messages.get((msg.conv.as_str(), seq))? else {
                        return Err(StorageError::Corrupt(format!("cmid index points at missing {}#{seq}", msg.conv)));
                    };
                    let earlier: Message = serde_json::from_slice(bytes.value())?;
                    return Ok(Appended { msg: earlier, duplicate: true });
                }
                let mut seqs = tx.open_table(CONV_SEQ)?;
                let last = seqs.get(msg.conv.as_str())?.map(|v| v.value()).unwrap_or(0);
                // ts never goes backwards inside a conversation, so seq order
                // and time order agree even if the wall clock steps back.
                let last_ts = match last {
                    0 => 0,
                    n => match messages.get((msg.conv.as_str(), n))? {
                        Some(b) => serde_json::from_slice::<Message>(b.value())?.ts,
                        None => 0,
                    },
                };
                let ts = now_ms().max(last_ts);
                let stored = Message {
                    mid: new_mid(ts),
                    seq: last + 1,
                    ts,
                    conv: msg.conv,
                    from: msg.from,
                    cmid: msg.cmid,
                    kind: msg.kind,
                    body: msg.body,
                };
                messages.insert((stored.conv.as_str(), stored.seq), serde_json::to_vec(&stored)?.as_slice())?;
                seqs.insert(stored.conv.as_str(), stored.seq)?;
                cmids.insert((stored.conv.as_str(), stored.from.as_str(), stored.cmid.as_str()), stored.seq)?;
                tx.open_table(MIDS)?.insert((stored.conv.as_str(), stored.mid.as_str()), stored.seq)?;
                let mut index = tx.open_table(USER_CONVS)?;
                for m in &members {
                    index.insert((m.as_str(), stored.conv.as_str()), ())?;
                }
                stored
            };
            tx.commit()?;
            Ok(Appended { msg: stored, duplicate: false })
        })
        .await
    }

    async fn find_cmid(&self, conv: &str, from: &str, cmid: &str) -> Result<Option<Message>> {
        let (conv, from, cmid) = (conv.to_owned(), from.to_owned(), cmid.to_owned());
        self.blocking(move |db| {
            let tx = db.begin_read()?;
            let Some(seq) =
                tx.open_table(CMIDS)?.get((conv.as_str(), from.as_str(), cmid.as_str()))?.map(|v| v.value())
            else {
                return Ok(None);
            };
            get_json(tx.open_table(MESSAGES)?.get((conv.as_str(), seq))?)
        })
        .await
    }

    async fn range(&self, conv: &str, after_seq: u64, limit: usize) -> Result<Vec<Message>> {
        let conv = conv.to_owned();
        self.blocking(move |db| {
            let t = db.begin_read()?.open_table(MESSAGES)?;
            let start = after_seq.saturating_add(1);
            let mut out = Vec::new();
            for row in t.range((conv.as_str(), start)..=(conv.as_str(), u64::MAX))?.take(limit) {
                out.push(serde_json::from_slice(row?.1.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn history(&self, conv: &str, before_seq: Option<u64>, limit: usize) -> Result<Vec<Message>> {
        let conv = conv.to_owned();
        self.blocking(move |db| {
            let t = db.begin_read()?.open_table(MESSAGES)?;
            let end = before_seq.unwrap_or(u64::MAX);
            let mut out = Vec::new();
            for row in t.range((conv.as_str(), 0)..(conv.as_str(), end))?.rev().take(limit) {
                out.push(serde_json::from_slice(row?.1.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn last_seq(&self, conv: &str) -> Result<u64> {
        let conv = conv.to_owned();
        self.blocking(move |db| {
            Ok(db.begin_read()?.open_table(CONV_SEQ)?.get(conv.as_str())?.map(|v| v.value()).unwrap_or(0))
        })
        .await
    }

    async fn user_convs(&self, user: &str) -> Result<Vec<(String, u64)>> {
        let user = user.to_owned();
        self.blocking(move |db| {
            let tx = db.begin_read()?;
            let index = tx.open_table(USER_CONVS)?;
            let seqs = tx.open_table(CONV_SEQ)?;
            let mut out = Vec::new();
            for row in index.range((user.as_str(), "")..)? {
                let (k, _) = row?;
                let (owner, conv) = k.value();
                if owner != user {
                    break;
                }
                let last = seqs.get(conv)?.map(|v| v.value()).unwrap_or(0);
                out.push((conv.to_owned(), last));
            }
            Ok(out)
        })
        .await
    }

    async fn set_ack(&self, user: &str, device: &str, conv: &str, seq: u64) -> Result<()> {
        let (u, d, c) = (user.to_owned(), device.to_owned(), conv.to_owned());
        self.blocking(move |db| {
            let tx = db.begin_write()?;
            {
                let mut t = tx.open_table(ACKS)?;
                let key = (u.as_str(), d.as_str(), c.as_str());
                let current = t.get(key)?.map(|v| v.value()).unwrap_or(0);
                if seq > current {
                    t.insert(key, seq)?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn acks(&self, user: &str, device: &str) -> Result<HashMap<String, u64>> {
        let (u, d) = (user.to_owned(), device.to_owned());
        self.blocking(move |db| {
            let t = db.begin_read()?.open_table(ACKS)?;
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
        .await
    }

    async fn set_read(&self, user: &str, conv: &str, seq: u64) -> Result<u64> {
        let (u, c) = (user.to_owned(), conv.to_owned());
        self.blocking(move |db| {
            let tx = db.begin_write()?;
            let stored = {
                let mut t = tx.open_table(READS)?;
                let key = (u.as_str(), c.as_str());
                let current = t.get(key)?.map(|v| v.value());
                match current {
                    Some(cur) if cur >= seq => cur,
                    // as with acks, a read of 0 records nothing
                    None if seq == 0 => 0,
                    _ => {
                        t.insert(key, seq)?;
                        seq
                    }
                }
            };
            tx.commit()?;
            Ok(stored)
        })
        .await
    }

    async fn reads(&self, user: &str) -> Result<HashMap<String, u64>> {
        let u = user.to_owned();
        self.blocking(move |db| {
            let t = db.begin_read()?.open_table(READS)?;
            let mut out = HashMap::new();
            for row in t.range((u.as_str(), "")..)? {
                let (k, v) = row?;
                let (owner, conv) = k.value();
                if owner != u {
                    break;
                }
                out.insert(conv.to_owned(), v.value());
            }
            Ok(out)
        })
        .await
    }

    async fn find_mid(&self, conv: &str, mid: &str) -> Result<Option<Message>> {
        let (conv, mid) = (conv.to_owned(), mid.to_owned());
        self.blocking(move |db| {
            let tx = db.begin_read()?;
            let Some(seq) = tx.open_table(MIDS)?.get((conv.as_str(), mid.as_str()))?.map(|v| v.value()) else {
                return Ok(None);
            };
            get_json(tx.open_table(MESSAGES)?.get((conv.as_str(), seq))?)
        })
        .await
    }

    async fn recall(&self, conv: &str, seq: u64) -> Result<Option<Message>> {
        let conv = conv.to_owned();
        self.blocking(move |db| {
            let tx = db.begin_write()?;
            let recalled = {
                let mut messages = tx.open_table(MESSAGES)?;
                let current: Option<Message> = get_json(messages.get((conv.as_str(), seq))?)?;
                let Some(m) = current else { return Ok(None) };
                let recalled = crate::recalled_form(m);
                messages.insert((conv.as_str(), seq), serde_json::to_vec(&recalled)?.as_slice())?;
                recalled
            };
            tx.commit()?;
            Ok(Some(recalled))
        })
        .await
    }
}

fn parse_role(s: &str) -> Result<Role> {
    Role::parse(s).ok_or_else(|| StorageError::Corrupt(format!("unknown group role {s:?}")))
}

#[async_trait]
impl GroupStore for EmbeddedStore {
    async fn create_group(&self, group: &Group, members: &[String]) -> Result<bool> {
        let (group, members) = (group.clone(), members.to_vec());
        self.blocking(move |db| {
            let tx = db.begin_write()?;
            {
                let mut groups = tx.open_table(GROUPS)?;
                if groups.get(group.id.as_str())?.is_some() {
                    return Ok(false);
                }
                groups.insert(group.id.as_str(), serde_json::to_vec(&group)?.as_slice())?;
                let mut by_group = tx.open_table(GROUP_MEMBERS)?;
                let mut by_user = tx.open_table(USER_GROUPS)?;
                let id = group.id.as_str();
                by_group.insert((id, group.owner.as_str()), Role::Owner.as_str())?;
                by_user.insert((group.owner.as_str(), id), Role::Owner.as_str())?;
                for m in &members {
                    if by_group.get((id, m.as_str()))?.is_none() {
                        by_group.insert((id, m.as_str()), Role::Member.as_str())?;
                        by_user.insert((m.as_str(), id), Role::Member.as_str())?;
                    }
                }
            }
            tx.commit()?;
            Ok(true)
        })
        .await
    }

    async fn group(&self, id: &str) -> Result<Option<Group>> {
        let id = id.to_owned();
        self.blocking(move |db| get_json(db.begin_read()?.open_table(GROUPS)?.get(id.as_str())?)).await
    }

    async fn add_member(&self, id: &str, user: &str, role: Role) -> Result<bool> {
        let (id, user) = (id.to_owned(), user.to_owned());
        self.blocking(move |db| {
            let tx = db.begin_write()?;
            {
                let mut by_group = tx.open_table(GROUP_MEMBERS)?;
                if by_group.get((id.as_str(), user.as_str()))?.is_some() {
                    return Ok(false);
                }
                by_group.insert((id.as_str(), user.as_str()), role.as_str())?;
                tx.open_table(USER_GROUPS)?.insert((user.as_str(), id.as_str()), role.as_str())?;
            }
            tx.commit()?;
            Ok(true)
        })
        .await
    }

    async fn remove_member(&self, id: &str, user: &str) -> Result<bool> {
        let (id, user) = (id.to_owned(), user.to_owned());
        self.blocking(move |db| {
            let tx = db.begin_write()?;
            {
                if tx.open_table(GROUP_MEMBERS)?.remove((id.as_str(), user.as_str()))?.is_none() {
                    return Ok(false);
                }
                tx.open_table(USER_GROUPS)?.remove((user.as_str(), id.as_str()))?;
            }
            tx.commit()?;
            Ok(true)
        })
        .await
    }

    async fn set_role(&self, id: &str, user: &str, role: Role) -> Result<bool> {
        let (id, user) = (id.to_owned(), user.to_owned());
        self.blocking(move |db| {
            let tx = db.begin_write()?;
            {
                let mut by_group = tx.open_table(GROUP_MEMBERS)?;
                if by_group.get((id.as_str(), user.as_str()))?.is_none() {
                    return Ok(false);
                }
                by_group.insert((id.as_str(), user.as_str()), role.as_str())?;
                tx.open_table(USER_GROUPS)?.insert((user.as_str(), id.as_str()), role.as_str())?;
            }
            tx.commit()?;
            Ok(true)
        })
        .await
    }

    async fn role(&self, id: &str, user: &str) -> Result<Option<Role>> {
        let (id, user) = (id.to_owned(), user.to_owned());
        self.blocking(move |db| {
            let t = db.begin_read()?.open_table(GROUP_MEMBERS)?;
            let role = t.get((id.as_str(), user.as_str()))?.map(|v| v.value().to_owned());
            role.as_deref().map(parse_role).transpose()
        })
        .await
    }

    async fn members(&self, id: &str) -> Result<Vec<(String, Role)>> {
        let id = id.to_owned();
        self.blocking(move |db| {
            let t = db.begin_read()?.open_table(GROUP_MEMBERS)?;
            let mut out = Vec::new();
            for row in t.range((id.as_str(), "")..)? {
                let (k, v) = row?;
                let (group, user) = k.value();
                if group != id {
                    break;
                }
                out.push((user.to_owned(), parse_role(v.value())?));
            }
            Ok(out)
        })
        .await
    }

    async fn user_groups(&self, user: &str) -> Result<Vec<(Group, Role)>> {
        let user = user.to_owned();
        self.blocking(move |db| {
            let tx = db.begin_read()?;
            let index = tx.open_table(USER_GROUPS)?;
            let groups = tx.open_table(GROUPS)?;
            let mut out = Vec::new();
            for row in index.range((user.as_str(), "")..)? {
                let (k, v) = row?;
                let (owner, id) = k.value();
                if owner != user {
                    break;
                }
                let group: Option<Group> = get_json(groups.get(id)?)?;
                let Some(group) = group else {
                    return Err(StorageError::Corrupt(format!("membership of {user} in missing group {id}")));
                };
                out.push((group, parse_role(v.value())?));
            }
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mid_index_is_filled_for_older_databases() {
        let dir = std::env::temp_dir().join(format!("sb-mids-{}", crate::contract::prefix()));
        let store = EmbeddedStore::open(&dir).unwrap();
        let msg = NewMessage {
            conv: "d:a:b".into(),
            from: "a".into(),
            cmid: "c1".into(),
            kind: "text".into(),
            body: serde_json::json!("hi"),
        };
        let stored = store.append(msg, &["a".to_string()]).await.unwrap().msg;
        // a database written before the mid index existed
        let tx = store.db.begin_write().unwrap();
        tx.delete_table(MIDS).unwrap();
        tx.commit().unwrap();
        drop(store);
        let store = EmbeddedStore::open(&dir).unwrap();
        assert_eq!(store.find_mid("d:a:b", &stored.mid).await.unwrap(), Some(stored));
        std::fs::remove_dir_all(&dir).ok();
    }
}
