//! The embedded store's write-ahead log of message appends: what makes an append durable between
//! two B-tree commits. A batch of appends costs one sequential `write` and one `fdatasync` here,
//! instead of rewriting a copy-on-write leaf in each of the message tables per batch.
//!
//! The log is a run of numbered **segments** (`appends-<n>.wal`, [`Segments`]): the log thread
//! writes the newest and starts the next one when it hands what it logged to a checkpoint; the
//! B-tree commit that holds a segment's records retires the segment.
//!
//! **Retired segments are recycled.** Up to [`SPARES`] of them are kept as `spare-<n>.wal` and a
//! new segment is a spare renamed, written over from its start: its blocks are allocated and its
//! length already covers what the next batches write, so a batch's `fdatasync` writes the batch
//! and flushes the disk, without a journal commit for a grown file (nor a file created, trimmed
//! and removed every checkpoint).
//!
//! A segment starts with [`MAGIC`] and its number (16 bytes). A record is `len: u32 LE`,
//! `hash: u64 LE` (xxh3 of the payload, seeded with the segment's number), then `len` payload
//! bytes. Reading stops at the first record that fails its length or hash check: a torn tail (a
//! crash in the middle of a write, never acknowledged, since a batch is acknowledged only after
//! its `fdatasync`), or the records of a recycled file's earlier life, whose hashes were seeded
//! with another number. Segments of older versions (no header, unseeded hashes) are still read.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::{Result, StorageError};

/// A record's header: length and hash.
const HEADER: usize = 12;
/// What a segment of this version starts with, before its number.
const MAGIC: &[u8; 8] = b"sbwal\x00\x02\x00";
/// [`MAGIC`] and the segment's number.
const SEGMENT_HEADER: usize = 16;
/// How many retired segments are kept for reuse.
pub(crate) const SPARES: usize = 2;
/// A retired segment longer than this is removed, not kept (a segment grows past its usual size
/// only while checkpoints fail).
pub(crate) const SPARE_MAX_BYTES: u64 = 64 << 20;

fn io_error(what: &str, e: std::io::Error) -> StorageError {
    StorageError::embedded(format!("write-ahead log: {what}: {e}"))
}

/// Appends `payload` framed as a record of a segment whose hashes are seeded with `seed` (its
/// number; 0 for the unheaded segments of older versions) to `out`.
pub(crate) fn frame(out: &mut Vec<u8>, payload: &[u8], seed: u64) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&xxh3_64_with_seed(payload, seed).to_le_bytes());
    out.extend_from_slice(payload);
}

/// The payloads of the intact records of segment `n`'s `bytes`, oldest first.
fn records_of(n: u64, bytes: &[u8]) -> Vec<Vec<u8>> {
    match bytes.strip_prefix(MAGIC) {
        // A segment of this version: a header naming another number is a recycled file whose
        // new header never reached the disk, so nothing of this segment did either.
        Some(rest) => match rest.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))) {
            Some(m) if m == n => parse(&rest[8..], n),
            _ => Vec::new(),
        },
        // An older version's segment.
        None => parse(bytes, 0),
    }
}

/// The payloads of the intact records at the start of `bytes`, hashed with `seed`.
fn parse(bytes: &[u8], seed: u64) -> Vec<Vec<u8>> {
    let mut records = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= HEADER {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let hash = u64::from_le_bytes(bytes[at + 4..at + HEADER].try_into().expect("8 bytes"));
        let Some(payload) = bytes.get(at + HEADER..at + HEADER + len) else { break };
        if xxh3_64_with_seed(payload, seed) != hash {
            break;
        }
        records.push(payload.to_vec());
        at += HEADER + len;
    }
    records
}

/// A log directory's files of one kind (`<prefix><n>.wal`) with their numbers, lowest first.
/// Segments include the single `appends.wal` of older versions (number 0).
fn numbered_files(dir: &Path, prefix: &str) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io_error("listing the segments", e))? {
        let path = entry.map_err(|e| io_error("listing the segments", e))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        let n = match name {
            "appends.wal" if prefix == SEGMENT => 0,
            _ => match name.strip_prefix(prefix).and_then(|r| r.strip_suffix(".wal")).map(str::parse) {
                Some(Ok(n)) => n,
                _ => continue,
            },
        };
        out.push((n, path));
    }
    out.sort_unstable();
    Ok(out)
}

const SEGMENT: &str = "appends-";
const SPARE: &str = "spare-";

/// The file `<prefix><n>.wal` of `dir` (`numbered_files` reads the number back).
fn numbered_path(dir: &Path, prefix: &str, n: u64) -> PathBuf {
    dir.join(format!("{prefix}{n:020}.wal"))
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    numbered_path(dir, SEGMENT, n)
}

/// Makes the creation, renaming or removal of files in `dir` durable.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_error("syncing the directory", e))
}

/// The segmented log of one directory; owned by the log thread.
pub(crate) struct Segments {
    dir: PathBuf,
    /// The number of the segment written now.
    n: u64,
    file: File,
    /// Where the next record goes: the end of the intact records written to this segment.
    len: u64,
}

impl Segments {
    /// Reads every segment in `dir`: the payloads of their intact records, oldest first, and the
    /// highest segment number found (0 if none).
    pub fn recover(dir: &Path) -> Result<(Vec<Vec<u8>>, u64)> {
        let mut records = Vec::new();
        let mut last = 0;
        for (n, path) in numbered_files(dir, SEGMENT)? {
            let bytes = std::fs::read(&path).map_err(|e| io_error("reading a segment", e))?;
            records.extend(records_of(n, &bytes));
            last = n;
        }
        Ok((records, last))
    }

    /// Starts segment `n` in `dir`: a spare renamed, or a new file. Its header is on disk and its
    /// name durable when this returns.
    pub fn start(dir: &Path, n: u64) -> Result<Self> {
        let path = segment_path(dir, n);
        let recycled = match numbered_files(dir, SPARE)?.into_iter().next() {
            Some((_, spare)) => match std::fs::rename(&spare, &path) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, spare = %spare.display(), "write-ahead log: spare segment not reused");
                    false
                }
            },
            None => false,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(!recycled)
            .open(&path)
            .map_err(|e| io_error("opening a new segment", e))?;
        let mut header = [0u8; SEGMENT_HEADER];
        header[..8].copy_from_slice(MAGIC);
        header[8..].copy_from_slice(&n.to_le_bytes());
        file.write_all_at(&header, 0).map_err(|e| io_error("writing a segment's header", e))?;
        file.sync_data().map_err(|e| io_error("fdatasync", e))?;
        sync_dir(dir)?;
        Ok(Self { dir: dir.to_owned(), n, file, len: SEGMENT_HEADER as u64 })
    }

    /// Appends `payload` framed as a record of the current segment to `out` (a batch written by
    /// [`Segments::append`]).
    pub fn frame(&self, out: &mut Vec<u8>, payload: &[u8]) {
        frame(out, payload, self.n);
    }

    /// Writes records framed by [`Segments::frame`] to the current segment and waits until they
    /// are on disk.
    pub fn append(&mut self, framed: &[u8]) -> Result<()> {
        let written = self.file.write_all_at(framed, self.len).map_err(|e| io_error("writing", e));
        match written.and_then(|()| self.file.sync_data().map_err(|e| io_error("fdatasync", e))) {
            Ok(()) => {
                self.len += framed.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Whatever part of the batch reached the file is not acknowledged: cut it off, so
                // no later batch of this segment (same seed) can end in front of its records.
                let _ = self.file.set_len(self.len);
                Err(e)
            }
        }
    }

    /// Starts the next segment; returns the number of the one before, whose records (and every
    /// older segment's) a checkpoint may then commit and retire with [`Segments::retire_through`].
    pub fn rotate(&mut self) -> Result<u64> {
        let next = Self::start(&self.dir, self.n + 1)?;
        Ok(std::mem::replace(self, next).n)
    }

    /// Retires the segments numbered up to `n` in `dir`, once a durable commit holds their
    /// records: kept as spares (up to [`SPARES`], segments of this version not longer than
    /// [`SPARE_MAX_BYTES`]) or removed. Not synced: a retirement lost in a crash only means
    /// records replayed again, and replaying changes nothing the B-trees hold already.
    pub fn retire_through(dir: &Path, n: u64) -> Result<()> {
        let mut spares = numbered_files(dir, SPARE)?.len();
        for (m, path) in numbered_files(dir, SEGMENT)? {
            if m > n {
                continue;
            }
            if spares < SPARES && recyclable(&path) {
                let spare = numbered_path(dir, SPARE, m);
                if std::fs::rename(&path, &spare).is_ok() {
                    spares += 1;
                    continue;
                }
            }
            std::fs::remove_file(&path).map_err(|e| io_error("removing a segment", e))?;
        }
        Ok(())
    }
}

/// Whether the segment at `path` may be kept as a spare: one of this version (only those carry a
/// header that tells their records from a later life's) and not overly long.
fn recyclable(path: &Path) -> bool {
    let Ok(file) = File::open(path) else { return false };
    let mut magic = [0u8; 8];
    let long = file.metadata().map_or(true, |m| m.len() > SPARE_MAX_BYTES);
    !long && file.read_exact_at(&mut magic, 0).is_ok() && &magic == MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sb-wal-{name}-{}", crate::contract::prefix()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn batch(s: &Segments, payloads: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in payloads {
            s.frame(&mut out, p);
        }
        out
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut out: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        out.sort();
        out
    }

    #[test]
    fn records_survive_a_restart_and_a_torn_tail_ends_them() {
        let dir = temp("torn");
        let mut s = Segments::start(&dir, 1).unwrap();
        s.append(&batch(&s, &[b"one", b"", b"three"])).unwrap();
        // a crash in the middle of the next batch: its record is only half there
        let torn = batch(&s, &[b"four, never acknowledged"]);
        s.file.write_all_at(&torn[..torn.len() - 5], s.len).unwrap();
        drop(s);
        let (records, last) = Segments::recover(&dir).unwrap();
        assert_eq!(records, vec![b"one".to_vec(), b"".to_vec(), b"three".to_vec()]);
        assert_eq!(last, 1);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_flipped_byte_ends_the_log_there() {
        let dir = temp("flip");
        let mut s = Segments::start(&dir, 1).unwrap();
        s.append(&batch(&s, &[b"good", b"bad"])).unwrap();
        drop(s);
        let path = segment_path(&dir, 1);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(Segments::recover(&dir).unwrap().0, vec![b"good".to_vec()]);
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A retired segment is reused, written over from its start, and what it held in its
    /// earlier life is never read as the new segment's.
    #[test]
    fn a_recycled_segment_shows_only_its_new_records() {
        let dir = temp("recycle");
        let mut s = Segments::start(&dir, 1).unwrap();
        let old: Vec<Vec<u8>> = (0..50).map(|i| format!("old record {i:04}").into_bytes()).collect();
        let old_refs: Vec<&[u8]> = old.iter().map(|r| r.as_slice()).collect();
        s.append(&batch(&s, &old_refs)).unwrap();
        assert_eq!(s.rotate().unwrap(), 1);
        Segments::retire_through(&dir, 1).unwrap();
        assert_eq!(names(&dir), vec![format!("{SEGMENT}{:020}.wal", 2), format!("{SPARE}{:020}.wal", 1)]);
        s.append(&batch(&s, &[b"second"])).unwrap();
        assert_eq!(s.rotate().unwrap(), 2);
        // segment 3 is the spare: as long as segment 1 was, its new records a prefix of it
        assert_eq!(names(&dir), vec![format!("{SEGMENT}{:020}.wal", 2), format!("{SEGMENT}{:020}.wal", 3)]);
        let len1 = std::fs::metadata(segment_path(&dir, 3)).unwrap().len();
        // the same size as old record 0, so the earlier life's next record starts right after
        s.append(&batch(&s, &[b"new record 0000"])).unwrap();
        assert!(len1 > s.len, "recycled without its blocks: {len1} <= {}", s.len);
        drop(s);
        let (records, last) = Segments::recover(&dir).unwrap();
        assert_eq!(records, vec![b"second".to_vec(), b"new record 0000".to_vec()]);
        assert_eq!(last, 3);
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A spare renamed to a segment whose new header never reached the disk holds nothing of
    /// that segment.
    #[test]
    fn a_segment_named_by_another_number_in_its_header_is_empty() {
        let dir = temp("renamed");
        let mut s = Segments::start(&dir, 4).unwrap();
        s.append(&batch(&s, &[b"of segment 4"])).unwrap();
        drop(s);
        std::fs::rename(segment_path(&dir, 4), segment_path(&dir, 7)).unwrap();
        let (records, last) = Segments::recover(&dir).unwrap();
        assert!(records.is_empty(), "{records:?}");
        assert_eq!(last, 7);
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Older versions' segments (no header, unseeded hashes; the single `appends.wal` before
    /// them) are read in order and removed when retired, never kept as spares.
    #[test]
    fn older_versions_segments_are_read_and_removed() {
        let dir = temp("older");
        let unheaded = |payloads: &[&[u8]]| {
            let mut out = Vec::new();
            for p in payloads {
                frame(&mut out, p, 0);
            }
            out
        };
        std::fs::write(dir.join("appends.wal"), unheaded(&[b"oldest"])).unwrap();
        std::fs::write(segment_path(&dir, 3), unheaded(&[b"older", b"old"])).unwrap();
        let (records, last) = Segments::recover(&dir).unwrap();
        assert_eq!(records, vec![b"oldest".to_vec(), b"older".to_vec(), b"old".to_vec()]);
        assert_eq!(last, 3);
        Segments::retire_through(&dir, last).unwrap();
        assert!(names(&dir).is_empty(), "{:?}", names(&dir));
        std::fs::remove_dir_all(&dir).ok();
    }

    /// At most [`SPARES`] retired segments are kept; the rest are removed.
    #[test]
    fn spares_are_bounded() {
        let dir = temp("spares");
        let mut s = Segments::start(&dir, 1).unwrap();
        for _ in 0..4 {
            s.append(&batch(&s, &[b"x"])).unwrap();
            s.rotate().unwrap();
        }
        Segments::retire_through(&dir, 4).unwrap();
        let spares = names(&dir).iter().filter(|n| n.starts_with(SPARE)).count();
        assert_eq!(spares, SPARES);
        assert_eq!(numbered_files(&dir, SEGMENT).unwrap().iter().map(|f| f.0).collect::<Vec<_>>(), vec![5]);
        std::fs::remove_dir_all(&dir).ok();
    }
}
