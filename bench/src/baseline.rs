//! `baseline-server`: what a Rust user would write instead of Switchboard's gateway — a
//! tokio-tungstenite server with default buffers and one task per connection, answering
//! `auth` (any token) with `auth.ok` and `ping` with `ping.ok`. Binds loopback only.

use std::net::SocketAddr;

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

#[derive(clap::Args)]
pub struct Args {
    /// Address to listen on (loopback only).
    #[arg(long, default_value = "127.0.0.1:9200")]
    addr: SocketAddr,
}

#[derive(Deserialize)]
struct Frame {
    op: String,
    rid: Option<u64>,
}

/// Entry point of `baseline-server`: serves until killed.
pub async fn run(args: Args) -> anyhow::Result<()> {
    if !args.addr.ip().is_loopback() {
        bail!("the baseline server listens on loopback only");
    }
    let listener = TcpListener::bind(args.addr).await.with_context(|| format!("binding {}", args.addr))?;
    println!("baseline-server: ws://{}/ws (pid {})", listener.local_addr()?, std::process::id());
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let _ = serve(stream).await;
        });
    }
}

async fn serve(stream: TcpStream) -> anyhow::Result<()> {
    stream.set_nodelay(true)?;
    let mut ws = tokio_tungstenite::accept_hdr_async(stream, echo_subprotocol as Callback).await?;
    while let Some(msg) = ws.next().await {
        let Message::Text(text) = msg? else { continue };
        let reply = match serde_json::from_str::<Frame>(&text) {
            Ok(f) if f.op == "auth" => serde_json::json!({"op": "auth.ok", "rid": f.rid, "user": "x"}),
            Ok(f) if f.op == "ping" => serde_json::json!({"op": "ping.ok", "rid": f.rid}),
            Ok(f) => serde_json::json!({"op": "error", "rid": f.rid, "code": "unknown_op"}),
            Err(_) => serde_json::json!({"op": "error", "code": "bad_request"}),
        };
        ws.send(Message::text(reply.to_string())).await?;
    }
    Ok(())
}

type Callback = fn(&Request, Response) -> Result<Response, ErrorResponse>;

/// Accepts the handshake, echoing `sb.json.v1` when the client offers it (as Switchboard does).
#[allow(clippy::result_large_err)] // the signature tungstenite's handshake callback requires
fn echo_subprotocol(req: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
    let offered = req.headers().get("Sec-WebSocket-Protocol").and_then(|v| v.to_str().ok()).unwrap_or("");
    if offered.split(',').any(|p| p.trim() == "sb.json.v1") {
        resp.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static("sb.json.v1"));
    }
    Ok(resp)
}
