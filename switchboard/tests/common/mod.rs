//! Test client: a tiny HTTP/1.1 client and a WebSocket client speaking the
//! JSON protocol, both over real sockets, written from docs/protocol.md;
//! role processes of the binary on the real engines ([`procs`]).
#![allow(dead_code)]

pub mod procs;

#[allow(unused_imports)]
pub use procs::{Proc, TestStore};

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use switchboard::{AllInOne, Settings};
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

/// A loopback address with a port free right now (for a process told where to listen).
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port")
}

pub fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sb-e2e-{name}-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Settings for an all-in-one node on ephemeral loopback ports with cheap
/// password hashing and short timers.
pub fn settings(dir: &Path) -> Settings {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    Settings {
        data_dir: Some(dir.to_path_buf()),
        http_addr: Some(any),
        ws_addr: Some(any),
        tcp_addr: Some("127.0.0.1:0".into()),
        logic_addr: Some(any),
        push_addr: Some(any),
        shards: Some(2),
        argon2_memory_kib: Some(1024),
        argon2_iterations: Some(1),
        auth_timeout_ms: Some(1500),
        repush_ms: Some(600),
        max_frame_bytes: Some(16 * 1024),
        auth_rate: Some(1000.0),
        auth_burst: Some(1000.0),
        login_rate: Some(1000.0),
        login_burst: Some(1000.0),
        ..Default::default()
    }
}

pub async fn start(dir: &Path) -> AllInOne {
    AllInOne::start(&settings(dir)).await.expect("node starts")
}

/// A node on a fresh temporary directory named after `name`, with [`settings`] changed by
/// `tweak`; the caller removes the directory.
pub async fn start_tweaked(name: &str, tweak: impl FnOnce(&mut Settings)) -> (AllInOne, PathBuf) {
    let dir = temp_dir(name);
    let mut s = settings(&dir);
    tweak(&mut s);
    (AllInOne::start(&s).await.expect("node starts"), dir)
}

/// Starts a node as [`start_tweaked`] does, runs the blocking client code `body` against its
/// HTTP and WebSocket addresses, then stops the node and removes its directory.
pub async fn with_node(
    name: &str,
    tweak: impl FnOnce(&mut Settings),
    body: impl FnOnce(SocketAddr, SocketAddr) + Send + 'static,
) {
    let (node, dir) = start_tweaked(name, tweak).await;
    let (http_addr, ws) = (node.http_addr(), node.ws_addr());
    blocking(move || body(http_addr, ws)).await;
    node.stop().await;
    std::fs::remove_dir_all(dir).ok();
}

/// The value of an unlabelled metric on the node's `/metrics`.
pub fn metric(addr: SocketAddr, name: &str) -> u64 {
    let (_, text) = http(addr, "GET", "/metrics", None, None);
    let text = text.as_str().expect("metrics text").to_owned();
    let line = text.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{name} missing"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// One HTTP request; returns (status, JSON body or Null).
pub fn http(addr: SocketAddr, method: &str, path: &str, body: Option<Value>, bearer: Option<&str>) -> (u16, Value) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = bearer.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a));
    }
    let (status, _, payload) = http_raw(addr, method, path, &headers, body.as_bytes());
    let text = String::from_utf8_lossy(&payload).into_owned();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// One HTTP/1.1 request with a raw body (its `Content-Length` added unless given); returns
/// the status, the headers (names lowercased) and the body.
pub fn http_raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, std::collections::HashMap<String, String>, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-length")) {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").expect("a full response");
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let mut lines = head.lines();
    let status: u16 = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|c| c.parse().ok()).expect("status line");
    let headers: std::collections::HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = out[split + 4..].to_vec();
    if headers.get("transfer-encoding").is_some_and(|t| t == "chunked") {
        body = dechunk(&body);
    }
    (status, headers, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(std::str::from_utf8(&b[..end]).unwrap_or("0").trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.extend_from_slice(&b[end + 2..end + 2 + n]);
        b = &b[end + 2 + n + 2..];
    }
    out
}

pub fn register(addr: SocketAddr, user: &str) {
    let (st, body) =
        http(addr, "POST", "/v1/auth/register", Some(json!({"username": user, "password": "password123"})), None);
    assert_eq!(st, 201, "{body}");
}

/// Logs in; returns the login reply (access_token, refresh_token, expires_in).
pub fn login(addr: SocketAddr, user: &str, device: &str) -> Value {
    let (st, body) = try_login(addr, user, "password123", device);
    assert_eq!(st, 200, "{body}");
    body
}

/// A login attempt; returns (status, body).
pub fn try_login(addr: SocketAddr, user: &str, password: &str, device: &str) -> (u16, Value) {
    let body = json!({"username": user, "password": password, "device": device});
    http(addr, "POST", "/v1/auth/login", Some(body), None)
}

/// A TCP connection to `to` from the local address `src` (one of 127.0.0.0/8), with a 10 s read
/// timeout.
pub fn tcp_from(src: std::net::IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::for_address(to), socket2::Type::STREAM, None)?;
    sock.bind(&SocketAddr::new(src, 0).into())?;
    sock.connect(&to.into())?;
    let stream: TcpStream = sock.into();
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(stream)
}

pub struct Client {
    pub ws: WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>,
    rid: u64,
    pushes: VecDeque<Value>,
    /// `presence` pushes, kept apart so tests about other pushes can ignore them.
    pub presence: VecDeque<Value>,
}

impl Client {
    /// The upgrade request of a JSON client.
    fn request(ws_addr: SocketAddr) -> tungstenite::handshake::client::Request {
        let mut req = format!("ws://{ws_addr}/ws").into_client_request().unwrap();
        req.headers_mut().insert("Sec-WebSocket-Protocol", "sb.json.v1".parse().unwrap());
        req
    }

    pub fn connect(ws_addr: SocketAddr) -> Client {
        let (ws, resp) = tungstenite::connect(Self::request(ws_addr)).expect("websocket connects");
        assert_eq!(resp.headers().get("Sec-WebSocket-Protocol").map(|v| v.to_str().unwrap()), Some("sb.json.v1"));
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        }
        Client { ws, rid: 0, pushes: VecDeque::new(), presence: VecDeque::new() }
    }

    /// Connects from the local address `src` (one of 127.0.0.0/8); the error says why the
    /// connection or its upgrade failed.
    pub fn connect_from(ws_addr: SocketAddr, src: std::net::IpAddr) -> Result<Client, String> {
        let stream = tcp_from(src, ws_addr).map_err(|e| e.to_string())?;
        let plain = tungstenite::stream::MaybeTlsStream::Plain(stream);
        let (ws, _) = tungstenite::client(Self::request(ws_addr), plain).map_err(|e| e.to_string())?;
        Ok(Client { ws, rid: 0, pushes: VecDeque::new(), presence: VecDeque::new() })
    }

    /// Connects and authenticates with a fresh login of `user` on `device`.
    pub fn login(http_addr: SocketAddr, ws_addr: SocketAddr, user: &str, device: &str) -> Client {
        let token = login(http_addr, user, device)["access_token"].as_str().unwrap().to_string();
        let mut c = Client::connect(ws_addr);
        let r = c.call("auth", json!({ "token": token }));
        assert_eq!(r["op"], "auth.ok", "{r}");
        assert_eq!(r["user"], user);
        c
    }

    pub fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).unwrap();
    }

    /// Reads the next frame (setting `presence` pushes aside); `None` when
    /// the connection is closed.
    pub fn read(&mut self) -> Option<Value> {
        loop {
            let v = self.read_any()?;
            if v["op"] == "presence" && v.get("rid").is_none() {
                self.presence.push_back(v);
                continue;
            }
            return Some(v);
        }
    }

    /// Reads the next frame of any kind; `None` when the connection is closed.
    pub fn read_any(&mut self) -> Option<Value> {
        loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => return Some(serde_json::from_str(t.as_str()).expect("server sends JSON")),
                Ok(Message::Close(_)) => {
                    let _ = self.ws.flush();
                    return None;
                }
                Ok(_) => continue,
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => return None,
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe) =>
                {
                    return None
                }
                Err(tungstenite::Error::Protocol(_)) => return None,
                Err(e) => panic!("read failed: {e}"),
            }
        }
    }

    /// Sends a request and returns its reply (pushes meanwhile are queued).
    pub fn call(&mut self, op: &str, fields: Value) -> Value {
        self.rid += 1;
        let rid = self.rid;
        let mut frame = fields;
        frame["op"] = op.into();
        frame["rid"] = rid.into();
        self.send_text(&frame.to_string());
        self.reply_to(rid)
    }

    pub fn reply_to(&mut self, rid: u64) -> Value {
        loop {
            let f = self.read().unwrap_or_else(|| panic!("closed while waiting for reply {rid}"));
            if f.get("rid").and_then(Value::as_u64) == Some(rid) {
                return f;
            }
            self.pushes.push_back(f);
        }
    }

    /// Calls and asserts success.
    pub fn ok(&mut self, op: &str, fields: Value) -> Value {
        let r = self.call(op, fields);
        assert_eq!(r["op"], format!("{op}.ok"), "{op} failed: {r}");
        r
    }

    /// Calls and asserts the error code.
    pub fn err(&mut self, op: &str, fields: Value, code: &str) -> Value {
        let r = self.call(op, fields);
        assert_eq!(r["op"], "error", "{op} should fail: {r}");
        assert_eq!(r["code"], code, "{r}");
        r
    }

    /// The next push with this op (skipping none: an unexpected push fails).
    pub fn push(&mut self, op: &str) -> Value {
        let f = match self.pushes.pop_front() {
            Some(f) => f,
            None => self.read().unwrap_or_else(|| panic!("closed while waiting for push {op}")),
        };
        assert_eq!(f["op"], op, "expected push {op}, got {f}");
        f
    }

    /// The next `presence` push.
    pub fn presence_push(&mut self) -> Value {
        while self.presence.is_empty() {
            let f = self.read_any().expect("closed while waiting for presence");
            if f["op"] == "presence" {
                self.presence.push_back(f);
            } else {
                self.pushes.push_back(f);
            }
        }
        self.presence.pop_front().unwrap()
    }

    /// The next frame (queued pushes first) arriving within `wait`; `None` on time-out or close.
    pub fn read_within(&mut self, wait: Duration) -> Option<Value> {
        if let Some(f) = self.pushes.pop_front() {
            return Some(f);
        }
        let set = |ws: &WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>, d: Duration| {
            if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
                // A zero timeout is refused by the OS call (it would mean "block"): wait a tick.
                s.set_read_timeout(Some(d.max(Duration::from_millis(1)))).unwrap();
            }
        };
        set(&self.ws, wait);
        let f = match self.ws.read() {
            Ok(Message::Text(t)) => Some(serde_json::from_str(t.as_str()).expect("server sends JSON")),
            _ => None,
        };
        set(&self.ws, Duration::from_secs(10));
        f
    }

    /// Asserts no frame arrives within `wait`.
    pub fn quiet(&mut self, wait: Duration) {
        assert!(self.pushes.is_empty(), "unexpected queued pushes: {:?}", self.pushes);
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = self.ws.get_ref() {
            s.set_read_timeout(Some(wait)).unwrap();
        }
        let start = Instant::now();
        match self.ws.read() {
            Ok(Message::Text(t)) if t.as_str().contains(r#""op":"presence""#) => {}
            Ok(m) => panic!("expected silence, got {m:?}"),
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => panic!("expected silence, got error {e} after {:?}", start.elapsed()),
        }
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = self.ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        }
    }

    pub fn close(mut self) {
        let _ = self.ws.close(None);
        while self.read().is_some() {}
    }
}

/// Runs blocking client code off the async runtime.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("client code panicked")
}

/// `a` asks `b` to be friends and `b` accepts, consuming the pushes.
pub fn befriend(a: &mut Client, b: &mut Client, b_name: &str, a_name: &str) {
    a.ok("friend.request", serde_json::json!({ "to": b_name }));
    b.push("friend.request");
    b.ok("friend.accept", serde_json::json!({ "from": a_name }));
    a.push("friend.accepted");
}

/// Registers `a` and `b`, logs them in (devices `a1` and `b1`) and makes them friends.
pub fn friends(http: SocketAddr, ws: SocketAddr, a: &str, b: &str) -> (Client, Client) {
    register(http, a);
    register(http, b);
    let mut ca = Client::login(http, ws, a, "a1");
    let mut cb = Client::login(http, ws, b, "b1");
    befriend(&mut ca, &mut cb, b, a);
    (ca, cb)
}

/// Sends a direct message, retrying on `unavailable` with the same cmid for up to `within`;
/// returns the `send.ok`.
pub fn send_retrying(c: &mut Client, to: &str, cmid: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let r = c.call("send", json!({"to": to, "cmid": cmid, "type": "text", "body": cmid}));
        if r["op"] == "send.ok" {
            return r;
        }
        assert_eq!(r["code"], "unavailable", "{r}");
        assert!(Instant::now() < deadline, "send {cmid} kept failing: {r}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
