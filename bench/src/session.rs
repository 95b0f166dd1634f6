//! Setup on the [`rawws`](crate::rawws) engine, shared by `ping`, `fanout` and `messaging`:
//! tokens (with the user and device read from their claims), connect + `auth` of many
//! connections, request/reply rounds over many connections, user registration over HTTP, and
//! the report writer.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use serde::Serialize;
use serde_json::{json, Value};

use crate::client::{self, Target};
use crate::rawws::{Client, Ctx, Handler};

/// Most connections one process opens (the machine's fd limit is 20,000 per process).
pub const MAX_CONNS: usize = 19_500;
/// Longest measured run.
pub const MAX_SECS: u64 = 3600;

/// An access token with the user and device of its claims.
#[derive(Debug, Clone)]
pub struct Token {
    pub raw: String,
    pub user: String,
    pub device: String,
}

/// Reads one token per line and decodes the `sub` and `dev` claims (the signature is the
/// server's business).
pub fn read_tokens(path: &Path) -> anyhow::Result<Vec<Token>> {
    client::read_tokens(path)?.into_iter().map(|raw| decode_token(&raw)).collect()
}

pub fn decode_token(raw: &str) -> anyhow::Result<Token> {
    let payload = raw.split('.').nth(1).context("a token is header.claims.signature")?;
    let claims: Value = serde_json::from_slice(&B64.decode(payload).context("token claims are not base64url")?)
        .context("token claims are not JSON")?;
    let user = claims["sub"].as_str().context("token without sub")?.to_string();
    let device = claims["dev"].as_str().unwrap_or_default().to_string();
    Ok(Token { raw: raw.to_string(), user, device })
}

/// Fails when two tokens share user and device: the server keeps one connection per device.
pub fn check_distinct_devices(tokens: &[Token]) -> anyhow::Result<()> {
    let mut seen = std::collections::HashSet::new();
    for t in tokens {
        if !seen.insert((t.user.as_str(), t.device.as_str())) {
            bail!("two tokens for user {} device {}: one connection per device, mint --count N", t.user, t.device);
        }
    }
    Ok(())
}

/// Checks the usual bounds of a run.
pub fn check_bounds(conns: usize, secs: u64) -> anyhow::Result<()> {
    if conns == 0 || conns > MAX_CONNS {
        bail!("--conns must be 1..={MAX_CONNS} per process");
    }
    if secs == 0 || secs > MAX_SECS {
        bail!("--secs must be 1..={MAX_SECS}");
    }
    Ok(())
}

/// A new client for `target`.
pub fn new_client(target: &Target) -> anyhow::Result<Client> {
    Ok(Client::new(target.addr, target.path())?)
}

/// Opens one connection per token (source addresses round robin over `src_ips` addresses,
/// starting at position `src_offset` of the round), authenticates each and waits for every
/// `auth.ok`. Connections get ids `first..first+n` in token order. Fails if any connection fails.
pub fn connect_all(
    client: &mut Client,
    tokens: &[&str],
    src_ips: usize,
    src_offset: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<usize>> {
    let mut h = AuthH { tokens: HashMap::new(), done: 0, failures: Vec::new() };
    let deadline = Instant::now() + timeout;
    let mut ids = Vec::with_capacity(tokens.len());
    let mut next = 0;
    // At most this many connections between connect and auth.ok at a time.
    const WINDOW: usize = 256;
    while h.done < tokens.len() {
        while next < tokens.len() && next - h.done < WINDOW && h.failures.is_empty() {
            let src = (src_ips > 0).then(|| client::source_ip(src_offset + next, src_ips));
            let id = client.open(src).with_context(|| format!("opening connection {next}"))?;
            h.tokens.insert(id, tokens[next].to_string());
            ids.push(id);
            next += 1;
        }
        if !h.failures.is_empty() {
            let (n, first) = (h.failures.len(), h.failures[0].clone());
            bail!("{n} connection(s) failed during connect/auth, first: {first}");
        }
        if Instant::now() > deadline {
            bail!("{} of {} connections authenticated within {timeout:?}", h.done, tokens.len());
        }
        client.poll(Some(Duration::from_millis(20)), &mut h)?;
    }
    let first = ids.first().copied().unwrap_or(0);
    if ids.iter().enumerate().any(|(i, &id)| id != first + i) {
        bail!("internal: connection ids are not dense");
    }
    Ok(ids)
}

struct AuthH {
    /// Tokens of the connections still waiting for `auth.ok`.
    tokens: HashMap<usize, String>,
    done: usize,
    failures: Vec<String>,
}

impl Handler for AuthH {
    fn opened(&mut self, cx: &mut Ctx) {
        if let Some(t) = self.tokens.get(&cx.id) {
            cx.send_text(json!({"op": "auth", "rid": 1, "token": t}).to_string().as_bytes());
        }
    }

    fn frame(&mut self, cx: &mut Ctx, _opcode: u8, payload: &[u8]) {
        if !self.tokens.contains_key(&cx.id) {
            return;
        }
        let Ok(v) = serde_json::from_slice::<Value>(payload) else { return };
        match (v["op"].as_str(), v["rid"].as_u64()) {
            (Some("auth.ok"), Some(1)) => {
                self.tokens.remove(&cx.id);
                self.done += 1;
            }
            (Some("error"), rid) if rid.is_none() || rid == Some(1) => {
                self.tokens.remove(&cx.id);
                self.failures.push(format!("auth error {}: {}", v["code"], v["message"]));
            }
            _ => {}
        }
    }

    fn closed(&mut self, id: usize, why: &str) {
        if self.tokens.remove(&id).is_some() {
            self.failures.push(why.to_string());
        }
    }
}

/// Sends every `(connection, request)` (each gets a fresh `rid`) and returns the replies in
/// request order. `rate_limited` errors are retried after `retry_after_ms`; pushes are ignored.
pub fn call_all(client: &mut Client, reqs: &[(usize, Value)], timeout: Duration) -> anyhow::Result<Vec<Value>> {
    let mut h = CallH { pending: HashMap::new(), replies: vec![None; reqs.len()], retry: Vec::new(), lost: None };
    let deadline = Instant::now() + timeout;
    let mut rid = 1_000_000u64;
    let mut send = |client: &mut Client, h: &mut CallH, i: usize| {
        rid += 1;
        let (id, req) = &reqs[i];
        let mut frame = req.clone();
        frame["rid"] = rid.into();
        client.send_text(*id, frame.to_string().as_bytes());
        h.pending.insert((*id, rid), i);
    };
    for i in 0..reqs.len() {
        send(client, &mut h, i);
    }
    loop {
        if let Some(why) = &h.lost {
            bail!("a connection was lost during setup: {why}");
        }
        if h.pending.is_empty() && h.retry.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let missing = h.replies.iter().filter(|r| r.is_none()).count();
            bail!("{missing} of {} setup requests unanswered within {timeout:?}", reqs.len());
        }
        let now = Instant::now();
        let due: Vec<usize> = h.retry.iter().filter(|(at, _)| *at <= now).map(|&(_, i)| i).collect();
        h.retry.retain(|(at, _)| *at > now);
        for i in due {
            send(client, &mut h, i);
        }
        client.poll(Some(Duration::from_millis(10)), &mut h)?;
    }
    Ok(h.replies.into_iter().map(|r| r.unwrap_or(Value::Null)).collect())
}

struct CallH {
    pending: HashMap<(usize, u64), usize>,
    replies: Vec<Option<Value>>,
    retry: Vec<(Instant, usize)>,
    lost: Option<String>,
}

impl Handler for CallH {
    fn frame(&mut self, cx: &mut Ctx, _opcode: u8, payload: &[u8]) {
        let Ok(v) = serde_json::from_slice::<Value>(payload) else { return };
        let Some(rid) = v["rid"].as_u64() else { return };
        let Some(i) = self.pending.remove(&(cx.id, rid)) else { return };
        if v["op"] == "error" && v["code"] == "rate_limited" {
            let wait = v["retry_after_ms"].as_u64().unwrap_or(100).clamp(1, 5000);
            self.retry.push((cx.now + Duration::from_millis(wait), i));
        } else {
            self.replies[i] = Some(v);
        }
    }

    fn closed(&mut self, id: usize, why: &str) {
        self.lost.get_or_insert_with(|| format!("connection {id}: {why}"));
    }
}

/// `http://HOST:PORT` on loopback.
pub fn parse_http(url: &str) -> anyhow::Result<SocketAddrV4> {
    let rest = url.strip_prefix("http://").context("only http:// URLs are supported")?;
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = authority.rsplit_once(':').unwrap_or((authority, "80"));
    let ip: Ipv4Addr = if host == "localhost" { Ipv4Addr::LOCALHOST } else { host.parse()? };
    if !ip.is_loopback() {
        bail!("refusing non-loopback HTTP target {ip}: this tool only loads 127.0.0.0/8");
    }
    Ok(SocketAddrV4::new(ip, port.parse().context("bad port")?))
}

/// The password of the users the bench registers.
pub const BENCH_PASSWORD: &str = "bench-password-1";

/// Registers each user (`POST /v1/auth/register`); an existing user (409) is fine, a
/// `rate_limited` answer is waited out. Returns how many were newly created.
pub fn register_users(http: SocketAddrV4, users: &[String], timeout: Duration) -> anyhow::Result<usize> {
    let deadline = Instant::now() + timeout;
    let mut created = 0;
    for u in users {
        loop {
            let body = json!({"username": u, "password": BENCH_PASSWORD}).to_string();
            let (status, reply) = http_post(http, "/v1/auth/register", &body)?;
            match status {
                201 => created += 1,
                409 => {}
                429 => {
                    if Instant::now() > deadline {
                        bail!("registration rate limited past {timeout:?}; start the server with --auth-rate 0");
                    }
                    let wait = reply["retry_after_ms"].as_u64().unwrap_or(200).clamp(1, 5000);
                    std::thread::sleep(Duration::from_millis(wait));
                    continue;
                }
                _ => bail!("registering {u}: HTTP {status} {reply}"),
            }
            break;
        }
    }
    Ok(created)
}

/// One `POST` with a JSON body; returns the status and the JSON body (or `Null`).
fn http_post(addr: SocketAddrV4, path: &str, body: &str) -> anyhow::Result<(u16, Value)> {
    let mut s = TcpStream::connect_timeout(&SocketAddr::V4(addr), Duration::from_secs(5))
        .with_context(|| format!("connecting to http://{addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).context("no HTTP status line")?;
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let payload =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(rest) } else { rest.to_string() };
    Ok((status, serde_json::from_str(&payload).unwrap_or(Value::Null)))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Prints the report on stdout and writes it to `path`.
pub fn emit<T: Serialize>(report: &T, path: Option<&Path>) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(report)?;
    println!("{json}");
    if let Some(path) = path {
        std::fs::write(path, format!("{json}\n")).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("report written to {}", path.display());
    }
    Ok(())
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A run id: distinct per run so `cmid`s never collide with an earlier run's (the server
/// deduplicates by conversation + sender + cmid).
pub fn run_id() -> u32 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    (t.as_nanos() as u32) ^ (std::process::id().rotate_left(16)) | 1
}

/// Counts of error codes (or failure kinds) for reports.
pub type Kinds = std::collections::BTreeMap<String, u64>;

pub fn bump(k: &mut Kinds, key: &str) {
    if let Some(v) = k.get_mut(key) {
        *v += 1;
    } else {
        k.insert(key.to_string(), 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_claims() {
        let claims = B64.encode(br#"{"sub":"alice","sid":"cli-x","dev":"d-3","iat":1,"exp":2,"typ":"access"}"#);
        let t = decode_token(&format!("h.{claims}.s")).unwrap();
        assert_eq!((t.user.as_str(), t.device.as_str()), ("alice", "d-3"));
        assert!(decode_token("nope").is_err());
        let dup = vec![t.clone(), t];
        assert!(check_distinct_devices(&dup).is_err());
    }

    #[test]
    fn http_targets_are_loopback_only() {
        assert_eq!(parse_http("http://127.0.0.1:8080").unwrap().port(), 8080);
        assert!(parse_http("http://10.0.0.1:8080").is_err());
    }

    #[test]
    fn chunked_bodies() {
        assert_eq!(dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), "abcde");
    }
}
