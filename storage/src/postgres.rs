//! The PostgreSQL backend: every store trait (and the cluster's
//! [`DurableLog`]) over one PostgreSQL database, through a connection pool.
//! Semantics mirror the embedded backend exactly; what redb gets from its
//! single writer, this backend gets from row locks (one `conv_seq` row per
//! conversation serialises its appends) and transaction-scoped advisory
//! locks (schema creation, one friend pair's relation).
//!
//! For the persist worker it also keeps how far the worker got in each
//! partition of the message topic (`persist_offsets`, written in the same
//! transaction as the records) and hands out [`PartitionLocks`]: session
//! advisory locks, one per partition, on a dedicated connection each, so
//! that a worker that dies (even by SIGKILL) releases its partitions as its
//! connection closes.
//!
//! Text keys use the "C" collation so that orderings (relations by the other
//! user's name, conversations of a user) are byte order, as in redb.
//! Unsigned numbers are stored as BIGINT; values above `i64::MAX` (never
//! produced by the stores themselves) are clamped to it.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod};
use tokio_postgres::{NoTls, Row};

use crate::files::{FileMeta, FileStore};
use crate::tls::{BackendTls, PgTls};

use crate::{
    now_ms, AccountStore, Appended, DurableLog, FriendState, Group, GroupStore, LockSession, Message, MessageStore,
    NewMessage, PartitionLocks, PartitionOffset, RequestOutcome, Result, Role, SequencedRecord, Session, SocialStore,
    StorageError, User,
};

/// Key of the advisory lock taken while creating the schema ("sbschema").
const SCHEMA_LOCK: i64 = 0x7362_7363_6865_6d61;
/// Class (first key) of the advisory locks that serialise changes to one
/// friend pair; the second key is a hash of the pair.
const PAIR_LOCK_CLASS: i32 = 0x7362_6672; // "sbfr"
/// How often a lock session's connection is probed by TCP keepalives (both
/// ends), so that the locks of a worker that vanished without closing its
/// connection (host down, network cut) are released within about a minute.
const LOCK_KEEPALIVE_IDLE: Duration = Duration::from_secs(15);

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS users (
    username TEXT COLLATE "C" PRIMARY KEY,
    nickname TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT COLLATE "C" PRIMARY KEY,
    username TEXT NOT NULL,
    device TEXT NOT NULL,
    refresh_hash TEXT NOT NULL,
    revoked BOOLEAN NOT NULL,
    created_ms BIGINT NOT NULL,
    refresh_expires_ms BIGINT NOT NULL
);
-- Each CREATE INDEX locks its table even when the index exists: sessions before
-- refresh_tokens, the order every write of both takes (else a concurrent prune deadlocks).
CREATE INDEX IF NOT EXISTS sessions_refresh_expiry ON sessions (refresh_expires_ms);
CREATE TABLE IF NOT EXISTS refresh_tokens (
    hash TEXT COLLATE "C" PRIMARY KEY,
    session_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS refresh_tokens_session ON refresh_tokens (session_id);
CREATE TABLE IF NOT EXISTS friends (
    username TEXT COLLATE "C" NOT NULL,
    other TEXT COLLATE "C" NOT NULL,
    state TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (username, other)
);
CREATE TABLE IF NOT EXISTS messages (
    conv TEXT COLLATE "C" NOT NULL,
    seq BIGINT NOT NULL,
    mid TEXT NOT NULL,
    from_user TEXT COLLATE "C" NOT NULL,
    cmid TEXT COLLATE "C" NOT NULL,
    type TEXT NOT NULL,
    body TEXT NOT NULL,
    ts BIGINT NOT NULL,
    PRIMARY KEY (conv, seq)
);
CREATE UNIQUE INDEX IF NOT EXISTS messages_cmid ON messages (conv, from_user, cmid);
CREATE TABLE IF NOT EXISTS conv_seq (
    conv TEXT COLLATE "C" PRIMARY KEY,
    last_seq BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS user_convs (
    username TEXT COLLATE "C" NOT NULL,
    conv TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (username, conv)
);
CREATE TABLE IF NOT EXISTS acks (
    username TEXT COLLATE "C" NOT NULL,
    device TEXT COLLATE "C" NOT NULL,
    conv TEXT COLLATE "C" NOT NULL,
    seq BIGINT NOT NULL,
    PRIMARY KEY (username, device, conv)
);
ALTER TABLE users ADD COLUMN IF NOT EXISTS banned BOOLEAN NOT NULL DEFAULT FALSE;
CREATE INDEX IF NOT EXISTS messages_mid ON messages (conv, mid);
CREATE TABLE IF NOT EXISTS reads (
    username TEXT COLLATE "C" NOT NULL,
    conv TEXT COLLATE "C" NOT NULL,
    seq BIGINT NOT NULL,
    PRIMARY KEY (username, conv)
);
CREATE TABLE IF NOT EXISTS groups (
    id TEXT COLLATE "C" PRIMARY KEY,
    name TEXT NOT NULL,
    owner TEXT COLLATE "C" NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS group_members (
    group_id TEXT COLLATE "C" NOT NULL,
    username TEXT COLLATE "C" NOT NULL,
    role TEXT NOT NULL,
    PRIMARY KEY (group_id, username)
);
CREATE INDEX IF NOT EXISTS group_members_username ON group_members (username);
CREATE TABLE IF NOT EXISTS blocks (
    username TEXT COLLATE "C" NOT NULL,
    other TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (username, other)
);
ALTER TABLE groups ADD COLUMN IF NOT EXISTS invite_only BOOLEAN NOT NULL DEFAULT FALSE;
CREATE TABLE IF NOT EXISTS files (
    id TEXT COLLATE "C" PRIMARY KEY,
    owner TEXT COLLATE "C" NOT NULL,
    name TEXT NOT NULL,
    mime TEXT NOT NULL,
    size BIGINT NOT NULL,
    ts BIGINT NOT NULL
);
-- Only when missing: an ALTER TABLE takes the table's exclusive lock, which would deadlock with
-- the appends of running instances (they hold a read lock on messages before they insert).
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                   WHERE table_schema = current_schema() AND table_name = 'messages' AND column_name = 'terms') THEN
        ALTER TABLE messages ADD COLUMN IF NOT EXISTS refs TEXT, ADD COLUMN IF NOT EXISTS stext TEXT,
            ADD COLUMN IF NOT EXISTS stext_seq BIGINT NOT NULL DEFAULT 0, ADD COLUMN IF NOT EXISTS terms BIGINT[];
    END IF;
END $$;
CREATE INDEX IF NOT EXISTS messages_terms ON messages USING GIN (terms);
CREATE TABLE IF NOT EXISTS mentions (
    username TEXT COLLATE "C" NOT NULL,
    conv TEXT COLLATE "C" NOT NULL,
    seq BIGINT NOT NULL,
    PRIMARY KEY (username, conv)
);
CREATE TABLE IF NOT EXISTS push_tokens (
    username TEXT COLLATE "C" NOT NULL,
    device TEXT COLLATE "C" NOT NULL,
    platform TEXT NOT NULL,
    token TEXT COLLATE "C" NOT NULL UNIQUE,
    updated_ms BIGINT NOT NULL,
    PRIMARY KEY (username, device)
);
CREATE TABLE IF NOT EXISTS mutes (
    username TEXT COLLATE "C" NOT NULL,
    conv TEXT COLLATE "C" NOT NULL,
    until_ms BIGINT NOT NULL,
    PRIMARY KEY (username, conv)
);
CREATE TABLE IF NOT EXISTS file_chunks (
    id TEXT COLLATE "C" NOT NULL,
    n INT NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (id, n)
);
CREATE TABLE IF NOT EXISTS file_convs (
    id TEXT COLLATE "C" NOT NULL,
    conv TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (id, conv)
);
CREATE TABLE IF NOT EXISTS persist_offsets (
    topic TEXT COLLATE "C" NOT NULL,
    part INT NOT NULL,
    next_offset BIGINT NOT NULL,
    PRIMARY KEY (topic, part)
);
"#;

const MESSAGE_COLS: &str = "conv, seq, mid, from_user, cmid, type, body, ts, refs";
/// The columns an insert writes: the message's, then its search text (with the seq that set
/// it) and terms (see [`crate::search`]).
const INSERT_COLS: &str = "conv, seq, mid, from_user, cmid, type, body, ts, refs, stext, stext_seq, terms";

impl From<tokio_postgres::Error> for StorageError {
    fn from(e: tokio_postgres::Error) -> Self {
        crate::error::DRIVER_ERRORS.count(crate::error::Backend::Postgres);
        // The server's own message: the error's Display says only "db error".
        let what = match e.as_db_error() {
            Some(db) => format!("{} ({})", db.message(), db.code().code()),
            None => with_sources(&e),
        };
        StorageError::Postgres(what, Some(Box::new(e)))
    }
}

impl From<PoolError> for StorageError {
    fn from(e: PoolError) -> Self {
        crate::error::DRIVER_ERRORS.count(crate::error::Backend::Postgres);
        StorageError::Postgres(with_sources(&e), Some(Box::new(e)))
    }
}

/// An error's message followed by its sources' ("error performing TLS handshake: invalid peer
/// certificate: UnknownIssuer"), so a failed connection says why.
fn with_sources(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

/// A u64 as stored (BIGINT), clamped to `i64::MAX`.
fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A stored BIGINT as u64 (the stores never write negative values).
fn uint(v: i64) -> u64 {
    v.max(0) as u64
}

fn message_from_row(r: &Row) -> Result<Message> {
    let body: String = r.try_get("body")?;
    let mut m = Message {
        conv: r.try_get("conv")?,
        seq: uint(r.try_get("seq")?),
        mid: r.try_get("mid")?,
        from: r.try_get("from_user")?,
        cmid: r.try_get("cmid")?,
        kind: r.try_get("type")?,
        body: serde_json::from_str(&body)?,
        ts: uint(r.try_get("ts")?),
        reply_to: None,
        mentions: Vec::new(),
    };
    m.set_refs_json(r.try_get::<_, Option<&str>>("refs")?)?;
    Ok(m)
}

/// Integers as a PostgreSQL array literal (`unnest` cannot pass an array per row).
fn array_literal(items: &[i64]) -> String {
    let items: Vec<String> = items.iter().map(i64::to_string).collect();
    format!("{{{}}}", items.join(","))
}

/// A message's search columns as inserted: its text, the seq that set it, its terms.
fn search_cols(m: &Message) -> (Option<String>, i64, Option<Vec<i64>>) {
    match crate::search::change_of(m) {
        crate::search::IndexChange::Add(text) => {
            let terms = crate::search::doc_terms(&text);
            (Some(text), int(m.seq), Some(terms))
        }
        _ => (None, 0, None),
    }
}

fn role_from_row(r: &Row) -> Result<Role> {
    let role: String = r.try_get("role")?;
    Role::parse(&role).ok_or_else(|| StorageError::Corrupt(format!("unknown group role {role:?}")))
}

fn group_from_row(r: &Row) -> Result<Group> {
    Ok(Group {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        owner: r.try_get("owner")?,
        created_ms: uint(r.try_get("created_ms")?),
        invite_only: r.try_get("invite_only")?,
    })
}

fn session_from_row(r: &Row) -> Result<Session> {
    Ok(Session {
        id: r.try_get("id")?,
        user: r.try_get("username")?,
        device: r.try_get("device")?,
        refresh_hash: r.try_get("refresh_hash")?,
        revoked: r.try_get("revoked")?,
        created_ms: uint(r.try_get("created_ms")?),
        refresh_expires_ms: uint(r.try_get("refresh_expires_ms")?),
    })
}

fn state_from_row(r: &Row) -> Result<FriendState> {
    FriendState::from_parts(r.try_get("state")?, r.try_get("note")?)
}

/// A (text, BIGINT) row, e.g. a conversation and a seq.
fn text_and_uint(r: &Row) -> Result<(String, u64)> {
    Ok((r.try_get(0)?, uint(r.try_get(1)?)))
}

/// The BIGINT of a one-column row, 0 without a row.
fn uint_or_zero(row: Option<Row>) -> Result<u64> {
    Ok(row.map(|r| r.try_get(0)).transpose()?.map(uint).unwrap_or(0))
}

/// A stable 32-bit hash (FNV-1a) of an unordered user pair, for its
/// advisory lock.
fn pair_key(a: &str, b: &str) -> i32 {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let mut h: u32 = 0x811c_9dc5;
    for byte in lo.bytes().chain(std::iter::once(0)).chain(hi.bytes()) {
        h ^= u32::from(byte);
        h = h.wrapping_mul(0x0100_0193);
    }
    h as i32
}

/// The key of the session advisory lock owning `partition` of `topic`: a
/// stable 64-bit hash (FNV-1a). Single-key locks never collide with the
/// two-key friend pair locks (PostgreSQL keeps the two kinds apart). In
/// `pg_locks` the key shows as `classid` (high 32 bits) and `objid` (low 32
/// bits) with `objsubid` 1: who holds a partition, for operators and tests.
pub fn partition_lock_key(topic: &str, partition: i32) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let key = format!("switchboard-persist\0{topic}\0{partition}");
    for byte in key.bytes() {
        h ^= u64::from(byte);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}

/// All stores over one PostgreSQL database. Cheap to clone (shares the pool).
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    /// Where the pool connects, for connections of their own (lock sessions).
    config: tokio_postgres::Config,
    /// How those connect (TLS when the URL asks for it).
    tls: PgTls,
}

impl PgStore {
    /// Connects to `url` (e.g. `postgres://user@host:5432/db`; TLS with
    /// `?sslmode=require`, verified against the web PKI roots) with a pool of
    /// at most `pool_size` connections, and creates the schema if it is
    /// missing. Safe when several processes start at once.
    pub async fn connect(url: &str, pool_size: usize) -> Result<PgStore> {
        Self::connect_tls(url, pool_size, &BackendTls::system()).await
    }

    /// [`PgStore::connect`], a TLS connection trusting `tls`'s roots.
    pub async fn connect_tls(url: &str, pool_size: usize, tls: &BackendTls) -> Result<PgStore> {
        let mut config: tokio_postgres::Config =
            url.parse().map_err(|e| StorageError::postgres(format!("bad url: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        let tls = tls.postgres(&config)?;
        let manager_config = ManagerConfig { recycling_method: RecyclingMethod::Fast };
        let manager = if tls.is_tls() {
            Manager::from_config(config.clone(), tls.clone(), manager_config)
        } else {
            Manager::from_config(config.clone(), NoTls, manager_config)
        };
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .build()
            .map_err(|e| StorageError::postgres(format!("pool: {e}")))?;
        let store = PgStore { pool, config, tls };
        store.create_schema().await?;
        Ok(store)
    }

    async fn create_schema(&self) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // Concurrent CREATE ... IF NOT EXISTS can still collide in the
        // catalogs; serialise schema creation across processes.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK]).await?;
        tx.batch_execute(SCHEMA).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn client(&self) -> Result<Object> {
        Ok(self.pool.get().await?)
    }

    /// Takes the lock serialising changes to the relation of `a` and `b`.
    async fn lock_pair(tx: &deadpool_postgres::Transaction<'_>, a: &str, b: &str) -> Result<()> {
        let st = tx.prepare_cached("SELECT pg_advisory_xact_lock($1, $2)").await?;
        tx.execute(&st, &[&PAIR_LOCK_CLASS, &pair_key(a, b)]).await?;
        Ok(())
    }

    async fn relation(tx: &deadpool_postgres::Transaction<'_>, a: &str, b: &str) -> Result<Option<FriendState>> {
        let st = tx.prepare_cached("SELECT state, note FROM friends WHERE username = $1 AND other = $2").await?;
        tx.query_opt(&st, &[&a, &b]).await?.map(|r| state_from_row(&r)).transpose()
    }

    async fn put_relation(tx: &deadpool_postgres::Transaction<'_>, a: &str, b: &str, s: &FriendState) -> Result<()> {
        let st = tx
            .prepare_cached(
                "INSERT INTO friends (username, other, state, note) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (username, other) DO UPDATE SET state = EXCLUDED.state, note = EXCLUDED.note",
            )
            .await?;
        let (state, note) = s.parts();
        tx.execute(&st, &[&a, &b, &state, &note]).await?;
        Ok(())
    }

    /// Indexes a refresh token hash to its session.
    async fn put_token(tx: &deadpool_postgres::Transaction<'_>, hash: &str, session_id: &str) -> Result<()> {
        let st = tx
            .prepare_cached(
                "INSERT INTO refresh_tokens (hash, session_id) VALUES ($1, $2) \
                 ON CONFLICT (hash) DO UPDATE SET session_id = EXCLUDED.session_id",
            )
            .await?;
        tx.execute(&st, &[&hash, &session_id]).await?;
        Ok(())
    }

    /// `user` accepts (both become friends) or rejects (both relations go)
    /// the pending request of `from`; `false` if there is none.
    async fn answer_request(&self, user: &str, from: &str, accept: bool) -> Result<bool> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        Self::lock_pair(&tx, user, from).await?;
        if !matches!(Self::relation(&tx, user, from).await?, Some(FriendState::Incoming { .. })) {
            tx.rollback().await?;
            return Ok(false);
        }
        if accept {
            Self::put_relation(&tx, user, from, &FriendState::Friends).await?;
            Self::put_relation(&tx, from, user, &FriendState::Friends).await?;
        } else {
            Self::remove_pair(&tx, user, from).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Deletes the relation in both directions; whether `a -> b` existed.
    async fn remove_pair(tx: &deadpool_postgres::Transaction<'_>, a: &str, b: &str) -> Result<bool> {
        let st = tx
            .prepare_cached(
                "DELETE FROM friends WHERE (username = $1 AND other = $2) OR (username = $2 AND other = $1) \
                 RETURNING username",
            )
            .await?;
        let rows = tx.query(&st, &[&a, &b]).await?;
        Ok(rows.iter().any(|r| r.get::<_, &str>(0) == a))
    }
}

#[async_trait]
impl AccountStore for PgStore {
    async fn create_user(&self, user: &User) -> Result<bool> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                "INSERT INTO users (username, nickname, password_hash, created_ms, banned) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (username) DO NOTHING",
            )
            .await?;
        let n = c
            .execute(&st, &[&user.username, &user.nickname, &user.password_hash, &int(user.created_ms), &user.banned])
            .await?;
        Ok(n == 1)
    }

    async fn get_user(&self, username: &str) -> Result<Option<User>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                "SELECT username, nickname, password_hash, created_ms, banned FROM users WHERE username = $1",
            )
            .await?;
        let Some(r) = c.query_opt(&st, &[&username]).await? else { return Ok(None) };
        Ok(Some(User {
            username: r.try_get("username")?,
            nickname: r.try_get("nickname")?,
            password_hash: r.try_get("password_hash")?,
            created_ms: uint(r.try_get("created_ms")?),
            banned: r.try_get("banned")?,
        }))
    }

    async fn put_session(&self, s: &Session) -> Result<()> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let st = tx
            .prepare_cached(
                "INSERT INTO sessions (id, username, device, refresh_hash, revoked, created_ms, refresh_expires_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO UPDATE SET username = EXCLUDED.username, \
                 device = EXCLUDED.device, refresh_hash = EXCLUDED.refresh_hash, revoked = EXCLUDED.revoked, \
                 created_ms = EXCLUDED.created_ms, refresh_expires_ms = EXCLUDED.refresh_expires_ms",
            )
            .await?;
        tx.execute(
            &st,
            &[&s.id, &s.user, &s.device, &s.refresh_hash, &s.revoked, &int(s.created_ms), &int(s.refresh_expires_ms)],
        )
        .await?;
        Self::put_token(&tx, &s.refresh_hash, &s.id).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_session(&self, id: &str) -> Result<Option<Session>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                "SELECT id, username, device, refresh_hash, revoked, created_ms, refresh_expires_ms \
                 FROM sessions WHERE id = $1",
            )
            .await?;
        c.query_opt(&st, &[&id]).await?.map(|r| session_from_row(&r)).transpose()
    }

    async fn session_by_refresh(&self, refresh_hash: &str) -> Result<Option<Session>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                "SELECT s.id, s.username, s.device, s.refresh_hash, s.revoked, s.created_ms, s.refresh_expires_ms \
                 FROM refresh_tokens t JOIN sessions s ON s.id = t.session_id WHERE t.hash = $1",
            )
            .await?;
        c.query_opt(&st, &[&refresh_hash]).await?.map(|r| session_from_row(&r)).transpose()
    }

    async fn rotate_refresh(&self, session_id: &str, old_hash: &str, new_hash: &str, expires_ms: u64) -> Result<bool> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        // The conditional UPDATE re-checks its WHERE under the row lock, so
        // of two racing rotations with the same old hash only one wins.
        let st = tx
            .prepare_cached(
                "UPDATE sessions SET refresh_hash = $3, refresh_expires_ms = $4 \
                 WHERE id = $1 AND refresh_hash = $2 AND NOT revoked",
            )
            .await?;
        if tx.execute(&st, &[&session_id, &old_hash, &new_hash, &int(expires_ms)]).await? != 1 {
            tx.rollback().await?;
            return Ok(false);
        }
        Self::put_token(&tx, new_hash, session_id).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn prune_sessions(&self, before_ms: u64) -> Result<usize> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let st = tx.prepare_cached("DELETE FROM sessions WHERE refresh_expires_ms < $1 RETURNING id").await?;
        let gone: Vec<String> = tx.query(&st, &[&int(before_ms)]).await?.iter().map(|r| r.get(0)).collect();
        let st = tx.prepare_cached("DELETE FROM refresh_tokens WHERE session_id = ANY($1)").await?;
        tx.execute(&st, &[&gone]).await?;
        tx.commit().await?;
        Ok(gone.len())
    }

    async fn revoke_session(&self, id: &str) -> Result<()> {
        let c = self.client().await?;
        let st = c.prepare_cached("UPDATE sessions SET revoked = TRUE WHERE id = $1").await?;
        c.execute(&st, &[&id]).await?;
        Ok(())
    }

    async fn set_banned(&self, username: &str, banned: bool) -> Result<bool> {
        let c = self.client().await?;
        let st = c.prepare_cached("UPDATE users SET banned = $2 WHERE username = $1").await?;
        Ok(c.execute(&st, &[&username, &banned]).await? == 1)
    }

    async fn put_push_token(&self, t: &crate::PushToken) -> Result<()> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let st =
            tx.prepare_cached("DELETE FROM push_tokens WHERE token = $1 AND (username, device) <> ($2, $3)").await?;
        tx.execute(&st, &[&t.token, &t.user, &t.device]).await?;
        let st = tx
            .prepare_cached(
                "INSERT INTO push_tokens (username, device, platform, token, updated_ms) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (username, device) DO UPDATE \
                 SET platform = EXCLUDED.platform, token = EXCLUDED.token, updated_ms = EXCLUDED.updated_ms",
            )
            .await?;
        tx.execute(&st, &[&t.user, &t.device, &t.platform, &t.token, &int(t.updated_ms)]).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn remove_push_token(&self, user: &str, device: &str) -> Result<bool> {
        let c = self.client().await?;
        let st = c.prepare_cached("DELETE FROM push_tokens WHERE username = $1 AND device = $2").await?;
        Ok(c.execute(&st, &[&user, &device]).await? == 1)
    }

    async fn push_tokens(&self, user: &str) -> Result<Vec<crate::PushToken>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                "SELECT device, platform, token, updated_ms FROM push_tokens WHERE username = $1 ORDER BY device",
            )
            .await?;
        c.query(&st, &[&user])
            .await?
            .iter()
            .map(|r| {
                Ok(crate::PushToken {
                    user: user.to_owned(),
                    device: r.try_get(0)?,
                    platform: r.try_get(1)?,
                    token: r.try_get(2)?,
                    updated_ms: uint(r.try_get(3)?),
                })
            })
            .collect()
    }

    async fn set_mute(&self, user: &str, conv: &str, until_ms: Option<u64>) -> Result<()> {
        let c = self.client().await?;
        match until_ms {
            Some(until) => {
                let st = c
                    .prepare_cached(
                        "INSERT INTO mutes (username, conv, until_ms) VALUES ($1, $2, $3) \
                         ON CONFLICT (username, conv) DO UPDATE SET until_ms = EXCLUDED.until_ms",
                    )
                    .await?;
                c.execute(&st, &[&user, &conv, &int(until)]).await?;
            }
            None => {
                let st = c.prepare_cached("DELETE FROM mutes WHERE username = $1 AND conv = $2").await?;
                c.execute(&st, &[&user, &conv]).await?;
            }
        }
        Ok(())
    }

    async fn mutes(&self, user: &str) -> Result<HashMap<String, u64>> {
        let c = self.client().await?;
        let st = c.prepare_cached("SELECT conv, until_ms FROM mutes WHERE username = $1").await?;
        // `u64::MAX` (for good) is stored as the largest BIGINT
        let forever = |(conv, until): (String, u64)| (conv, if until >= i64::MAX as u64 { u64::MAX } else { until });
        c.query(&st, &[&user]).await?.iter().map(|r| text_and_uint(r).map(forever)).collect()
    }
}

#[async_trait]
impl SocialStore for PgStore {
    async fn friend_state(&self, user: &str, other: &str) -> Result<Option<FriendState>> {
        let c = self.client().await?;
        let st = c.prepare_cached("SELECT state, note FROM friends WHERE username = $1 AND other = $2").await?;
        c.query_opt(&st, &[&user, &other]).await?.map(|r| state_from_row(&r)).transpose()
    }

    async fn request_friend(&self, from: &str, to: &str, note: &str) -> Result<RequestOutcome> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        Self::lock_pair(&tx, from, to).await?;
        let st = tx
            .prepare_cached(
                "SELECT 1 FROM blocks WHERE (username = $1 AND other = $2) OR (username = $2 AND other = $1)",
            )
            .await?;
        if !tx.query(&st, &[&from, &to]).await?.is_empty() {
            tx.rollback().await?;
            return Ok(RequestOutcome::Blocked);
        }
        let outcome = match Self::relation(&tx, from, to).await? {
            Some(FriendState::Friends) => {
                tx.rollback().await?;
                return Ok(RequestOutcome::AlreadyFriends);
            }
            Some(FriendState::Incoming { .. }) => {
                Self::put_relation(&tx, from, to, &FriendState::Friends).await?;
                Self::put_relation(&tx, to, from, &FriendState::Friends).await?;
                RequestOutcome::BecameFriends
            }
            Some(FriendState::Outgoing { .. }) | None => {
                Self::put_relation(&tx, from, to, &FriendState::Outgoing { note: note.to_owned() }).await?;
                Self::put_relation(&tx, to, from, &FriendState::Incoming { note: note.to_owned() }).await?;
                RequestOutcome::Pending
            }
        };
        tx.commit().await?;
        Ok(outcome)
    }

    async fn accept_friend(&self, user: &str, from: &str) -> Result<bool> {
        self.answer_request(user, from, true).await
    }

    async fn reject_friend(&self, user: &str, from: &str) -> Result<bool> {
        self.answer_request(user, from, false).await
    }

    async fn delete_friend(&self, user: &str, other: &str) -> Result<bool> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        Self::lock_pair(&tx, user, other).await?;
        let existed = Self::remove_pair(&tx, user, other).await?;
        tx.commit().await?;
        Ok(existed)
    }

    async fn relations(&self, user: &str) -> Result<Vec<(String, FriendState)>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(r#"SELECT other, state, note FROM friends WHERE username = $1 ORDER BY other COLLATE "C""#)
            .await?;
        c.query(&st, &[&user]).await?.iter().map(|r| Ok((r.try_get("other")?, state_from_row(r)?))).collect()
    }

    async fn set_block(&self, user: &str, other: &str, block: bool) -> Result<bool> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        Self::lock_pair(&tx, user, other).await?;
        let sql = if block {
            "INSERT INTO blocks (username, other) VALUES ($1, $2) ON CONFLICT DO NOTHING"
        } else {
            "DELETE FROM blocks WHERE username = $1 AND other = $2"
        };
        let st = tx.prepare_cached(sql).await?;
        let changed = tx.execute(&st, &[&user, &other]).await? == 1;
        if changed && block {
            Self::remove_pair(&tx, user, other).await?;
        }
        tx.commit().await?;
        Ok(changed)
    }

    async fn blocks(&self, user: &str, other: &str) -> Result<bool> {
        let c = self.client().await?;
        let st = c.prepare_cached("SELECT 1 FROM blocks WHERE username = $1 AND other = $2").await?;
        Ok(c.query_opt(&st, &[&user, &other]).await?.is_some())
    }

    async fn blocked(&self, user: &str) -> Result<Vec<String>> {
        let c = self.client().await?;
        let st = c.prepare_cached(r#"SELECT other FROM blocks WHERE username = $1 ORDER BY other COLLATE "C""#).await?;
        c.query(&st, &[&user]).await?.iter().map(|r| Ok(r.try_get("other")?)).collect()
    }
}

#[async_trait]
impl MessageStore for PgStore {
    async fn append(&self, msg: NewMessage, members: &[String]) -> Result<Appended> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        // Lock the conversation's counter row first (creating it if new):
        // appends to one conversation serialise here, and every statement
        // after it sees what earlier appends committed.
        let st = tx
            .prepare_cached(
                "INSERT INTO conv_seq (conv, last_seq) VALUES ($1, 0) \
                 ON CONFLICT (conv) DO UPDATE SET last_seq = conv_seq.last_seq RETURNING last_seq",
            )
            .await?;
        let last: i64 = tx.query_one(&st, &[&msg.conv]).await?.try_get(0)?;
        // The earlier message with this cmid, and the last message (for ts).
        let st = tx
            .prepare_cached(&format!(
                "SELECT {MESSAGE_COLS} FROM messages \
                 WHERE conv = $1 AND ((from_user = $2 AND cmid = $3) OR seq = $4)"
            ))
            .await?;
        let rows = tx.query(&st, &[&msg.conv, &msg.from, &msg.cmid, &last]).await?;
        let mut last_ts = 0;
        for r in &rows {
            let m = message_from_row(r)?;
            if m.from == msg.from && m.cmid == msg.cmid {
                tx.rollback().await?;
                return Ok(Appended { msg: m, duplicate: true, json: None });
            }
            last_ts = m.ts;
        }
        // ts never goes backwards inside a conversation, so seq order and
        // time order agree even if the wall clock steps back.
        let ts = now_ms().max(last_ts);
        let stored = msg.stored_as(uint(last) + 1, ts);
        let body = serde_json::to_string(&stored.body)?;
        let refs = stored.refs_json()?;
        let (stext, stext_seq, terms) = search_cols(&stored);
        let st = tx
            .prepare_cached(&format!(
                "INSERT INTO messages ({INSERT_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
            ))
            .await?;
        tx.execute(
            &st,
            &[
                &stored.conv,
                &int(stored.seq),
                &stored.mid,
                &stored.from,
                &stored.cmid,
                &stored.kind,
                &body,
                &int(stored.ts),
                &refs,
                &stext,
                &stext_seq,
                &terms,
            ],
        )
        .await?;
        Self::index_in(&tx, std::slice::from_ref(&stored)).await?;
        let st = tx.prepare_cached("UPDATE conv_seq SET last_seq = $2 WHERE conv = $1").await?;
        tx.execute(&st, &[&stored.conv, &int(stored.seq)]).await?;
        if !members.is_empty() {
            let st = tx
                .prepare_cached(
                    "INSERT INTO user_convs (username, conv) \
                     SELECT DISTINCT u, $2::text FROM unnest($1::text[]) AS m(u) ORDER BY 1 \
                     ON CONFLICT DO NOTHING",
                )
                .await?;
            tx.execute(&st, &[&members, &stored.conv]).await?;
        }
        tx.commit().await?;
        Ok(Appended { msg: stored, duplicate: false, json: None })
    }

    async fn range(&self, conv: &str, after_seq: u64, limit: usize) -> Result<Vec<Message>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(&format!(
                "SELECT {MESSAGE_COLS} FROM messages WHERE conv = $1 AND seq > $2 ORDER BY seq LIMIT $3"
            ))
            .await?;
        let limit = int(limit as u64);
        c.query(&st, &[&conv, &int(after_seq), &limit]).await?.iter().map(message_from_row).collect()
    }

    async fn history(&self, conv: &str, before_seq: Option<u64>, limit: usize) -> Result<Vec<Message>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(&format!(
                "SELECT {MESSAGE_COLS} FROM messages WHERE conv = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3"
            ))
            .await?;
        let before = int(before_seq.unwrap_or(u64::MAX));
        let limit = int(limit as u64);
        c.query(&st, &[&conv, &before, &limit]).await?.iter().map(message_from_row).collect()
    }

    async fn find_cmid(&self, conv: &str, from: &str, cmid: &str) -> Result<Option<Message>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(&format!(
                "SELECT {MESSAGE_COLS} FROM messages WHERE conv = $1 AND from_user = $2 AND cmid = $3"
            ))
            .await?;
        c.query_opt(&st, &[&conv, &from, &cmid]).await?.as_ref().map(message_from_row).transpose()
    }

    async fn last_seq(&self, conv: &str) -> Result<u64> {
        let c = self.client().await?;
        let st = c.prepare_cached("SELECT last_seq FROM conv_seq WHERE conv = $1").await?;
        uint_or_zero(c.query_opt(&st, &[&conv]).await?)
    }

    async fn last_messages(&self, convs: &[String]) -> Result<Vec<Option<Message>>> {
        if convs.is_empty() {
            return Ok(Vec::new());
        }
        let c = self.client().await?;
        // One index probe per conversation (a LATERAL top-1), not a scan of their messages.
        let st = c
            .prepare_cached(&format!(
                "SELECT m.* FROM unnest($1::text[]) AS c(conv) CROSS JOIN LATERAL \
                 (SELECT {MESSAGE_COLS} FROM messages WHERE conv = c.conv ORDER BY seq DESC LIMIT 1) m"
            ))
            .await?;
        let mut found = HashMap::with_capacity(convs.len());
        for r in c.query(&st, &[&convs]).await? {
            let m = message_from_row(&r)?;
            found.insert(m.conv.clone(), m);
        }
        Ok(convs.iter().map(|conv| found.get(conv).cloned()).collect())
    }

    async fn last_seqs(&self, convs: &[String]) -> Result<Vec<u64>> {
        if convs.is_empty() {
            return Ok(Vec::new());
        }
        let c = self.client().await?;
        let st = c.prepare_cached("SELECT conv, last_seq FROM conv_seq WHERE conv = ANY($1)").await?;
        let found: HashMap<String, u64> =
            c.query(&st, &[&convs]).await?.iter().map(text_and_uint).collect::<Result<_>>()?;
        Ok(convs.iter().map(|conv| found.get(conv).copied().unwrap_or(0)).collect())
    }

    async fn user_convs(&self, user: &str) -> Result<Vec<(String, u64)>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                r#"SELECT u.conv, COALESCE(s.last_seq, 0) FROM user_convs u
                   LEFT JOIN conv_seq s ON s.conv = u.conv
                   WHERE u.username = $1 ORDER BY u.conv COLLATE "C""#,
            )
            .await?;
        c.query(&st, &[&user]).await?.iter().map(text_and_uint).collect()
    }

    async fn set_ack(&self, user: &str, device: &str, conv: &str, seq: u64) -> Result<()> {
        if seq == 0 {
            // As in the embedded store: an ack of 0 records nothing.
            return Ok(());
        }
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                "INSERT INTO acks (username, device, conv, seq) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (username, device, conv) DO UPDATE SET seq = GREATEST(acks.seq, EXCLUDED.seq)",
            )
            .await?;
        c.execute(&st, &[&user, &device, &conv, &int(seq)]).await?;
        Ok(())
    }

    async fn acks(&self, user: &str, device: &str) -> Result<HashMap<String, u64>> {
        let c = self.client().await?;
        let st = c.prepare_cached("SELECT conv, seq FROM acks WHERE username = $1 AND device = $2").await?;
        c.query(&st, &[&user, &device]).await?.iter().map(text_and_uint).collect()
    }

    async fn user_acked(&self, user: &str, conv: &str) -> Result<u64> {
        let c = self.client().await?;
        let st = c.prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM acks WHERE username = $1 AND conv = $2").await?;
        Ok(uint(c.query_one(&st, &[&user, &conv]).await?.get(0)))
    }

    async fn set_read(&self, user: &str, conv: &str, seq: u64) -> Result<u64> {
        let c = self.client().await?;
        if seq == 0 {
            // As with acks: a read of 0 records nothing.
            let st = c.prepare_cached("SELECT seq FROM reads WHERE username = $1 AND conv = $2").await?;
            return uint_or_zero(c.query_opt(&st, &[&user, &conv]).await?);
        }
        let st = c
            .prepare_cached(
                "INSERT INTO reads (username, conv, seq) VALUES ($1, $2, $3) \
                 ON CONFLICT (username, conv) DO UPDATE SET seq = GREATEST(reads.seq, EXCLUDED.seq) RETURNING seq",
            )
            .await?;
        Ok(uint(c.query_one(&st, &[&user, &conv, &int(seq)]).await?.try_get(0)?))
    }

    async fn set_acks(&self, cursors: &[crate::AckCursor]) -> Result<()> {
        // One statement for the batch; keys are unique within a batch (the caller coalesced them).
        let mut cursors: Vec<&crate::AckCursor> = cursors.iter().filter(|c| c.seq > 0).collect();
        if cursors.is_empty() {
            return Ok(());
        }
        // Rows locked in key order: two logic instances flushing overlapping cursors at once
        // then wait for each other instead of deadlocking.
        cursors.sort_unstable_by(|a, b| (&a.user, &a.device, &a.conv).cmp(&(&b.user, &b.device, &b.conv)));
        let users: Vec<&str> = cursors.iter().map(|c| c.user.as_str()).collect();
        let devices: Vec<&str> = cursors.iter().map(|c| c.device.as_str()).collect();
        let convs: Vec<&str> = cursors.iter().map(|c| c.conv.as_str()).collect();
        let seqs: Vec<i64> = cursors.iter().map(|c| int(c.seq)).collect();
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                "INSERT INTO acks (username, device, conv, seq) \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[]) \
                 ON CONFLICT (username, device, conv) DO UPDATE SET seq = GREATEST(acks.seq, EXCLUDED.seq)",
            )
            .await?;
        c.execute(&st, &[&users, &devices, &convs, &seqs]).await?;
        Ok(())
    }

    async fn set_reads(&self, cursors: &[crate::ReadCursor]) -> Result<()> {
        let mut cursors: Vec<&crate::ReadCursor> = cursors.iter().filter(|c| c.seq > 0).collect();
        if cursors.is_empty() {
            return Ok(());
        }
        // In key order, as `set_acks`.
        cursors.sort_unstable_by(|a, b| (&a.user, &a.conv).cmp(&(&b.user, &b.conv)));
        let users: Vec<&str> = cursors.iter().map(|c| c.user.as_str()).collect();
        let convs: Vec<&str> = cursors.iter().map(|c| c.conv.as_str()).collect();
        let seqs: Vec<i64> = cursors.iter().map(|c| int(c.seq)).collect();
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                "INSERT INTO reads (username, conv, seq) \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[]) \
                 ON CONFLICT (username, conv) DO UPDATE SET seq = GREATEST(reads.seq, EXCLUDED.seq)",
            )
            .await?;
        c.execute(&st, &[&users, &convs, &seqs]).await?;
        Ok(())
    }

    async fn reads(&self, user: &str) -> Result<HashMap<String, u64>> {
        let c = self.client().await?;
        let st = c.prepare_cached("SELECT conv, seq FROM reads WHERE username = $1").await?;
        c.query(&st, &[&user]).await?.iter().map(text_and_uint).collect()
    }

    async fn find_mid(&self, conv: &str, mid: &str) -> Result<Option<Message>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(&format!("SELECT {MESSAGE_COLS} FROM messages WHERE conv = $1 AND mid = $2 LIMIT 1"))
            .await?;
        c.query_opt(&st, &[&conv, &mid]).await?.as_ref().map(message_from_row).transpose()
    }

    async fn recall(&self, conv: &str, seq: u64) -> Result<Option<Message>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(&format!(
                "UPDATE messages SET type = 'recalled', body = '\"\"', refs = NULL, stext = NULL, terms = NULL \
                 WHERE conv = $1 AND seq = $2 \
                 RETURNING {MESSAGE_COLS}"
            ))
            .await?;
        c.query_opt(&st, &[&conv, &int(seq)]).await?.as_ref().map(message_from_row).transpose()
    }

    async fn mentions(&self, user: &str) -> Result<HashMap<String, u64>> {
        let c = self.client().await?;
        let st = c.prepare_cached("SELECT conv, seq FROM mentions WHERE username = $1").await?;
        c.query(&st, &[&user]).await?.iter().map(text_and_uint).collect()
    }

    async fn search(&self, q: &crate::search::SearchQuery) -> Result<Vec<crate::search::Found>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(&format!(
                "SELECT {MESSAGE_COLS}, stext FROM messages \
                 WHERE conv = ANY($1) AND terms @> $2 AND ($3::text IS NULL OR from_user = $3) AND ts < $4 \
                 ORDER BY ts DESC, seq DESC LIMIT $5"
            ))
            .await?;
        let before = int(q.before_ts.unwrap_or(u64::MAX));
        let rows = c.query(&st, &[&q.convs, &q.terms, &q.from, &before, &int(q.limit as u64)]).await?;
        rows.iter().map(|r| Ok(crate::search::Found { msg: message_from_row(r)?, text: r.try_get("stext")? })).collect()
    }
}

/// The columns of a set of records, as arrays for `unnest`.
#[derive(Default)]
struct Columns<'a> {
    convs: Vec<&'a str>,
    seqs: Vec<i64>,
    mids: Vec<&'a str>,
    froms: Vec<&'a str>,
    cmids: Vec<&'a str>,
    kinds: Vec<&'a str>,
    bodies: Vec<String>,
    tss: Vec<i64>,
    refs: Vec<Option<String>>,
    stexts: Vec<Option<String>>,
    stext_seqs: Vec<i64>,
    /// Each row's terms as an array literal (`unnest` flattens arrays of arrays).
    terms: Vec<Option<String>>,
}

impl<'a> Columns<'a> {
    fn push(&mut self, m: &'a Message) -> Result<()> {
        self.convs.push(m.conv.as_str());
        self.seqs.push(int(m.seq));
        self.mids.push(m.mid.as_str());
        self.froms.push(m.from.as_str());
        self.cmids.push(m.cmid.as_str());
        self.kinds.push(m.kind.as_str());
        self.bodies.push(serde_json::to_string(&m.body)?);
        self.tss.push(int(m.ts));
        self.refs.push(m.refs_json()?);
        let (stext, stext_seq, terms) = search_cols(m);
        self.stexts.push(stext);
        self.stext_seqs.push(stext_seq);
        self.terms.push(terms.as_deref().map(array_literal));
        Ok(())
    }

    /// Inserts the rows whose (conv, seq) and (conv, from, cmid) are free;
    /// how many were inserted.
    async fn insert_missing(&self, tx: &deadpool_postgres::Transaction<'_>) -> Result<u64> {
        if self.convs.is_empty() {
            return Ok(0);
        }
        // No conflict target: a record whose (conv, seq) is stored, or whose
        // (conv, from, cmid) is already taken, is skipped, not an error.
        let st = tx
            .prepare_cached(&format!(
                r#"INSERT INTO messages ({INSERT_COLS})
                   SELECT conv, seq, mid, from_user, cmid, type, body, ts, refs, stext, stext_seq, terms::int8[]
                   FROM unnest($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::text[],
                               $7::text[], $8::int8[], $9::text[], $10::text[], $11::int8[], $12::text[])
                        AS r({INSERT_COLS})
                   ORDER BY conv COLLATE "C", seq
                   ON CONFLICT DO NOTHING"#
            ))
            .await?;
        let (c, sq, md, fr, cm, k, b, ts) =
            (&self.convs, &self.seqs, &self.mids, &self.froms, &self.cmids, &self.kinds, &self.bodies, &self.tss);
        let (rf, sx, ss, tm) = (&self.refs, &self.stexts, &self.stext_seqs, &self.terms);
        Ok(tx.execute(&st, &[c, sq, md, fr, cm, k, b, ts, rf, sx, ss, tm]).await?)
    }
}

#[async_trait]
impl DurableLog for PgStore {
    async fn upsert_records_at(&self, records: &[SequencedRecord], offsets: &[PartitionOffset]) -> Result<u64> {
        if records.is_empty() && offsets.is_empty() {
            return Ok(0);
        }
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let inserted = Self::upsert_in(&tx, records).await?;
        if !offsets.is_empty() {
            let topics: Vec<&str> = offsets.iter().map(|o| o.topic.as_str()).collect();
            let parts: Vec<i32> = offsets.iter().map(|o| o.partition).collect();
            let nexts: Vec<i64> = offsets.iter().map(|o| o.next_offset).collect();
            // The last offset given for a partition wins (DISTINCT ON keeps
            // the first row of each key in the inner order).
            let st = tx
                .prepare_cached(
                    r#"INSERT INTO persist_offsets (topic, part, next_offset)
                       SELECT DISTINCT ON (topic, part) topic, part, next_offset
                       FROM unnest($1::text[], $2::int4[], $3::int8[]) WITH ORDINALITY AS o(topic, part, next_offset, i)
                       ORDER BY topic, part, i DESC
                       ON CONFLICT (topic, part) DO UPDATE SET next_offset = EXCLUDED.next_offset"#,
                )
                .await?;
            tx.execute(&st, &[&topics, &parts, &nexts]).await?;
        }
        tx.commit().await?;
        Ok(inserted)
    }

    async fn partition_offsets(&self, topic: &str) -> Result<HashMap<i32, i64>> {
        let c = self.client().await?;
        let st = c.prepare_cached("SELECT part, next_offset FROM persist_offsets WHERE topic = $1").await?;
        c.query(&st, &[&topic]).await?.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect()
    }
}

/// A lock session of the persist worker: one connection of its own,
/// holding session advisory locks until it closes.
struct PgLockSession {
    client: tokio_postgres::Client,
}

#[async_trait]
impl PartitionLocks for PgStore {
    async fn lock_session(&self) -> Result<Box<dyn LockSession>> {
        let mut config = self.config.clone();
        config.application_name("switchboard-persist-locks").keepalives(true).keepalives_idle(LOCK_KEEPALIVE_IDLE);
        let client = self.tls.connect(&config).await?;
        // The server side probes too, so a vanished worker's locks go.
        let idle = LOCK_KEEPALIVE_IDLE.as_secs();
        client
            .batch_execute(&format!(
                "SET tcp_keepalives_idle = {idle}; SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3"
            ))
            .await?;
        Ok(Box::new(PgLockSession { client }))
    }
}

#[async_trait]
impl LockSession for PgLockSession {
    async fn try_lock(&mut self, topic: &str, partition: i32) -> Result<bool> {
        // Taking a lock this session already holds succeeds again (and
        // stacks, which is harmless: the session never unlocks by hand).
        let key = partition_lock_key(topic, partition);
        Ok(self.client.query_one("SELECT pg_try_advisory_lock($1)", &[&key]).await?.try_get(0)?)
    }

    fn is_closed(&self) -> bool {
        self.client.is_closed()
    }
}

impl PgStore {
    /// The record upserts of [`DurableLog::upsert_records`] inside `tx`.
    async fn upsert_in(tx: &deadpool_postgres::Transaction<'_>, records: &[SequencedRecord]) -> Result<u64> {
        if records.is_empty() {
            return Ok(0);
        }
        let mut counters: (Vec<&str>, Vec<i64>) = (Vec::with_capacity(records.len()), Vec::new());
        let mut plain = Columns::default();
        // One recall per (conv, seq): an UPDATE may touch a row only once.
        let mut recalls: std::collections::BTreeMap<(&str, u64), &Message> = std::collections::BTreeMap::new();
        let (mut member_users, mut member_convs) = (Vec::new(), Vec::new());
        // Only the first record of a (conv, seq) in the batch, as in the
        // partition: a later one (a void published after the message, or
        // the message after its void) is skipped like one of a later batch.
        // One INSERT does not keep the batch's order among equal keys.
        let mut seen = std::collections::HashSet::new();
        for r in records {
            let m = &r.msg;
            counters.0.push(m.conv.as_str());
            counters.1.push(int(m.seq));
            if r.recall {
                recalls.insert((m.conv.as_str(), m.seq), m);
            } else if seen.insert((m.conv.as_str(), m.seq)) {
                plain.push(m)?;
            }
            for u in &r.members {
                member_users.push(u.as_str());
                member_convs.push(m.conv.as_str());
            }
        }
        let mut recalled = Columns::default();
        for m in recalls.values() {
            recalled.push(m)?;
        }
        // Same lock order as `append` (counter rows first, in conv order;
        // then messages; then the member index), so that batches and appends
        // never deadlock each other.
        let st = tx
            .prepare_cached(
                r#"INSERT INTO conv_seq (conv, last_seq)
                   SELECT conv, max(seq) FROM unnest($1::text[], $2::int8[]) AS r(conv, seq)
                   GROUP BY conv ORDER BY conv COLLATE "C"
                   ON CONFLICT (conv) DO UPDATE SET last_seq = GREATEST(conv_seq.last_seq, EXCLUDED.last_seq)"#,
            )
            .await?;
        tx.execute(&st, &[&counters.0, &counters.1]).await?;
        let mut inserted = plain.insert_missing(tx).await?;
        if !recalled.convs.is_empty() {
            // Recalls after the originals of the batch: a stored message
            // (however it got there) takes the recalled type and body; a
            // missing one is stored in its recalled form, so that its
            // original, arriving later, is skipped.
            let st = tx
                .prepare_cached(
                    r#"UPDATE messages m SET type = r.type, body = r.body, refs = NULL, stext = NULL, terms = NULL
                       FROM (SELECT * FROM unnest($1::text[], $2::int8[], $3::text[], $4::text[])
                             AS u(conv, seq, type, body) ORDER BY conv COLLATE "C", seq) r
                       WHERE m.conv = r.conv AND m.seq = r.seq"#,
                )
                .await?;
            tx.execute(&st, &[&recalled.convs, &recalled.seqs, &recalled.kinds, &recalled.bodies]).await?;
            inserted += recalled.insert_missing(tx).await?;
        }
        if !member_users.is_empty() {
            let st = tx
                .prepare_cached(
                    r#"INSERT INTO user_convs (username, conv)
                       SELECT DISTINCT u, c FROM unnest($1::text[], $2::text[]) AS m(u, c)
                       ORDER BY 1, 2
                       ON CONFLICT DO NOTHING"#,
                )
                .await?;
            tx.execute(&st, &[&member_users, &member_convs]).await?;
        }
        let plain: Vec<&Message> = records.iter().filter(|r| !r.recall).map(|r| &r.msg).collect();
        Self::index_in(tx, plain).await?;
        Ok(inserted)
    }

    /// The derived indexes of newly stored messages (idempotent): each mention raises the
    /// mentioned user's mark, each edit gives its target the edited text and terms, unless a
    /// later edit did (an edit counts only if stored: a void may have taken its seq).
    async fn index_in<'m>(
        tx: &deadpool_postgres::Transaction<'_>,
        msgs: impl IntoIterator<Item = &'m Message>,
    ) -> Result<()> {
        // (user, conv) -> (seq, mid) of the latest mention
        let mut marks: std::collections::BTreeMap<(&str, &str), (i64, &str)> = std::collections::BTreeMap::new();
        let mut edits: std::collections::BTreeMap<(&str, String), (i64, String)> = std::collections::BTreeMap::new();
        for m in msgs {
            for u in &m.mentions {
                let v = marks.entry((u.as_str(), m.conv.as_str())).or_insert((0, ""));
                if int(m.seq) > v.0 {
                    *v = (int(m.seq), m.mid.as_str());
                }
            }
            if let crate::search::IndexChange::Edit { mid, text } = crate::search::change_of(m) {
                let e = edits.entry((m.conv.as_str(), mid)).or_insert((0, String::new()));
                if int(m.seq) > e.0 {
                    *e = (int(m.seq), text);
                }
            }
        }
        if !marks.is_empty() {
            let (mut users, mut convs, mut seqs, mut mids) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for ((u, c), (seq, mid)) in &marks {
                users.push(*u);
                convs.push(*c);
                seqs.push(*seq);
                mids.push(*mid);
            }
            let st = tx
                .prepare_cached(
                    r#"INSERT INTO mentions (username, conv, seq)
                       SELECT u.username, u.conv, u.seq
                       FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[]) AS u(username, conv, seq, mid)
                       -- only a message that is stored (a void or an earlier record may hold its seq)
                       JOIN messages m ON m.conv = u.conv AND m.seq = u.seq AND m.mid = u.mid
                       ORDER BY 1, 2
                       ON CONFLICT (username, conv) DO UPDATE SET seq = GREATEST(mentions.seq, EXCLUDED.seq)"#,
                )
                .await?;
            tx.execute(&st, &[&users, &convs, &seqs, &mids]).await?;
        }
        if !edits.is_empty() {
            let (mut convs, mut mids, mut seqs, mut texts, mut terms) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for ((conv, mid), (seq, text)) in &edits {
                convs.push(*conv);
                mids.push(mid.as_str());
                seqs.push(*seq);
                texts.push(text.as_str());
                terms.push(array_literal(&crate::search::doc_terms(text)));
            }
            let st = tx
                .prepare_cached(
                    r#"UPDATE messages m SET stext = e.text, stext_seq = e.seq, terms = e.terms::int8[]
                       FROM (SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[], $5::text[])
                             AS u(conv, mid, seq, text, terms) ORDER BY conv COLLATE "C", mid) e
                       WHERE m.conv = e.conv AND m.mid = e.mid AND m.stext IS NOT NULL AND m.stext_seq < e.seq
                         AND EXISTS (SELECT 1 FROM messages x WHERE x.conv = e.conv AND x.seq = e.seq AND x.type = 'edit')"#,
                )
                .await?;
            tx.execute(&st, &[&convs, &mids, &seqs, &texts, &terms]).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl GroupStore for PgStore {
    async fn create_group(&self, group: &Group, members: &[String]) -> Result<bool> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let st = tx
            .prepare_cached(
                "INSERT INTO groups (id, name, owner, created_ms, invite_only) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (id) DO NOTHING",
            )
            .await?;
        let row: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
            [&group.id, &group.name, &group.owner, &int(group.created_ms), &group.invite_only];
        if tx.execute(&st, &row).await? != 1 {
            tx.rollback().await?;
            return Ok(false);
        }
        let st = tx
            .prepare_cached(
                r#"INSERT INTO group_members (group_id, username, role)
                   SELECT $1, $2, 'owner'
                   UNION ALL
                   SELECT DISTINCT $1, u, 'member' FROM unnest($3::text[]) AS m(u) WHERE u <> $2
                   ON CONFLICT DO NOTHING"#,
            )
            .await?;
        tx.execute(&st, &[&group.id, &group.owner, &members]).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn group(&self, id: &str) -> Result<Option<Group>> {
        let c = self.client().await?;
        let st = c.prepare_cached("SELECT id, name, owner, created_ms, invite_only FROM groups WHERE id = $1").await?;
        c.query_opt(&st, &[&id]).await?.as_ref().map(group_from_row).transpose()
    }

    async fn add_member(&self, id: &str, user: &str, role: Role) -> Result<bool> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                "INSERT INTO group_members (group_id, username, role) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            )
            .await?;
        Ok(c.execute(&st, &[&id, &user, &role.as_str()]).await? == 1)
    }

    async fn remove_member(&self, id: &str, user: &str) -> Result<bool> {
        let c = self.client().await?;
        let st = c.prepare_cached("DELETE FROM group_members WHERE group_id = $1 AND username = $2").await?;
        Ok(c.execute(&st, &[&id, &user]).await? == 1)
    }

    async fn set_role(&self, id: &str, user: &str, role: Role) -> Result<bool> {
        let c = self.client().await?;
        let st = c.prepare_cached("UPDATE group_members SET role = $3 WHERE group_id = $1 AND username = $2").await?;
        Ok(c.execute(&st, &[&id, &user, &role.as_str()]).await? == 1)
    }

    async fn role(&self, id: &str, user: &str) -> Result<Option<Role>> {
        let c = self.client().await?;
        let st = c.prepare_cached("SELECT role FROM group_members WHERE group_id = $1 AND username = $2").await?;
        c.query_opt(&st, &[&id, &user]).await?.as_ref().map(role_from_row).transpose()
    }

    async fn members(&self, id: &str) -> Result<Vec<(String, Role)>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                r#"SELECT username, role FROM group_members WHERE group_id = $1 ORDER BY username COLLATE "C""#,
            )
            .await?;
        c.query(&st, &[&id]).await?.iter().map(|r| Ok((r.try_get("username")?, role_from_row(r)?))).collect()
    }

    async fn user_groups(&self, user: &str) -> Result<Vec<(Group, Role)>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                r#"SELECT g.id, g.name, g.owner, g.created_ms, g.invite_only, m.role FROM group_members m
                   JOIN groups g ON g.id = m.group_id
                   WHERE m.username = $1 ORDER BY g.id COLLATE "C""#,
            )
            .await?;
        c.query(&st, &[&user]).await?.iter().map(|r| Ok((group_from_row(r)?, role_from_row(r)?))).collect()
    }

    async fn user_group_ids(&self, user: &str) -> Result<Vec<String>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(r#"SELECT group_id FROM group_members WHERE username = $1 ORDER BY group_id COLLATE "C""#)
            .await?;
        c.query(&st, &[&user]).await?.iter().map(|r| Ok(r.try_get(0)?)).collect()
    }

    async fn set_invite_only(&self, id: &str, invite_only: bool) -> Result<bool> {
        let c = self.client().await?;
        let st = c.prepare_cached("UPDATE groups SET invite_only = $2 WHERE id = $1").await?;
        Ok(c.execute(&st, &[&id, &invite_only]).await? == 1)
    }
}

/// Bytes per row of `file_chunks`.
const FILE_CHUNK: usize = 256 * 1024;

#[async_trait]
impl FileStore for PgStore {
    async fn put_file(&self, meta: &FileMeta, bytes: bytes::Bytes) -> Result<()> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        let st = tx
            .prepare_cached("INSERT INTO files (id, owner, name, mime, size, ts) VALUES ($1, $2, $3, $4, $5, $6)")
            .await?;
        tx.execute(&st, &[&meta.id, &meta.owner, &meta.name, &meta.mime, &int(meta.size), &int(meta.ts)]).await?;
        let st = tx.prepare_cached("INSERT INTO file_chunks (id, n, data) VALUES ($1, $2, $3)").await?;
        for (n, chunk) in bytes.chunks(FILE_CHUNK).enumerate() {
            tx.execute(&st, &[&meta.id, &(n as i32), &chunk]).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn file_meta(&self, id: &str) -> Result<Option<FileMeta>> {
        let c = self.client().await?;
        let st = c.prepare_cached("SELECT owner, name, mime, size, ts FROM files WHERE id = $1").await?;
        Ok(c.query_opt(&st, &[&id]).await?.map(|r| FileMeta {
            id: id.to_owned(),
            owner: r.get(0),
            name: r.get(1),
            mime: r.get(2),
            size: uint(r.get(3)),
            ts: uint(r.get(4)),
        }))
    }

    async fn file_bytes(&self, id: &str) -> Result<Option<bytes::Bytes>> {
        let Some(meta) = self.file_meta(id).await? else { return Ok(None) };
        let c = self.client().await?;
        let st = c.prepare_cached("SELECT data FROM file_chunks WHERE id = $1 ORDER BY n").await?;
        let mut out = Vec::with_capacity(meta.size as usize);
        for row in c.query(&st, &[&id]).await? {
            out.extend_from_slice(row.get::<_, &[u8]>(0));
        }
        Ok(Some(out.into()))
    }

    async fn share_file(&self, id: &str, conv: &str) -> Result<()> {
        let c = self.client().await?;
        let st = c.prepare_cached("INSERT INTO file_convs (id, conv) VALUES ($1, $2) ON CONFLICT DO NOTHING").await?;
        c.execute(&st, &[&id, &conv]).await?;
        Ok(())
    }

    async fn file_convs(&self, id: &str) -> Result<Vec<String>> {
        let c = self.client().await?;
        let st = c.prepare_cached("SELECT conv FROM file_convs WHERE id = $1 ORDER BY conv").await?;
        Ok(c.query(&st, &[&id]).await?.iter().map(|r| r.get(0)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_key_ignores_order() {
        assert_eq!(pair_key("ann", "bob"), pair_key("bob", "ann"));
        assert_ne!(pair_key("ann", "bob"), pair_key("annb", "ob"));
    }

    #[test]
    fn partition_lock_keys_differ() {
        assert_eq!(partition_lock_key("sb.messages", 0), partition_lock_key("sb.messages", 0));
        assert_ne!(partition_lock_key("sb.messages", 0), partition_lock_key("sb.messages", 1));
        assert_ne!(partition_lock_key("a.messages", 0), partition_lock_key("b.messages", 0));
    }

    #[test]
    fn ints_clamp() {
        assert_eq!(int(u64::MAX), i64::MAX);
        assert_eq!(int(7), 7);
        assert_eq!(uint(-1), 0);
    }
}
