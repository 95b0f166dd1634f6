//! The client side shared by the modes: target parsing (loopback only), token files, source
//! address selection, and connect + WebSocket handshake + `auth` until `auth.ok`.

use std::borrow::Cow;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, Request};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// An open, authenticated client socket.
pub type Ws = WebSocketStream<TcpStream>;

/// Where to connect: a WebSocket URL whose host is an IPv4 loopback address.
#[derive(Clone)]
pub struct Target {
    pub url: String,
    pub addr: SocketAddrV4,
}

impl Target {
    /// Parses `ws://HOST:PORT/PATH`; HOST must be `localhost` or in 127.0.0.0/8.
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let rest = url.strip_prefix("ws://").context("only ws:// URLs are supported")?;
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = authority.rsplit_once(':').unwrap_or((authority, "80"));
        let ip: Ipv4Addr = if host == "localhost" { Ipv4Addr::LOCALHOST } else { host.parse()? };
        if !ip.is_loopback() {
            bail!("refusing non-loopback target {ip}: this tool only loads 127.0.0.0/8");
        }
        Ok(Target { url: url.to_string(), addr: SocketAddrV4::new(ip, port.parse().context("bad port")?) })
    }

    /// The request path (`/ws` in `ws://127.0.0.1:8090/ws`).
    pub fn path(&self) -> &str {
        let rest = self.url.strip_prefix("ws://").unwrap_or(&self.url);
        match rest.find('/') {
            Some(i) => &rest[i..],
            None => "/",
        }
    }

    fn request(&self) -> anyhow::Result<Request<()>> {
        let mut req = self.url.as_str().into_client_request()?;
        req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static("sb.json.v1"));
        Ok(req)
    }
}

/// Reads one token per non-empty line.
pub fn read_tokens(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading tokens from {}", path.display()))?;
    Ok(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect())
}

/// The source address of connection `index`: round robin over 127.0.0.2 ..= 127.0.0.(1+count),
/// so each address's ephemeral port range is used only by its share of the connections.
pub fn source_ip(index: usize, count: usize) -> Ipv4Addr {
    let n = count.clamp(1, 253);
    Ipv4Addr::new(127, 0, 0, 2 + (index % n) as u8)
}

/// A reply or push frame; only the fields the bench looks at.
#[derive(Deserialize)]
pub struct Reply<'a> {
    #[serde(borrow)]
    pub op: Cow<'a, str>,
    pub rid: Option<u64>,
    #[serde(borrow, default)]
    pub code: Option<Cow<'a, str>>,
}

/// A `ping` request frame.
pub fn ping_frame(rid: u64) -> Message {
    Message::text(format!(r#"{{"op":"ping","rid":{rid}}}"#))
}

/// Binds to `src` (port chosen by the kernel), connects, does the WebSocket handshake with
/// subprotocol `sb.json.v1`, sends `auth` and waits for `auth.ok`, all within `timeout`.
pub async fn connect_auth(
    target: &Target,
    src: Option<Ipv4Addr>,
    token: &str,
    timeout: Duration,
) -> anyhow::Result<Ws> {
    match tokio::time::timeout(timeout, connect_auth_inner(target, src, token)).await {
        Ok(r) => r,
        Err(_) => bail!("timeout"),
    }
}

async fn connect_auth_inner(target: &Target, src: Option<Ipv4Addr>, token: &str) -> anyhow::Result<Ws> {
    let sock = TcpSocket::new_v4().context("socket")?;
    if let Some(ip) = src {
        sock.bind(SocketAddr::V4(SocketAddrV4::new(ip, 0))).context("bind")?;
    }
    let stream = sock.connect(SocketAddr::V4(target.addr)).await.context("connect")?;
    stream.set_nodelay(true).context("nodelay")?;
    let config = WebSocketConfig::default();
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(target.request()?, stream, Some(config))
        .await
        .context("handshake")?;
    let auth = serde_json::json!({"op": "auth", "rid": 1, "token": token}).to_string();
    ws.send(Message::text(auth)).await.context("send auth")?;
    while let Some(msg) = ws.next().await {
        let msg = msg.context("read auth reply")?;
        let Message::Text(text) = msg else { continue };
        let reply: Reply = serde_json::from_str(&text).context("bad auth reply")?;
        match (reply.op.as_ref(), reply.rid) {
            ("auth.ok", Some(1)) => return Ok(ws),
            ("error", _) => bail!("auth error {}", reply.code.as_deref().unwrap_or("?")),
            _ => {}
        }
    }
    bail!("closed before auth.ok")
}

/// The first words of an error chain, used to group failures in reports.
pub fn failure_kind(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    text.chars().take(80).collect()
}
