//! The embedded store's tail: every message appended or recalled and every ack and read cursor
//! raised (all durable in the write-ahead log) that the B-trees may not hold yet, which readers
//! see through it.
//!
//! It holds up to two **generations**: the `active` one the log thread adds to, and a `frozen`
//! one that the B-tree thread is applying to the B-trees (a checkpoint). A generation is dropped
//! only after the commit that holds it, so readers take what they need from the tail **before**
//! opening their read transaction: every message is then in one or the other (or both, when the
//! commit lands in between; the tail's copy wins, since every change of a message goes through
//! the tail first).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use crate::{AckCursor, Message, ReadCursor};

/// The hash maps of a generation, which the log thread fills per message: foldhash (seeded per
/// process) instead of SipHash.
type Map<K, V> = HashMap<K, V, foldhash::quality::RandomState>;

/// What one logged write adds to the tail.
pub(crate) enum Entry {
    /// A message appended (`json` is its stored encoding), with the members whose conversation
    /// index got their first row for its conversation with it, and its size in the log.
    Message { msg: Arc<Message>, json: Bytes, indexed: Vec<String>, bytes: usize },
    /// A stored message replaced by its recalled form.
    Recalled { msg: Arc<Message>, json: Bytes, bytes: usize },
    /// Ack cursors raised.
    Acks(Vec<AckCursor>),
    /// Read marks raised.
    Reads(Vec<ReadCursor>),
}

/// Rough memory of one cursor in the tail.
const CURSOR_BYTES: usize = 96;

/// A message held by a generation: decoded for readers, encoded for the checkpoint.
#[derive(Clone)]
pub(crate) struct Held {
    pub msg: Arc<Message>,
    pub json: Bytes,
    /// Appended in this generation (its index rows are written with it), not only changed.
    pub appended: bool,
    /// The users the message mentioned when appended (kept when a recall replaces it here).
    pub mentions: Vec<String>,
}

/// A conversation's messages in one generation.
#[derive(Default)]
pub(crate) struct ConvTail {
    pub by_seq: BTreeMap<u64, Held>,
    /// The highest seq appended in this generation (0: only changes of older messages).
    pub last: u64,
}

/// One generation of the tail.
#[derive(Default)]
pub(crate) struct Gen {
    pub convs: Map<String, ConvTail>,
    /// "conv\0from\0cmid" -> seq, of the messages appended here.
    cmids: Map<String, u64>,
    /// user -> conversations first indexed for them here.
    pub indexed: Map<String, Vec<String>>,
    /// (user, device) -> conv -> acked seq.
    pub acks: Map<(String, String), Map<String, u64>>,
    /// user -> conv -> read seq.
    pub reads: Map<String, Map<String, u64>>,
    pub bytes: usize,
}

impl Gen {
    pub fn is_empty(&self) -> bool {
        self.convs.is_empty() && self.acks.is_empty() && self.reads.is_empty()
    }

    fn add(&mut self, entry: Entry) {
        match entry {
            Entry::Message { msg, json, indexed, bytes } => {
                // The decoded message (its body as a JSON tree), its encoding, its key in the
                // cmid map, and one index row per newly indexed member.
                self.bytes += bytes
                    + json.len()
                    + value_bytes(&msg.body)
                    + 4 * msg.conv.len()
                    + msg.from.len()
                    + msg.cmid.len()
                    + 256
                    + indexed.iter().map(|u| u.len() + msg.conv.len() + 64).sum::<usize>();
                self.cmids.insert(cmid_key(&msg.conv, &msg.from, &msg.cmid), msg.seq);
                for user in indexed {
                    self.indexed.entry(user).or_default().push(msg.conv.clone());
                }
                let conv = self.convs.entry(msg.conv.clone()).or_default();
                conv.last = conv.last.max(msg.seq);
                let mentions = msg.mentions.clone();
                conv.by_seq.insert(msg.seq, Held { msg, json, appended: true, mentions });
            }
            Entry::Recalled { msg, json, bytes } => {
                self.bytes += bytes + json.len() + value_bytes(&msg.body) + msg.conv.len() + 256;
                let conv = self.convs.entry(msg.conv.clone()).or_default();
                let earlier = conv.by_seq.get(&msg.seq).filter(|h| h.appended);
                let (appended, mentions) = (earlier.is_some(), earlier.map(|h| h.mentions.clone()).unwrap_or_default());
                conv.by_seq.insert(msg.seq, Held { msg, json, appended, mentions });
            }
            Entry::Acks(cursors) => {
                self.bytes += cursors.len() * CURSOR_BYTES;
                for c in cursors {
                    raise(self.acks.entry((c.user, c.device)).or_default(), c.conv, c.seq);
                }
            }
            Entry::Reads(cursors) => {
                self.bytes += cursors.len() * CURSOR_BYTES;
                for c in cursors {
                    raise(self.reads.entry(c.user).or_default(), c.conv, c.seq);
                }
            }
        }
    }

    fn at(&self, conv: &str, seq: u64) -> Option<Arc<Message>> {
        self.convs.get(conv)?.by_seq.get(&seq).map(|h| h.msg.clone())
    }

    /// Takes in everything of `newer`, whose copies win, and leaves it empty with its maps'
    /// room kept (the staged batch is refilled at once: its maps need not grow again).
    fn absorb(&mut self, newer: &mut Gen) {
        for (conv, c) in newer.convs.drain() {
            let mine = self.convs.entry(conv).or_default();
            mine.last = mine.last.max(c.last);
            for (seq, h) in c.by_seq {
                let earlier = mine.by_seq.get(&seq).filter(|o| o.appended);
                let appended = h.appended || earlier.is_some();
                let mentions = match earlier {
                    Some(o) if !h.appended => o.mentions.clone(),
                    _ => h.mentions,
                };
                mine.by_seq.insert(seq, Held { appended, mentions, ..h });
            }
        }
        self.cmids.extend(newer.cmids.drain());
        for (user, convs) in newer.indexed.drain() {
            self.indexed.entry(user).or_default().extend(convs);
        }
        for (key, cursors) in newer.acks.drain() {
            merge_cursors(self.acks.entry(key).or_default(), cursors);
        }
        for (user, cursors) in newer.reads.drain() {
            merge_cursors(self.reads.entry(user).or_default(), cursors);
        }
        self.bytes += std::mem::take(&mut newer.bytes);
    }
}

#[derive(Default)]
struct Inner {
    /// The log thread's batch in progress: seen by its later jobs, by readers only once logged.
    staged: Gen,
    /// Being applied to the B-trees by a checkpoint.
    frozen: Option<Arc<Gen>>,
    /// Being added to by the log thread.
    active: Gen,
}

impl Inner {
    /// The generations, newest first.
    fn gens(&self) -> impl Iterator<Item = &Gen> {
        std::iter::once(&self.active).chain(self.frozen.as_deref())
    }

    /// The generations, newest first, with the staged batch if `staged`.
    fn gens_with(&self, staged: bool) -> impl Iterator<Item = &Gen> {
        staged.then_some(&self.staged).into_iter().chain(self.gens())
    }

    /// The newest copy of `conv`#`seq` in the tail.
    fn at(&self, conv: &str, seq: u64, staged: bool) -> Option<Arc<Message>> {
        self.gens_with(staged).find_map(|g| g.at(conv, seq))
    }

    /// The last seq appended to `conv` in the tail (0 when none).
    fn last_seq(&self, conv: &str, staged: bool) -> u64 {
        self.gens_with(staged).filter_map(|g| g.convs.get(conv)).map(|c| c.last).max().unwrap_or(0)
    }
}

/// Shared by the log thread (which adds to it and freezes it), the B-tree thread (which
/// releases a frozen generation once committed) and readers.
#[derive(Default, Clone)]
pub(crate) struct Tail(Arc<Mutex<Inner>>);

/// The three parts joined by NULs (which no conversation id or user name holds), written
/// without the formatting machinery: the log thread builds one or two per send.
fn cmid_key(conv: &str, from: &str, cmid: &str) -> String {
    let mut key = String::with_capacity(conv.len() + from.len() + cmid.len() + 2);
    for (i, part) in [conv, from, cmid].into_iter().enumerate() {
        if i > 0 {
            key.push('\0');
        }
        key.push_str(part);
    }
    key
}

impl Tail {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent maps (every change is one insert).
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds an entry of the log thread's batch in progress (see [`Tail::publish`]).
    pub fn stage(&self, entry: Entry) {
        self.lock().staged.add(entry);
    }

    /// Makes the staged entries (now durable in the log) visible to readers.
    pub fn publish(&self) {
        let mut guard = self.lock();
        let t = &mut *guard;
        t.active.absorb(&mut t.staged);
    }

    /// Forgets the staged entries (their log write failed).
    pub fn discard(&self) {
        self.lock().staged = Gen::default();
    }

    /// Bytes held by the active generation, and whether a frozen one is still being applied.
    pub fn state(&self) -> (usize, bool) {
        let t = self.lock();
        (t.active.bytes, t.frozen.is_some())
    }

    /// Turns the active generation into the frozen one and returns it for the checkpoint
    /// (`None` when it is empty). Only when no generation is frozen.
    pub fn freeze(&self) -> Option<Arc<Gen>> {
        let mut t = self.lock();
        debug_assert!(t.frozen.is_none(), "one checkpoint at a time");
        if t.active.is_empty() {
            return None;
        }
        let gen = Arc::new(std::mem::take(&mut t.active));
        t.frozen = Some(gen.clone());
        Some(gen)
    }

    /// Forgets the frozen generation once a commit holds it.
    pub fn release(&self) {
        self.lock().frozen = None;
    }

    /// The ack cursors of `device` of `user` raised in the tail.
    pub fn acks(&self, user: &str, device: &str) -> HashMap<String, u64> {
        let t = self.lock();
        let key = (user.to_owned(), device.to_owned());
        let mut out = HashMap::new();
        for cursors in t.gens().filter_map(|g| g.acks.get(&key)) {
            merge_cursors(&mut out, cursors.iter().map(|(c, s)| (c.clone(), *s)));
        }
        out
    }

    /// The highest seq of `conv` any device of `user` acked in the tail (0 when none).
    pub fn user_acked(&self, user: &str, conv: &str) -> u64 {
        let t = self.lock();
        t.gens()
            .flat_map(|g| g.acks.iter())
            .filter(|((u, _), _)| u == user)
            .filter_map(|(_, convs)| convs.get(conv).copied())
            .max()
            .unwrap_or(0)
    }

    /// The read marks of `user` raised in the tail.
    pub fn reads(&self, user: &str) -> HashMap<String, u64> {
        let t = self.lock();
        let mut out = HashMap::new();
        for cursors in t.gens().filter_map(|g| g.reads.get(user)) {
            merge_cursors(&mut out, cursors.iter().map(|(c, s)| (c.clone(), *s)));
        }
        out
    }

    /// The messages of `conv` in the tail whose seq is in `range` (the newest copy of each), in
    /// seq order.
    pub fn messages(&self, conv: &str, range: impl std::ops::RangeBounds<u64> + Clone) -> Vec<Arc<Message>> {
        let t = self.lock();
        let mut by_seq = BTreeMap::new();
        // oldest generation first, so newer copies replace older ones
        for g in [t.frozen.as_deref(), Some(&t.active)].into_iter().flatten() {
            if let Some(c) = g.convs.get(conv) {
                for (seq, h) in c.by_seq.range(range.clone()) {
                    by_seq.insert(*seq, h.msg.clone());
                }
            }
        }
        by_seq.into_values().collect()
    }

    /// The highest seq of each conversation at which a message appended in the tail mentions
    /// `user`.
    pub fn mentions_of(&self, user: &str) -> HashMap<String, u64> {
        let t = self.lock();
        let mut out = HashMap::new();
        for g in t.gens() {
            for (conv, c) in &g.convs {
                for (seq, h) in c.by_seq.iter().rev() {
                    if h.appended && h.mentions.iter().any(|u| u == user) {
                        let v = out.entry(conv.clone()).or_insert(0);
                        *v = (*v).max(*seq);
                        break;
                    }
                }
            }
        }
        out
    }

    // The lookups below see the log thread's staged batch when `staged` (the log thread's own
    // calls); readers pass `false`.

    /// The last seq appended to `conv` in the tail, with that message's ts.
    pub fn last(&self, conv: &str, staged: bool) -> Option<(u64, u64)> {
        let t = self.lock();
        let seq = Some(t.last_seq(conv, staged)).filter(|&s| s > 0)?;
        Some((seq, t.at(conv, seq, staged).map_or(0, |m| m.ts)))
    }

    /// The newest copy of the highest seq the tail holds of each of `convs`, under one lock.
    pub fn newest(&self, convs: &[String]) -> Vec<Option<Arc<Message>>> {
        let t = self.lock();
        convs
            .iter()
            .map(|conv| {
                let seq = t.gens().filter_map(|g| g.convs.get(conv.as_str())?.by_seq.keys().next_back()).max()?;
                t.at(conv, *seq, false)
            })
            .collect()
    }

    /// [`Tail::last`]'s seq of each of `convs` (0 where the tail has none), under one lock.
    pub fn lasts(&self, convs: &[String]) -> Vec<u64> {
        let t = self.lock();
        convs.iter().map(|conv| t.last_seq(conv, false)).collect()
    }

    /// The newest copy in the tail of `conv`#`seq`.
    pub fn at(&self, conv: &str, seq: u64, staged: bool) -> Option<Arc<Message>> {
        self.lock().at(conv, seq, staged)
    }

    /// The message of `conv` that `from` sent with `cmid`, if it was appended in the tail.
    pub fn by_cmid(&self, conv: &str, from: &str, cmid: &str, staged: bool) -> Option<Arc<Message>> {
        let t = self.lock();
        let key = cmid_key(conv, from, cmid);
        let seq = t.gens_with(staged).find_map(|g| g.cmids.get(&key).copied())?;
        t.at(conv, seq, staged)
    }

    /// The message `mid` of `conv`, if it was appended in the tail.
    pub fn by_mid(&self, conv: &str, mid: &str) -> Option<Arc<Message>> {
        let ts = crate::embedded_mids::ts_of(mid)?;
        let t = self.lock();
        let seq = t.gens().find_map(|g| {
            let by_seq = &g.convs.get(conv)?.by_seq;
            let first_from = |seq| Ok::<_, ()>(by_seq.range(seq..).next().map(|(&s, h)| (s, h.msg.ts)));
            let from = crate::embedded_mids::first_seq_at(ts, *by_seq.keys().next_back()?, first_from).ok()?;
            by_seq
                .range(from..)
                .take_while(|(_, h)| h.msg.ts == ts)
                .find(|(_, h)| h.appended && h.msg.mid == mid)
                .map(|(&s, _)| s)
        })?;
        t.at(conv, seq, false)
    }

    /// Whether `user` got their conversation-index row for `conv` in the tail (or the staged
    /// batch).
    pub fn indexed(&self, user: &str, conv: &str) -> bool {
        self.lock().gens_with(true).any(|g| g.indexed.get(user).is_some_and(|cs| cs.iter().any(|c| c == conv)))
    }

    /// For `user`: the conversations first indexed for them in the tail, and the last seq
    /// appended in the tail of every conversation that has one.
    pub fn user_view(&self, user: &str) -> (Vec<String>, HashMap<String, u64>) {
        let t = self.lock();
        let mut new = Vec::new();
        let mut lasts = HashMap::new();
        for g in t.gens() {
            new.extend(g.indexed.get(user).into_iter().flatten().cloned());
            for (conv, c) in &g.convs {
                if c.last > 0 {
                    raise(&mut lasts, conv.clone(), c.last);
                }
            }
        }
        (new, lasts)
    }
}

/// Roughly the heap a decoded JSON value holds (`serde_json::Value` slots are 32 bytes; map
/// entries carry their key and some overhead).
pub(crate) fn value_bytes(v: &serde_json::Value) -> usize {
    use serde_json::Value;
    match v {
        Value::String(s) => s.len(),
        Value::Array(a) => a.iter().map(|x| 32 + value_bytes(x)).sum(),
        Value::Object(o) => o.iter().map(|(k, x)| 32 + 48 + k.len() + value_bytes(x)).sum(),
        _ => 0,
    }
}

fn raise<S: std::hash::BuildHasher>(map: &mut HashMap<String, u64, S>, conv: String, seq: u64) {
    let v = map.entry(conv).or_insert(seq);
    *v = (*v).max(seq);
}

/// Raises every cursor of `stored` to its value in `tail` where that is higher.
pub(crate) fn merge_cursors<S: std::hash::BuildHasher>(
    stored: &mut HashMap<String, u64, S>,
    tail: impl IntoIterator<Item = (String, u64)>,
) {
    for (conv, seq) in tail {
        raise(stored, conv, seq);
    }
}

/// Merges messages read from the B-tree (`stored`) with the tail's: one per seq, the tail's copy
/// winning (every change of a message reaches the tail before the B-tree), in ascending seq
/// order.
pub(crate) fn merge(stored: Vec<Message>, tail: Vec<Arc<Message>>) -> Vec<Message> {
    if tail.is_empty() {
        return stored;
    }
    let mut by_seq: BTreeMap<u64, Message> = stored.into_iter().map(|m| (m.seq, m)).collect();
    for m in tail {
        by_seq.insert(m.seq, (*m).clone());
    }
    by_seq.into_values().collect()
}
