//! Limits against one noisy client, driven from outside: a gateway holds at most
//! `max_connections_per_ip` connections from one address (others are served), and logins to one
//! account are throttled whatever address they come from.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{http, register, temp_dir};
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
    let dir = temp_dir("per-ip");
    let mut s = common::settings(&dir);
    s.max_connections_per_ip = Some(3);
    let node = switchboard::AllInOne::start(&s).await.expect("node starts");
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
    let dir = temp_dir("login-rate");
    let mut s = common::settings(&dir);
    s.login_rate = Some(0.01);
    s.login_burst = Some(3.0);
    let node = switchboard::AllInOne::start(&s).await.expect("node starts");
    let addr = node.http_addr();
    common::blocking(move || {
        register(addr, "target");
        register(addr, "bystander");
        let login = |user: &str, password: &str| {
            http(
                addr,
                "POST",
                "/v1/auth/login",
                Some(json!({"username": user, "password": password, "device": "d"})),
                None,
            )
        };
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
