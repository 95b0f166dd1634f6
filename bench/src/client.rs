//! What every mode's client needs besides [`crate::rawws`]: target parsing (loopback only),
//! token files and source address selection.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// Flags every load mode has: the target, the source addresses and where the report goes.
#[derive(clap::Args, Clone, Debug)]
pub struct CommonArgs {
    /// WebSocket URL (loopback only).
    #[arg(long, default_value = "ws://127.0.0.1:8090/ws")]
    pub url: String,
    /// Source addresses to bind to, 127.0.0.2 ..= 127.0.0.(1+K) (0: let the kernel choose).
    #[arg(long, default_value_t = 8)]
    pub src_ips: usize,
    /// Write the JSON report here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Free-form label stored in the report (e.g. the server's name).
    #[arg(long, default_value = "")]
    pub label: String,
}

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
