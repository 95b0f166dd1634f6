//! Session lifecycle from outside: sessions whose refresh token expired are deleted with their
//! token hashes (after the pruner ran, the old refresh token is unknown, not merely expired), and
//! a revoked session stops being served even when no kick reached its socket.

mod common;

use std::time::{Duration, Instant};

use common::{http, login, register};
use serde_json::json;

/// Sends requests on `c` until one is refused with `bad_token` (within 20 s), then checks the
/// connection closed.
fn until_refused(c: &mut common::Client, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = c.call("friend.list", json!({}));
        if r["op"] == "error" {
            assert_eq!(r["code"], "bad_token", "{r}");
            break;
        }
        assert!(Instant::now() < deadline, "{what}: still served");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(c.read().is_none(), "{what}: closed after bad_token");
}

/// Has `sender` message `to` until `idle` (which only reads) gets `kick` with `reason` and is
/// closed (within 20 s).
fn until_kicked(sender: &mut common::Client, to: &str, idle: &mut common::Client, reason: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for i in 0.. {
        sender.ok("send", json!({"to": to, "cmid": format!("k{i}"), "type": "text", "body": "after"}));
        while let Some(f) = idle.read_within(Duration::from_millis(200)) {
            if f["op"] == "kick" {
                assert_eq!(f["reason"], reason);
                assert!(idle.read().is_none(), "closed after the kick");
                return;
            }
            assert_eq!(f["op"], "msg", "{f}");
        }
        assert!(Instant::now() < deadline, "an idle socket still receives pushes ({reason})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_sessions_are_pruned() {
    let (node, dir) = common::start_tweaked("prune", |s| {
        s.refresh_ttl_secs = Some(1);
        s.session_prune_secs = Some(1);
    })
    .await;
    let addr = node.http_addr();
    common::blocking(move || {
        register(addr, "pru");
        let refresh = login(addr, "pru", "p1")["refresh_token"].as_str().unwrap().to_owned();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        loop {
            let (st, body) = http(addr, "POST", "/v1/auth/refresh", Some(json!({"refresh_token": refresh})), None);
            let message = body["message"].as_str().unwrap_or_default().to_owned();
            if seen.last() != Some(&message) {
                seen.push(message.clone());
            }
            if message == "unknown refresh token" {
                assert_eq!((st, body["code"].as_str()), (401, Some("bad_token")));
                break;
            }
            assert!(Instant::now() < deadline, "never pruned; answers were {seen:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
        // a fresh login still works
        assert!(login(addr, "pru", "p2")["refresh_token"].is_string());
    })
    .await;
    node.stop().await;
    std::fs::remove_dir_all(dir).ok();
}

/// A session revoked behind the socket's back (as if the kick push that should close it was
/// lost) stops being served within `session_check_ms`: the next request gets `bad_token` and
/// the connection closes; the user's other sessions go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_session_stops_being_served_without_its_kick() {
    let (node, dir) = common::start_tweaked("revoked", |s| {
        s.session_check_ms = Some(100);
    })
    .await;
    let (addr, ws) = (node.http_addr(), node.ws_addr());
    let accounts = node.logic.logic.stores.accounts.clone();
    let (session, mut gone, mut kept) = common::blocking(move || {
        register(addr, "rev");
        let mut gone = common::Client::connect(ws);
        let token = login(addr, "rev", "d1")["access_token"].as_str().unwrap().to_owned();
        let ok = gone.ok("auth", json!({ "token": token }));
        let kept = common::Client::login(addr, ws, "rev", "d2");
        gone.ok("friend.list", json!({}));
        (ok["session"].as_str().unwrap().to_owned(), gone, kept)
    })
    .await;
    accounts.revoke_session(&session).await.unwrap();
    common::blocking(move || {
        until_refused(&mut gone, "a revoked session's socket");
        kept.ok("friend.list", json!({}));
    })
    .await;
    node.stop().await;
    std::fs::remove_dir_all(dir).ok();
}

/// The same for a socket that only receives: the first push after `session_check_ms` has its
/// session read again, and the socket is kicked and closed though it never sends a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_socket_of_a_revoked_session_is_closed_by_its_pushes() {
    let (node, dir) = common::start_tweaked("revoked-idle", |s| {
        s.session_check_ms = Some(100);
    })
    .await;
    let (addr, ws) = (node.http_addr(), node.ws_addr());
    let accounts = node.logic.logic.stores.accounts.clone();
    let (session, mut sender, mut idle) = common::blocking(move || {
        let (mut sender, idle) = common::friends(addr, ws, "snd", "idl");
        idle.close();
        let mut idle = common::Client::connect(ws);
        let token = login(addr, "idl", "i2")["access_token"].as_str().unwrap().to_owned();
        let ok = idle.ok("auth", json!({ "token": token }));
        sender.ok("send", json!({"to": "idl", "cmid": "before", "type": "text", "body": "before"}));
        assert_eq!(idle.push("msg")["msg"]["body"], "before");
        (ok["session"].as_str().unwrap().to_owned(), sender, idle)
    })
    .await;
    accounts.revoke_session(&session).await.unwrap();
    common::blocking(move || {
        until_kicked(&mut sender, "idl", &mut idle, "session revoked");
    })
    .await;
    node.stop().await;
    std::fs::remove_dir_all(dir).ok();
}

/// A ban written behind the sockets' back (as if its kick pushes were lost): the banned user's
/// connections stop being served within `session_check_ms`, idle ones through their next push.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_without_its_kick_stops_every_socket() {
    let (node, dir) = common::start_tweaked("banned-quiet", |s| {
        s.session_check_ms = Some(100);
    })
    .await;
    let (addr, ws) = (node.http_addr(), node.ws_addr());
    let accounts = node.logic.logic.stores.accounts.clone();
    let (mut friend, mut active, mut idle) = common::blocking(move || {
        let (friend, active) = common::friends(addr, ws, "bfr", "bnd");
        let idle = common::Client::login(addr, ws, "bnd", "b2");
        (friend, active, idle)
    })
    .await;
    assert!(accounts.set_banned("bnd", true).await.unwrap());
    common::blocking(move || {
        until_refused(&mut active, "a banned user's socket");
        // The idle device: no request of its own; a friend's message (a banned user still
        // receives sends) brings the check.
        until_kicked(&mut friend, "bnd", &mut idle, "account banned");
    })
    .await;
    node.stop().await;
    std::fs::remove_dir_all(dir).ok();
}
