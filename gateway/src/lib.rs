//! Switchboard connection gateway: sharded mio front end (WebSocket with JSON or
//! protobuf frames, and raw length-prefixed TCP with protobuf frames) that relays
//! client frames to logic as canonical JSON over a [`LogicLink`] (gRPC, or in process)
//! and receives pushes through [`LocalPush`] (behind its own gRPC service, or called
//! directly by logic in the same process).

mod acks;
pub mod bincodec;
mod bridge;
mod calls;
mod conn;
pub mod connid;
pub mod frame;
mod ipcap;
pub mod link;
mod metrics;
pub mod pool;
/// PROXY protocol headers (public for the fuzz targets in `fuzz/`).
pub mod proxyproto;
mod push;
mod session;
mod shard;
/// Raw TCP length-prefix framing (public for the fuzz targets in `fuzz/`).
pub mod tcpframe;
pub mod wheel;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Poll, Waker};
use socket2::{Domain, Protocol, Socket, Type};
use switchboard_proto::internal::gateway_server::GatewayServer;
pub use switchboard_proto::trusted::TrustedProxies;

pub use crate::link::{GrpcLink, LinkFuture, LogicLink};
pub use crate::metrics::GatewayMetrics;
pub use crate::pool::{EndpointStats, LogicPool};
pub use crate::push::LocalPush;

use crate::bridge::{Bridge, ShardLink, ShardMsg};
use crate::metrics::CpuSampler;
use crate::push::PushService;
use crate::shard::{Env, Shard, WAKER};

/// Whether the client listeners read a PROXY protocol header (v1 or v2) from connections of
/// trusted proxies ([`GatewayConfig::trusted_proxies`]). Connections from other addresses are
/// clients themselves in every mode, and one that starts with a PROXY header is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProxyMode {
    /// No header is read: a connection that sends one is refused.
    #[default]
    Off,
    /// A trusted proxy's connection may start with a header.
    Optional,
    /// A trusted proxy's connection must start with a header (refused without one).
    Required,
}

impl std::fmt::Display for ProxyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Off => "off",
            Self::Optional => "optional",
            Self::Required => "required",
        })
    }
}

impl std::str::FromStr for ProxyMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Self::Off),
            "optional" => Ok(Self::Optional),
            "required" => Ok(Self::Required),
            _ => Err(format!("{s:?}: expected off, optional or required")),
        }
    }
}

/// Gateway settings.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// WebSocket listener (path `/ws`); port 0 picks a free port.
    pub ws_addr: SocketAddr,
    /// Raw TCP listener (big-endian u32 length + protobuf `Frame`, both directions);
    /// port 0 picks a free port; `None` => no TCP listener.
    pub tcp_addr: Option<SocketAddr>,
    /// Where the gRPC `Gateway` (Push) service listens; port 0 allowed.
    pub push_addr: SocketAddr,
    /// URL logic dials for pushes; `None` => `http://{bound push addr}`.
    pub advertise: Option<String>,
    /// Logic gRPC endpoints, e.g. `http://127.0.0.1:9100`; at least one. Picked per RPC by
    /// power-of-two-choices; later replaced through [`LogicPool::update`].
    pub logic_endpoints: Vec<String>,
    /// Consecutive transport failures that open a logic instance's circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker keeps its instance out before one probe is let through.
    pub breaker_cooldown: Duration,
    /// Shard threads; 0 => number of CPUs.
    pub shards: usize,
    /// Largest accepted client frame.
    pub max_frame_bytes: usize,
    /// Time allowed between connecting and a successful `auth`.
    pub auth_timeout: Duration,
    /// A connection silent longer than this is closed.
    pub idle_timeout: Duration,
    /// Re-send unacked `msg` pushes this often.
    pub repush_interval: Duration,
    /// Re-send an unacked push at most this many times.
    pub repush_attempts: u32,
    /// The gateway answers a client's `ack` itself when it holds the acked push, and hands logic
    /// the highest acked seq per connection and conversation this long after the first ack
    /// (see `acks`); zero relays every `ack` to logic.
    pub ack_flush: Duration,
    /// Longest time a shard under fan-out load lets pushes wait for its next write round, so
    /// that one write carries several messages (see `shard::PushRounds`); replies queued behind
    /// such pushes wait with them. Zero writes every push at once.
    pub push_linger: Duration,
    /// Per-connection outbound queue bound in frames (slow consumers are closed).
    pub max_outbound_frames: usize,
    /// Per-connection outbound queue bound in bytes (slow consumers are closed).
    pub max_outbound_bytes: usize,
    /// Unacked `msg` pushes kept per connection for re-push (the oldest is dropped beyond;
    /// the client catches up with `sync`). They share the frames logic sent, so this bounds
    /// references, and `max_frame_bytes`-sized messages at most this many times.
    pub max_unacked: usize,
    /// Per-connection queued requests awaiting logic.
    pub max_pending_requests: usize,
    /// Connections per process.
    pub max_connections: usize,
    /// Connections per client address bucket (an IPv4 address, an IPv6 /64) over the whole
    /// process; 0: no cap. Behind a trusted proxy that sends PROXY headers, the address the
    /// header names is counted.
    pub max_connections_per_ip: usize,
    /// PROXY protocol on the WebSocket and raw TCP listeners.
    pub proxy_protocol: ProxyMode,
    /// Addresses whose connections may carry a PROXY header.
    pub trusted_proxies: TrustedProxies,
    /// Secret every internal call must carry, both ways (`None`: internal links are open; only
    /// for a gateway and logic on one trusted host).
    pub cluster_secret: Option<String>,
    /// Mutual TLS on the push service and the links to logic (`None`: plain TCP).
    pub cluster_tls: Option<switchboard_proto::cluster_tls::ClusterTls>,
    /// Largest gRPC message on the links to and from logic, both directions (logic's push
    /// batches are cut well below it).
    pub max_link_message_bytes: usize,
    /// A `call.offer` unanswered this long ends with a `call.hangup` push (`reason: "timeout"`)
    /// to the caller and a `call.hangup` relayed through logic to the callee.
    pub ring_timeout: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            ws_addr: SocketAddr::from(([127, 0, 0, 1], 8090)),
            tcp_addr: Some(SocketAddr::from(([127, 0, 0, 1], 8091))),
            push_addr: SocketAddr::from(([127, 0, 0, 1], 9101)),
            advertise: None,
            logic_endpoints: vec!["http://127.0.0.1:9100".into()],
            breaker_failures: 3,
            breaker_cooldown: Duration::from_secs(2),
            shards: 0,
            max_frame_bytes: 64 * 1024,
            auth_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            repush_interval: Duration::from_secs(5),
            repush_attempts: 5,
            ack_flush: Duration::from_millis(50),
            push_linger: Duration::from_millis(20),
            max_outbound_frames: 1024,
            max_outbound_bytes: 8 << 20,
            max_unacked: 1024,
            max_pending_requests: 64,
            max_connections: 100_000,
            max_connections_per_ip: 1000,
            proxy_protocol: ProxyMode::Off,
            trusted_proxies: TrustedProxies::default(),
            max_link_message_bytes: 16 << 20,
            cluster_secret: None,
            cluster_tls: None,
            ring_timeout: Duration::from_secs(30),
        }
    }
}

/// Asks every shard to re-announce its authenticated connections to logic (spread over a few
/// loop turns per shard). Cheap to clone.
#[derive(Clone)]
pub struct Reannouncer {
    shards: Vec<ShardLink>,
}

impl Reannouncer {
    pub fn reannounce(&self) {
        for s in &self.shards {
            s.send(ShardMsg::Reannounce);
        }
    }
}

/// How long one call to logic over gRPC may take, retry included.
const LOGIC_TIMEOUT: Duration = Duration::from_secs(15);

/// Errors of [`Gateway::start`].
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// Binding a listener failed.
    #[error("bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// Other I/O failure (poll, waker, threads).
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The logic endpoint URL is invalid.
    #[error("invalid logic endpoint {endpoint:?}: {message}")]
    Endpoint { endpoint: String, message: String },
    /// The configuration cannot be used.
    #[error("invalid config: {0}")]
    Config(String),
}

/// A running gateway.
pub struct Gateway {
    ws_addr: SocketAddr,
    tcp_addr: Option<SocketAddr>,
    push_addr: SocketAddr,
    advertise: String,
    metrics: Arc<GatewayMetrics>,
    pool: Option<Arc<LogicPool>>,
    cpu: Option<CpuSampler>,
    links: Vec<ShardLink>,
    threads: Vec<std::thread::JoinHandle<()>>,
    push_stop: Option<tokio::sync::oneshot::Sender<()>>,
    push_task: Option<tokio::task::JoinHandle<()>>,
    bridge: Bridge,
}

/// How long a stopping gateway waits for logic to hear about the connections it closed.
const DISCONNECTS_GRACE: Duration = Duration::from_secs(5);

fn bind_reuseport(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

impl Gateway {
    /// Binds listeners, starts shard threads and the push gRPC server (on the
    /// current tokio runtime), returns once listening. Logic is reached over gRPC at
    /// `config.logic_endpoints`.
    pub async fn start(config: GatewayConfig) -> Result<Gateway, GatewayError> {
        Self::start_with(config, None).await
    }

    /// [`Gateway::start`] with the link to logic given (`None`: gRPC to
    /// `config.logic_endpoints`). With a link, `logic_endpoints` is not used.
    pub async fn start_with(config: GatewayConfig, link: Option<Arc<dyn LogicLink>>) -> Result<Gateway, GatewayError> {
        let shards = if config.shards == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            config.shards
        };
        if shards > connid::MAX_SHARDS {
            return Err(GatewayError::Config(format!("at most {} shards", connid::MAX_SHARDS)));
        }
        let rt = tokio::runtime::Handle::current();
        let (link, pool) = match link {
            Some(link) => (link, None),
            None => {
                if config.logic_endpoints.is_empty() {
                    return Err(GatewayError::Config("no logic endpoints".into()));
                }
                let pool = LogicPool::new(&config.logic_endpoints, config.breaker_failures, config.breaker_cooldown)
                    .map_err(|(endpoint, message)| GatewayError::Endpoint { endpoint, message })?
                    .with_max_message_bytes(config.max_link_message_bytes)
                    .and_then(|p| p.with_tls(config.cluster_tls.clone()))
                    .map_err(|message| GatewayError::Config(format!("cluster TLS: {message}")))?;
                let secret = match config.cluster_secret.as_deref() {
                    Some(s) => Some(
                        switchboard_proto::cluster_auth::value(s)
                            .ok_or_else(|| GatewayError::Config("the cluster secret must be visible ASCII".into()))?,
                    ),
                    None => None,
                };
                let pool = Arc::new(pool.with_secret(secret).map_err(GatewayError::Config)?);
                let link: Arc<dyn LogicLink> = Arc::new(GrpcLink::new(pool.clone(), LOGIC_TIMEOUT));
                (link, Some(pool))
            }
        };

        // Push service listener first: its address is what logic dials.
        // A TLS configuration tonic refuses stops the start (before any thread runs), not
        // just the push server.
        let builder = switchboard_proto::cluster_tls::server(config.cluster_tls.as_ref())
            .map_err(|e| GatewayError::Config(format!("push server TLS configuration: {e}")))?;
        let push_listener = tokio::net::TcpListener::bind(config.push_addr)
            .await
            .map_err(|source| GatewayError::Bind { addr: config.push_addr, source })?;
        let push_addr = push_listener.local_addr()?;
        let scheme = switchboard_proto::cluster_tls::scheme(config.cluster_tls.as_ref());
        let advertise = config.advertise.clone().unwrap_or_else(|| format!("{scheme}://{push_addr}"));

        // WebSocket listeners, one per shard, sharing the port via SO_REUSEPORT.
        let mut listeners = Vec::with_capacity(shards);
        let mut ws_addr = config.ws_addr;
        for _ in 0..shards {
            let l = bind_reuseport(ws_addr).map_err(|source| GatewayError::Bind { addr: ws_addr, source })?;
            ws_addr = l.local_addr()?;
            listeners.push(l);
        }
        // Raw TCP listeners, likewise one per shard.
        let mut tcp_listeners: Vec<Option<std::net::TcpListener>> = Vec::with_capacity(shards);
        let mut tcp_addr = config.tcp_addr;
        for _ in 0..shards {
            match tcp_addr {
                Some(addr) => {
                    let l = bind_reuseport(addr).map_err(|source| GatewayError::Bind { addr, source })?;
                    tcp_addr = Some(l.local_addr()?);
                    tcp_listeners.push(Some(l));
                }
                None => tcp_listeners.push(None),
            }
        }

        let metrics = Arc::new(GatewayMetrics::default());
        if let Some(pool) = &pool {
            let _ = metrics.pool.set(pool.clone());
        }
        let bridge = Bridge::new(rt.clone(), link, Arc::from(advertise.as_str()), metrics.clone());

        let cfg = Arc::new(config);
        let ip_caps = Arc::new(ipcap::IpCaps::new(cfg.max_connections_per_ip));
        // Every shard's mailbox exists before any shard runs: the links to logic serve pushes
        // from the first one they open.
        let mut mailboxes = Vec::with_capacity(shards);
        let mut links = Vec::with_capacity(shards);
        for _ in 0..shards {
            let poll = Poll::new()?;
            let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
            let (tx, rx) = crossbeam_channel::unbounded();
            links.push(ShardLink::new(tx, waker));
            mailboxes.push((poll, rx));
        }
        if let Some(pool) = &pool {
            pool.serve_pushes(&advertise, LocalPush { shards: links.clone() }).map_err(GatewayError::Config)?;
        }
        let mut threads = Vec::with_capacity(shards);
        for (idx, ((l, tl), (poll, rx))) in listeners.into_iter().zip(tcp_listeners).zip(mailboxes).enumerate() {
            let link = links[idx].clone();
            let env = Env {
                cfg: cfg.clone(),
                metrics: metrics.clone(),
                bridge: bridge.clone(),
                link: link.clone(),
                wheel: wheel::Wheel::new(shard::TICK, shard::WHEEL_SLOTS, Instant::now()),
                now: Instant::now(),
                now_ms: 0,
                epoch: Instant::now(),
                frames_out: 0,
                scratch: vec![0; shard::SCRATCH_BYTES],
                ip_caps: ip_caps.clone(),
                acks: Default::default(),
            };
            let tl = tl.map(mio::net::TcpListener::from_std);
            let shard = Shard::new(idx, poll, mio::net::TcpListener::from_std(l), tl, rx, env)?;
            let t = std::thread::Builder::new().name(format!("sb-gw-shard-{idx}")).spawn(move || shard.run());
            match t {
                Ok(t) => threads.push(t),
                Err(e) => {
                    for link in &links {
                        ShardLink::send(link, ShardMsg::Shutdown);
                    }
                    return Err(e.into());
                }
            }
        }

        let cpu = match CpuSampler::start(metrics.clone(), Duration::from_secs(1)) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "cpu load sampler not started");
                None
            }
        };

        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let svc = GatewayServer::new(PushService { local: LocalPush { shards: links.clone() } })
            .max_decoding_message_size(cfg.max_link_message_bytes)
            .max_encoding_message_size(cfg.max_link_message_bytes);
        let svc = tonic::service::interceptor::InterceptedService::new(
            svc,
            switchboard_proto::cluster_auth::checker(cfg.cluster_secret.clone()),
        );
        // Accepted sockets need their own `TCP_NODELAY` (the builder's covers only listeners it
        // binds): a reply written while another is unacknowledged would wait for a delayed ACK.
        let incoming = tonic::transport::server::TcpIncoming::from(push_listener).with_nodelay(Some(true));
        let push_task = rt.spawn(async move {
            // Push batches carry up to ~1,000 frames: windows large enough that one
            // never waits for a flow-control update.
            let res = builder
                .tcp_nodelay(true)
                .initial_stream_window_size(Some(4 << 20))
                .initial_connection_window_size(Some(8 << 20))
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stop_rx.await;
                })
                .await;
            if let Err(e) = res {
                tracing::warn!(error = %e, "push server failed");
            }
        });
        tracing::info!(%ws_addr, ?tcp_addr, %push_addr, %advertise, shards, "gateway listening");
        Ok(Gateway {
            ws_addr,
            tcp_addr,
            push_addr,
            advertise,
            metrics,
            pool,
            cpu,
            links,
            threads,
            push_stop: Some(stop_tx),
            push_task: Some(push_task),
            bridge,
        })
    }

    /// Actual bound WebSocket address.
    pub fn ws_addr(&self) -> SocketAddr {
        self.ws_addr
    }

    /// Actual bound raw TCP address; `None` when no TCP listener was configured.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// Actual bound push (gRPC) address.
    pub fn push_addr(&self) -> SocketAddr {
        self.push_addr
    }

    /// URL logic dials for pushes.
    pub fn advertise(&self) -> &str {
        &self.advertise
    }

    /// Shared metrics.
    pub fn metrics(&self) -> Arc<GatewayMetrics> {
        self.metrics.clone()
    }

    /// The pool of logic instances (feed it registry updates with [`LogicPool::update`]);
    /// `None` when the gateway was started with its own [`LogicLink`].
    pub fn logic_pool(&self) -> Option<Arc<LogicPool>> {
        self.pool.clone()
    }

    /// A handle that makes the gateway tell logic again about every authenticated connection
    /// (after the route table was lost, e.g. a Redis restart).
    pub fn reannouncer(&self) -> Reannouncer {
        Reannouncer { shards: self.links.clone() }
    }

    /// Delivers pushes to this gateway's connections without going through gRPC (logic in the
    /// same process).
    pub fn local_push(&self) -> LocalPush {
        LocalPush { shards: self.links.clone() }
    }

    /// Graceful drain: stop accepting, push `drain` to every connection, close
    /// them, join shard threads, stop the push server.
    pub async fn shutdown(mut self) {
        for link in &self.links {
            link.send(ShardMsg::Shutdown);
        }
        let threads = std::mem::take(&mut self.threads);
        let joined = tokio::task::spawn_blocking(move || {
            for t in threads {
                if t.join().is_err() {
                    tracing::warn!("shard thread panicked");
                }
            }
        })
        .await;
        if joined.is_err() {
            tracing::warn!("joining shard threads failed");
        }
        // Logic hears about every connection the drain closed before the gateway is gone.
        self.bridge.disconnects_told(DISCONNECTS_GRACE).await;
        if let Some(stop) = self.push_stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.push_task.take() {
            let _ = task.await;
        }
        if let Some(mut cpu) = self.cpu.take() {
            let _ = tokio::task::spawn_blocking(move || cpu.stop()).await;
        }
        tracing::info!("gateway stopped");
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // Dropped without shutdown(): still stop the shards and the server.
        if !self.threads.is_empty() {
            for link in &self.links {
                link.send(ShardMsg::Shutdown);
            }
        }
        if let Some(stop) = self.push_stop.take() {
            let _ = stop.send(());
        }
    }
}
