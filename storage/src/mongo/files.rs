//! [`FileStore`] on MongoDB: the bytes in `file_chunks` (`_id` `id\0nnnnnnnn`; file, n, data,
//! [`CHUNK`] bytes each, well under the 16 MiB document limit), what is known of a file in
//! `files` (`_id` id; owner, name, mime, size, ts, convs). The chunks are written first, the
//! record last: a file is there once its record is, and a crash mid-upload leaves only chunks
//! no record names.

use async_trait::async_trait;
use bytes::Bytes;
use mongodb::bson::spec::BinarySubtype;
use mongodb::bson::{doc, Binary, Bson, Document};

use super::{collect, int, key, number, text, MongoStore};
use crate::files::{FileMeta, FileStore};
use crate::{Result, StorageError};

/// Bytes per chunk document.
const CHUNK: usize = 256 * 1024;

fn chunk_id(id: &str, n: usize) -> String {
    key(&[id, &format!("{n:08}")])
}

#[async_trait]
impl FileStore for MongoStore {
    async fn put_file(&self, meta: &FileMeta, bytes: Bytes) -> Result<()> {
        let chunks: Vec<Document> = bytes
            .chunks(CHUNK)
            .enumerate()
            .map(|(n, c)| {
                doc! {
                    "_id": chunk_id(&meta.id, n), "file": &meta.id, "n": n as i64,
                    "data": Binary { subtype: BinarySubtype::Generic, bytes: c.to_vec() },
                }
            })
            .collect();
        for batch in chunks.chunks(16) {
            self.file_chunks.insert_many(batch.to_vec()).await?;
        }
        let record = doc! {
            "_id": &meta.id, "owner": &meta.owner, "name": &meta.name, "mime": &meta.mime,
            "size": int(meta.size), "ts": int(meta.ts), "convs": Vec::<String>::new(),
        };
        self.files.insert_one(record).await?;
        Ok(())
    }

    async fn file_meta(&self, id: &str) -> Result<Option<FileMeta>> {
        let Some(d) = self.files.find_one(doc! { "_id": id }).await? else { return Ok(None) };
        Ok(Some(FileMeta {
            id: id.to_owned(),
            owner: text(&d, "owner")?,
            name: text(&d, "name")?,
            mime: text(&d, "mime")?,
            size: number(&d, "size")?,
            ts: number(&d, "ts")?,
        }))
    }

    async fn file_bytes(&self, id: &str) -> Result<Option<Bytes>> {
        let Some(meta) = self.file_meta(id).await? else { return Ok(None) };
        let chunks = collect(self.file_chunks.find(doc! { "file": id }).sort(doc! { "n": 1 }).await?).await?;
        let mut out = Vec::with_capacity(meta.size as usize);
        for c in &chunks {
            match c.get("data") {
                Some(Bson::Binary(b)) => out.extend_from_slice(&b.bytes),
                other => return Err(super::corrupt(format_args!("file chunk of {id}: {other:?}"))),
            }
        }
        // Only the upload's own chunks count (the record is written last, so they are all there).
        if out.len() as u64 != meta.size {
            return Err(super::corrupt(format_args!("file {id} holds {} bytes, not {}", out.len(), meta.size)));
        }
        Ok(Some(out.into()))
    }

    async fn share_file(&self, id: &str, conv: &str) -> Result<()> {
        let r = self.files.update_one(doc! { "_id": id }, doc! { "$addToSet": { "convs": conv } }).await?;
        if r.matched_count == 0 {
            return Err(StorageError::Files(format!("no file {id} to share"), None));
        }
        Ok(())
    }

    async fn file_convs(&self, id: &str) -> Result<Vec<String>> {
        let Some(d) = self.files.find_one(doc! { "_id": id }).await? else { return Ok(Vec::new()) };
        let mut convs: Vec<String> = d
            .get_array("convs")
            .map(|a| a.iter().filter_map(|c| c.as_str().map(String::from)).collect())
            .unwrap_or_default();
        convs.sort();
        Ok(convs)
    }
}
