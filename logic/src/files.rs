//! Files over HTTP: `POST /v1/files` uploads one (authenticated, bounded in bytes, its content
//! type read from its bytes and checked against the one declared), `GET /v1/files/{id}` serves it
//! to its uploader and to the members of every conversation it was sent in. A media message
//! whose `url` names one of these files records its conversation ([`attach`]), which is what
//! lets the members download it.

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use switchboard_storage::files::{valid_file_id, FileMeta};
use switchboard_storage::now_ms;

use crate::auth::{random_token, Claims};
use crate::error::ApiError;
use crate::http::Http;
use crate::Logic;

/// Where files are served: `/v1/files/<id>`.
pub const URL_PREFIX: &str = "/v1/files/";
/// Longest file name kept, in characters.
const MAX_NAME: usize = 255;
/// Headers of every download: nothing in a file runs as this origin's page.
const DOWNLOAD_CSP: &str = "default-src 'none'; sandbox";

/// The content type of `bytes`, from their first bytes: the common image, audio, video and
/// document formats, UTF-8 text, else `application/octet-stream`. Never `text/html` or SVG: a
/// file is never served as something a browser would run.
pub fn sniff(b: &[u8]) -> &'static str {
    let at = |off: usize, sig: &[u8]| b.len() >= off + sig.len() && &b[off..off + sig.len()] == sig;
    if at(0, b"\x89PNG\r\n\x1a\n") {
        "image/png"
    } else if at(0, b"\xff\xd8\xff") {
        "image/jpeg"
    } else if at(0, b"GIF87a") || at(0, b"GIF89a") {
        "image/gif"
    } else if at(0, b"RIFF") && at(8, b"WEBP") {
        "image/webp"
    } else if at(0, b"RIFF") && at(8, b"WAVE") {
        "audio/wav"
    } else if at(0, b"%PDF-") {
        "application/pdf"
    } else if at(4, b"ftypqt") {
        "video/quicktime"
    } else if at(4, b"ftypM4A") {
        "audio/mp4"
    } else if at(4, b"ftyp") {
        "video/mp4"
    } else if at(0, b"\x1a\x45\xdf\xa3") {
        "video/webm"
    } else if at(0, b"OggS") {
        "audio/ogg"
    } else if at(0, b"ID3") || (b.len() >= 2 && b[0] == 0xff && b[1] & 0xe0 == 0xe0) {
        "audio/mpeg"
    } else if at(0, b"PK\x03\x04") {
        "application/zip"
    } else if !b.contains(&0) && std::str::from_utf8(b).is_ok() {
        "text/plain; charset=utf-8"
    } else {
        "application/octet-stream"
    }
}

/// The user a request speaks for: a Bearer access token, or `?token=` (for `<img src>`).
async fn caller(logic: &Logic, headers: &HeaderMap, query_token: Option<&str>) -> Result<Claims, ApiError> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match bearer.or(query_token) {
        Some(token) => logic.authenticate(token).await,
        None => Err(ApiError::new("unauthorized", "a Bearer access token (or ?token=) is required")),
    }
}

/// Whether `user` may download the file: its uploader, or a member of a conversation it was
/// sent in.
async fn may_read(logic: &Logic, user: &str, meta: &FileMeta) -> Result<bool, ApiError> {
    if meta.owner == user {
        return Ok(true);
    }
    for conv in logic.stores.files.file_convs(&meta.id).await? {
        if crate::ops::require_member(logic, &conv, user).await.is_ok() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The file id a media message's `url` names, if it is one of this server's files (a path
/// `/v1/files/<id>`, or a full URL ending in one).
fn file_id(url: &str) -> Option<&str> {
    let path = match url.find("://") {
        Some(i) => &url[i + 3 + url[i + 3..].find('/')?..],
        None => url,
    };
    path.strip_prefix(URL_PREFIX).filter(|id| valid_file_id(id))
}

/// Before a media message is stored in `conv`: when its `url` names one of this server's files,
/// the sender must be allowed to read it (`bad_request` for an unknown file, `forbidden`
/// otherwise), and the conversation is recorded, so its members may download it.
pub async fn attach(logic: &Logic, user: &str, conv: &str, kind: &str, body: &Value) -> Result<(), ApiError> {
    if !matches!(kind, "image" | "file" | "audio" | "video") {
        return Ok(());
    }
    let Some(id) = body.get("url").and_then(Value::as_str).and_then(file_id) else { return Ok(()) };
    let Some(meta) = logic.stores.files.file_meta(id).await? else {
        return Err(ApiError::bad_request(format!("no file `{id}`")));
    };
    if !may_read(logic, user, &meta).await? {
        return Err(ApiError::forbidden(format!("file `{id}` is not yours to send")));
    }
    logic.stores.files.share_file(id, conv).await?;
    Ok(())
}

#[derive(Deserialize)]
pub(crate) struct UploadQuery {
    name: Option<String>,
}

/// `POST /v1/files?name=<name>`: the body is the file, with its `Content-Length`.
pub(crate) async fn upload(
    State(h): State<Http>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Query(q): Query<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let logic = &h.logic;
    let claims = caller(logic, &headers, None).await?;
    let max = logic.config.max_file_bytes;
    let len: u64 = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| ApiError::bad_request("an upload needs its Content-Length"))?;
    if len > max {
        return Err(ApiError::new("too_large", format!("files are at most {max} bytes")));
    }
    if len == 0 {
        return Err(ApiError::bad_request("the file is empty"));
    }
    let name = q.name.as_deref().map(str::trim).unwrap_or("file");
    if name.is_empty()
        || name.chars().count() > MAX_NAME
        || name.chars().any(|c| c.is_control() || c == '/' || c == '\\')
    {
        return Err(ApiError::bad_request(format!("name: 1-{MAX_NAME} characters, no slashes or control characters")));
    }
    logic.limit_request(&claims.sub, &peer.ip().to_string())?;
    let _held = logic.file_buffer(len).await?;
    let bytes = axum::body::to_bytes(body, len as usize)
        .await
        .map_err(|_| ApiError::bad_request("the body is longer than its Content-Length"))?;
    if bytes.len() as u64 != len {
        return Err(ApiError::bad_request("the body is shorter than its Content-Length"));
    }
    let mime = sniff(&bytes);
    let declared = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or_default().trim().to_ascii_lowercase())
        .filter(|d| !d.is_empty() && d != "application/octet-stream");
    if let Some(d) = declared {
        if d != mime.split(';').next().unwrap_or_default() {
            return Err(ApiError::bad_request(format!("declared as {d}, but the bytes are {mime}")));
        }
    }
    let id = random_token(18);
    let meta = FileMeta {
        id: id.clone(),
        owner: claims.sub,
        name: name.to_owned(),
        mime: mime.to_owned(),
        size: len,
        ts: now_ms(),
    };
    logic.stores.files.put_file(&meta, bytes).await?;
    let url = format!("{URL_PREFIX}{id}");
    let reply = json!({"file": id, "url": url, "name": meta.name, "mime": meta.mime, "size": meta.size});
    Ok((StatusCode::CREATED, Json(reply)).into_response())
}

#[derive(Deserialize)]
pub(crate) struct DownloadQuery {
    token: Option<String>,
}

/// `GET /v1/files/{id}`.
pub(crate) async fn download(
    State(h): State<Http>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Path(id): Path<String>,
    Query(q): Query<DownloadQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let logic = &h.logic;
    let claims = caller(logic, &headers, q.token.as_deref()).await?;
    logic.limit_request(&claims.sub, &peer.ip().to_string())?;
    let not_found = || ApiError::new("not_found", format!("no file `{id}`"));
    let meta = logic.stores.files.file_meta(&id).await?.ok_or_else(not_found)?;
    if !may_read(logic, &claims.sub, &meta).await? {
        return Err(ApiError::forbidden("only the uploader and members of a conversation it was sent in"));
    }
    let room = logic.file_buffer(meta.size).await?;
    let bytes = logic.stores.files.file_bytes(&id).await?.ok_or_else(not_found)?;
    let inline = ["image/", "audio/", "video/"].iter().any(|p| meta.mime.starts_with(p));
    let ascii: String =
        meta.name.chars().map(|c| if c.is_ascii_alphanumeric() || ".-_ ".contains(c) { c } else { '_' }).collect();
    let disposition = format!(
        "{}; filename=\"{ascii}\"; filename*=UTF-8''{}",
        if inline { "inline" } else { "attachment" },
        percent(&meta.name)
    );
    let headers = [
        (header::CONTENT_TYPE, meta.mime.clone()),
        (header::CONTENT_DISPOSITION, disposition),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
        (header::CONTENT_SECURITY_POLICY, DOWNLOAD_CSP.to_owned()),
        (header::CACHE_CONTROL, "private, max-age=3600".to_owned()),
    ];
    Ok((headers, Body::new(Held { rest: bytes, _room: room })).into_response())
}

/// Bytes handed to the client per frame.
const CHUNK: usize = 64 * 1024;

/// A download's body: it keeps the file's room in `file_buffer_bytes` until the server has
/// taken its last chunk, so slow readers cannot hold file bytes beyond that budget.
struct Held {
    rest: bytes::Bytes,
    _room: tokio::sync::OwnedSemaphorePermit,
}

impl http_body::Body for Held {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        if self.rest.is_empty() {
            return std::task::Poll::Ready(None);
        }
        let n = self.rest.len().min(CHUNK);
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(self.rest.split_to(n)))))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.rest.len() as u64)
    }
}

/// RFC 5987 percent-encoding of a file name.
fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_come_from_the_bytes() {
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"), "image/png");
        assert_eq!(sniff(b"\xff\xd8\xff\xe0\0\x10JFIF"), "image/jpeg");
        assert_eq!(sniff(b"GIF89a..."), "image/gif");
        assert_eq!(sniff(b"RIFF\0\0\0\0WEBPVP8 "), "image/webp");
        assert_eq!(sniff(b"%PDF-1.7\n"), "application/pdf");
        assert_eq!(sniff(b"\0\0\0\x18ftypmp42"), "video/mp4");
        assert_eq!(sniff(b"OggS\0\x02"), "audio/ogg");
        assert_eq!(sniff("plain text, ünïcode".as_bytes()), "text/plain; charset=utf-8");
        assert_eq!(sniff(b"<html><script>alert(1)</script>"), "text/plain; charset=utf-8");
        assert_eq!(sniff(b"\0\x01\x02\xfe"), "application/octet-stream");
    }

    #[test]
    fn only_this_servers_file_urls_name_files() {
        assert_eq!(file_id("/v1/files/abc_D-9"), Some("abc_D-9"));
        assert_eq!(file_id("https://chat.example/v1/files/abc"), Some("abc"));
        assert_eq!(file_id("https://cdn.example/img/abc.png"), None);
        assert_eq!(file_id("/v1/files/../secret"), None);
        assert_eq!(file_id("/v1/files/"), None);
        assert_eq!(file_id("https://host"), None);
    }

    #[test]
    fn names_are_percent_encoded() {
        assert_eq!(percent("a b/ü.png"), "a%20b%2F%C3%BC.png");
    }
}
