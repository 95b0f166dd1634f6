//! Switchboard's logic role: stateless request handling behind the gateway
//! (gRPC `Logic` service) and the HTTP API. All state lives in the stores.

pub mod auth;
pub mod balance;
pub mod cursors;
pub mod error;
pub mod files;
pub mod http;
pub mod limits;
pub mod link;
pub mod link_push;
pub mod metrics;
pub mod notify;
mod ops;
pub mod push;
pub mod service;
pub mod sessions;
pub mod web;

use std::sync::Arc;
use std::time::Duration;

use switchboard_proto::net::ip_bucket_key;
use switchboard_storage::{AccountStore, GroupStore, MessageStore, Registry, RouteTable, SocialStore};

pub use error::ApiError;
pub use service::LogicService;

/// Where a client can reach a gateway (`GET /v1/gateways`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct GatewayInfo {
    pub ws: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp: Option<String>,
}

/// Settings of the logic role.
#[derive(Clone)]
pub struct LogicConfig {
    /// HS256 secret shared by every logic instance of a deployment.
    pub jwt_secret: Vec<u8>,
    pub access_ttl: Duration,
    pub refresh_ttl: Duration,
    pub hash_cost: auth::HashCost,
    /// Gateways advertised to clients.
    pub gateways: Vec<GatewayInfo>,
    /// Most messages one `sync` reply carries.
    pub sync_max: usize,
    /// Most bytes of messages one `sync` or `history` reply carries (at least one message
    /// always goes, so a client can get past any single message); the rest is paged.
    pub reply_max_bytes: usize,
    /// Bounds of the push path (queues and batches in bytes).
    pub push: push::PushLimits,
    /// How often coalesced ack and read cursors are written to the store.
    pub cursor_flush: Duration,
    /// Socket requests per user.
    pub user_rate: limits::Rate,
    /// Socket requests per client IP.
    pub ip_rate: limits::Rate,
    /// HTTP auth requests (register, login, refresh) per client IP.
    pub auth_rate: limits::Rate,
    /// Login attempts per account (whatever their source address).
    pub login_rate: limits::Rate,
    /// Password hashes computed at once (each holds the argon2 memory cost); more wait.
    pub hash_concurrency: usize,
    /// Most members of one group.
    pub max_group_members: usize,
    /// How long after sending a message its sender may recall it.
    pub recall_window: Duration,
    /// How long after sending a text message its sender may edit it.
    pub edit_window: Duration,
    /// Most messages the folded view of `history` reads after a page to apply their events.
    pub fold_scan: usize,
    /// Most matches `search` ranks for one request (the newest of them).
    pub search_scan: usize,
    /// Most users one message may mention.
    pub max_mentions: usize,
    /// Most push tokens one user keeps (a new device's replaces the oldest beyond it).
    pub max_push_tokens: usize,
    /// Largest file `/v1/files` takes, in bytes.
    pub max_file_bytes: u64,
    /// Bytes of files uploads and downloads may hold in memory at once, all together; more wait.
    pub file_buffer_bytes: u64,
    /// The offline-notification webhook; `None` sends none.
    pub notify: Option<notify::NotifyConfig>,
    /// Bearer token of the admin endpoints; `None` disables them.
    pub admin_token: Option<String>,
    /// How often sessions whose refresh token expired are deleted.
    pub session_prune: Duration,
    /// Most connections of one user over all devices (checked at `auth`).
    pub max_connections_per_user: usize,
    /// How long a connection's session counts as valid after it was last read from the store:
    /// a request after that re-reads it, so a revoked session or a banned user stops being
    /// served within this time even if the kick push that should have closed the socket was lost.
    pub session_check: Duration,
}

impl LogicConfig {
    pub fn new(jwt_secret: Vec<u8>) -> Self {
        Self {
            jwt_secret,
            access_ttl: Duration::from_secs(900),
            refresh_ttl: Duration::from_secs(30 * 24 * 3600),
            hash_cost: auth::HashCost::default(),
            gateways: Vec::new(),
            sync_max: 500,
            reply_max_bytes: 1 << 20,
            push: push::PushLimits::default(),
            cursor_flush: Duration::from_millis(100),
            user_rate: limits::Rate::new(50.0, 100.0),
            ip_rate: limits::Rate::new(500.0, 1000.0),
            auth_rate: limits::Rate::new(5.0, 20.0),
            login_rate: limits::Rate::new(1.0, 10.0),
            hash_concurrency: std::thread::available_parallelism().map_or(2, |n| n.get()),
            max_group_members: 2000,
            recall_window: Duration::from_secs(120),
            edit_window: Duration::from_secs(24 * 3600),
            fold_scan: 5000,
            search_scan: 200,
            max_mentions: 50,
            max_push_tokens: 20,
            max_file_bytes: 10 << 20,
            file_buffer_bytes: 64 << 20,
            notify: None,
            admin_token: None,
            session_prune: Duration::from_secs(3600),
            max_connections_per_user: 32,
            session_check: Duration::from_secs(5),
        }
    }
}

/// The backends logic runs on.
#[derive(Clone)]
pub struct Stores {
    pub accounts: Arc<dyn AccountStore>,
    pub social: Arc<dyn SocialStore>,
    pub messages: Arc<dyn MessageStore>,
    pub groups: Arc<dyn GroupStore>,
    /// Uploaded files (`/v1/files`).
    pub files: Arc<dyn switchboard_storage::files::FileStore>,
    pub routes: Arc<dyn RouteTable>,
    /// The cluster registry; `None` in a single-process deployment, where
    /// the configured gateways are advertised as they are.
    pub registry: Option<Arc<dyn Registry>>,
}

/// What a conversation lock guards besides the order of appends: the completion signal of the
/// last send whose push is not enqueued yet (each send enqueues after the one before it).
pub(crate) type ConvTail = Option<tokio::sync::oneshot::Receiver<()>>;

/// Kibibytes, rounded up.
fn kib(bytes: u64) -> u64 {
    bytes.div_ceil(1024)
}

/// Longest wait for a password-hashing slot before the request is refused as `rate_limited`.
const HASH_WAIT: Duration = Duration::from_secs(5);

/// Stripes of the per-conversation lock (conversations hash onto them).
const CONV_LOCKS: usize = 1024;

/// Shared state of one logic instance.
pub struct Logic {
    pub config: LogicConfig,
    pub stores: Stores,
    pub key: auth::TokenKey,
    pub pusher: push::Pusher,
    pub cursors: Arc<cursors::Cursors>,
    pub metrics: Arc<metrics::LogicMetrics>,
    /// Offline notifications (see [`notify`]).
    pub notifier: notify::Notifier,
    user_limits: limits::Limiter,
    ip_limits: limits::Limiter,
    auth_limits: limits::Limiter,
    login_limits: limits::Limiter,
    /// Slots for password hashing (see [`Logic::hash_slot`]).
    hash_slots: limits::Slots,
    /// Sessions confirmed valid lately (see [`Logic::confirm_session`]).
    sessions: Arc<sessions::SessionWatch>,
    /// Checks of pushed-to sessions, taken by [`Logic::run_sessions`].
    session_checks: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<sessions::Check>>>,
    conv_locks: Vec<tokio::sync::Mutex<ConvTail>>,
    /// Room for file bytes in memory, in KiB (see [`Logic::file_buffer`]).
    file_buffer: Arc<tokio::sync::Semaphore>,
}

impl Logic {
    /// A logic instance over `stores`, pushing through `transport` (gRPC to gateways, or a
    /// gateway in the same process). Run [`cursors::Cursors::run_flusher`] on `cursors`.
    pub fn new(config: LogicConfig, stores: Stores, transport: Arc<dyn push::PushTransport>) -> Arc<Self> {
        // A cluster instance (one with a registry) produces to the broker: its /metrics shows how
        // long acknowledgements take.
        let metrics = Arc::new(metrics::LogicMetrics { cluster: stores.registry.is_some(), ..Default::default() });
        let (watch, checks) = sessions::SessionWatch::new(config.session_check);
        let sessions = Arc::new(watch);
        let pusher =
            push::Pusher::new(stores.routes.clone(), transport, config.push, metrics.clone(), sessions.clone());
        let cursors = cursors::Cursors::new(stores.messages.clone());
        Arc::new(Self {
            cursors,
            key: auth::TokenKey::new(config.jwt_secret.clone()),
            user_limits: limits::Limiter::new(config.user_rate),
            ip_limits: limits::Limiter::new(config.ip_rate),
            auth_limits: limits::Limiter::new(config.auth_rate),
            login_limits: limits::Limiter::new(config.login_rate),
            hash_slots: {
                let slots = limits::Slots::new(config.hash_concurrency, HASH_WAIT);
                let _ = metrics.hashing.set(slots.counts());
                slots
            },
            sessions,
            session_checks: std::sync::Mutex::new(Some(checks)),
            stores,
            pusher,
            metrics,
            conv_locks: (0..CONV_LOCKS).map(|_| tokio::sync::Mutex::new(None)).collect(),
            file_buffer: Arc::new(tokio::sync::Semaphore::new(
                kib(config.file_buffer_bytes).clamp(1, u32::MAX as u64) as usize
            )),
            notifier: notify::Notifier::new(config.notify.clone()),
            config,
        })
    }

    /// Holds room for `bytes` of a file in memory (uploads and downloads share
    /// `file_buffer_bytes`); `too_large` for more than all of it, `rate_limited` when no room
    /// comes within the hashing wait.
    pub(crate) async fn file_buffer(&self, bytes: u64) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        let need = kib(bytes).max(1);
        if need > kib(self.config.file_buffer_bytes).clamp(1, u32::MAX as u64) {
            return Err(ApiError::new("too_large", "the file is larger than the server's file buffer"));
        }
        match tokio::time::timeout(HASH_WAIT, self.file_buffer.clone().acquire_many_owned(need as u32)).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(ApiError::rate_limited(1000)),
        }
    }

    /// This instance's `/metrics` text: the counters and histograms, then the queues' depths
    /// (cursors waiting for their flush, push bytes waiting per gateway).
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        self.metrics.render(out);
        let name = "switchboard_logic_cursors_pending";
        let _ = writeln!(
            out,
            "# HELP {name} Ack and read cursors raised and not yet flushed to the store.\n# TYPE {name} gauge\n{name} {}",
            self.cursors.pending()
        );
        self.pusher.render_queues(out);
        self.notifier.render(out);
    }

    /// Charges one socket request to the user's and the IP's buckets (an IPv6 client's bucket is
    /// its /64).
    pub fn limit_request(&self, user: &str, ip: &str) -> Result<(), ApiError> {
        self.user_limits.check(user).map_err(ApiError::rate_limited)?;
        if !ip.is_empty() && self.ip_limits.enabled() {
            self.ip_limits.check(&ip_bucket_key(ip)).map_err(ApiError::rate_limited)?;
        }
        Ok(())
    }

    /// Charges one HTTP auth request to the client IP's bucket (an IPv6 client's is its /64).
    pub fn limit_auth(&self, ip: &str) -> Result<(), ApiError> {
        self.auth_limits.check(&ip_bucket_key(ip)).map_err(ApiError::rate_limited)
    }

    /// Charges one login attempt to the account's bucket, wherever it comes from.
    pub fn limit_login(&self, username: &str) -> Result<(), ApiError> {
        self.login_limits.check(username).map_err(ApiError::rate_limited)
    }

    /// Runs `f` (a password hash or check) in one of the `hash_concurrency` slots, so a burst
    /// of logins queues instead of holding the argon2 memory cost (19 MiB by default) once per
    /// request. A request that waits longer than [`HASH_WAIT`] gets `rate_limited`.
    pub async fn hash_slot<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
        self.hash_slots.run(f).await
    }

    /// `bad_token` when `session` of `user` was revoked or `user` is banned, read from the store
    /// at most once per `session_check` per session (a session or user the store does not hold,
    /// such as a pruned session or a minted token's user, does not end an authenticated
    /// connection).
    pub async fn confirm_session(&self, user: &str, session: &str) -> Result<(), ApiError> {
        if self.sessions.fresh(session) {
            return Ok(());
        }
        self.check_session(user, session).await
    }

    /// Reads `session` of `user` from the store: `bad_token` (and forgotten) when it was revoked
    /// or the user banned, else confirmed for `session_check`.
    async fn check_session(&self, user: &str, session: &str) -> Result<(), ApiError> {
        let accounts = &self.stores.accounts;
        let revoked = accounts.get_session(session).await?.is_some_and(|s| s.revoked || s.user != user);
        // Only an explicit ban counts: tokens minted by `switchboard token` may name users who
        // never registered.
        let banned = accounts.get_user(user).await?.is_some_and(|u| u.banned);
        if revoked || banned {
            self.sessions.forget(session);
            let why = if banned { "the account is banned" } else { "the session was signed out" };
            return Err(ApiError::new("bad_token", why));
        }
        self.sessions.confirmed(session);
        Ok(())
    }

    /// Deletes the sessions whose refresh token expired (with their token hashes), now and every
    /// `session_prune` after, and closes pushed-to connections whose session turns out revoked
    /// (or whose user banned), until `stop` resolves.
    pub async fn run_sessions(&self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut checks = self.session_checks.lock().unwrap_or_else(|p| p.into_inner()).take();
        let mut next_prune = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep_until(next_prune) => {
                    match self.stores.accounts.prune_sessions(switchboard_storage::now_ms()).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(sessions = n, "pruned expired sessions"),
                        Err(e) => tracing::warn!(error = %e, "pruning expired sessions failed"),
                    }
                    next_prune = tokio::time::Instant::now() + self.config.session_prune;
                }
                Some((user, conn)) = async { match checks.as_mut() { Some(rx) => rx.recv().await, None => None } } => {
                    match self.check_session(&user, &conn.session).await {
                        Err(e) if e.code == "bad_token" => {
                            let reason = if e.message.contains("banned") { "account banned" } else { "session revoked" };
                            let frame = serde_json::to_vec(&serde_json::json!({"op": "kick", "reason": reason}))
                                .expect("JSON serializes");
                            self.pusher.to_conn(&user, &conn, frame.into(), None, true).await;
                        }
                        Err(e) => tracing::warn!(error = %e.message, "checking a session failed"),
                        Ok(()) => {}
                    }
                }
            }
        }
    }

    /// The lock serializing append + push of one conversation, so pushes
    /// leave in seq order.
    fn conv_lock(&self, conv: &str) -> &tokio::sync::Mutex<ConvTail> {
        let h = conv.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
        &self.conv_locks[(h % self.conv_locks.len() as u64) as usize]
    }
}
