//! The HTTP API's accept loop, in place of `axum::serve`, with the limits a public listener
//! needs: a cap on open connections (one beyond it is closed at once), a header-read timeout
//! (a client that does not finish its request head in time is closed: slowloris, and idle
//! keep-alive connections, since the timer also runs while waiting for the next request), and a
//! timeout on each whole request, body included (`408` after it). Behind a trusted proxy the
//! client's address (what per-address limits count) comes from the forwarding headers.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use std::net::SocketAddr;

use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use switchboard_proto::trusted::TrustedProxies;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Semaphore};

/// Limits of the HTTP listener.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Most open connections.
    pub max_connections: usize,
    /// Time to receive a request's head, counted from when the connection starts waiting for it.
    pub header_timeout: Duration,
    /// Time to receive, handle and answer one request.
    pub request_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            header_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// The address a request from `peer` comes from: `peer`, or behind a trusted proxy the client
/// its `Forwarded` / `X-Forwarded-For` headers name (port 0 when it is not `peer`).
fn client_addr(trusted: &TrustedProxies, peer: SocketAddr, headers: &HeaderMap) -> SocketAddr {
    if !trusted.trusts(peer.ip()) {
        return peer;
    }
    let values = |name: &str| headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>();
    let ip = trusted.client(peer.ip(), &values("forwarded"), &values("x-forwarded-for"));
    if ip == peer.ip() {
        peer
    } else {
        SocketAddr::new(ip, 0)
    }
}

/// Serves `router` on `listener` until `stopped` resolves, then lets open requests finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    trusted: TrustedProxies,
    stopped: oneshot::Receiver<()>,
) {
    let trusted = Arc::new(trusted);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    tokio::pin!(stopped);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "HTTP connection limit reached; closing");
            continue;
        };
        let router = router.clone();
        let trusted = trusted.clone();
        let timeout = limits.request_timeout;
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            let client = client_addr(&trusted, peer, req.headers());
            req.extensions_mut().insert(ConnectInfo(client));
            let mut router = router.clone();
            async move {
                let call = tower_service::Service::call(&mut router, req);
                Ok::<Response, Infallible>(match tokio::time::timeout(timeout, call).await {
                    Ok(Ok(response)) => response,
                    Ok(Err(never)) => match never {},
                    Err(_) => (StatusCode::REQUEST_TIMEOUT, "request took too long").into_response(),
                })
            }
        });
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "HTTP connection ended");
            }
            drop(slot);
        });
    }
    // Open requests get a moment to finish; a client stalling its request head is not waited for.
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
}
