//! The embedded store's write-ahead log of message appends: what makes an append durable between
//! two B-tree commits. A batch of appends costs one sequential `write` and one `fdatasync` here,
//! instead of rewriting a copy-on-write leaf in each of the message tables per batch.
//!
//! The log is a run of numbered **segments** (`appends-<n>.wal`, [`Segments`]): the log thread
//! writes the newest and starts the next one when it hands what it logged to a checkpoint; the
//! B-tree commit that holds a segment's records removes the segment.
//!
//! A record is `len: u32 LE`, `hash: u64 LE` (xxh3 of the payload), then `len` payload bytes. A
//! torn tail (a crash in the middle of a write) fails its length or hash check, and reading stops
//! there: it was never acknowledged, since a batch is acknowledged only after its `fdatasync`.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::xxh3_64;

use crate::{Result, StorageError};

const HEADER: usize = 12;

/// The log file. Records are written at `len` by position, never through the file cursor, so a
/// failed write or truncation can never leave a gap before the next record.
pub(crate) struct Wal {
    file: File,
    len: u64,
}

fn io_error(what: &str, e: std::io::Error) -> StorageError {
    StorageError::embedded(format!("write-ahead log: {what}: {e}"))
}

impl Wal {
    /// Opens (or creates) the log at `path` and returns it with the payloads of its intact
    /// records, oldest first. A torn tail is cut off, so later appends follow the last intact
    /// record.
    pub fn open(path: &Path) -> Result<(Self, Vec<Vec<u8>>)> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| io_error("opening", e))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(|e| io_error("reading", e))?;
        let (records, intact) = parse(&bytes);
        if intact as usize != bytes.len() {
            tracing::warn!(
                kept = intact,
                dropped = bytes.len() - intact as usize,
                "write-ahead log: torn tail cut off"
            );
            file.set_len(intact).map_err(|e| io_error("cutting the torn tail", e))?;
        }
        Ok((Self { file, len: intact }, records))
    }

    /// Appends `payload` framed as a record to `out` (a batch written by [`Wal::append`]).
    pub fn frame(out: &mut Vec<u8>, payload: &[u8]) {
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&xxh3_64(payload).to_le_bytes());
        out.extend_from_slice(payload);
    }

    /// Writes framed records and waits until they are on disk.
    pub fn append(&mut self, framed: &[u8]) -> Result<()> {
        let written = self.file.write_all_at(framed, self.len).map_err(|e| io_error("writing", e));
        let synced = written.and_then(|()| self.file.sync_data().map_err(|e| io_error("fdatasync", e)));
        match synced {
            Ok(()) => {
                self.len += framed.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Whatever part of the batch reached the file is not acknowledged: cut it off
                // (the next write lands at `len` anyway; the writer empties the log next).
                let _ = self.file.set_len(self.len);
                Err(e)
            }
        }
    }

    /// Empties the log.
    #[cfg(test)]
    pub fn reset(&mut self) -> Result<()> {
        if self.len == 0 {
            return Ok(());
        }
        self.file.set_len(0).map_err(|e| io_error("truncating", e))?;
        self.len = 0;
        // Not synced: if the truncation is lost in a crash, replaying records the B-tree already
        // holds changes nothing (replay skips what is there).
        Ok(())
    }
}

/// The log's segment files in `dir`, oldest first: the single `appends.wal` of older versions
/// (number 0), then `appends-<n>.wal`.
fn segment_files(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io_error("listing the segments", e))? {
        let path = entry.map_err(|e| io_error("listing the segments", e))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        let n = match name {
            "appends.wal" => 0,
            _ => match name.strip_prefix("appends-").and_then(|r| r.strip_suffix(".wal")).map(str::parse) {
                Some(Ok(n)) => n,
                _ => continue,
            },
        };
        out.push((n, path));
    }
    out.sort_unstable();
    Ok(out)
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("appends-{n:020}.wal"))
}

/// Makes the creation or removal of files in `dir` durable.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_error("syncing the directory", e))
}

/// The segmented log of one directory; owned by the log thread.
pub(crate) struct Segments {
    dir: PathBuf,
    /// The number of the segment written now.
    n: u64,
    wal: Wal,
}

impl Segments {
    /// Reads every segment in `dir`: the payloads of their intact records, oldest first, and the
    /// highest segment number found (0 if none). A torn tail of a segment is cut off.
    pub fn recover(dir: &Path) -> Result<(Vec<Vec<u8>>, u64)> {
        let mut records = Vec::new();
        let mut last = 0;
        for (n, path) in segment_files(dir)? {
            records.extend(Wal::open(&path)?.1);
            last = n;
        }
        Ok((records, last))
    }

    /// Starts segment `n` in `dir` (empty).
    pub fn start(dir: &Path, n: u64) -> Result<Self> {
        let path = segment_path(dir, n);
        let wal = Wal::open(&path)?.0;
        wal.file.set_len(0).map_err(|e| io_error("emptying a new segment", e))?;
        sync_dir(dir)?;
        Ok(Self { dir: dir.to_owned(), n, wal: Wal { len: 0, ..wal } })
    }

    /// Appends framed records to the current segment and waits until they are on disk.
    pub fn append(&mut self, framed: &[u8]) -> Result<()> {
        self.wal.append(framed)
    }

    /// Starts the next segment; returns the number of the one before, whose records (and every
    /// older segment's) a checkpoint may then commit and remove with [`Segments::remove_through`].
    pub fn rotate(&mut self) -> Result<u64> {
        let next = Self::start(&self.dir, self.n + 1)?;
        Ok(std::mem::replace(self, next).n)
    }

    /// Removes the segments numbered up to `n` in `dir`, once a durable commit holds their
    /// records. Not synced: a removal lost in a crash only means records replayed again, and
    /// replaying changes nothing the B-trees hold already.
    pub fn remove_through(dir: &Path, n: u64) -> Result<()> {
        for (m, path) in segment_files(dir)? {
            if m <= n {
                std::fs::remove_file(&path).map_err(|e| io_error("removing a segment", e))?;
            }
        }
        Ok(())
    }
}

/// The payloads of the intact records at the start of `bytes`, and the length they span.
fn parse(bytes: &[u8]) -> (Vec<Vec<u8>>, u64) {
    let mut records = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= HEADER {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let hash = u64::from_le_bytes(bytes[at + 4..at + HEADER].try_into().expect("8 bytes"));
        let Some(payload) = bytes.get(at + HEADER..at + HEADER + len) else { break };
        if xxh3_64(payload) != hash {
            break;
        }
        records.push(payload.to_vec());
        at += HEADER + len;
    }
    (records, at as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("sb-wal-{name}-{}", crate::contract::prefix()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("wal")
    }

    #[test]
    fn records_survive_reopening_and_a_torn_tail_is_cut() {
        let path = temp("torn");
        let (mut wal, none) = Wal::open(&path).unwrap();
        assert!(none.is_empty());
        let mut batch = Vec::new();
        Wal::frame(&mut batch, b"one");
        Wal::frame(&mut batch, b"");
        Wal::frame(&mut batch, b"three");
        wal.append(&batch).unwrap();
        drop(wal);
        // a crash in the middle of the next batch: its record is only half there
        let mut torn = Vec::new();
        Wal::frame(&mut torn, b"four, never acknowledged");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&torn[..torn.len() - 5]).unwrap();
        drop(f);
        let (mut wal, records) = Wal::open(&path).unwrap();
        assert_eq!(records, vec![b"one".to_vec(), b"".to_vec(), b"three".to_vec()]);
        // the next append follows the last intact record
        let mut more = Vec::new();
        Wal::frame(&mut more, b"five");
        wal.append(&more).unwrap();
        drop(wal);
        let (mut wal, records) = Wal::open(&path).unwrap();
        assert_eq!(records.len(), 4);
        assert_eq!(records[3], b"five");
        wal.reset().unwrap();
        drop(wal);
        assert!(Wal::open(&path).unwrap().1.is_empty());
        std::fs::remove_dir_all(path.parent().unwrap()).ok();
    }

    #[test]
    fn a_flipped_byte_ends_the_log_there() {
        let path = temp("flip");
        let (mut wal, _) = Wal::open(&path).unwrap();
        let mut batch = Vec::new();
        Wal::frame(&mut batch, b"good");
        Wal::frame(&mut batch, b"bad");
        wal.append(&batch).unwrap();
        drop(wal);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(Wal::open(&path).unwrap().1, vec![b"good".to_vec()]);
        std::fs::remove_dir_all(path.parent().unwrap()).ok();
    }
}
