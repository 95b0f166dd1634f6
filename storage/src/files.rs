//! Uploaded files: the [`FileStore`] trait (bytes, who uploaded them, the conversations they
//! were sent in) and its all-in-one implementation, [`DirFiles`]: a directory under the data
//! dir with one file of bytes and one JSON record per upload, each written to a temporary name,
//! synced and renamed into place, so a crash leaves either the whole upload or none of it.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{Result, StorageError};

/// What is known of an uploaded file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMeta {
    /// Random and unguessable (the server picks it).
    pub id: String,
    /// The user who uploaded it.
    pub owner: String,
    /// The name the uploader gave it.
    pub name: String,
    /// The content type read from its bytes.
    pub mime: String,
    pub size: u64,
    /// Upload time (ms since the epoch).
    pub ts: u64,
}

/// Where uploaded files live.
#[async_trait]
pub trait FileStore: Send + Sync {
    /// Stores a new file under `meta.id` (a fresh id: an existing one is an error).
    async fn put_file(&self, meta: &FileMeta, bytes: Bytes) -> Result<()>;
    async fn file_meta(&self, id: &str) -> Result<Option<FileMeta>>;
    async fn file_bytes(&self, id: &str) -> Result<Option<Bytes>>;
    /// Records that the file was sent in `conv` (idempotent).
    async fn share_file(&self, id: &str, conv: &str) -> Result<()>;
    /// The conversations the file was sent in.
    async fn file_convs(&self, id: &str) -> Result<Vec<String>>;
}

/// A file id as the server makes them: 1–64 of `[A-Za-z0-9_-]` (so it is also a safe file name).
pub fn valid_file_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The record kept next to a file's bytes.
#[derive(Serialize, Deserialize)]
struct Record {
    meta: FileMeta,
    convs: Vec<String>,
}

/// Files in a directory: `<id>.bin` (the bytes) and `<id>.json` (a [`Record`]).
#[derive(Clone)]
pub struct DirFiles {
    dir: PathBuf,
    /// Serialises the read-modify-write of records (sharing).
    records: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl DirFiles {
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        Ok(Self { dir: dir.to_path_buf(), records: Default::default() })
    }

    fn path(&self, id: &str, ext: &str) -> Result<PathBuf> {
        if !valid_file_id(id) {
            return Err(StorageError::Corrupt(format!("bad file id {id:?}")));
        }
        Ok(self.dir.join(format!("{id}.{ext}")))
    }

    async fn read_record(&self, id: &str) -> Result<Option<Record>> {
        let path = self.path(id, "json")?;
        match tokio::fs::read(&path).await {
            Ok(b) => Ok(Some(serde_json::from_slice(&b)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path, e)),
        }
    }

    /// Writes `bytes` to `path` whole or not at all (temporary file, fsync, rename, fsync dir).
    async fn write_atomically(&self, path: PathBuf, bytes: Bytes) -> Result<()> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            use std::io::Write;
            let tmp = path.with_extension(format!("tmp{:08x}", rand::random::<u32>()));
            let mut f = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
            f.write_all(&bytes).and_then(|()| f.sync_all()).map_err(|e| io(&tmp, e))?;
            std::fs::rename(&tmp, &path).map_err(|e| io(&path, e))?;
            std::fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(|e| io(&dir, e))
        })
        .await
        .map_err(|e| StorageError::Task(e.to_string()))?
    }
}

fn io(path: &Path, e: std::io::Error) -> StorageError {
    StorageError::Files(format!("{}: {e}", path.display()), Some(Box::new(e)))
}

#[async_trait]
impl FileStore for DirFiles {
    async fn put_file(&self, meta: &FileMeta, bytes: Bytes) -> Result<()> {
        let _guard = self.records.lock().await;
        if self.read_record(&meta.id).await?.is_some() {
            return Err(StorageError::Files(format!("file {} exists", meta.id), None));
        }
        // The bytes first: a record never names bytes that are not there.
        self.write_atomically(self.path(&meta.id, "bin")?, bytes).await?;
        let record = Record { meta: meta.clone(), convs: Vec::new() };
        self.write_atomically(self.path(&meta.id, "json")?, Bytes::from(serde_json::to_vec(&record)?)).await
    }

    async fn file_meta(&self, id: &str) -> Result<Option<FileMeta>> {
        if !valid_file_id(id) {
            return Ok(None);
        }
        Ok(self.read_record(id).await?.map(|r| r.meta))
    }

    async fn file_bytes(&self, id: &str) -> Result<Option<Bytes>> {
        if !valid_file_id(id) || self.read_record(id).await?.is_none() {
            return Ok(None);
        }
        let path = self.path(id, "bin")?;
        match tokio::fs::read(&path).await {
            Ok(b) => Ok(Some(Bytes::from(b))),
            Err(e) => Err(io(&path, e)),
        }
    }

    async fn share_file(&self, id: &str, conv: &str) -> Result<()> {
        let _guard = self.records.lock().await;
        let Some(mut record) = self.read_record(id).await? else {
            return Err(StorageError::Files(format!("no file {id} to share"), None));
        };
        if record.convs.iter().any(|c| c == conv) {
            return Ok(());
        }
        record.convs.push(conv.to_owned());
        self.write_atomically(self.path(id, "json")?, Bytes::from(serde_json::to_vec(&record)?)).await
    }

    async fn file_convs(&self, id: &str) -> Result<Vec<String>> {
        if !valid_file_id(id) {
            return Ok(Vec::new());
        }
        Ok(self.read_record(id).await?.map(|r| r.convs).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_directory_meets_the_contract() {
        let dir = std::env::temp_dir().join(format!("sb-files-{:08x}", rand::random::<u32>()));
        let files = DirFiles::open(&dir).unwrap();
        crate::contract::files_contract(&files).await;
        // nothing half-written is left behind
        let names: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert!(names.iter().all(|n| n.ends_with(".bin") || n.ends_with(".json")), "{names:?}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn ids_are_safe_names() {
        assert!(valid_file_id("aZ09_-"));
        assert!(!valid_file_id(""));
        assert!(!valid_file_id("../etc/passwd"));
        assert!(!valid_file_id("a.b"));
        assert!(!valid_file_id(&"a".repeat(65)));
    }
}
