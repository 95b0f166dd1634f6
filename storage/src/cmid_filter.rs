//! The embedded store's filter of the cmids it holds: a blocked Bloom filter of fixed size in
//! bytes over (conversation, sender, cmid), so that a send with a new cmid (nearly every send)
//! skips the B-tree probe that proves it unused. It answers "certainly not stored" or "maybe";
//! "maybe" falls back to the probe, so a full filter only costs the probe it would have saved.
//!
//! It must hold every stored cmid before it may answer "not stored": the log thread adds each
//! cmid it appends (before that append can be read), and a background thread adds the cmids the
//! database held when it opened, in short read transactions; until that scan ends the filter
//! answers "maybe" for everything. Nothing removes a cmid from the database, and a cmid of a
//! batch whose log write failed stays in the filter (a false "maybe", harmless).

use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use redb::Database;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::embedded::CMIDS;
use crate::Result;

/// Rows read per read transaction of the scan (a transaction held long would hold back the
/// pages later commits free).
const SCAN_CHUNK: usize = 65_536;

/// Share of bits set above which the filter warns at start: a new cmid then gets a "maybe"
/// (and a lookup) more than 6 % of the time.
const CROWDED: f64 = 0.5;

/// Bits set per cmid, all in one 64-bit word (one cache line touched per lookup).
const BITS_PER_KEY: u32 = 4;

/// A cmid's word in the filter and its bits in that word.
#[derive(Clone, Copy)]
pub(crate) struct Slot {
    word: usize,
    bits: u64,
}

pub(crate) struct CmidFilter {
    words: Box<[AtomicU64]>,
    /// Every cmid the database held at open is in: "not stored" answers can be trusted.
    complete: AtomicBool,
    /// The store is closing: the scan stops (leaving the filter incomplete).
    stop: AtomicBool,
}

impl CmidFilter {
    /// A filter of `bytes` (rounded down to whole 8-byte words); `None` for fewer than 8.
    pub fn new(bytes: usize) -> Option<Arc<Self>> {
        let n = bytes / 8;
        (n > 0).then(|| {
            // A zeroed allocation: its pages are mapped as they are first written, so memory
            // grows with the cmids stored, up to `bytes`.
            // SAFETY: all-zero bytes are a valid `AtomicU64` (it has the layout of `u64`).
            let words = unsafe { Box::<[AtomicU64]>::new_zeroed_slice(n).assume_init() };
            Arc::new(Self { words, complete: AtomicBool::new(false), stop: AtomicBool::new(false) })
        })
    }

    /// Where one cmid lives in the filter (hashed once, for both [`Self::may_hold`] and
    /// [`Self::insert`]).
    pub fn slot(&self, conv: &str, from: &str, cmid: &str) -> Slot {
        let h = xxh3_64_with_seed(cmid.as_bytes(), xxh3_64_with_seed(from.as_bytes(), xxh3_64(conv.as_bytes())));
        // The word from the high half of the product (uniform over any length), the bits from a
        // second mixing of the hash.
        let word = ((u128::from(h) * self.words.len() as u128) >> 64) as usize;
        let mut mix = h.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
        let mut bits = 0u64;
        for _ in 0..BITS_PER_KEY {
            bits |= 1 << (mix & 63);
            mix >>= 6;
        }
        Slot { word, bits }
    }

    pub fn insert(&self, slot: Slot) {
        self.words[slot.word].fetch_or(slot.bits, Ordering::Relaxed);
    }

    /// False only when the cmid of `slot` was certainly never stored.
    pub fn may_hold(&self, slot: Slot) -> bool {
        !self.complete.load(Ordering::Acquire) || self.words[slot.word].load(Ordering::Relaxed) & slot.bits == slot.bits
    }

    /// Whether the scan of the database has ended.
    #[cfg(test)]
    pub fn complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }

    /// Adds every cmid `db` holds, in read transactions of [`SCAN_CHUNK`] rows, then trusts
    /// the filter's "not stored" answers. Returns the rows read (`None`: stopped first).
    pub fn fill(&self, db: &Database) -> Result<Option<u64>> {
        let mut after: Option<(String, String, String)> = None;
        let mut rows = 0u64;
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Ok(None);
            }
            let tx = db.begin_read()?;
            let table = tx.open_table(CMIDS)?;
            let start = match &after {
                Some((c, f, m)) => Bound::Excluded((c.as_str(), f.as_str(), m.as_str())),
                None => Bound::Unbounded,
            };
            let (mut read, mut last) = (0, None);
            for row in table.range((start, Bound::Unbounded))?.take(SCAN_CHUNK) {
                let (key, _) = row?;
                let (conv, from, cmid) = key.value();
                self.insert(self.slot(conv, from, cmid));
                read += 1;
                if read == SCAN_CHUNK {
                    last = Some((conv.to_owned(), from.to_owned(), cmid.to_owned()));
                }
            }
            rows += read as u64;
            match last {
                Some(key) => after = Some(key),
                None => break,
            }
        }
        self.complete.store(true, Ordering::Release);
        Ok(Some(rows))
    }

    /// Share of the filter's bits set (what its "maybe" rate for a new cmid is, to the power
    /// of [`BITS_PER_KEY`]).
    pub fn fill_ratio(&self) -> f64 {
        let set: u64 = self.words.iter().map(|w| u64::from(w.load(Ordering::Relaxed).count_ones())).sum();
        set as f64 / (self.words.len() as f64 * 64.0)
    }
}

/// The thread filling a filter from the database; dropping it stops the scan and waits for it
/// (the thread holds the database open).
pub(crate) struct Scan {
    pub filter: Arc<CmidFilter>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Scan {
    /// Starts the scan of `db` on a thread of its own (niced like the checkpoint thread: it is
    /// background work); a failed scan leaves the filter answering "maybe".
    pub fn start(filter: Arc<CmidFilter>, db: Arc<Database>, nice: i32) -> Result<Self> {
        let f = filter.clone();
        let thread = std::thread::Builder::new()
            .name("sb-cmid-scan".into())
            .spawn(move || {
                crate::group_commit::lower_priority(nice);
                let started = std::time::Instant::now();
                match f.fill(&db) {
                    Ok(Some(rows)) => {
                        let (ms, fill) = (started.elapsed().as_millis() as u64, f.fill_ratio());
                        tracing::info!(rows, ms, fill, "embedded store: cmid filter filled");
                        if fill > CROWDED {
                            tracing::warn!(
                                rows,
                                fill,
                                "embedded store: the cmid filter is crowded (many sends will look up the index); \
                                 raise embedded_cmid_filter_bytes to about 10 bits per stored message"
                            );
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "embedded store: cmid filter scan failed; every send probes the index")
                    }
                }
            })
            .map_err(|e| crate::StorageError::embedded(format!("starting the cmid scan: {e}")))?;
        Ok(Self { filter, thread: Some(thread) })
    }
}

impl Drop for Scan {
    fn drop(&mut self) {
        self.filter.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn may(f: &CmidFilter, conv: &str, from: &str, cmid: &str) -> bool {
        f.may_hold(f.slot(conv, from, cmid))
    }

    #[test]
    fn no_stored_cmid_is_ever_denied_and_new_ones_mostly_are() {
        let f = CmidFilter::new(64 << 10).unwrap();
        f.complete.store(true, Ordering::Release);
        let n = 50_000; // ~10 bits of filter per cmid
        for i in 0..n {
            f.insert(f.slot(&format!("d:u{}:u{}", i % 97, i % 89), &format!("u{}", i % 97), &format!("c-{i}")));
        }
        for i in 0..n {
            assert!(may(&f, &format!("d:u{}:u{}", i % 97, i % 89), &format!("u{}", i % 97), &format!("c-{i}")));
        }
        let maybe = (n..2 * n)
            .filter(|i| may(&f, &format!("d:u{}:u{}", i % 97, i % 89), &format!("u{}", i % 97), &format!("c-{i}")))
            .count();
        assert!(maybe < n / 20, "{maybe} of {n} new cmids answered maybe");
        // The parts are hashed apart: moving a character between them is another cmid.
        f.insert(f.slot("d:a:b", "a", "xy"));
        assert!(may(&f, "d:a:b", "a", "xy"));
        let moved = [("d:a:b", "ax", "y"), ("d:a:bx", "a", "y"), ("d:a:b", "", "axy")];
        assert!(moved.iter().filter(|(c, u, m)| may(&f, c, u, m)).count() < 3);
    }

    #[test]
    fn until_the_scan_ends_everything_may_be_stored() {
        let f = CmidFilter::new(1024).unwrap();
        assert!(may(&f, "d:a:b", "a", "never"));
        assert!(CmidFilter::new(7).is_none(), "under one word there is no filter");
    }

    #[test]
    fn the_scan_reads_every_row_across_chunks() {
        let dir = std::env::temp_dir().join(format!("sb-cmid-scan-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = Database::create(dir.join("t.redb")).unwrap();
        let tx = db.begin_write().unwrap();
        let n = SCAN_CHUNK as u64 * 2 + 7;
        {
            let mut t = tx.open_table(CMIDS).unwrap();
            for i in 0..n {
                t.insert(("d:a:b", if i % 2 == 0 { "a" } else { "b" }, format!("c{i}").as_str()), i + 1).unwrap();
            }
        }
        tx.commit().unwrap();
        let f = CmidFilter::new(1 << 20).unwrap();
        assert_eq!(f.fill(&db).unwrap(), Some(n));
        assert!(f.complete());
        for i in 0..n {
            assert!(may(&f, "d:a:b", if i % 2 == 0 { "a" } else { "b" }, &format!("c{i}")), "row {i}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
