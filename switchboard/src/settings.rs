//! Settings of every role: one struct that is at once the TOML file's
//! schema and the CLI flags (each flag also reads an `SB_*` environment
//! variable). Precedence: flag > environment > file > default. Which role reads which option is
//! declared in [`crate::roles`], the defaults in [`crate::defaults`], the store's section in
//! [`crate::storage_settings`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde::Deserialize;
use serde_json::Value;
use switchboard_gateway::GatewayConfig;
use switchboard_logic::notify::NotifyConfig;
use switchboard_proto::cluster_tls::ClusterTls;
use switchboard_proto::trusted::TrustedProxies;

use crate::defaults;
use crate::http_serve::HttpLimits;
use crate::roles::Role;
pub use crate::storage_settings::StorageSettings;

/// Every option is optional here; `get` accessors apply the defaults.
#[derive(Debug, Clone, Default, Args, Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// The store and its engines (`[storage]` in a file).
    #[command(flatten)]
    pub storage: StorageSettings,
    /// Directory of the embedded database and the token signing key.
    #[arg(long, env = "SB_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// HTTP API listen address.
    #[arg(long, env = "SB_HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// WebSocket listen address (path /ws).
    #[arg(long, env = "SB_WS_ADDR")]
    pub ws_addr: Option<SocketAddr>,
    /// Raw TCP listen address (length-prefixed protobuf frames); "off" disables it.
    #[arg(long, env = "SB_TCP_ADDR")]
    pub tcp_addr: Option<String>,
    /// Logic gRPC listen address (logic, all-in-one).
    #[arg(long, env = "SB_LOGIC_ADDR")]
    pub logic_addr: Option<SocketAddr>,
    /// Gateway push gRPC listen address (gateway, all-in-one).
    #[arg(long, env = "SB_PUSH_ADDR")]
    pub push_addr: Option<SocketAddr>,
    /// Logic URL a gateway calls (gateway role).
    #[arg(long, env = "SB_LOGIC_URL")]
    pub logic_url: Option<String>,
    /// Push URL logic dials to reach this gateway (default http://<push-addr>).
    #[arg(long, env = "SB_ADVERTISE_PUSH")]
    pub advertise_push: Option<String>,
    /// WebSocket URL handed to clients by GET /v1/gateways (default ws://<ws-addr>/ws).
    #[arg(long, env = "SB_PUBLIC_WS")]
    pub public_ws: Option<Vec<String>>,
    /// HS256 secret for access tokens; default: generated once into <data-dir>/jwt.secret.
    #[arg(long, env = "SB_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Secret every internal gRPC call (gateway <-> logic) carries and checks, at least 32
    /// bytes; required by the cluster roles.
    #[arg(long, env = "SB_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<String>,
    /// Gateway event-loop threads (0 = one per core).
    #[arg(long, env = "SB_SHARDS")]
    pub shards: Option<usize>,
    /// Largest client frame in bytes.
    #[arg(long, env = "SB_MAX_FRAME_BYTES")]
    pub max_frame_bytes: Option<usize>,
    /// Most connections one gateway process holds.
    #[arg(long, env = "SB_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Most connections one gateway process holds from one client address (an IPv4 address,
    /// an IPv6 /64); 0: no cap; default 1000.
    #[arg(long, env = "SB_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<usize>,
    /// Per-connection bound of queued outbound frames (slow consumers beyond it are closed).
    #[arg(long, env = "SB_MAX_OUTBOUND_FRAMES")]
    pub max_outbound_frames: Option<usize>,
    /// Per-connection bound of queued outbound bytes (slow consumers beyond it are closed); default 8 MiB.
    #[arg(long, env = "SB_MAX_OUTBOUND_BYTES")]
    pub max_outbound_bytes: Option<usize>,
    /// Largest gRPC message between gateway and logic, both ways; default 16 MiB.
    #[arg(long, env = "SB_MAX_LINK_MESSAGE_BYTES")]
    pub max_link_message_bytes: Option<usize>,
    /// Push batches to a gateway are cut before this many bytes; default 1 MiB.
    #[arg(long, env = "SB_PUSH_BATCH_BYTES")]
    pub push_batch_bytes: Option<usize>,
    /// Most bytes of messages in one `sync` or `history` reply (the rest is paged); default 1 MiB.
    #[arg(long, env = "SB_REPLY_MAX_BYTES")]
    pub reply_max_bytes: Option<usize>,
    /// Milliseconds between writes of coalesced ack and read cursors; default 100.
    #[arg(long, env = "SB_CURSOR_FLUSH_MS")]
    pub cursor_flush_ms: Option<u64>,
    /// Load balancers trusted to name the client's address: networks separated by commas
    /// (`10.0.0.0/8,127.0.0.1`). Their PROXY headers are read on the gateway's listeners (see
    /// `proxy_protocol`), and their `Forwarded` / `X-Forwarded-For` headers on the HTTP API
    /// (the right-most address no trusted proxy added is the client). Default: none.
    #[arg(long, env = "SB_TRUSTED_PROXIES")]
    pub trusted_proxies: Option<String>,
    /// PROXY protocol (v1 or v2) on the gateway's WebSocket and raw TCP listeners, from
    /// `trusted_proxies` only: `off` (a header is refused), `optional` or `required`; default off.
    #[arg(long, env = "SB_PROXY_PROTOCOL")]
    pub proxy_protocol: Option<String>,
    /// A gateway's own HTTP listener: `/healthz` (alive), `/readyz` (taking connections; 503
    /// from the start of a drain) and `/metrics` (the gateway's). Default: none.
    #[arg(long, env = "SB_HEALTH_ADDR")]
    pub health_addr: Option<SocketAddr>,
    /// On SIGTERM a gateway reports unready on `/readyz` this long before it drains its
    /// connections, so a load balancer stops sending new ones first; default 0.
    #[arg(long, env = "SB_DRAIN_GRACE_MS")]
    pub drain_grace_ms: Option<u64>,
    /// Serve `/metrics` and `/v1/admin/*` on this (private) address only, instead of on the
    /// client-facing HTTP listener.
    #[arg(long, env = "SB_ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,
    /// Most connections one user holds over all devices (a new `auth` beyond it is refused with
    /// `too_many_connections`; one replacing the same device's connection is not); default 32.
    #[arg(long, env = "SB_MAX_CONNECTIONS_PER_USER")]
    pub max_connections_per_user: Option<usize>,
    /// Most open HTTP API connections (one more is closed at once); default 10000.
    #[arg(long, env = "SB_HTTP_MAX_CONNECTIONS")]
    pub http_max_connections: Option<usize>,
    /// Milliseconds an HTTP client has to send a request head (also closes idle keep-alive
    /// connections); default 10000.
    #[arg(long, env = "SB_HTTP_HEADER_TIMEOUT_MS")]
    pub http_header_timeout_ms: Option<u64>,
    /// Milliseconds to receive, handle and answer one HTTP request (408 after it); default 30000.
    #[arg(long, env = "SB_HTTP_REQUEST_TIMEOUT_MS")]
    pub http_request_timeout_ms: Option<u64>,
    /// Milliseconds a new connection has to `auth`.
    #[arg(long, env = "SB_AUTH_TIMEOUT_MS")]
    pub auth_timeout_ms: Option<u64>,
    /// Milliseconds of silence after which a connection is closed.
    #[arg(long, env = "SB_IDLE_TIMEOUT_MS")]
    pub idle_timeout_ms: Option<u64>,
    /// Milliseconds a gateway holds the acks it answered itself before handing logic the highest
    /// per connection and conversation; 0 relays every ack to logic; default 50.
    #[arg(long, env = "SB_ACK_FLUSH_MS")]
    pub ack_flush_ms: Option<u64>,
    /// Longest milliseconds a gateway shard under fan-out load lets pushes wait for its next
    /// write round (fewer writes per delivery); 0 writes every push at once; default 20.
    #[arg(long, env = "SB_PUSH_LINGER_MS")]
    pub push_linger_ms: Option<u64>,
    /// Milliseconds before an unacked push is sent again.
    #[arg(long, env = "SB_REPUSH_MS")]
    pub repush_ms: Option<u64>,
    /// Access token lifetime in seconds.
    #[arg(long, env = "SB_ACCESS_TTL_SECS")]
    pub access_ttl_secs: Option<u64>,
    /// Milliseconds a connection's session counts as valid before a request re-reads it (a
    /// revoked session or banned user stops being served within it); default 5000.
    #[arg(long, env = "SB_SESSION_CHECK_MS")]
    pub session_check_ms: Option<u64>,
    /// Seconds between deletions of sessions whose refresh token expired; default 3600.
    #[arg(long, env = "SB_SESSION_PRUNE_SECS")]
    pub session_prune_secs: Option<u64>,
    /// Refresh token lifetime in seconds.
    #[arg(long, env = "SB_REFRESH_TTL_SECS")]
    pub refresh_ttl_secs: Option<u64>,
    /// argon2id memory cost in KiB.
    #[arg(long, env = "SB_ARGON2_MEMORY_KIB")]
    pub argon2_memory_kib: Option<u32>,
    /// Password hashes (register, login) computed at once; more wait for a slot; default: the
    /// number of CPUs.
    #[arg(long, env = "SB_ARGON2_CONCURRENCY")]
    pub argon2_concurrency: Option<usize>,
    /// Login attempts per second per account (0 disables); default 1.
    #[arg(long, env = "SB_LOGIN_RATE")]
    pub login_rate: Option<f64>,
    /// Burst of login attempts per account; default 10.
    #[arg(long, env = "SB_LOGIN_BURST")]
    pub login_burst: Option<f64>,
    /// argon2id iterations.
    #[arg(long, env = "SB_ARGON2_ITERATIONS")]
    pub argon2_iterations: Option<u32>,
    /// This node's certificate (PEM) for mutual TLS on the internal gRPC links; with
    /// --cluster-tls-key and --cluster-tls-ca (all three or none).
    #[arg(long, env = "SB_CLUSTER_TLS_CERT")]
    pub cluster_tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --cluster-tls-cert.
    #[arg(long, env = "SB_CLUSTER_TLS_KEY")]
    pub cluster_tls_key: Option<PathBuf>,
    /// The CA (PEM) that signed every node's certificate: servers admit only clients it signed,
    /// clients verify servers against it.
    #[arg(long, env = "SB_CLUSTER_TLS_CA")]
    pub cluster_tls_ca: Option<PathBuf>,
    /// This process's id in the registry (default: random).
    #[arg(long, env = "SB_NODE_ID")]
    pub node_id: Option<String>,
    /// Logic gRPC URL published in the registry (default http://<logic-addr>).
    #[arg(long, env = "SB_ADVERTISE_LOGIC")]
    pub advertise_logic: Option<String>,
    /// Records the persist worker writes per batch at most.
    #[arg(long, env = "SB_PERSIST_BATCH")]
    pub persist_batch: Option<usize>,
    /// Seconds the persist worker retries a failing store, broker or lock
    /// session before it exits non-zero (for its supervisor to restart it); default 60.
    #[arg(long, env = "SB_PERSIST_GIVE_UP_SECS")]
    pub persist_give_up_secs: Option<u64>,
    /// Milliseconds after which a reserved seq whose send no instance completed is voided
    /// (cluster logic); default 30000.
    #[arg(long, env = "SB_VOID_AFTER_MS")]
    pub void_after_ms: Option<u64>,
    /// Socket requests per second per user (0 disables); default 50.
    #[arg(long, env = "SB_USER_RATE")]
    pub user_rate: Option<f64>,
    /// Burst of socket requests per user; default 100.
    #[arg(long, env = "SB_USER_BURST")]
    pub user_burst: Option<f64>,
    /// Socket requests per second per client IP (0 disables); default 500.
    #[arg(long, env = "SB_IP_RATE")]
    pub ip_rate: Option<f64>,
    /// Burst of socket requests per client IP; default 1000.
    #[arg(long, env = "SB_IP_BURST")]
    pub ip_burst: Option<f64>,
    /// HTTP register/login/refresh per second per client IP (0 disables); default 5.
    #[arg(long, env = "SB_AUTH_RATE")]
    pub auth_rate: Option<f64>,
    /// Burst of HTTP auth requests per client IP; default 20.
    #[arg(long, env = "SB_AUTH_BURST")]
    pub auth_burst: Option<f64>,
    /// Bearer token of the admin endpoints (/v1/admin/*); unset disables them.
    #[arg(long, env = "SB_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Milliseconds after sending during which a message may be recalled; default 120000.
    #[arg(long, env = "SB_RECALL_WINDOW_MS")]
    pub recall_window_ms: Option<u64>,
    /// Milliseconds after sending during which a text message may be edited; default 86400000.
    #[arg(long, env = "SB_EDIT_WINDOW_MS")]
    pub edit_window_ms: Option<u64>,
    /// Most messages `history` with `fold` reads after a page to apply their edits, reactions
    /// and pins; default 5000.
    #[arg(long, env = "SB_FOLD_SCAN")]
    pub fold_scan: Option<usize>,
    /// Most matches `search` ranks for one request (the newest); default 200.
    #[arg(long, env = "SB_SEARCH_SCAN")]
    pub search_scan: Option<usize>,
    /// Most users one message may mention; default 50.
    #[arg(long, env = "SB_MAX_MENTIONS")]
    pub max_mentions: Option<usize>,
    /// Most push tokens one user keeps (one per device; a new device's token replaces the
    /// oldest beyond it); default 20.
    #[arg(long, env = "SB_MAX_PUSH_TOKENS")]
    pub max_push_tokens: Option<usize>,
    /// Offline notifications go to this webhook (`http://host:port/path`); unset sends none.
    #[arg(long, env = "SB_NOTIFY_URL")]
    pub notify_url: Option<String>,
    /// Key of the notifications' HMAC-SHA256 signature (`X-Switchboard-Signature`); required
    /// with `notify_url`.
    #[arg(long, env = "SB_NOTIFY_SECRET", hide_env_values = true)]
    pub notify_secret: Option<String>,
    /// Milliseconds new messages may stay unacked and unread before their conversation is
    /// notified; default 30000.
    #[arg(long, env = "SB_NOTIFY_DELAY_MS")]
    pub notify_delay_ms: Option<u64>,
    /// Attempts per notification, the first included; default 5.
    #[arg(long, env = "SB_NOTIFY_ATTEMPTS")]
    pub notify_attempts: Option<u32>,
    /// Milliseconds before the first retry of a notification (doubling, at most 60 s); default 1000.
    #[arg(long, env = "SB_NOTIFY_BACKOFF_MS")]
    pub notify_backoff_ms: Option<u64>,
    /// Bytes of pending notifications kept in memory; more are dropped (and counted); default
    /// 16777216 (16 MiB).
    #[arg(long, env = "SB_NOTIFY_MAX_PENDING_BYTES")]
    pub notify_max_pending_bytes: Option<usize>,
    /// Largest file `POST /v1/files` takes, in bytes; default 10485760 (10 MiB).
    #[arg(long, env = "SB_MAX_FILE_BYTES")]
    pub max_file_bytes: Option<u64>,
    /// Bytes of files all uploads and downloads together may hold in memory; more wait; default
    /// 67108864 (64 MiB).
    #[arg(long, env = "SB_FILE_BUFFER_BYTES")]
    pub file_buffer_bytes: Option<u64>,
    /// Most members of one group; default 2000.
    #[arg(long, env = "SB_MAX_GROUP_MEMBERS")]
    pub max_group_members: Option<usize>,
    /// Milliseconds an unanswered call rings before it ends with reason "timeout"; default 30000.
    #[arg(long, env = "SB_RING_TIMEOUT_MS")]
    pub ring_timeout_ms: Option<u64>,
}

/// One `key = value` line of [`Settings::describe`] into `set` (secrets and URL passwords
/// masked), or, for an option left unset, a comment into `unset` with the default it takes
/// (`default`, null when it has none: off or generated).
fn describe_one(set: &mut String, unset: &mut String, name: &str, key: &str, value: Value, default: &Value) {
    if value.is_null() {
        match default {
            Value::Null => unset.push_str(&format!("# {name}\n")),
            d => unset.push_str(&format!("# {name} = {d}\n")),
        }
        return;
    }
    let value = match (key, value) {
        ("jwt_secret" | "cluster_secret" | "admin_token" | "notify_secret", _) => Value::from("***"),
        (_, Value::String(s)) => Value::from(mask_password(&s)),
        (_, v) => v,
    };
    // A JSON string, number, boolean or array of those is the same value in TOML.
    set.push_str(&format!("{key} = {value}\n"));
}

/// `scheme://user:password@host…` with the password replaced by `***`; anything else as is.
fn mask_password(s: &str) -> String {
    let Some((scheme, rest)) = s.split_once("://") else { return s.to_owned() };
    let Some((userinfo, host)) = rest.split_once('@') else { return s.to_owned() };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => s.to_owned(),
    }
}

/// Fills what `dst` leaves out (an unset option) from `src`, table by table.
fn fill_unset(dst: &mut toml::Table, src: toml::Table) {
    for (key, value) in src {
        match (dst.get_mut(&key), value) {
            (Some(toml::Value::Table(table)), toml::Value::Table(from)) => fill_unset(table, from),
            (Some(_), _) => {}
            (None, value) => {
                dst.insert(key, value);
            }
        }
    }
}

/// Keys of a file written before the store's options moved under `[storage]`, as they were
/// then (top-level), for a hint in the error.
fn misplaced_storage_keys(text: &str) -> Vec<String> {
    let Ok(table) = text.parse::<toml::Table>() else { return Vec::new() };
    let storage = crate::roles::storage_option_ids();
    table.keys().filter(|k| storage.contains(k)).cloned().collect()
}

impl Settings {
    /// [`Settings::with_file`] for `role`: a key of the file that the role does not read is
    /// refused with its name ([`crate::roles`]).
    pub fn with_role_file(self, role: Role, path: Option<&Path>) -> anyhow::Result<Self> {
        if let Some(path) = path {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            if let Ok(table) = text.parse::<toml::Table>() {
                crate::roles::check_file_keys(role, &table).with_context(|| format!("in {}", path.display()))?;
            }
        }
        self.with_file(path)?.only_for(role)
    }

    /// The options `role` reads, the others (`SB_*` variables meant for another role) dropped.
    pub fn only_for(self, role: Role) -> anyhow::Result<Self> {
        let toml::Value::Table(mut table) = toml::Value::try_from(&self).context("the options")? else {
            anyhow::bail!("settings are not a table");
        };
        table.retain(|k, _| k == "storage" || role.reads(k));
        if let Some(toml::Value::Table(storage)) = table.get_mut("storage") {
            storage.retain(|k, _| role.reads(k));
        }
        Ok(toml::Value::Table(table).try_into()?)
    }

    /// Fills every option not given on the command line or in the
    /// environment from the TOML file at `path`.
    pub fn with_file(self, path: Option<&Path>) -> anyhow::Result<Self> {
        let Some(path) = path else { return Ok(self) };
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let file: toml::Table = match toml::from_str::<Settings>(&text) {
            // Parsed once more as a table: options left out are absent from it, not defaults.
            Ok(_) => text.parse().with_context(|| format!("parsing {}", path.display()))?,
            Err(e) => {
                let moved = misplaced_storage_keys(&text);
                let e = anyhow::Error::new(e).context(format!("parsing {}", path.display()));
                if moved.is_empty() {
                    return Err(e);
                }
                return Err(
                    e.context(format!("{} belong(s) under [storage] now (see tuning/config/)", moved.join(", ")))
                );
            }
        };
        // The options set by flags and variables, as a table (unset ones are left out).
        let toml::Value::Table(mut merged) = toml::Value::try_from(&self).context("the options given as flags")? else {
            anyhow::bail!("settings are not a table");
        };
        fill_unset(&mut merged, file);
        toml::Value::Table(merged).try_into().with_context(|| format!("merging {} under the flags", path.display()))
    }

    /// The settings as a TOML file would give them: every option set (by flag, `SB_*` variable
    /// or the file) with its value, secrets and URL passwords masked, then the options left to
    /// their defaults as comments with the value each takes ([`defaults::defaults`]); with
    /// `role`, only the options that role reads.
    pub fn describe(&self, role: Option<Role>) -> anyhow::Result<String> {
        let shown = |key: &str| role.is_none_or(|r| r.reads(key));
        let Value::Object(fields) = serde_json::to_value(self)? else {
            anyhow::bail!("settings are not a table");
        };
        let mut defaults = serde_json::to_value(defaults::defaults())?;
        // Left unset, the backend follows the URLs that are set.
        if let Ok(choice) = self.storage.choice() {
            defaults["storage"]["backend"] = Value::from(choice.name());
        }
        let (mut set, mut unset) =
            (String::new(), String::from("\n# Left to their defaults (the value each takes):\n"));
        let mut tables = String::new();
        for (key, value) in fields {
            if let Value::Object(table) = value {
                // A section (`[storage]`), after the top-level keys as TOML wants.
                tables.push_str(&format!("\n[{key}]\n"));
                for (k, v) in table.into_iter().filter(|(k, _)| shown(k)) {
                    let default = &defaults[&key][&k];
                    describe_one(&mut tables, &mut unset, &format!("{key}.{k}"), &k, v, default);
                }
                continue;
            }
            if shown(&key) {
                describe_one(&mut set, &mut unset, &key, &key, value, &defaults[&key]);
            }
        }
        Ok(set + &tables + &unset)
    }

    /// Limits of the HTTP API listener (defaults in [`HttpLimits::default`]).
    pub fn http_limits(&self) -> HttpLimits {
        let mut l = HttpLimits::default();
        if let Some(n) = self.http_max_connections {
            l.max_connections = n.max(1);
        }
        if let Some(ms) = self.http_header_timeout_ms {
            l.header_timeout = Duration::from_millis(ms.max(1));
        }
        if let Some(ms) = self.http_request_timeout_ms {
            l.request_timeout = Duration::from_millis(ms.max(1));
        }
        l
    }

    /// The load balancers trusted to name client addresses (`--trusted-proxies`).
    pub fn trusted_proxies(&self) -> anyhow::Result<TrustedProxies> {
        TrustedProxies::parse(self.trusted_proxies.as_deref().unwrap_or_default())
            .map_err(|e| anyhow::anyhow!("--trusted-proxies: {e}"))
    }

    /// How long a gateway reports unready before it drains (`--drain-grace-ms`).
    pub fn drain_grace(&self) -> Duration {
        Duration::from_millis(self.drain_grace_ms.unwrap_or(defaults::DRAIN_GRACE_MS))
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(|| PathBuf::from(defaults::DATA_DIR))
    }
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr.unwrap_or(defaults::HTTP_ADDR)
    }
    pub fn ws_addr(&self) -> SocketAddr {
        self.ws_addr.unwrap_or_else(|| GatewayConfig::default().ws_addr)
    }
    /// The raw TCP listen address; `None` when set to "off".
    pub fn tcp_addr(&self) -> anyhow::Result<Option<SocketAddr>> {
        match self.tcp_addr.as_deref() {
            None => Ok(GatewayConfig::default().tcp_addr),
            Some("off") => Ok(None),
            Some(a) => Ok(Some(a.parse().with_context(|| format!("--tcp-addr {a}"))?)),
        }
    }
    pub fn logic_addr(&self) -> SocketAddr {
        self.logic_addr.unwrap_or(defaults::LOGIC_ADDR)
    }
    pub fn push_addr(&self) -> SocketAddr {
        self.push_addr.unwrap_or_else(|| GatewayConfig::default().push_addr)
    }
    /// Logic URLs a gateway starts with (comma-separated in --logic-url);
    /// in a cluster the registry keeps the list current.
    pub fn logic_urls(&self) -> Vec<String> {
        match &self.logic_url {
            Some(list) => list.split(',').map(str::trim).filter(|u| !u.is_empty()).map(String::from).collect(),
            None => vec![format!("http://{}", self.logic_addr())],
        }
    }
    /// How long a reserved seq may stay pending before it is voided (at least 100 ms).
    pub fn void_after(&self) -> Duration {
        Duration::from_millis(self.void_after_ms.unwrap_or(defaults::VOID_AFTER_MS).max(100))
    }
    pub fn node_id(&self) -> String {
        self.node_id.clone().unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()))
    }

    /// Mutual TLS on the internal links, when configured (all three files or none).
    pub fn cluster_tls(&self) -> anyhow::Result<Option<ClusterTls>> {
        match (&self.cluster_tls_cert, &self.cluster_tls_key, &self.cluster_tls_ca) {
            (None, None, None) => Ok(None),
            (Some(c), Some(k), Some(a)) => Ok(Some(ClusterTls::from_files(c, k, a).map_err(anyhow::Error::msg)?)),
            _ => anyhow::bail!("mutual TLS needs all of --cluster-tls-cert, --cluster-tls-key and --cluster-tls-ca"),
        }
    }
    /// The token secret: configured, or read from (created once in) the data dir.
    pub fn jwt_secret(&self) -> anyhow::Result<Vec<u8>> {
        if let Some(s) = &self.jwt_secret {
            anyhow::ensure!(s.len() >= MIN_SECRET_BYTES, "--jwt-secret must be at least {MIN_SECRET_BYTES} bytes");
            return Ok(s.as_bytes().to_vec());
        }
        let dir = self.data_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("jwt.secret");
        match std::fs::read_to_string(&path) {
            Ok(s) => {
                let s = s.trim();
                // Never an empty or short HMAC key, whatever a crash or full disk left behind.
                anyhow::ensure!(
                    s.len() >= MIN_SECRET_BYTES,
                    "{} holds {} bytes, fewer than {MIN_SECRET_BYTES}: remove it to generate a new key",
                    path.display(),
                    s.len()
                );
                return Ok(s.as_bytes().to_vec());
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
        let secret: String = (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
        write_private(&path, &secret).with_context(|| format!("writing {}", path.display()))?;
        Ok(secret.into_bytes())
    }

    /// The cluster secret, checked: at least [`MIN_SECRET_BYTES`] of visible ASCII.
    pub fn cluster_secret(&self) -> anyhow::Result<Option<String>> {
        let Some(s) = &self.cluster_secret else { return Ok(None) };
        anyhow::ensure!(s.len() >= MIN_SECRET_BYTES, "--cluster-secret must be at least {MIN_SECRET_BYTES} bytes");
        anyhow::ensure!(s.bytes().all(|b| b.is_ascii_graphic()), "--cluster-secret must be visible ASCII");
        Ok(Some(s.clone()))
    }

    /// Refuses to run a cluster role without its secrets: instances that generated their own
    /// token keys could not verify each other's tokens, and internal links would be open.
    /// `logic` and `gateway` are cluster roles when Redis is configured.
    pub fn require_cluster_secrets(&self, role: &str) -> anyhow::Result<()> {
        if self.storage.redis_url.is_none() {
            if self.cluster_secret.is_none() {
                tracing::warn!(
                    role,
                    "no --cluster-secret: the internal gRPC link is unauthenticated (one trusted host only)"
                );
            }
            return Ok(());
        }
        anyhow::ensure!(
            self.cluster_secret.is_some(),
            "the {role} role needs --cluster-secret (SB_CLUSTER_SECRET) in a cluster"
        );
        self.cluster_secret()?;
        if role == "logic" {
            anyhow::ensure!(
                self.jwt_secret.is_some(),
                "the logic role needs --jwt-secret (SB_JWT_SECRET) in a cluster"
            );
            self.jwt_secret()?;
        }
        Ok(())
    }

    /// `public` lists the gateways advertised when no registry is used.
    pub fn logic_config(
        &self,
        public: Vec<switchboard_logic::GatewayInfo>,
    ) -> anyhow::Result<switchboard_logic::LogicConfig> {
        let mut c = switchboard_logic::LogicConfig::new(self.jwt_secret()?);
        if let Some(s) = self.access_ttl_secs {
            c.access_ttl = Duration::from_secs(s);
        }
        if let Some(s) = self.refresh_ttl_secs {
            c.refresh_ttl = Duration::from_secs(s);
        }
        if let Some(n) = self.max_connections_per_user {
            c.max_connections_per_user = n.max(1);
        }
        if let Some(ms) = self.session_check_ms {
            c.session_check = Duration::from_millis(ms);
        }
        if let Some(s) = self.session_prune_secs {
            c.session_prune = Duration::from_secs(s.max(1));
        }
        if let Some(m) = self.argon2_memory_kib {
            c.hash_cost.memory_kib = m;
        }
        if let Some(i) = self.argon2_iterations {
            c.hash_cost.iterations = i;
        }
        let rate = |r: Option<f64>, b: Option<f64>, d: switchboard_logic::limits::Rate| {
            switchboard_logic::limits::Rate::new(r.unwrap_or(d.per_sec), b.unwrap_or(d.burst))
        };
        c.user_rate = rate(self.user_rate, self.user_burst, c.user_rate);
        c.ip_rate = rate(self.ip_rate, self.ip_burst, c.ip_rate);
        c.auth_rate = rate(self.auth_rate, self.auth_burst, c.auth_rate);
        c.login_rate = rate(self.login_rate, self.login_burst, c.login_rate);
        if let Some(n) = self.argon2_concurrency {
            c.hash_concurrency = n.max(1);
        }
        c.admin_token = self.admin_token.clone().filter(|t| !t.is_empty());
        if let Some(n) = self.max_group_members {
            c.max_group_members = n;
        }
        if let Some(ms) = self.recall_window_ms {
            c.recall_window = Duration::from_millis(ms);
        }
        if let Some(ms) = self.edit_window_ms {
            c.edit_window = Duration::from_millis(ms);
        }
        if let Some(n) = self.fold_scan {
            c.fold_scan = n.max(1);
        }
        if let Some(n) = self.search_scan {
            c.search_scan = n.max(1);
        }
        if let Some(n) = self.max_mentions {
            c.max_mentions = n;
        }
        if let Some(n) = self.max_push_tokens {
            c.max_push_tokens = n.max(1);
        }
        if let Some(n) = self.max_file_bytes {
            c.max_file_bytes = n;
        }
        if let Some(n) = self.file_buffer_bytes {
            c.file_buffer_bytes = n;
        }
        if let Some(url) = self.notify_url.as_deref().filter(|u| !u.is_empty()) {
            anyhow::ensure!(
                switchboard_logic::notify::valid_url(url),
                "notify_url must be http://host[:port]/path (put a relay in front of an https endpoint)"
            );
            let secret = self.notify_secret.as_deref().filter(|s| !s.is_empty());
            let secret =
                secret.context("notify_secret is required with notify_url (the webhook checks the signature)")?;
            c.notify = Some(NotifyConfig {
                url: url.to_owned(),
                secret: secret.as_bytes().to_vec(),
                delay: self.notify_delay_ms.map_or(NotifyConfig::DEFAULT_DELAY, Duration::from_millis),
                attempts: self.notify_attempts.unwrap_or(NotifyConfig::DEFAULT_ATTEMPTS).max(1),
                backoff: self.notify_backoff_ms.map_or(NotifyConfig::DEFAULT_BACKOFF, Duration::from_millis),
                max_pending_bytes: self.notify_max_pending_bytes.unwrap_or(NotifyConfig::DEFAULT_MAX_PENDING_BYTES),
                dead_letter: Some(self.data_dir().join("notify-dead-letter.jsonl")),
            });
        }
        if let Some(v) = self.max_link_message_bytes {
            c.push.max_message_bytes = v;
        }
        if let Some(v) = self.push_batch_bytes {
            c.push.batch_bytes = v;
        }
        anyhow::ensure!(
            c.push.batch_bytes < c.push.max_message_bytes,
            "--push-batch-bytes must be below --max-link-message-bytes"
        );
        if let Some(v) = self.reply_max_bytes {
            c.reply_max_bytes = v;
        }
        if let Some(ms) = self.cursor_flush_ms {
            c.cursor_flush = Duration::from_millis(ms.max(1));
        }
        c.gateways = match self.public_ws.clone() {
            Some(urls) => urls.into_iter().map(|ws| switchboard_logic::GatewayInfo { ws, tcp: None }).collect(),
            None => public,
        };
        Ok(c)
    }

    pub fn gateway_config(&self) -> anyhow::Result<switchboard_gateway::GatewayConfig> {
        let mut c = switchboard_gateway::GatewayConfig {
            cluster_secret: self.cluster_secret()?,
            cluster_tls: self.cluster_tls()?,
            ws_addr: self.ws_addr(),
            tcp_addr: self.tcp_addr()?,
            push_addr: self.push_addr(),
            advertise: self.advertise_push.clone(),
            logic_endpoints: self.logic_urls(),
            trusted_proxies: self.trusted_proxies()?,
            ..Default::default()
        };
        if let Some(mode) = &self.proxy_protocol {
            c.proxy_protocol = mode.parse().map_err(|e| anyhow::anyhow!("--proxy-protocol: {e}"))?;
        }
        if let Some(v) = self.shards {
            c.shards = v;
        }
        if let Some(v) = self.max_frame_bytes {
            c.max_frame_bytes = v;
        }
        if let Some(v) = self.max_connections {
            c.max_connections = v;
        }
        if let Some(v) = self.max_connections_per_ip {
            c.max_connections_per_ip = v;
        }
        if let Some(v) = self.max_outbound_frames {
            c.max_outbound_frames = v;
        }
        if let Some(v) = self.max_outbound_bytes {
            c.max_outbound_bytes = v;
        }
        if let Some(v) = self.max_link_message_bytes {
            c.max_link_message_bytes = v;
        }
        if let Some(ms) = self.auth_timeout_ms {
            c.auth_timeout = Duration::from_millis(ms);
        }
        if let Some(ms) = self.idle_timeout_ms {
            c.idle_timeout = Duration::from_millis(ms);
        }
        if let Some(ms) = self.repush_ms {
            c.repush_interval = Duration::from_millis(ms);
        }
        if let Some(ms) = self.ring_timeout_ms {
            c.ring_timeout = Duration::from_millis(ms);
        }
        if let Some(ms) = self.ack_flush_ms {
            c.ack_flush = Duration::from_millis(ms);
        }
        if let Some(ms) = self.push_linger_ms {
            c.push_linger = Duration::from_millis(ms);
        }
        Ok(c)
    }
}

/// Shortest accepted token or cluster secret.
pub const MIN_SECRET_BYTES: usize = 32;

/// Writes a 0600 file atomically: a temporary file, fsynced, renamed over `path` (so `path` is
/// either absent or complete, never empty).
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_fills_only_what_flags_left_open() {
        let dir = std::env::temp_dir().join(format!("sb-settings-{}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sb.toml");
        std::fs::write(&path, "http_addr = \"127.0.0.1:1111\"\nws_addr = \"127.0.0.1:2222\"\nshards = 3\n").unwrap();
        let cli = Settings { ws_addr: Some("127.0.0.1:3333".parse().unwrap()), ..Default::default() };
        let s = cli.with_file(Some(&path)).unwrap();
        assert_eq!(s.http_addr().port(), 1111);
        assert_eq!(s.ws_addr().port(), 3333, "the flag wins over the file");
        assert_eq!(s.shards, Some(3));
        assert_eq!(s.logic_addr().port(), 9100, "default");
        std::fs::write(&path, "no_such_option = 1\n").unwrap();
        assert!(Settings::default().with_file(Some(&path)).is_err(), "unknown keys are refused");
        // A file of the flat layout: the store's keys are named with where they go now.
        std::fs::write(&path, "shards = 1\nredis_url = \"redis://r\"\n").unwrap();
        let err = format!("{:#}", Settings::default().with_file(Some(&path)).unwrap_err());
        assert!(err.contains("redis_url belong(s) under [storage]"), "{err}");
        // Flags and the file meet inside a section too, and non-finite numbers survive.
        std::fs::write(&path, "user_rate = 1.0\n[storage]\nkey_prefix = \"f:\"\ntopic_prefix = \"f.\"\n").unwrap();
        let cli = Settings {
            user_rate: Some(f64::INFINITY),
            storage: StorageSettings { key_prefix: Some("cli:".into()), ..Default::default() },
            ..Default::default()
        };
        let s = cli.with_file(Some(&path)).unwrap();
        assert_eq!(s.user_rate, Some(f64::INFINITY));
        assert_eq!((s.storage.key_prefix(), s.storage.topic_prefix()), ("cli:".into(), "f.".into()));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn example_configs_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tuning/config");
        for role in [Role::AllInOne, Role::Gateway, Role::Logic, Role::Persist] {
            let path = dir.join(format!("{}.toml", role.name()));
            // Each file holds only its role's options.
            let s = Settings::default()
                .with_role_file(role, Some(&path))
                .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            s.storage.check().unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        }
        let persist = Settings::default().with_file(Some(&dir.join("persist.toml"))).unwrap();
        assert_eq!(persist.persist_give_up_secs, Some(60));
        assert!(matches!(
            persist.storage.choice().unwrap(),
            crate::storage_settings::StoreChoice::Cluster {
                durable: crate::storage_settings::Durable::Postgres { .. },
                ..
            }
        ));
        let all = Settings::default().with_file(Some(&dir.join("all-in-one.toml"))).unwrap();
        let err = Settings::default().with_role_file(Role::Gateway, Some(&dir.join("logic.toml"))).unwrap_err();
        assert!(format!("{err:#}").contains("is not an option of the gateway role"), "{err:#}");
        assert!(matches!(all.storage.choice().unwrap(), crate::storage_settings::StoreChoice::Embedded));
    }

    #[test]
    fn generated_secret_is_stable() {
        let dir = std::env::temp_dir().join(format!("sb-secret-{}", rand::random::<u32>()));
        let s = Settings { data_dir: Some(dir.clone()), ..Default::default() };
        let a = s.jwt_secret().unwrap();
        assert_eq!(a.len(), 64);
        assert_eq!(s.jwt_secret().unwrap(), a);
        // an empty or short key file (a crash, a full disk) is refused, never used as a key
        std::fs::write(dir.join("jwt.secret"), "").unwrap();
        assert!(s.jwt_secret().is_err());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn cluster_roles_need_sane_secrets() {
        let long = "x".repeat(MIN_SECRET_BYTES);
        let storage = StorageSettings { redis_url: Some("redis://127.0.0.1:1".into()), ..Default::default() };
        let cluster = Settings { storage, ..Default::default() };
        assert!(cluster.require_cluster_secrets("gateway").is_err(), "no cluster secret");
        let s = Settings { cluster_secret: Some(long.clone()), ..cluster.clone() };
        assert!(s.require_cluster_secrets("gateway").is_ok());
        assert!(s.require_cluster_secrets("logic").is_err(), "logic also needs --jwt-secret");
        let s = Settings { jwt_secret: Some("short".into()), ..s };
        assert!(s.require_cluster_secrets("logic").is_err(), "a short jwt secret");
        let s = Settings { jwt_secret: Some(long.clone()), ..s };
        assert!(s.require_cluster_secrets("logic").is_ok());
        let s = Settings { cluster_secret: Some("too short".into()), ..s };
        assert!(s.require_cluster_secrets("logic").is_err());
        assert!(Settings::default().require_cluster_secrets("logic").is_ok(), "one host, no cluster");
    }
}
