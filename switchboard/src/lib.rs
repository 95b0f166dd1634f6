//! The roles the `switchboard` binary runs, as a library so tests can start
//! them in-process: `all-in-one` (gateway + logic on embedded storage, the
//! two talking over loopback gRPC exactly as in a split deployment),
//! `logic` and `gateway`.

pub mod settings;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use switchboard_gateway::Gateway;
use switchboard_logic::{http::MetricsHook, Logic, LogicService, Stores};
use switchboard_storage::embedded::EmbeddedStore;
use switchboard_storage::memory_routes::MemoryRoutes;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use settings::Settings;

/// A server task with its shutdown trigger.
struct Server {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Server {
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// A running logic instance: its gRPC and HTTP servers.
pub struct LogicRole {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    grpc: Server,
    http: Server,
}

impl LogicRole {
    /// Opens the embedded stores in the data dir and serves gRPC and HTTP.
    pub async fn start(s: &Settings, public_ws: Vec<String>, extra: Vec<MetricsHook>) -> anyhow::Result<Self> {
        let store = EmbeddedStore::open(&s.data_dir()).context("opening the embedded store")?;
        let stores = Stores {
            accounts: Arc::new(store.clone()),
            social: Arc::new(store.clone()),
            messages: Arc::new(store),
            routes: Arc::new(MemoryRoutes::default()),
        };
        let logic = Logic::new(s.logic_config(public_ws)?, stores);

        let grpc_listener =
            TcpListener::bind(s.logic_addr()).await.with_context(|| format!("binding {}", s.logic_addr()))?;
        let grpc_addr = grpc_listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let service = LogicService::new(logic.clone()).into_server();
        let task = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc_listener);
            let served = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "logic gRPC server failed");
            }
        });
        let grpc = Server { stop, task };

        let http_listener =
            TcpListener::bind(s.http_addr()).await.with_context(|| format!("binding {}", s.http_addr()))?;
        let http_addr = http_listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let router = switchboard_logic::http::router(logic, extra);
        let task = tokio::spawn(async move {
            let served = axum::serve(http_listener, router)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "HTTP server failed");
            }
        });
        let http = Server { stop, task };
        tracing::info!(%grpc_addr, %http_addr, "logic serving");
        Ok(Self { grpc_addr, http_addr, grpc, http })
    }

    pub async fn stop(self) {
        self.http.stop().await;
        self.grpc.stop().await;
    }
}

/// Starts a gateway role talking to the logic at `settings.logic_url()`.
pub async fn start_gateway(s: &Settings) -> anyhow::Result<Gateway> {
    let gw = Gateway::start(s.gateway_config()).await.context("starting the gateway")?;
    tracing::info!(ws = %gw.ws_addr(), push = %gw.push_addr(), "gateway serving");
    Ok(gw)
}

/// Gateway and logic in one process on embedded storage.
pub struct AllInOne {
    pub logic: LogicRole,
    pub gateway: Gateway,
}

impl AllInOne {
    pub async fn start(s: &Settings) -> anyhow::Result<Self> {
        // The gateway's metrics live in the process; bind it first (it
        // connects to logic lazily) so /metrics and /v1/gateways know it.
        let mut s = s.clone();
        let logic_listener_probe =
            std::net::TcpListener::bind(s.logic_addr()).with_context(|| format!("binding {}", s.logic_addr()))?;
        let logic_addr = logic_listener_probe.local_addr()?;
        drop(logic_listener_probe);
        s.logic_addr = Some(logic_addr);
        s.logic_url = Some(format!("http://{logic_addr}"));
        let gateway = start_gateway(&s).await?;
        let metrics = gateway.metrics();
        let hook: MetricsHook = Arc::new(move |out: &mut String| metrics.render(out));
        let public_ws = vec![format!("ws://{}/ws", gateway.ws_addr())];
        let logic = match LogicRole::start(&s, public_ws, vec![hook]).await {
            Ok(l) => l,
            Err(e) => {
                gateway.shutdown().await;
                return Err(e);
            }
        };
        Ok(Self { logic, gateway })
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.logic.http_addr
    }
    pub fn ws_addr(&self) -> SocketAddr {
        self.gateway.ws_addr()
    }

    /// Drains the gateway (clients get `drain`), then stops logic.
    pub async fn stop(self) {
        self.gateway.shutdown().await;
        self.logic.stop().await;
    }
}
