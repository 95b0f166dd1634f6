//! Redis adapters of the cluster deployment: the route table, the
//! per-conversation seq counters with the `cmid` index (each cmid record
//! reserves its seq together with the message's content, so a retry can
//! always publish the very same message, and pending records are indexed by
//! age so that a seq nobody completes can be voided), the recent-message
//! cache (so a `send.ok`'d message is readable before the persist worker
//! stores it), conversation membership for `sync`, and the registry of
//! gateways and logic instances with their reported load.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::aio::ConnectionManager;

use crate::tls::BackendTls;
use redis::AsyncCommands;

use crate::{ConnRef, Member, Message, NewMessage, Registry, Result, RouteTable, StorageError};

impl From<redis::RedisError> for StorageError {
    fn from(e: redis::RedisError) -> Self {
        StorageError::Redis(crate::error::driver_error(crate::error::Backend::Redis, &e), Some(Box::new(e)))
    }
}

/// How long a `cmid` is remembered in Redis (the durable store keeps it
/// for good; this only spares it the lookup).
const CMID_TTL_SECS: u64 = 7 * 24 * 3600;
/// How long after its counter started from zero a conversation's cmids are all still in Redis
/// (every one was written after that, each kept [`CMID_TTL_SECS`]), less an hour for clock
/// differences between logic instances.
const CMIDS_COMPLETE_MS: u64 = (CMID_TTL_SECS - 3600) * 1000;
/// Messages kept per conversation in the recent cache (trimmed to this when a message with a
/// seq divisible by 16 is cached: some more in between), and for how long.
pub const RECENT_KEEP: isize = 1000;
const RECENT_TTL_SECS: i64 = 24 * 3600;

/// Allocates the next seq of a conversation unless the cmid is known, and
/// stores the message's content in the cmid record in the same step, so that
/// no seq is ever reserved without what is needed to publish it; for several sends in one call
/// (each as if alone, in order).
/// KEYS: the pending index, then per send: cmid, seq counter, last ts, the time the counter
/// started from zero.
/// ARGV: now_ms, cmid ttl, then per send: content (JSON), a voided record to replace ('' for
/// none), and '' or the longest time since the counter started from zero for which an unknown
/// cmid counts as new (beyond it, or without that time, the answer is {3, ''}: ask the durable
/// store first).
/// Returns per send {0, record} (new), {1, record} (known cmid), {2, ''} (no
/// counter: reseed it from the durable store first) or {3, ''}, all in one flat list.
const ALLOC_SCRIPT: &str = r#"
local now = tonumber(ARGV[1])
local function unsure(k, a)
  if ARGV[a + 3] == '' then return false end
  local born = tonumber(redis.call('GET', KEYS[k + 4]) or '-1')
  return born < 0 or now - born >= tonumber(ARGV[a + 3])
end
local out = {}
local k, a = 1, 2
while k < #KEYS do
  local code, val = 0, ''
  local v = redis.call('GET', KEYS[k + 1])
  if v and v ~= ARGV[a + 2] then
    code, val = 1, v
  elseif redis.call('EXISTS', KEYS[k + 2]) == 0 then
    code = 2
  elseif unsure(k, a) then
    code = 3
  else
    local seq = redis.call('INCR', KEYS[k + 2])
    -- the last ts becomes now, and back to what it was in the rare case that was later
    local last = tonumber(redis.call('SET', KEYS[k + 3], string.format('%d', now), 'GET') or '0')
    local ts = now
    if last > now then
      ts = last
      redis.call('SET', KEYS[k + 3], string.format('%d', ts))
    end
    val = string.format('%d:%d:p:', seq, ts) .. ARGV[a + 1]
    redis.call('SET', KEYS[k + 1], val, 'EX', ARGV[2])
    redis.call('ZADD', KEYS[1], now, KEYS[k + 1])
  end
  out[#out + 1] = code
  out[#out + 1] = val
  k, a = k + 4, a + 3
end
return out
"#;

/// The scripts of every send, hashed once.
static ALLOC: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| redis::Script::new(ALLOC_SCRIPT));
static COMPLETE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| redis::Script::new(COMPLETE_SCRIPT));

/// Gives a pending record written without content (by a version before
/// content was reserved with the seq) its content, unless another attempt
/// did first. KEYS: cmid, pending index. ARGV: the content-less record,
/// the record with content, cmid ttl, now_ms. Returns the record now stored.
const ADOPT_SCRIPT: &str = r#"
local v = redis.call('GET', KEYS[1])
if v ~= ARGV[1] then return v or '' end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
redis.call('ZADD', KEYS[2], 'NX', ARGV[4], KEYS[1])
return ARGV[2]
"#;

/// Marks a reserved message as acknowledged by the broker and caches it, in
/// one step, unless the seq was claimed for a void meanwhile; for several sends in one call
/// (each as if alone, in order).
/// KEYS: the pending index, then per send: cmid, recent cache, then the `convs` set of each
/// member.
/// ARGV: cmid ttl, cache size, cache ttl, then per send: the number of members, "seq:ts:" of
/// the reservation, done record, message JSON, seq, conv.
/// Returns per send 'done' (marked now), 'already' (marked before), 'void' (claimed
/// for a void: the caller must not report success) or 'moved' (the cmid
/// names another seq now).
const COMPLETE_SCRIPT: &str = r#"
local out = {}
local k, a = 1, 3
while a < #ARGV do
  local members, head = tonumber(ARGV[a + 1]), ARGV[a + 2]
  local answer = 'done'
  local v = redis.call('GET', KEYS[k + 1])
  if v then
    local st = string.sub(v, #head + 1, #head + 1)
    if string.sub(v, 1, #head) ~= head then answer = 'moved'
    elseif st == 'v' then answer = 'void'
    elseif st == 'd' then answer = 'already' end
  end
  if answer == 'done' then
    redis.call('SET', KEYS[k + 1], ARGV[a + 3], 'EX', ARGV[1])
    redis.call('ZREM', KEYS[1], KEYS[k + 1])
    redis.call('ZADD', KEYS[k + 2], ARGV[a + 5], ARGV[a + 4])
    if tonumber(ARGV[a + 5]) % 16 == 0 then
      redis.call('ZREMRANGEBYRANK', KEYS[k + 2], 0, -tonumber(ARGV[2]) - 1)
    end
    redis.call('EXPIRE', KEYS[k + 2], ARGV[3])
    for i = 1, members do redis.call('SADD', KEYS[k + 2 + i], ARGV[a + 6]) end
  end
  out[#out + 1] = answer
  k, a = k + 2 + members, a + 6
end
return out
"#;

/// Claims an overdue pending seq for a void: the record turns from pending
/// to void (so no attempt can complete it any more) and its index entry is
/// pushed back by a full timeout (so a sweeper that dies before publishing
/// the void is replaced later, and concurrent sweepers skip it).
/// KEYS: cmid, pending index. ARGV: cutoff_ms, now_ms, cmid ttl.
/// Returns the void record, or '' when there is nothing to void.
const CLAIM_SCRIPT: &str = r#"
local score = redis.call('ZSCORE', KEYS[2], KEYS[1])
if not score or tonumber(score) > tonumber(ARGV[1]) then return '' end
local v = redis.call('GET', KEYS[1])
local head, st, rest
if v then head, st, rest = string.match(v, '^(%d+:%d+:)(%a)(.*)$') end
if not head or st == 'd' or rest == '' then
  redis.call('ZREM', KEYS[2], KEYS[1])
  return ''
end
if st == 'p' then
  v = head .. 'v' .. rest
  redis.call('SET', KEYS[1], v, 'EX', ARGV[3])
end
redis.call('ZADD', KEYS[2], ARGV[2], KEYS[1])
return v
"#;

/// Sets a record to `ARGV[2]` and drops its index entry if it still is
/// `ARGV[1]`. KEYS: cmid, pending index. ARGV: expected, new ('' keeps it), ttl.
/// Returns 1 when it was.
const SETTLE_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] ~= '' then redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) end
redis.call('ZREM', KEYS[2], KEYS[1])
return 1
"#;

/// What a cmid record says of its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmidState {
    /// The seq is reserved; the broker has not acknowledged the message (yet).
    Pending,
    /// The broker acknowledged the message.
    Done,
    /// The seq was claimed for a void after the timeout: no attempt may
    /// report it as sent unless the durable store ends up holding the
    /// message itself (the broker had it before the void).
    Void,
}

/// What is reserved with a seq: everything of the message but its seq and
/// ts, which the record carries. Stored as JSON after the record's head.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Content {
    conv: String,
    from: String,
    cmid: String,
    #[serde(rename = "type")]
    kind: String,
    body: serde_json::Value,
    /// The mid after its 11 hex digits of `ts` (see [`crate::new_mid`]).
    mid_tail: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reply_to: Option<Box<crate::Quote>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    mentions: Vec<String>,
}

impl Content {
    fn of(msg: &NewMessage) -> Self {
        Content {
            conv: msg.conv.clone(),
            from: msg.from.clone(),
            cmid: msg.cmid.clone(),
            kind: msg.kind.clone(),
            body: msg.body.clone(),
            mid_tail: format!("{:016x}", rand::random::<u64>()),
            reply_to: msg.reply_to.clone(),
            mentions: msg.mentions.clone(),
        }
    }
}

/// A cmid record as stored: `seq:ts:state`, then, while the message is not
/// acknowledged, `:` and its [`Content`] (`state` is `p`, `d` or `v`).
/// Records written before content was reserved with the seq lack it.
#[derive(Debug, Clone, PartialEq)]
pub struct CmidRecord {
    pub seq: u64,
    pub ts: u64,
    pub state: CmidState,
    content: Option<Content>,
    raw: String,
}

impl CmidRecord {
    fn parse(raw: &str) -> Option<Self> {
        let mut it = raw.splitn(4, ':');
        let seq = it.next()?.parse().ok()?;
        let ts = it.next()?.parse().ok()?;
        let state = match it.next()? {
            "p" => CmidState::Pending,
            "d" => CmidState::Done,
            "v" => CmidState::Void,
            _ => return None,
        };
        let content = match it.next() {
            Some(json) => Some(serde_json::from_str(json).ok()?),
            None => None,
        };
        Some(Self { seq, ts, state, content, raw: raw.to_owned() })
    }

    /// The reserved message, exactly as every attempt publishes it (`None`
    /// for a record without content).
    pub fn message(&self) -> Option<Message> {
        let c = self.content.clone()?;
        Some(Message {
            mid: format!("{:011x}{}", self.ts, c.mid_tail),
            seq: self.seq,
            ts: self.ts,
            conv: c.conv,
            from: c.from,
            cmid: c.cmid,
            kind: c.kind,
            body: c.body,
            reply_to: c.reply_to,
            mentions: c.mentions,
        })
    }

    /// The conversation, when the record carries content.
    pub fn conv(&self) -> Option<&str> {
        self.content.as_ref().map(|c| c.conv.as_str())
    }

    /// The record as stored (compare-and-set scripts match it exactly).
    pub fn raw(&self) -> &str {
        &self.raw
    }

    fn head(&self) -> String {
        format!("{}:{}:", self.seq, self.ts)
    }
}

/// The answer of [`RedisStore::alloc`].
#[derive(Debug, Clone, PartialEq)]
pub enum Alloc {
    /// A fresh seq and ts, reserved with the message (in the record).
    New(CmidRecord),
    /// The cmid was seen before; the record tells whether its message
    /// reached the queue, is pending (it must be produced again) or was
    /// voided.
    Known(CmidRecord),
    /// The conversation's counter is missing (new conversation or a Redis
    /// restart): seed it from the durable store and try again.
    NoCounter,
    /// Redis may have forgotten this cmid (asked with `complete_only`): look in the durable
    /// store first, then allocate without it.
    Unsure,
}

/// One send's reservation for [`RedisStore::alloc_many`] ([`RedisStore::alloc_request`]).
pub struct AllocRequest {
    keys: [String; 4],
    content: String,
    replace: String,
    window: String,
}

/// One send's completion for [`RedisStore::complete_many`] ([`RedisStore::complete_request`]).
pub struct CompleteRequest {
    /// The cmid record, the recent cache, then each member's `convs` set.
    keys: Vec<String>,
    head: String,
    json: String,
    seq: u64,
    conv: String,
}

/// The answer of [`RedisStore::complete`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// Marked acknowledged and cached by this call.
    Done,
    /// Another attempt had marked it already.
    Already,
    /// Claimed for a void first: this attempt must not report success.
    Void,
    /// The cmid names another seq now (its void was resolved).
    Moved,
}

/// Every Redis-backed store of the cluster over one multiplexed connection.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    /// For the dedicated connections pub/sub needs.
    client: redis::Client,
    /// The live gateways as last read, and when ([`LIVE_FOR`]).
    live: Arc<std::sync::Mutex<Option<LiveGateways>>>,
}

/// A set of live gateways and when it was read.
type LiveGateways = (Instant, Arc<HashSet<String>>);

/// How long a route lookup trusts the set of live gateways it read: a gateway that left may
/// still get pushes (which fail) this long; a gateway missing from the set is always read again.
const LIVE_FOR: Duration = Duration::from_secs(1);

impl RedisStore {
    /// Connects; every key gets `prefix` (lets deployments or test runs share a server).
    /// A `rediss://` URL connects with TLS, verified against the system's roots.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self> {
        Self::connect_tls(url, prefix, &BackendTls::system()).await
    }

    /// [`RedisStore::connect`], a `rediss://` URL verified against `tls`'s roots.
    pub async fn connect_tls(url: &str, prefix: &str, tls: &BackendTls) -> Result<Self> {
        let client = tls.redis_client(url)?;
        let conn = ConnectionManager::new(client.clone()).await?;
        Ok(Self { conn, prefix: prefix.to_owned(), client, live: Default::default() })
    }

    /// Tells every subscriber of [`RedisStore::changes`] of `topic` that what `parts` names
    /// changed.
    pub async fn publish_change(&self, topic: &str, parts: &[&str]) -> Result<()> {
        let payload = serde_json::to_string(parts).map_err(|e| StorageError::Corrupt(e.to_string()))?;
        let _: i64 = redis::cmd("PUBLISH")
            .arg(self.key(&["changed", topic]))
            .arg(payload)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// What changed in `topic`, as [`RedisStore::publish_change`] announces it, on a connection
    /// of its own; the stream ends when that connection does.
    pub async fn changes(&self, topic: &str) -> Result<impl tokio_stream::Stream<Item = Vec<String>> + Send + Unpin> {
        let mut sub = self.client.get_async_pubsub().await?;
        sub.subscribe(self.key(&["changed", topic])).await?;
        Ok(tokio_stream::StreamExt::filter_map(sub.into_on_message(), |m| {
            let payload: String = m.get_payload().ok()?;
            serde_json::from_str(&payload).ok()
        }))
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

    fn pending_index(&self) -> String {
        self.key(&["pending-index"])
    }

    /// Allocates a seq for the message's (conv, from, cmid) and reserves it
    /// with the message's content, or answers what is known of the cmid;
    /// see [`Alloc`]. `replace` is a voided record (as read) that may be
    /// replaced by a fresh reservation: its void won, so the cmid's message
    /// needs a new seq.
    ///
    /// With `complete_only`, an unknown cmid gets a seq only in a conversation whose every cmid
    /// Redis still has: its counter started from zero (see [`RedisStore::seed`]) less than the
    /// cmid lifetime ago, so no cmid of it can have expired, and was not lost since (a lost
    /// counter is reseeded from the store with the seq it had). Otherwise [`Alloc::Unsure`].
    pub async fn alloc(
        &self,
        msg: &NewMessage,
        now_ms: u64,
        replace: Option<&str>,
        complete_only: bool,
    ) -> Result<Alloc> {
        let one = self.alloc_request(msg, replace, complete_only)?;
        let mut answers = self.alloc_many(std::slice::from_ref(&one), now_ms).await?;
        answers.pop().ok_or_else(|| StorageError::Corrupt("seq allocation answered nothing".into()))
    }

    /// The reservation [`RedisStore::alloc`] makes, for [`RedisStore::alloc_many`].
    pub fn alloc_request(&self, msg: &NewMessage, replace: Option<&str>, complete_only: bool) -> Result<AllocRequest> {
        Ok(AllocRequest {
            keys: [
                self.cmid_key(&msg.conv, &msg.from, &msg.cmid),
                self.key(&["seq", &msg.conv]),
                self.key(&["ts", &msg.conv]),
                self.key(&["born", &msg.conv]),
            ],
            content: serde_json::to_string(&Content::of(msg))?,
            replace: replace.unwrap_or("").to_owned(),
            window: if complete_only { CMIDS_COMPLETE_MS.to_string() } else { String::new() },
        })
    }

    /// [`RedisStore::alloc`] for several sends in one script call, each answered as if alone.
    pub async fn alloc_many(&self, reqs: &[AllocRequest], now_ms: u64) -> Result<Vec<Alloc>> {
        let mut call = ALLOC.key(self.pending_index());
        call.arg(now_ms).arg(CMID_TTL_SECS);
        for r in reqs {
            call.key(&r.keys[..]).arg(&r.content).arg(&r.replace).arg(&r.window);
        }
        // a flat list of (code, record) pairs
        let answers: Vec<(i64, String)> = call.invoke_async(&mut self.conn.clone()).await?;
        if answers.len() != reqs.len() {
            return Err(StorageError::Corrupt(format!("{} seq allocations answered {}", reqs.len(), answers.len())));
        }
        answers
            .into_iter()
            .map(|(code, val)| {
                let bad = || StorageError::Corrupt(format!("seq allocation answered {code} {val:?}"));
                match code {
                    0 => CmidRecord::parse(&val).map(Alloc::New).ok_or_else(bad),
                    1 => CmidRecord::parse(&val).map(Alloc::Known).ok_or_else(bad),
                    2 => Ok(Alloc::NoCounter),
                    3 => Ok(Alloc::Unsure),
                    _ => Err(bad()),
                }
            })
            .collect()
    }

    /// What Redis knows of a cmid.
    pub async fn cmid(&self, conv: &str, from: &str, cmid: &str) -> Result<Option<CmidRecord>> {
        let v: Option<String> = self.conn.clone().get(self.cmid_key(conv, from, cmid)).await?;
        Ok(v.as_deref().and_then(CmidRecord::parse))
    }

    /// Gives a pending record without content (written by an earlier
    /// version, which stashed the message in a separate step, or died
    /// before) the content of `msg`: the message that version stashed, or
    /// the retry's own (same cmid, same message). Another attempt may do so
    /// first: returns the record now stored, whatever it is.
    pub async fn adopt(&self, rec: &CmidRecord, msg: &Message, now_ms: u64) -> Result<Option<CmidRecord>> {
        let mid_tail = match msg.mid.strip_prefix(&format!("{:011x}", rec.ts)) {
            Some(tail) => tail.to_owned(),
            None => format!("{:016x}", rand::random::<u64>()),
        };
        let content = Content {
            conv: msg.conv.clone(),
            from: msg.from.clone(),
            cmid: msg.cmid.clone(),
            kind: msg.kind.clone(),
            body: msg.body.clone(),
            mid_tail,
            reply_to: msg.reply_to.clone(),
            mentions: msg.mentions.clone(),
        };
        let adopted = format!("{}p:{}", rec.head(), serde_json::to_string(&content)?);
        let script = redis::Script::new(ADOPT_SCRIPT);
        let now: String = script
            .key(self.cmid_key(&msg.conv, &msg.from, &msg.cmid))
            .key(self.pending_index())
            .arg(rec.raw())
            .arg(adopted)
            .arg(CMID_TTL_SECS)
            .arg(now_ms)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(CmidRecord::parse(&now))
    }

    /// Seeds a missing counter (another seeder may win; that is fine, both
    /// read the same durable state).
    ///
    /// A counter seeded from zero (the conversation has no message anywhere) also records when:
    /// from then on every cmid of the conversation is written here (see [`RedisStore::alloc`]).
    /// Both in one transaction, so the time never outlives the counter it speaks for.
    pub async fn seed(&self, conv: &str, last_seq: u64, last_ts: u64) -> Result<()> {
        let mut c = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("SET").arg(self.key(&["seq", conv])).arg(last_seq).arg("NX").ignore();
        pipe.cmd("SET").arg(self.key(&["ts", conv])).arg(last_ts).arg("NX").ignore();
        if last_seq == 0 {
            pipe.cmd("SET").arg(self.key(&["born", conv])).arg(crate::now_ms()).arg("NX").ignore();
        }
        let _: () = pipe.query_async(&mut c).await?;
        Ok(())
    }

    /// Records a cmid as known without allocating (it was found durable).
    pub async fn remember_cmid(&self, msg: &Message) -> Result<()> {
        let mut c = self.conn.clone();
        let v = format!("{}:{}:d", msg.seq, msg.ts);
        let _: () = c.set_ex(self.cmid_key(&msg.conv, &msg.from, &msg.cmid), v, CMID_TTL_SECS).await?;
        Ok(())
    }

    /// After the broker acknowledged `msg`: marks its cmid done and caches it
    /// (indexing the conversation for `members`) in one step, unless its seq
    /// was claimed for a void first; see [`Completion`].
    pub async fn complete(&self, msg: &Message, members: &[String]) -> Result<Completion> {
        let one = self.complete_request(msg, members)?;
        let mut answers = self.complete_many(std::slice::from_ref(&one)).await?;
        answers.pop().ok_or_else(|| StorageError::Corrupt("completion answered nothing".into()))
    }

    /// The step [`RedisStore::complete`] takes, for [`RedisStore::complete_many`].
    pub fn complete_request(&self, msg: &Message, members: &[String]) -> Result<CompleteRequest> {
        let mut keys = vec![self.cmid_key(&msg.conv, &msg.from, &msg.cmid), self.key(&["recent", &msg.conv])];
        keys.extend(members.iter().map(|m| self.key(&["convs", m])));
        Ok(CompleteRequest {
            keys,
            head: format!("{}:{}:", msg.seq, msg.ts),
            json: serde_json::to_string(msg)?,
            seq: msg.seq,
            conv: msg.conv.clone(),
        })
    }

    /// [`RedisStore::complete`] for several sends in one script call, each answered as if alone.
    pub async fn complete_many(&self, reqs: &[CompleteRequest]) -> Result<Vec<Completion>> {
        let mut call = COMPLETE.key(self.pending_index());
        call.arg(CMID_TTL_SECS).arg(RECENT_KEEP).arg(RECENT_TTL_SECS);
        for r in reqs {
            call.key(&r.keys[..])
                .arg(r.keys.len() - 2)
                .arg(&r.head)
                .arg(format!("{}d", r.head))
                .arg(&r.json)
                .arg(r.seq)
                .arg(&r.conv);
        }
        let answers: Vec<String> = call.invoke_async(&mut self.conn.clone()).await?;
        if answers.len() != reqs.len() {
            return Err(StorageError::Corrupt(format!("{} completions answered {}", reqs.len(), answers.len())));
        }
        answers
            .iter()
            .map(|a| match a.as_str() {
                "done" => Ok(Completion::Done),
                "already" => Ok(Completion::Already),
                "void" => Ok(Completion::Void),
                "moved" => Ok(Completion::Moved),
                other => Err(StorageError::Corrupt(format!("completion answered {other:?}"))),
            })
            .collect()
    }

    /// How many reserved seqs are pending (neither acknowledged nor voided).
    pub async fn pending(&self) -> Result<u64> {
        Ok(self.conn.clone().zcard(self.pending_index()).await?)
    }

    /// Keys of cmid records whose seq has been pending since before
    /// `cutoff_ms` (at most `limit`), oldest first.
    pub async fn overdue(&self, cutoff_ms: u64, limit: usize) -> Result<Vec<String>> {
        let keys: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.pending_index())
            .arg("-inf")
            .arg(cutoff_ms)
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(keys)
    }

    /// Claims the overdue pending seq of the cmid record at `key` for a
    /// void (see [`CmidState::Void`]); `None` when it is not overdue any
    /// more, was acknowledged, or has no content to tell its conversation.
    /// A record already void is returned again (its void may not have been
    /// published: the sweeper that claimed it may have died).
    pub async fn claim_void(&self, key: &str, cutoff_ms: u64, now_ms: u64) -> Result<Option<CmidRecord>> {
        let script = redis::Script::new(CLAIM_SCRIPT);
        let v: String = script
            .key(key)
            .key(self.pending_index())
            .arg(cutoff_ms)
            .arg(now_ms)
            .arg(CMID_TTL_SECS)
            .invoke_async(&mut self.conn.clone())
            .await?;
        if v.is_empty() {
            return Ok(None);
        }
        CmidRecord::parse(&v)
            .map(Some)
            .ok_or_else(|| StorageError::Corrupt(format!("claimed cmid record {v:?} does not parse")))
    }

    /// Once the void of the record claimed at `key` is acknowledged by the
    /// broker: drops its pending-index entry if the record is still that void.
    pub async fn void_published(&self, key: &str, rec: &CmidRecord) -> Result<()> {
        self.settle(key, rec.raw(), "").await.map(|_| ())
    }

    /// A voided record whose message `stored` the durable store holds after
    /// all (the broker had it before the void): marks it done. `false` when
    /// the record changed meanwhile.
    pub async fn void_lost(&self, rec: &CmidRecord, stored: &Message) -> Result<bool> {
        let done = format!("{}:{}:d", rec.seq, rec.ts);
        self.settle(&self.cmid_key(&stored.conv, &stored.from, &stored.cmid), rec.raw(), &done).await
    }

    async fn settle(&self, key: &str, expected: &str, new: &str) -> Result<bool> {
        let script = redis::Script::new(SETTLE_SCRIPT);
        let n: i64 = script
            .key(key)
            .key(self.pending_index())
            .arg(expected)
            .arg(new)
            .arg(CMID_TTL_SECS)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(n == 1)
    }

    /// Whether the counters' epoch is settled: no data loss since the persist worker was last
    /// known to have stored the whole topic (see `ClusterMessages::reseed`). A missing key means
    /// Redis lost its data (or never had any).
    pub async fn epoch_settled(&self) -> Result<bool> {
        let v: Option<String> = self.conn.clone().get(self.key(&["epoch"])).await?;
        Ok(v.is_some_and(|v| v.ends_with(":settled")))
    }

    /// Opens an epoch after a loss (or joins the one being opened): returns its id.
    pub async fn open_epoch(&self) -> Result<String> {
        let key = self.key(&["epoch"]);
        let mine = format!("{:016x}:pending", rand::random::<u64>());
        let mut c = self.conn.clone();
        let _: Option<String> = redis::cmd("SET").arg(&key).arg(&mine).arg("NX").query_async(&mut c).await?;
        let now: Option<String> = c.get(&key).await?;
        let now = now.ok_or_else(|| StorageError::Busy("the counters' epoch vanished".into()))?;
        Ok(now.split(':').next().unwrap_or_default().to_owned())
    }

    /// Marks epoch `id` settled (only if it is still the current, pending one).
    pub async fn settle_epoch(&self, id: &str) -> Result<()> {
        let script = redis::Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] .. ':pending' then \
               redis.call('SET', KEYS[1], ARGV[1] .. ':settled') end return 1",
        );
        let _: i64 = script.key(self.key(&["epoch"])).arg(id).invoke_async(&mut self.conn.clone()).await?;
        Ok(())
    }

    /// The Redis server's run id: it changes whenever the server restarts (and with it, unless
    /// Redis persists, every route is gone).
    pub async fn server_run_id(&self) -> Result<String> {
        let info: String = redis::cmd("INFO").arg("server").query_async(&mut self.conn.clone()).await?;
        info.lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .map(|id| id.trim().to_owned())
            .ok_or_else(|| StorageError::redis("INFO server has no run_id"))
    }

    /// The conversation's counter, if present.
    pub async fn counter(&self, conv: &str) -> Result<Option<u64>> {
        Ok(self.conn.clone().get(self.key(&["seq", conv])).await?)
    }

    /// A message stashed by a version before content was reserved with the
    /// seq (it stashed in a separate step after allocating), if any.
    pub async fn legacy_stashed(&self, conv: &str, seq: u64) -> Result<Option<Message>> {
        let raw: Option<String> = self.conn.clone().get(self.key(&["pending", conv, &seq.to_string()])).await?;
        raw.map(|s| serde_json::from_str(&s).map_err(StorageError::from)).transpose()
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

    /// The cached copies of the message at each `(conv, seq)`, in one pipeline.
    pub async fn cached_at(&self, at: &[(&str, u64)]) -> Result<Vec<Vec<Message>>> {
        if at.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (conv, seq) in at {
            pipe.zrangebyscore(self.key(&["recent", conv]), *seq, *seq);
        }
        let raw: Vec<Vec<String>> = pipe.query_async(&mut self.conn.clone()).await?;
        raw.iter()
            .map(|copies| copies.iter().map(|s| serde_json::from_str(s).map_err(StorageError::from)).collect())
            .collect()
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
}

/// The gateway a route field ([`RedisStore::route_field`]) names.
fn route_gateway(field: &str) -> &str {
    field.rsplit_once('|').map_or(field, |(g, _)| g)
}

impl RedisStore {
    /// The gateways in the registry now: the set read less than [`LIVE_FOR`] ago when it holds
    /// every gateway of `routes`, read again otherwise (a route is only ever dropped for a
    /// gateway that a fresh read does not find).
    async fn live_gateways<'a>(&self, mut routes: impl Iterator<Item = &'a str>) -> Result<Arc<HashSet<String>>> {
        let cached = self.live.lock().expect("live gateways lock").clone();
        if let Some((at, live)) = cached {
            if at.elapsed() < LIVE_FOR && routes.all(|g| live.contains(g)) {
                return Ok(live);
            }
        }
        let live: Arc<HashSet<String>> = Arc::new(self.members("gateway").await?.into_iter().map(|m| m.rpc).collect());
        *self.live.lock().expect("live gateways lock") = Some((Instant::now(), live.clone()));
        Ok(live)
    }
}

#[async_trait]
impl Registry for RedisStore {
    /// Publishes a registry entry that lives `ttl_secs` unless refreshed; `true` when it was
    /// absent (SET … GET, Redis 6.2+).
    async fn register(&self, kind: &str, m: &Member, ttl_secs: u64) -> Result<bool> {
        let json = serde_json::to_string(m)?;
        let mut p = redis::pipe();
        p.cmd("SET").arg(self.key(&[kind, &m.id])).arg(json).arg("EX").arg(ttl_secs).arg("GET");
        p.cmd("SADD").arg(self.key(&[kind])).arg(&m.id).ignore();
        let (before,): (Option<String>,) = p.query_async(&mut self.conn.clone()).await?;
        Ok(before.is_none())
    }

    /// Removes a registry entry (graceful shutdown).
    async fn deregister(&self, kind: &str, id: &str) -> Result<()> {
        *self.live.lock().expect("live gateways lock") = None;
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

    async fn claim(&self, name: &str, ttl: Duration) -> Result<bool> {
        let set: Option<String> = redis::cmd("SET")
            .arg(self.key(&["claim", name]))
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(set.is_some())
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
        let live = self.live_gateways(all.keys().map(String::as_str).map(route_gateway)).await?;
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

    async fn get_many(&self, users: &[String]) -> Result<Vec<std::sync::Arc<[ConnRef]>>> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let mut p = redis::pipe();
        for u in users {
            p.cmd("HGETALL").arg(self.key(&["route", u]));
        }
        let all: Vec<HashMap<String, String>> = p.query_async(&mut self.conn.clone()).await?;
        if all.iter().all(HashMap::is_empty) {
            return Ok(users.iter().map(|_| std::sync::Arc::from([])).collect());
        }
        let live =
            self.live_gateways(all.iter().flat_map(HashMap::keys).map(String::as_str).map(route_gateway)).await?;
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
            out.push(conns.into());
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
    fn cmid_records_parse() {
        let old = CmidRecord::parse("7:1700000000000:p").unwrap();
        assert_eq!((old.seq, old.ts, old.state, old.message()), (7, 1_700_000_000_000, CmidState::Pending, None));
        assert_eq!(CmidRecord::parse("7:1:d").unwrap().state, CmidState::Done);
        assert_eq!(CmidRecord::parse("x:1:d"), None);
        assert_eq!(CmidRecord::parse("7"), None);
        assert_eq!(CmidRecord::parse("7:1:q"), None);

        let new = NewMessage {
            conv: "d:a:b".into(),
            from: "a".into(),
            cmid: "c:1".into(),
            kind: "text".into(),
            body: serde_json::json!("x:y"),
            reply_to: None,
            mentions: Vec::new(),
        };
        let content = Content::of(&new);
        let raw = format!("7:255:v:{}", serde_json::to_string(&content).unwrap());
        let rec = CmidRecord::parse(&raw).unwrap();
        assert_eq!((rec.state, rec.conv(), rec.raw()), (CmidState::Void, Some("d:a:b"), raw.as_str()));
        let m = rec.message().unwrap();
        assert_eq!(m.mid, format!("000000000ff{}", content.mid_tail));
        assert_eq!(m, Message { mid: m.mid.clone(), ..new.stored_as(7, 255) });
    }
}
