//! The roles the `switchboard` binary runs, as a library so tests can start
//! them in-process: `all-in-one` (gateway + logic on embedded storage, linked
//! in process through the same interfaces as the gRPC links of a split deployment),
//! `logic`, `gateway` and `persist` (the cluster roles over Redis, Kafka and
//! PostgreSQL).

mod defaults;
mod health;
mod heartbeat;
pub mod http_serve;
pub mod inproc;
pub mod roles;
pub mod settings;
mod storage_settings;
mod stores;
pub mod telemetry;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use switchboard_gateway::{Gateway, TrustedProxies};
use switchboard_logic::push::{GrpcPush, PushTransport};
use switchboard_logic::{http::MetricsHook, GatewayInfo, Logic, LogicService};
use switchboard_storage::kafka::{ensure_topics, Topics};
use switchboard_storage::persist::{PersistConfig, PersistStats, PersistWorker};
use switchboard_storage::redis::RedisStore;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use settings::Settings;

/// A background task with its shutdown trigger.
pub(crate) struct Task {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Task {
    pub(crate) fn spawn<F, Fut>(f: F) -> Self
    where
        F: FnOnce(oneshot::Receiver<()>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (stop, stopped) = oneshot::channel();
        Self { stop, task: tokio::spawn(f(stopped)) }
    }

    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Pushes to gateways over gRPC with the configured message limit and cluster secret.
fn grpc_push(s: &Settings) -> anyhow::Result<GrpcPush> {
    let secret = s
        .cluster_secret()?
        .map(|c| switchboard_proto::cluster_auth::value(&c).context("cluster secret"))
        .transpose()?;
    Ok(GrpcPush::new(s.logic_config(Vec::new())?.push.max_message_bytes, secret).with_tls(s.cluster_tls()?))
}

/// Concurrent gRPC streams one gateway connection may open on a logic instance.
const LOGIC_MAX_STREAMS: u32 = 16_384;
/// HTTP/2 connection window of the logic gRPC server (bytes).
const LOGIC_CONNECTION_WINDOW: u32 = 64 << 20;

/// A running logic instance: its gRPC and HTTP servers.
pub struct LogicRole {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// The operator listener (`/metrics`, `/v1/admin/*`), when `--admin-addr` sets one.
    pub admin_addr: Option<SocketAddr>,
    pub logic: Arc<Logic>,
    grpc: Task,
    http: Task,
    admin: Option<Task>,
    cursors: Task,
    /// Sends offline notifications as they come due.
    notifier: Task,
    pruner: Task,
    heartbeat: Option<heartbeat::Heartbeat>,
    /// Voids seqs whose send no instance completed (cluster only).
    sweeper: Option<Task>,
    /// Tells when the embedded store has closed (embedded only).
    store_closed: Option<switchboard_storage::embedded::ClosedWatch>,
}

impl LogicRole {
    /// Opens the stores and serves gRPC (for gateways) and HTTP (for clients); pushes go to
    /// gateways over gRPC.
    pub async fn start(s: &Settings, public: Vec<GatewayInfo>, extra: Vec<MetricsHook>) -> anyhow::Result<Self> {
        let transport = Arc::new(grpc_push(s)?);
        Self::start_with(s, public, extra, transport).await
    }

    /// [`LogicRole::start`] with the way pushes reach gateways given.
    pub async fn start_with(
        s: &Settings,
        public: Vec<GatewayInfo>,
        extra: Vec<MetricsHook>,
        transport: Arc<dyn PushTransport>,
    ) -> anyhow::Result<Self> {
        let (stores, opened) = stores::open(s).await?;
        let config = s.logic_config(public)?;
        let (flush_every, max_message) = (config.cursor_flush, config.push.max_message_bytes);
        let logic = Logic::new(config, stores, transport);
        let janitor = logic.clone();
        let pruner = Task::spawn(|stopped| async move {
            janitor
                .run_sessions(async {
                    let _ = stopped.await;
                })
                .await
        });
        let notifying = logic.clone();
        let notifier = Task::spawn(|stopped| async move {
            switchboard_logic::notify::run(notifying, async {
                let _ = stopped.await;
            })
            .await
        });
        let flusher = logic.cursors.clone();
        let cursors = Task::spawn(|stopped| async move {
            flusher
                .run_flusher(flush_every, async {
                    let _ = stopped.await;
                })
                .await
        });

        let grpc_listener =
            TcpListener::bind(s.logic_addr()).await.with_context(|| format!("binding {}", s.logic_addr()))?;
        let grpc_addr = grpc_listener.local_addr()?;
        // The gateways' links end (after their calls in flight) when the server stops.
        let (closing, links_closing) = tokio::sync::watch::channel(false);
        let service = LogicService::new(logic.clone(), links_closing)
            .into_server()
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message);
        let service = tonic::service::interceptor::InterceptedService::new(
            service,
            switchboard_proto::cluster_auth::checker(s.cluster_secret()?),
        );
        let grpc_tls = s.cluster_tls()?;
        let scheme = switchboard_proto::cluster_tls::scheme(grpc_tls.as_ref());
        // A TLS configuration tonic refuses stops the start, not just this server.
        let builder = switchboard_proto::cluster_tls::server(grpc_tls.as_ref())
            .map_err(|e| anyhow::anyhow!("logic gRPC TLS configuration: {e}"))?;
        let grpc = Task::spawn(|stopped| async move {
            // The builder's `tcp_nodelay` covers only listeners it binds itself: without it, a
            // push or result written while another is unacknowledged waits for the gateway's
            // delayed ACK (~40 ms).
            let incoming = tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true));
            // Gateways multiplex every client's requests over a few HTTP/2 connections: a
            // burst of connects puts thousands of small `Authenticate` streams on one of them.
            // h2 sends GOAWAY (ENHANCE_YOUR_CALM, "too_many_data_frames") once small DATA frames
            // not yet read by the service exceed half the connection window, so the window is
            // sized for such a burst.
            let served = builder
                .tcp_nodelay(true)
                .max_concurrent_streams(Some(LOGIC_MAX_STREAMS))
                .http2_max_pending_accept_reset_streams(Some(LOGIC_MAX_STREAMS as usize))
                .initial_connection_window_size(Some(LOGIC_CONNECTION_WINDOW))
                .initial_stream_window_size(Some(1 << 20))
                // A gateway that stops answering pings (gone without a reset) has its links
                // ended, and their calls' tasks with them.
                .http2_keepalive_interval(Some(Duration::from_secs(10)))
                .http2_keepalive_timeout(Some(Duration::from_secs(10)))
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                    let _ = closing.send(true);
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "logic gRPC server failed");
            }
        });

        let http_listener =
            TcpListener::bind(s.http_addr()).await.with_context(|| format!("binding {}", s.http_addr()))?;
        let http_addr = http_listener.local_addr()?;
        let limits = s.http_limits();
        let trusted = s.trusted_proxies()?;
        let (router, admin, admin_addr) = match s.admin_addr {
            None => (switchboard_logic::http::router(logic.clone(), extra), None, None),
            Some(addr) => {
                let (client, operator) = switchboard_logic::http::split_routers(logic.clone(), extra);
                let listener = TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
                let admin_addr = listener.local_addr()?;
                let trusted = trusted.clone();
                let admin = Task::spawn(|stopped| http_serve::serve(listener, operator, limits, trusted, stopped));
                (client, Some(admin), Some(admin_addr))
            }
        };
        let http = Task::spawn(|stopped| http_serve::serve(http_listener, router, limits, trusted, stopped));
        let (heartbeat, sweeper, store_closed) = match opened {
            stores::Opened::Cluster(parts) => {
                let stores::ClusterParts { redis, messages } = *parts;
                let rpc = s.advertise_logic.clone().unwrap_or_else(|| format!("{scheme}://{grpc_addr}"));
                let heartbeat = heartbeat::Heartbeat::logic(redis, s.node_id(), rpc, logic.metrics.clone());
                let void_after = s.void_after();
                let sweeper = Task::spawn(|stopped| async move {
                    messages
                        .run_sweeper(void_after, async {
                            let _ = stopped.await;
                        })
                        .await
                });
                (Some(heartbeat), Some(sweeper), None)
            }
            stores::Opened::Embedded(closed) => (None, None, Some(closed)),
        };
        tracing::info!(%grpc_addr, %http_addr, cluster = heartbeat.is_some(), "logic serving");
        Ok(Self {
            grpc_addr,
            http_addr,
            admin_addr,
            logic,
            grpc,
            http,
            admin,
            cursors,
            pruner,
            notifier,
            heartbeat,
            sweeper,
            store_closed,
        })
    }

    /// Stops serving, then writes the cursors still in memory.
    pub async fn stop(self) {
        if let Some(h) = self.heartbeat {
            h.stop().await;
        }
        if let Some(s) = self.sweeper {
            s.stop().await;
        }
        self.http.stop().await;
        if let Some(a) = self.admin {
            a.stop().await;
        }
        self.grpc.stop().await;
        self.pruner.stop().await;
        self.notifier.stop().await;
        self.cursors.stop().await;
    }
}

/// A running gateway, registered in the cluster registry when configured, with its own
/// health listener when `--health-addr` is set.
pub struct GatewayRole {
    pub gateway: Gateway,
    heartbeat: Option<heartbeat::Heartbeat>,
    health: Option<(SocketAddr, health::Health, Task)>,
    grace: Duration,
}

impl GatewayRole {
    /// Starts a gateway talking to the logic instances at `--logic-url`
    /// (and, in a cluster, to those the registry lists).
    pub async fn start(s: &Settings) -> anyhow::Result<Self> {
        let gateway = Gateway::start(s.gateway_config()?).await.context("starting the gateway")?;
        let heartbeat = match &s.storage.redis_url {
            Some(url) => {
                let redis = RedisStore::connect_tls(url, &s.storage.key_prefix(), &s.storage.backend_tls()?)
                    .await
                    .context("connecting to Redis")?;
                let ws = s.public_ws.clone().and_then(|v| v.into_iter().next());
                let ws = ws.unwrap_or_else(|| format!("ws://{}/ws", gateway.ws_addr()));
                let tcp = gateway.tcp_addr().map(|a| a.to_string()).unwrap_or_default();
                Some(heartbeat::Heartbeat::gateway(redis, s.node_id(), &gateway, ws, tcp).await)
            }
            None => None,
        };
        let metrics = gateway.metrics();
        let health = serve_health(s, move |out| metrics.render(out)).await?;
        tracing::info!(ws = %gateway.ws_addr(), push = %gateway.push_addr(), "gateway serving");
        Ok(Self { gateway, heartbeat, health, grace: s.drain_grace() })
    }

    /// The health listener's address (`--health-addr`).
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health.as_ref().map(|(addr, _, _)| *addr)
    }

    /// Reports unready and leaves the registry, waits the drain grace (a load balancer stops
    /// sending new connections meanwhile), then drains and closes every connection.
    pub async fn stop(self) {
        if let Some((_, health, _)) = &self.health {
            health.set_ready(false);
        }
        if let Some(h) = self.heartbeat {
            h.stop().await;
        }
        if !self.grace.is_zero() {
            tracing::info!(grace_ms = self.grace.as_millis() as u64, "gateway unready; draining after the grace");
            tokio::time::sleep(self.grace).await;
        }
        self.gateway.shutdown().await;
        if let Some((_, _, task)) = self.health {
            task.stop().await;
        }
    }
}

/// Starts the role's health listener when `--health-addr` asks for one.
async fn serve_health(
    s: &Settings,
    render: impl Fn(&mut String) + Clone + Send + Sync + 'static,
) -> anyhow::Result<Option<(SocketAddr, health::Health, Task)>> {
    let Some(addr) = s.health_addr else { return Ok(None) };
    let listener = TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    let addr = listener.local_addr()?;
    let health = health::Health::default();
    let router = health.router(render);
    let limits = s.http_limits();
    let task = Task::spawn(|stopped| http_serve::serve(listener, router, limits, TrustedProxies::default(), stopped));
    Ok(Some((addr, health, task)))
}

/// The persist worker role: Kafka -> the durable store, PostgreSQL or MongoDB (see
/// [`switchboard_storage::persist`]).
pub struct PersistRole {
    pub stats: Arc<PersistStats>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<switchboard_storage::Result<()>>,
    /// `--health-addr`: `/healthz`, `/readyz` and `/metrics` (the worker's counters).
    health: Option<(SocketAddr, health::Health, Task)>,
}

impl PersistRole {
    pub async fn start(s: &Settings) -> anyhow::Result<Self> {
        let (_, brokers, durable) = stores::cluster_of(&s.storage, "persist")?;
        let store = stores::DurableStore::connect(&durable, &s.storage, 4).await?;
        let topics = Topics::with_prefix(&s.storage.topic_prefix());
        ensure_topics(&brokers, &topics).await.context("creating Kafka topics")?;
        let topic = topics.messages.clone();
        let mut config = PersistConfig::default();
        config.max_batch = s.persist_batch.unwrap_or(config.max_batch);
        if let Some(secs) = s.persist_give_up_secs {
            config.give_up_after = Duration::from_secs(secs);
        }
        let worker = PersistWorker::new(&brokers, topics, store.log, store.locks, config)
            .context("creating the persist worker")?;
        let stats = worker.stats.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(worker.run(async {
            let _ = stopped.await;
        }));
        let shown = stats.clone();
        let health = serve_health(s, move |out| {
            shown.render(out);
            switchboard_storage::DRIVER_ERRORS.render(out);
            switchboard_storage::metrics::render(switchboard_storage::metrics::Shown::Persist, out);
        })
        .await?;
        tracing::info!(%topic, "persist worker running");
        Ok(Self { stats, stop, task, health })
    }

    /// Runs until `shutdown` resolves, then stops the worker; or until the
    /// worker fails, with its error (the process then exits non-zero, for
    /// its supervisor to restart it).
    pub async fn run_until(mut self, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        tokio::select! {
            _ = shutdown => self.stop().await,
            done = &mut self.task => match done.context("persist worker task")? {
                Ok(()) => anyhow::bail!("persist worker stopped on its own"),
                Err(e) => Err(e).context("persist worker failed"),
            },
        }
    }

    /// The health listener's address (`--health-addr`).
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health.as_ref().map(|(addr, _, _)| *addr)
    }

    /// Stops the worker between two writes; its error if it had failed.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        let done = self.task.await.context("persist worker task")?.context("persist worker failed");
        if let Some((_, _, task)) = self.health {
            task.stop().await;
        }
        done
    }
}

/// How long [`AllInOne::stop`] waits for the last calls into logic to end.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// Gateway and logic in one process on embedded storage.
pub struct AllInOne {
    pub logic: LogicRole,
    pub gateway: Gateway,
}

impl AllInOne {
    pub async fn start(s: &Settings) -> anyhow::Result<Self> {
        // The store is checked before anything listens: one process runs on the embedded store.
        let choice = s.storage.choice().context("[storage]")?;
        anyhow::ensure!(
            matches!(choice, storage_settings::StoreChoice::Embedded),
            "all-in-one runs on the embedded store, not {:?} (start the cluster roles for that)",
            choice.name()
        );
        // The gateway first, its link bound to logic once logic is up, so logic can push
        // straight into its shards and /metrics and /v1/gateways can describe it.
        let link = Arc::new(inproc::InProcessLink::default());
        let gateway =
            Gateway::start_with(s.gateway_config()?, Some(link.clone())).await.context("starting the gateway")?;
        let metrics = gateway.metrics();
        let hook: MetricsHook = Arc::new(move |out: &mut String| metrics.render(out));
        let public = vec![GatewayInfo {
            ws: format!("ws://{}/ws", gateway.ws_addr()),
            tcp: gateway.tcp_addr().map(|a| a.to_string()),
        }];
        let grpc = grpc_push(s)?;
        let transport =
            Arc::new(inproc::InProcessPush::new(gateway.advertise().to_owned(), gateway.local_push(), grpc));
        let logic = match LogicRole::start_with(s, public, vec![hook], transport).await {
            Ok(l) => l,
            Err(e) => {
                gateway.shutdown().await;
                return Err(e);
            }
        };
        link.bind(logic.logic.clone());
        Ok(Self { logic, gateway })
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.logic.http_addr
    }
    pub fn ws_addr(&self) -> SocketAddr {
        self.gateway.ws_addr()
    }

    /// Drains the gateway (clients get `drain`), then stops logic. When it returns the data dir
    /// is free for another node: work still holding the store (a call the gateway made on a
    /// closing connection's behalf, a write under way) is waited for, up to [`STOP_WAIT`].
    pub async fn stop(self) {
        let closed = self.logic.store_closed.clone();
        self.gateway.shutdown().await;
        self.logic.stop().await;
        let started = std::time::Instant::now();
        while closed.as_ref().is_some_and(|c| !c.is_closed()) {
            if started.elapsed() >= STOP_WAIT {
                tracing::warn!(
                    "the store is still open {STOP_WAIT:?} after stopping; it closes when its last user ends"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
