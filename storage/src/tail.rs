//! The embedded store's tail: the messages appended and the ack and read cursors raised (all
//! durable in the write-ahead log) since the last B-tree commit, which readers see through it until that commit makes them visible in the
//! B-trees. Readers take what they need from the tail **before** opening their read transaction:
//! the writer empties the tail only after a commit, so every message is in one or the other (or
//! both, when the commit lands in between; then the B-tree's copy wins, since a recall may have
//! changed it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::{AckCursor, Message, ReadCursor};

/// What one logged write adds to the tail.
pub(crate) enum Entry {
    /// A message appended, with the members whose conversation index got their first row for
    /// its conversation with it, and its size in the log (which stands for the memory it holds).
    Message { msg: Arc<Message>, indexed: Vec<String>, bytes: usize },
    /// Ack cursors raised.
    Acks(Vec<AckCursor>),
    /// Read marks raised.
    Reads(Vec<ReadCursor>),
}

/// Rough memory of one cursor in the tail.
const CURSOR_BYTES: usize = 96;

#[derive(Default)]
struct Inner {
    /// conv -> its messages since the last commit, in seq order.
    convs: HashMap<String, Vec<Arc<Message>>>,
    /// "conv\0from\0cmid" -> seq.
    cmids: HashMap<String, u64>,
    /// "conv\0mid" -> seq.
    mids: HashMap<String, u64>,
    /// user -> conversations first indexed for them since the last commit.
    indexed: HashMap<String, Vec<String>>,
    /// (user, device) -> conv -> acked seq.
    acks: HashMap<(String, String), HashMap<String, u64>>,
    /// user -> conv -> read seq.
    reads: HashMap<String, HashMap<String, u64>>,
    bytes: usize,
}

/// Shared by the writer thread (which fills and empties it) and readers.
#[derive(Default, Clone)]
pub(crate) struct Tail(Arc<Mutex<Inner>>);

fn cmid_key(conv: &str, from: &str, cmid: &str) -> String {
    format!("{conv}\0{from}\0{cmid}")
}

fn mid_key(conv: &str, mid: &str) -> String {
    format!("{conv}\0{mid}")
}

impl Tail {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent maps (every change is one insert).
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `entries` (durable in the log) visible to readers.
    pub fn extend(&self, entries: Vec<Entry>) {
        let mut t = self.lock();
        for entry in entries {
            match entry {
                Entry::Message { msg, indexed, bytes } => {
                    // The decoded message (its body as a JSON tree), its keys in the two maps,
                    // and one index row per newly indexed member.
                    t.bytes += bytes
                        + value_bytes(&msg.body)
                        + 4 * msg.conv.len()
                        + msg.from.len()
                        + msg.cmid.len()
                        + msg.mid.len()
                        + 256
                        + indexed.iter().map(|u| u.len() + msg.conv.len() + 64).sum::<usize>();
                    t.cmids.insert(cmid_key(&msg.conv, &msg.from, &msg.cmid), msg.seq);
                    t.mids.insert(mid_key(&msg.conv, &msg.mid), msg.seq);
                    for user in indexed {
                        t.indexed.entry(user).or_default().push(msg.conv.clone());
                    }
                    t.convs.entry(msg.conv.clone()).or_default().push(msg);
                }
                Entry::Acks(cursors) => {
                    t.bytes += cursors.len() * CURSOR_BYTES;
                    for c in cursors {
                        raise(t.acks.entry((c.user, c.device)).or_default(), c.conv, c.seq);
                    }
                }
                Entry::Reads(cursors) => {
                    t.bytes += cursors.len() * CURSOR_BYTES;
                    for c in cursors {
                        raise(t.reads.entry(c.user).or_default(), c.conv, c.seq);
                    }
                }
            }
        }
    }

    /// Forgets everything once a commit holds it.
    pub fn clear(&self) {
        *self.lock() = Inner::default();
    }

    /// Roughly the memory the tail holds, in bytes.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// The ack cursors of `device` of `user` raised in the tail.
    pub fn acks(&self, user: &str, device: &str) -> HashMap<String, u64> {
        self.lock().acks.get(&(user.to_owned(), device.to_owned())).cloned().unwrap_or_default()
    }

    /// The read marks of `user` raised in the tail.
    pub fn reads(&self, user: &str) -> HashMap<String, u64> {
        self.lock().reads.get(user).cloned().unwrap_or_default()
    }

    /// The messages of `conv` in the tail whose seq is in `range`.
    pub fn messages(&self, conv: &str, range: impl std::ops::RangeBounds<u64>) -> Vec<Arc<Message>> {
        let t = self.lock();
        t.convs.get(conv).map_or_else(Vec::new, |ms| ms.iter().filter(|m| range.contains(&m.seq)).cloned().collect())
    }

    /// The last seq of `conv` in the tail.
    pub fn last_seq(&self, conv: &str) -> Option<u64> {
        self.lock().convs.get(conv).and_then(|ms| ms.last()).map(|m| m.seq)
    }

    /// The message of `conv` that `from` sent with `cmid`, if it is in the tail.
    pub fn by_cmid(&self, conv: &str, from: &str, cmid: &str) -> Option<Arc<Message>> {
        let t = self.lock();
        let seq = *t.cmids.get(&cmid_key(conv, from, cmid))?;
        at(&t, conv, seq)
    }

    /// The message `mid` of `conv`, if it is in the tail.
    pub fn by_mid(&self, conv: &str, mid: &str) -> Option<Arc<Message>> {
        let t = self.lock();
        let seq = *t.mids.get(&mid_key(conv, mid))?;
        at(&t, conv, seq)
    }

    /// For `user`: the conversations first indexed for them in the tail, and the last seq in the
    /// tail of every conversation that has one.
    pub fn user_view(&self, user: &str) -> (Vec<String>, HashMap<String, u64>) {
        let t = self.lock();
        let new = t.indexed.get(user).cloned().unwrap_or_default();
        let lasts = t.convs.iter().filter_map(|(c, ms)| Some((c.clone(), ms.last()?.seq))).collect();
        (new, lasts)
    }
}

/// Roughly the heap a decoded JSON value holds (`serde_json::Value` slots are 32 bytes; map
/// entries carry their key and some overhead).
fn value_bytes(v: &serde_json::Value) -> usize {
    use serde_json::Value;
    match v {
        Value::String(s) => s.len(),
        Value::Array(a) => a.iter().map(|x| 32 + value_bytes(x)).sum(),
        Value::Object(o) => o.iter().map(|(k, x)| 32 + 48 + k.len() + value_bytes(x)).sum(),
        _ => 0,
    }
}

fn raise(map: &mut HashMap<String, u64>, conv: String, seq: u64) {
    let v = map.entry(conv).or_insert(seq);
    *v = (*v).max(seq);
}

/// Raises every cursor of `stored` to its value in `tail` where that is higher.
pub(crate) fn merge_cursors(stored: &mut HashMap<String, u64>, tail: HashMap<String, u64>) {
    for (conv, seq) in tail {
        raise(stored, conv, seq);
    }
}

fn at(t: &Inner, conv: &str, seq: u64) -> Option<Arc<Message>> {
    let ms = t.convs.get(conv)?;
    let first = ms.first()?.seq;
    ms.get(usize::try_from(seq.checked_sub(first)?).ok()?).cloned()
}

/// Merges messages read from the B-tree (`stored`) with the tail's: one per seq, the stored copy
/// winning, in ascending seq order.
pub(crate) fn merge(stored: Vec<Message>, tail: Vec<Arc<Message>>) -> Vec<Message> {
    if tail.is_empty() {
        return stored;
    }
    let mut by_seq: std::collections::BTreeMap<u64, Message> = stored.into_iter().map(|m| (m.seq, m)).collect();
    for m in tail {
        by_seq.entry(m.seq).or_insert_with(|| (*m).clone());
    }
    by_seq.into_values().collect()
}
