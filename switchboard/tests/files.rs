//! File upload and download end to end through real sockets: the uploader and the members of a
//! conversation the file was sent in may download it, nobody else; oversized, mislabelled and
//! unauthenticated uploads are refused; the type served is the one read from the bytes.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;

use common::*;
use serde_json::{json, Value};

fn json_of(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or_else(|_| panic!("JSON expected: {}", String::from_utf8_lossy(body)))
}

fn png(len: usize) -> Vec<u8> {
    let mut b = b"\x89PNG\r\n\x1a\n".to_vec();
    b.extend((0..len - 8).map(|i| (i % 251) as u8));
    b
}

fn upload(http: SocketAddr, token: &str, name: &str, mime: &str, bytes: &[u8]) -> (u16, Value) {
    let auth = format!("Bearer {token}");
    let headers = [("Authorization", auth.as_str()), ("Content-Type", mime)];
    let (status, _, body) = http_raw(http, "POST", &format!("/v1/files?name={name}"), &headers, bytes);
    (status, json_of(&body))
}

fn download(http: SocketAddr, token: &str, url: &str) -> (u16, HashMap<String, String>, Vec<u8>) {
    http_raw(http, "GET", url, &[("Authorization", &format!("Bearer {token}"))], b"")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_reach_the_members_of_their_conversations_only() {
    with_node(
        "files",
        |s| s.max_file_bytes = Some(64 * 1024),
        |http, ws| {
            let (mut alice, mut bob) = friends(http, ws, "alice", "bob");
            register(http, "carol");
            let token = |user: &str| login(http, user, "f1")["access_token"].as_str().unwrap().to_string();
            let (ta, tb, tc) = (token("alice"), token("bob"), token("carol"));

            // an upload: the type is read from the bytes and checked against the declared one
            let cat = png(40_000);
            let (status, up) = upload(http, &ta, "cat%20%C3%BC.png", "image/png", &cat);
            assert_eq!(status, 201, "{up}");
            let url = up["url"].as_str().unwrap().to_string();
            assert_eq!(
                (up["mime"].as_str(), up["size"].as_u64(), up["name"].as_str()),
                (Some("image/png"), Some(40_000), Some("cat ü.png"))
            );
            assert_eq!(url, format!("/v1/files/{}", up["file"].as_str().unwrap()));
            let (status, e) = upload(http, &ta, "x.png", "image/png", b"\xff\xd8\xff\xe0 a jpeg in disguise");
            assert_eq!((status, e["code"].as_str()), (400, Some("bad_request")), "mislabelled: {e}");
            let (status, e) = upload(http, &ta, "page.html", "text/html", b"<html><script>alert(1)</script></html>");
            assert_eq!((status, e["code"].as_str()), (400, Some("bad_request")), "HTML is never taken as HTML: {e}");
            let (status, e) = upload(http, &ta, "big.png", "image/png", &png(64 * 1024 + 1));
            assert_eq!((status, e["code"].as_str()), (400, Some("too_large")), "{e}");
            let (status, e) = upload(http, &ta, "empty", "", b"");
            assert_eq!((status, e["code"].as_str()), (400, Some("bad_request")), "{e}");
            let (status, _, body) = http_raw(http, "POST", "/v1/files?name=x", &[], b"no token");
            assert_eq!((status, json_of(&body)["code"].as_str()), (401, Some("unauthorized")));
            let (status, _, body) =
                http_raw(http, "POST", "/v1/files?name=x", &[("Authorization", "Bearer nonsense")], b"x");
            assert_eq!((status, json_of(&body)["code"].as_str()), (401, Some("bad_token")));

            // the uploader reads it back; others may not, until it is sent to them
            let (status, headers, body) = download(http, &ta, &url);
            assert_eq!((status, body == cat), (200, true));
            assert_eq!(headers["content-type"], "image/png");
            assert_eq!(headers["x-content-type-options"], "nosniff");
            assert!(headers["content-disposition"].starts_with("inline"), "{headers:?}");
            assert!(headers["content-disposition"].contains("UTF-8''cat%20%C3%BC.png"), "{headers:?}");
            assert_eq!(download(http, &tb, &url).0, 403);

            // sent in a message: the recipient may download it (also with ?token= for <img src>)
            let media = json!({"url": url, "name": "cat ü.png", "size": 40_000, "mime": "image/png"});
            alice.ok("send", json!({"to": "bob", "cmid": "f1", "type": "image", "body": media}));
            assert_eq!(bob.push("msg")["msg"]["body"]["url"], url.as_str());
            let (status, _, got) = download(http, &tb, &url);
            assert_eq!((status, got == cat), (200, true));
            let (status, _, got) = http_raw(http, "GET", &format!("{url}?token={tb}"), &[], b"");
            assert_eq!((status, got == cat), (200, true));
            // an outsider may not, nor can anyone without a token
            let (status, _, body) = download(http, &tc, &url);
            assert_eq!((status, json_of(&body)["code"].as_str()), (403, Some("forbidden")));
            assert_eq!(http_raw(http, "GET", &url, &[], b"").0, 401);
            let (status, _, body) = download(http, &ta, "/v1/files/nosuchfile");
            assert_eq!((status, json_of(&body)["code"].as_str()), (404, Some("not_found")));

            // a file someone else keeps private cannot be sent on, nor one that does not exist
            let (_, secret) = upload(http, &tc, "secret.txt", "text/plain", b"carol's notes");
            assert_eq!(secret["mime"], "text/plain; charset=utf-8");
            let leak = json!({"url": secret["url"], "name": "s", "size": 13, "mime": "text/plain"});
            bob.err("send", json!({"to": "alice", "cmid": "f2", "type": "file", "body": leak}), "forbidden");
            let ghost = json!({"url": "/v1/files/nosuchfile", "name": "g", "size": 1, "mime": "text/plain"});
            bob.err("send", json!({"to": "alice", "cmid": "f3", "type": "file", "body": ghost}), "bad_request");
            assert_eq!(download(http, &ta, secret["url"].as_str().unwrap()).0, 403);
            // a recipient may pass a file on: bob forwards the cat to carol once they are friends
            let mut carol = Client::login(http, ws, "carol", "c1");
            befriend(&mut bob, &mut carol, "carol", "bob");
            bob.ok("send", json!({"to": "carol", "cmid": "f4", "type": "image", "body": media}));
            let (status, _, got) = download(http, &tc, &url);
            assert_eq!((status, got == cat), (200, true));
            // text is served as text, never as a page
            let (_, headers, got) = download(http, &tc, secret["url"].as_str().unwrap());
            assert_eq!(
                (headers["content-type"].as_str(), got.as_slice()),
                ("text/plain; charset=utf-8", &b"carol's notes"[..])
            );
            assert!(headers["content-disposition"].starts_with("attachment"));
            assert!(headers["content-security-policy"].contains("sandbox"));
            // downloads count against the user's request bucket (100 at once by default)
            let statuses: Vec<u16> = (0..150).map(|_| download(http, &tc, &url).0).collect();
            assert!(statuses.iter().take(50).all(|s| *s == 200), "{statuses:?}");
            assert!(statuses.contains(&429), "a burst of downloads is rate-limited: {statuses:?}");
        },
    )
    .await;
}
