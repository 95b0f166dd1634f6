//! Redis adapters of the cluster deployment: the route table, the
//! per-conversation seq counters with the `cmid` index and the
//! recent-message cache (so a `send.ok`'d message is readable before the
//! persist worker stores it), conversation membership for `sync`, and the
//! registry of gateways and logic instances with their reported load.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;

use crate::{ConnRef, Member, Message, Registry, Result, RouteTable, StorageError};

impl From<redis::RedisError> for StorageError {
    fn from(e: redis::RedisError) -> Self {
        StorageError::Redis(e.to_string())
    }
}

/// How long a `cmid` is remembered in Redis (the durable store keeps it
/// for good; this only spares it the lookup).
const CMID_TTL_SECS: u64 = 7 * 24 * 3600;
/// Messages kept per conversation in the recent cache, and for how long.
const RECENT_KEEP: isize = 1000;
const RECENT_TTL_SECS: i64 = 24 * 3600;

/// Allocates the next seq of a conversation unless the cmid is known.
/// KEYS: cmid, seq counter, last ts. ARGV: now_ms, cmid ttl.
/// Returns {0, "seq:ts:p"} (new), {1, stored value} (known cmid) or {2, ""}
/// (no counter: reseed it from the durable store first).
const ALLOC_SCRIPT: &str = r#"
local v = redis.call('GET', KEYS[1])
if v then return {1, v} end
if redis.call('EXISTS', KEYS[2]) == 0 then return {2, ''} end
local seq = redis.call('INCR', KEYS[2])
local now = tonumber(ARGV[1])
local last = tonumber(redis.call('GET', KEYS[3]) or '0')
local ts = now
if last > now then ts = last end
redis.call('SET', KEYS[3], string.format('%d', ts))
local val = string.format('%d:%d:p', seq, ts)
redis.call('SET', KEYS[1], val, 'EX', ARGV[2])
return {0, val}
"#;

/// The answer of [`RedisStore::alloc`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alloc {
    /// A fresh seq and ts for a new message.
    New { seq: u64, ts: u64 },
    /// The cmid was seen before; `done` tells whether its message reached
    /// the queue (otherwise it must be produced again).
    Known { seq: u64, ts: u64, done: bool },
    /// The conversation's counter is missing (new conversation or a Redis
    /// restart): seed it from the durable store and try again.
    NoCounter,
}

fn parse_alloc(v: &str) -> Option<(u64, u64, bool)> {
    let mut it = v.split(':');
    let seq = it.next()?.parse().ok()?;
    let ts = it.next()?.parse().ok()?;
    let done = it.next()? == "d";
    Some((seq, ts, done))
}

/// Every Redis-backed store of the cluster over one multiplexed connection.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
}

impl RedisStore {
    /// Connects; every key gets `prefix` (lets deployments or test runs share a server).
    pub async fn connect(url: &str, prefix: &str) -> Result<Self> {
        let client = redis::Client::open(url)?;
        let conn = ConnectionManager::new(client).await?;
        Ok(Self { conn, prefix: prefix.to_owned() })
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut k = self.prefix.clone();
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                k.push(':');
            }
            k.push_str(p);
        }
        k
    }

    fn cmid_key(&self, conv: &str, from: &str, cmid: &str) -> String {
        // lengths make the key unambiguous whatever the parts contain
        self.key(&["cmid", conv, &format!("{}:{from}:{cmid}", from.len())])
    }

    /// Allocates a seq for (conv, from, cmid); see [`Alloc`].
    pub async fn alloc(&self, conv: &str, from: &str, cmid: &str, now_ms: u64) -> Result<Alloc> {
        let script = redis::Script::new(ALLOC_SCRIPT);
        let (code, val): (i64, String) = script
            .key(self.cmid_key(conv, from, cmid))
            .key(self.key(&["seq", conv]))
            .key(self.key(&["ts", conv]))
            .arg(now_ms)
            .arg(CMID_TTL_SECS)
            .invoke_async(&mut self.conn.clone())
            .await?;
        let bad = || StorageError::Corrupt(format!("seq allocation answered {code} {val:?}"));
        match code {
            0 => parse_alloc(&val).map(|(seq, ts, _)| Alloc::New { seq, ts }).ok_or_else(bad),
            1 => parse_alloc(&val).map(|(seq, ts, done)| Alloc::Known { seq, ts, done }).ok_or_else(bad),
            2 => Ok(Alloc::NoCounter),
            _ => Err(bad()),
        }
    }

    /// What Redis knows of a cmid: (seq, ts, done).
    pub async fn cmid(&self, conv: &str, from: &str, cmid: &str) -> Result<Option<(u64, u64, bool)>> {
        let v: Option<String> = self.conn.clone().get(self.cmid_key(conv, from, cmid)).await?;
        Ok(v.as_deref().and_then(parse_alloc))
    }

    /// Seeds a missing counter (another seeder may win; that is fine, both
    /// read the same durable state).
    pub async fn seed(&self, conv: &str, last_seq: u64, last_ts: u64) -> Result<()> {
        let mut c = self.conn.clone();
        let _: () = redis::pipe()
            .cmd("SET")
            .arg(self.key(&["seq", conv]))
            .arg(last_seq)
            .arg("NX")
            .ignore()
            .cmd("SET")
            .arg(self.key(&["ts", conv]))
            .arg(last_ts)
            .arg("NX")
            .ignore()
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    /// Records a cmid as known without allocating (it was found durable).
    pub async fn remember_cmid(&self, msg: &Message) -> Result<()> {
        let mut c = self.conn.clone();
        let v = format!("{}:{}:d", msg.seq, msg.ts);
        let _: () = c.set_ex(self.cmid_key(&msg.conv, &msg.from, &msg.cmid), v, CMID_TTL_SECS).await?;
        Ok(())
    }

    /// Marks a cmid's message as handed to the queue.
    pub async fn mark_done(&self, msg: &Message) -> Result<()> {
        self.remember_cmid(msg).await?;
        let _: () = self.conn.clone().del(self.key(&["pending", &msg.conv, &msg.seq.to_string()])).await?;
        Ok(())
    }

    /// The Redis server's run id: it changes whenever the server restarts (and with it, unless
    /// Redis persists, every route is gone).
    pub async fn server_run_id(&self) -> Result<String> {
        let info: String = redis::cmd("INFO").arg("server").query_async(&mut self.conn.clone()).await?;
        info.lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .map(|id| id.trim().to_owned())
            .ok_or_else(|| StorageError::Redis("INFO server has no run_id".into()))
    }

    /// The conversation's counter, if present.
    pub async fn counter(&self, conv: &str) -> Result<Option<u64>> {
        Ok(self.conn.clone().get(self.key(&["seq", conv])).await?)
    }

    /// Keeps a message whose seq is allocated but not yet acknowledged by
    /// the broker, so a retry with its cmid can publish the same message.
    pub async fn stash(&self, msg: &Message) -> Result<()> {
        let key = self.key(&["pending", &msg.conv, &msg.seq.to_string()]);
        let _: () = self.conn.clone().set_ex(key, serde_json::to_string(msg)?, CMID_TTL_SECS).await?;
        Ok(())
    }

    /// A stashed message, if any.
    pub async fn stashed(&self, conv: &str, seq: u64) -> Result<Option<Message>> {
        let raw: Option<String> = self.conn.clone().get(self.key(&["pending", conv, &seq.to_string()])).await?;
        raw.map(|s| serde_json::from_str(&s).map_err(StorageError::from)).transpose()
    }

    /// Caches a message and indexes the conversation for its members.
    pub async fn cache(&self, msg: &Message, members: &[String]) -> Result<()> {
        let key = self.key(&["recent", &msg.conv]);
        let json = serde_json::to_string(msg)?;
        let mut p = redis::pipe();
        p.cmd("ZADD").arg(&key).arg(msg.seq).arg(json).ignore();
        p.cmd("ZREMRANGEBYRANK").arg(&key).arg(0).arg(-RECENT_KEEP - 1).ignore();
        p.cmd("EXPIRE").arg(&key).arg(RECENT_TTL_SECS).ignore();
        for m in members {
            p.cmd("SADD").arg(self.key(&["convs", m])).arg(&msg.conv).ignore();
        }
        let _: () = p.query_async(&mut self.conn.clone()).await?;
        Ok(())
    }

    /// Replaces the cached message with `msg.seq` by `msg` (adding it if it
    /// was not cached), atomically.
    pub async fn replace_cached(&self, msg: &Message) -> Result<()> {
        let key = self.key(&["recent", &msg.conv]);
        let json = serde_json::to_string(msg)?;
        let mut p = redis::pipe();
        p.atomic();
        p.cmd("ZREMRANGEBYSCORE").arg(&key).arg(msg.seq).arg(msg.seq).ignore();
        p.cmd("ZADD").arg(&key).arg(msg.seq).arg(json).ignore();
        p.cmd("EXPIRE").arg(&key).arg(RECENT_TTL_SECS).ignore();
        let _: () = p.query_async(&mut self.conn.clone()).await?;
        Ok(())
    }

    /// Cached messages with seq in `lo..=hi`, oldest first.
    pub async fn cached_range(&self, conv: &str, lo: u64, hi: u64) -> Result<Vec<Message>> {
        let raw: Vec<String> = self.conn.clone().zrangebyscore(self.key(&["recent", conv]), lo, hi).await?;
        raw.iter().map(|s| serde_json::from_str(s).map_err(StorageError::from)).collect()
    }

    /// The conversations `user` belongs to, as indexed by recent sends.
    pub async fn convs_of(&self, user: &str) -> Result<Vec<String>> {
        Ok(self.conn.clone().smembers(self.key(&["convs", user])).await?)
    }

    /// Several counters at once (missing ones are `None`).
    pub async fn counters(&self, convs: &[String]) -> Result<Vec<Option<u64>>> {
        if convs.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = convs.iter().map(|c| self.key(&["seq", c])).collect();
        Ok(self.conn.clone().mget(keys).await?)
    }

    fn route_field(conn: &ConnRef) -> String {
        format!("{}|{}", conn.gateway, conn.conn_id)
    }

    async fn live_gateways(&self) -> Result<HashSet<String>> {
        Ok(self.members("gateway").await?.into_iter().map(|m| m.rpc).collect())
    }
}

#[async_trait]
impl Registry for RedisStore {
    /// Publishes a registry entry that lives `ttl_secs` unless refreshed.
    async fn register(&self, kind: &str, m: &Member, ttl_secs: u64) -> Result<()> {
        let json = serde_json::to_string(m)?;
        let mut p = redis::pipe();
        p.cmd("SET").arg(self.key(&[kind, &m.id])).arg(json).arg("EX").arg(ttl_secs).ignore();
        p.cmd("SADD").arg(self.key(&[kind])).arg(&m.id).ignore();
        let _: () = p.query_async(&mut self.conn.clone()).await?;
        Ok(())
    }

    /// Removes a registry entry (graceful shutdown).
    async fn deregister(&self, kind: &str, id: &str) -> Result<()> {
        let mut p = redis::pipe();
        p.cmd("DEL").arg(self.key(&[kind, id])).ignore();
        p.cmd("SREM").arg(self.key(&[kind])).arg(id).ignore();
        let _: () = p.query_async(&mut self.conn.clone()).await?;
        Ok(())
    }

    /// Live registry entries of one kind ("gateway" or "logic"); expired
    /// ones are dropped from the index.
    async fn members(&self, kind: &str) -> Result<Vec<Member>> {
        let mut c = self.conn.clone();
        let ids: Vec<String> = c.smembers(self.key(&[kind])).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| self.key(&[kind, id])).collect();
        let vals: Vec<Option<String>> = c.mget(keys).await?;
        let mut out = Vec::new();
        for (id, v) in ids.iter().zip(vals) {
            match v.and_then(|s| serde_json::from_str::<Member>(&s).ok()) {
                Some(m) => out.push(m),
                None => {
                    let _: () = c.srem(self.key(&[kind]), id).await?;
                }
            }
        }
        Ok(out)
    }
}

/// Routes: a hash per user (field "gateway|conn_id" -> ConnRef) and a
/// reverse key per connection. Entries of gateways that left the registry
/// are ignored and cleaned lazily, so a crashed gateway's routes vanish
/// within the registry TTL.
#[async_trait]
impl RouteTable for RedisStore {
    async fn add(&self, user: &str, conn: ConnRef) -> Result<()> {
        let field = Self::route_field(&conn);
        let mut p = redis::pipe();
        p.cmd("HSET").arg(self.key(&["route", user])).arg(&field).arg(serde_json::to_string(&conn)?).ignore();
        p.cmd("SET").arg(self.key(&["conn", &field])).arg(user).ignore();
        let _: () = p.query_async(&mut self.conn.clone()).await?;
        Ok(())
    }

    async fn remove(&self, user: &str, conn: &ConnRef) -> Result<()> {
        let field = Self::route_field(conn);
        let mut p = redis::pipe();
        p.cmd("HDEL").arg(self.key(&["route", user])).arg(&field).ignore();
        p.cmd("DEL").arg(self.key(&["conn", &field])).ignore();
        let _: () = p.query_async(&mut self.conn.clone()).await?;
        Ok(())
    }

    async fn get(&self, user: &str) -> Result<Vec<ConnRef>> {
        let all: HashMap<String, String> = self.conn.clone().hgetall(self.key(&["route", user])).await?;
        if all.is_empty() {
            return Ok(Vec::new());
        }
        let live = self.live_gateways().await?;
        let mut out = Vec::new();
        for (field, json) in all {
            match serde_json::from_str::<ConnRef>(&json) {
                Ok(c) if live.contains(&c.gateway) => out.push(c),
                Ok(c) => self.remove(user, &c).await?,
                Err(_) => {
                    let _: () = self.conn.clone().hdel(self.key(&["route", user]), field).await?;
                }
            }
        }
        Ok(out)
    }

    async fn get_many(&self, users: &[String]) -> Result<Vec<Vec<ConnRef>>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let mut p = redis::pipe();
        for u in users {
            p.cmd("HGETALL").arg(self.key(&["route", u]));
        }
        let all: Vec<HashMap<String, String>> = p.query_async(&mut self.conn.clone()).await?;
        if all.iter().all(HashMap::is_empty) {
            return Ok(vec![Vec::new(); users.len()]);
        }
        let live = self.live_gateways().await?;
        let mut out = Vec::with_capacity(users.len());
        for (user, routes) in users.iter().zip(all) {
            let mut conns = Vec::with_capacity(routes.len());
            for (field, json) in routes {
                match serde_json::from_str::<ConnRef>(&json) {
                    Ok(c) if live.contains(&c.gateway) => conns.push(c),
                    Ok(c) => self.remove(user, &c).await?,
                    Err(_) => {
                        let _: () = self.conn.clone().hdel(self.key(&["route", user]), field).await?;
                    }
                }
            }
            out.push(conns);
        }
        Ok(out)
    }

    async fn remove_conn(&self, gateway: &str, conn_id: u64) -> Result<()> {
        let field = format!("{gateway}|{conn_id}");
        let user: Option<String> = self.conn.clone().get(self.key(&["conn", &field])).await?;
        if let Some(user) = user {
            let mut p = redis::pipe();
            p.cmd("HDEL").arg(self.key(&["route", &user])).arg(&field).ignore();
            p.cmd("DEL").arg(self.key(&["conn", &field])).ignore();
            let _: () = p.query_async(&mut self.conn.clone()).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_values_parse() {
        assert_eq!(parse_alloc("7:1700000000000:p"), Some((7, 1_700_000_000_000, false)));
        assert_eq!(parse_alloc("7:1:d"), Some((7, 1, true)));
        assert_eq!(parse_alloc("x:1:d"), None);
        assert_eq!(parse_alloc("7"), None);
    }
}
