//! A role's own HTTP listener (`--health-addr`, gateway and persist): `/healthz` (the process
//! is alive), `/readyz` (a gateway takes new connections: 503 from the start of a drain, so a
//! load balancer checking it stops sending clients before the drain closes the ones it has) and
//! `/metrics` (the role's counters and histograms).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

/// Whether the gateway is ready; shared by the listener and the role that drains.
#[derive(Clone)]
pub struct Health(Arc<AtomicBool>);

impl Default for Health {
    fn default() -> Self {
        Self(Arc::new(AtomicBool::new(true)))
    }
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }

    /// The listener's routes (requests need no `ConnectInfo`); `render` writes `/metrics`.
    pub fn router(&self, render: impl Fn(&mut String) + Clone + Send + Sync + 'static) -> Router {
        let ready = self.clone();
        Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route(
                "/readyz",
                get(move || async move {
                    if ready.0.load(Ordering::SeqCst) {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
                    }
                }),
            )
            .route(
                "/metrics",
                get(move || async move {
                    let mut out = String::new();
                    render(&mut out);
                    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
                }),
            )
    }
}
