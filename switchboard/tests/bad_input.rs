//! Bad input over real sockets gets the documented error, and neither the
//! connection (where the protocol keeps it open) nor the process dies.

mod common;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_errors_are_documented_and_survivable() {
    let dir = temp_dir("bad");
    let node = start(&dir).await;
    let (http_addr, ws) = (node.http_addr(), node.ws_addr());
    blocking(move || {
        register(http_addr, "dave");
        let mut c = Client::login(http_addr, ws, "dave", "d1");

        c.send_text("{not json");
        let e = c.read().unwrap();
        assert_eq!((e["op"].as_str(), e["code"].as_str()), (Some("error"), Some("bad_request")));
        c.send_text("[1,2,3]");
        assert_eq!(c.read().unwrap()["code"], "bad_request");
        c.send_text(r#"{"rid": 77}"#);
        let e = c.read().unwrap();
        assert_eq!((e["code"].as_str(), e["rid"].as_u64()), (Some("bad_request"), Some(77)));
        c.err("no.such.op", json!({}), "unknown_op");
        c.err("send", json!({"to": "x"}), "bad_request");
        c.err("send", json!({"to": "x", "cmid": "", "type": "text", "body": "b"}), "bad_request");
        c.err("send", json!({"to": "x", "cmid": "1", "type": "sticker", "body": "b"}), "bad_request");
        c.err("history", json!({"conv": 5}), "bad_request");
        c.err("auth", json!({"token": "x"}), "bad_request");
        c.ok("ping", json!({}));

        // oversize frame: too_large, then closed
        let big = json!({"op": "send", "rid": 1, "to": "x", "cmid": "big", "type": "text", "body": "x".repeat(20_000)});
        c.send_text(&big.to_string());
        let e = c.read().expect("error frame before close");
        assert_eq!(e["code"], "too_large");
        assert!(c.read().is_none(), "closed after too_large");

        // ops before auth
        let mut anon = Client::connect(ws);
        anon.err("send", json!({"to": "dave", "cmid": "1", "type": "text", "body": "b"}), "unauthorized");
        anon.ok("ping", json!({}));
        anon.err("auth", json!({}), "bad_request");
        anon.err("auth", json!({"token": "garbage.token.here"}), "bad_token");
        assert!(anon.read().is_none(), "closed after bad_token");

        // silence before auth: auth_timeout, then closed
        let mut slow = Client::connect(ws);
        let e = slow.read().expect("auth_timeout frame");
        assert_eq!(e["code"], "auth_timeout");
        assert!(slow.read().is_none());

        // the process still serves
        let mut again = Client::login(http_addr, ws, "dave", "d1");
        again.ok("ping", json!({}));
    })
    .await;
    node.stop().await;
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_api_accounts_and_tokens() {
    let dir = temp_dir("http");
    let node = start(&dir).await;
    let (http_addr, ws) = (node.http_addr(), node.ws_addr());
    blocking(move || {
        let reg = |body| http(http_addr, "POST", "/v1/auth/register", Some(body), None);
        assert_eq!(reg(json!({"username": "erin", "password": "password123", "nickname": "Erin"})).0, 201);
        let (st, e) = reg(json!({"username": "erin", "password": "password123"}));
        assert_eq!((st, e["code"].as_str()), (409, Some("user_exists")));
        assert_eq!(reg(json!({"username": "Bad Name", "password": "password123"})).1["code"], "bad_request");
        assert_eq!(reg(json!({"username": "frank", "password": "short"})).0, 400);
        assert_eq!(reg(json!({"username": "frank"})).0, 400);
        let (st, _) = http(http_addr, "POST", "/v1/auth/register", None, None);
        assert_eq!(st, 400, "empty body");

        let (st, e) = http(
            http_addr,
            "POST",
            "/v1/auth/login",
            Some(json!({"username": "erin", "password": "wrongpass1"})),
            None,
        );
        assert_eq!((st, e["code"].as_str()), (401, Some("bad_credentials")));
        let (st, _) = http(
            http_addr,
            "POST",
            "/v1/auth/login",
            Some(json!({"username": "nobody", "password": "wrongpass1"})),
            None,
        );
        assert_eq!(st, 401);

        let l = login(http_addr, "erin", "e1");
        assert!(l["expires_in"].as_u64().unwrap() > 0);
        let r1 = l["refresh_token"].as_str().unwrap().to_string();

        // refresh rotates; the new access token works on the socket
        let (st, r) = http(http_addr, "POST", "/v1/auth/refresh", Some(json!({"refresh_token": r1})), None);
        assert_eq!(st, 200, "{r}");
        let access2 = r["access_token"].as_str().unwrap().to_string();
        let mut c = Client::connect(ws);
        c.ok("auth", json!({"token": access2}));
        // reusing the rotated-out token revokes the session
        let (st, e) = http(http_addr, "POST", "/v1/auth/refresh", Some(json!({"refresh_token": r1})), None);
        assert_eq!((st, e["code"].as_str()), (401, Some("bad_token")));
        // and ends the session's sockets
        let k = c.read().expect("kick before close");
        assert_eq!((k["op"].as_str(), k["reason"].as_str()), (Some("kick"), Some("session revoked")), "{k}");
        assert!(c.read().is_none(), "the revoked session's socket is closed");
        let (st, _) =
            http(http_addr, "POST", "/v1/auth/refresh", Some(json!({"refresh_token": r["refresh_token"]})), None);
        assert_eq!(st, 401, "the whole session is revoked after reuse");
        let mut c2 = Client::connect(ws);
        c2.err("auth", json!({"token": access2}), "bad_token");

        // logout revokes the session's access tokens
        let l = login(http_addr, "erin", "e2");
        let access = l["access_token"].as_str().unwrap();
        let mut open = Client::connect(ws);
        open.ok("auth", json!({ "token": access }));
        let other = login(http_addr, "erin", "e3")["access_token"].as_str().unwrap().to_string();
        let mut other_session = Client::connect(ws);
        other_session.ok("auth", json!({ "token": other }));
        assert_eq!(http(http_addr, "POST", "/v1/auth/logout", None, None).1["code"], "unauthorized");
        assert_eq!(http(http_addr, "POST", "/v1/auth/logout", None, Some(access)).0, 204);
        let k = open.read().expect("kick before close");
        assert_eq!((k["op"].as_str(), k["reason"].as_str()), (Some("kick"), Some("signed out")));
        assert!(open.read().is_none(), "the signed-out session's socket is closed");
        other_session.ok("ping", json!({}));
        assert_eq!(http(http_addr, "POST", "/v1/auth/logout", None, Some(access)).0, 401);
        let mut c3 = Client::connect(ws);
        c3.err("auth", json!({"token": access}), "bad_token");

        // discovery, health, metrics
        let (st, g) = http(http_addr, "GET", "/v1/gateways", None, None);
        assert_eq!(st, 200);
        assert_eq!(g["gateways"][0]["ws"], format!("ws://{ws}/ws"));
        assert_eq!(http(http_addr, "GET", "/healthz", None, None).0, 200);
        let (st, m) = http(http_addr, "GET", "/metrics", None, None);
        assert_eq!(st, 200);
        let m = m.as_str().unwrap().to_string();
        for name in [
            "switchboard_gateway_connections",
            "switchboard_gateway_frames_in_total",
            "switchboard_gateway_frames_out_total",
            "switchboard_logic_sends_total",
            "switchboard_logic_errors_total",
        ] {
            assert!(m.contains(name), "{name} missing from /metrics:\n{m}");
        }
        assert_eq!(http(http_addr, "GET", "/nope", None, None).0, 404);
    })
    .await;
    node.stop().await;
    std::fs::remove_dir_all(&dir).ok();
}
