//! Limits against one noisy client, driven from outside: a gateway holds at most
//! `max_connections_per_ip` connections from one address (others are served), and logins to one
//! account are throttled whatever address they come from, and password hashes run in bounded
//! slots.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::register;
use serde_json::json;
use tungstenite::client::IntoClientRequest;

/// A WebSocket handshake from source address `src`.
fn ws_from(src: &str, ws: SocketAddr) -> Result<tungstenite::WebSocket<TcpStream>, String> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).map_err(|e| e.to_string())?;
    sock.bind(&SocketAddr::new(src.parse().unwrap(), 0).into()).map_err(|e| e.to_string())?;
    sock.connect(&ws.into()).map_err(|e| e.to_string())?;
    let stream: TcpStream = sock.into();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!("ws://{ws}/ws").into_client_request().unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", "sb.json.v1".parse().unwrap());
    tungstenite::client(req, stream).map(|(ws, _)| ws).map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_the_gateway() {
    let (node, dir) = common::start_tweaked("per-ip", |s| {
        s.max_connections_per_ip = Some(3);
    })
    .await;
    let ws = node.ws_addr();
    common::blocking(move || {
        let mut held: Vec<_> =
            (0..3).map(|i| ws_from("127.0.0.1", ws).unwrap_or_else(|e| panic!("{i}: {e}"))).collect();
        assert!(ws_from("127.0.0.1", ws).is_err(), "a fourth connection from one address is refused");
        // other addresses are served meanwhile (two shards: the count is per process)
        let others: Vec<_> = (2..6).map(|i| ws_from(&format!("127.0.0.{i}"), ws).expect("another address")).collect();
        // a closed connection frees its place
        let mut first = held.remove(0);
        first.close(None).unwrap();
        let _ = first.flush();
        drop(first);
        let mut again = None;
        for _ in 0..100 {
            if let Ok(c) = ws_from("127.0.0.1", ws) {
                again = Some(c);
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(again.is_some(), "the freed place was never given back");
        drop((held, others, again));
    })
    .await;
    node.stop().await;
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_to_one_account_are_throttled() {
    let (node, dir) = common::start_tweaked("login-rate", |s| {
        s.login_rate = Some(0.01);
        s.login_burst = Some(3.0);
    })
    .await;
    let addr = node.http_addr();
    common::blocking(move || {
        register(addr, "target");
        register(addr, "bystander");
        let login = |user: &str, password: &str| common::try_login(addr, user, password, "d");
        // guesses count too
        assert_eq!(login("target", "wrong-guess-1").0, 401);
        assert_eq!(login("target", "wrong-guess-2").0, 401);
        assert_eq!(login("target", "password123").0, 200);
        let (st, body) = login("target", "password123");
        assert_eq!(st, 429, "{body}");
        assert_eq!(body["code"], "rate_limited", "{body}");
        assert!(body["retry_after_ms"].as_u64().unwrap() > 0, "{body}");
        // the throttle is the account's, not the address's
        assert_eq!(login("bystander", "password123").0, 200);
    })
    .await;
    node.stop().await;
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_cannot_hold_unbounded_connections() {
    let (node, dir) = common::start_tweaked("per-user", |s| {
        s.max_connections_per_user = Some(2);
    })
    .await;
    let (addr, ws) = (node.http_addr(), node.ws_addr());
    common::blocking(move || {
        register(addr, "many");
        register(addr, "other");
        let token = |device: &str| common::login(addr, "many", device)["access_token"].as_str().unwrap().to_owned();
        let (t1, t2, t3) = (token("d1"), token("d2"), token("d3"));
        let mut c1 = common::Client::connect(ws);
        c1.ok("auth", json!({ "token": t1 }));
        let mut c2 = common::Client::connect(ws);
        c2.ok("auth", json!({ "token": t2 }));
        // a third device is refused (and closed, as any refused auth)
        let mut c3 = common::Client::connect(ws);
        let e = c3.err("auth", json!({ "token": t3 }), "too_many_connections");
        assert!(e["message"].as_str().unwrap().contains('2'), "{e}");
        assert!(c3.read().is_none(), "closed after the refusal");
        // a new connection of a device already connected replaces it instead
        let mut c2b = common::Client::connect(ws);
        c2b.ok("auth", json!({ "token": token("d2") }));
        assert_eq!(c2.read().expect("kick")["op"], "kick");
        // other users are not affected
        common::Client::login(addr, ws, "other", "o1").ok("ping", json!({}));
        // once a connection closes there is room again
        c1.close();
        let mut admitted = false;
        for _ in 0..100 {
            let mut c3 = common::Client::connect(ws);
            let r = c3.call("auth", json!({ "token": t3 }));
            if r["op"] == "auth.ok" {
                admitted = true;
                break;
            }
            assert_eq!(r["code"], "too_many_connections", "{r}");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(admitted, "no room after a connection closed");
    })
    .await;
    node.stop().await;
    std::fs::remove_dir_all(dir).ok();
}

/// Password hashing runs in bounded slots: three logins at once with one slot run one after the
/// other (the others wait; none is refused), as `/metrics` shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_hashes_run_in_bounded_slots() {
    let tweak = |s: &mut switchboard::Settings| {
        s.argon2_concurrency = Some(1);
        s.argon2_memory_kib = Some(8 * 1024);
        s.argon2_iterations = Some(1);
        s.auth_rate = Some(0.0);
        s.login_rate = Some(0.0);
    };
    common::with_node("hash-slots", tweak, |addr, _| {
        let users: Vec<String> = (0..3).map(|i| format!("slot{i}")).collect();
        for u in &users {
            register(addr, u);
        }
        let logins: Vec<_> = users
            .into_iter()
            .map(|u| std::thread::spawn(move || common::try_login(addr, &u, "password123", "d").0))
            .collect();
        for l in logins {
            assert_eq!(l.join().unwrap(), 200, "a login waiting for its slot still succeeds");
        }
        let value = |name: &str| common::metric(addr, name);
        assert_eq!(value("switchboard_logic_password_hashes_peak"), 1, "never more hashes at once than slots");
        assert!(value("switchboard_logic_password_hash_waits_total") >= 1, "concurrent logins queued for the slot");
    })
    .await;
}
