//! The gateway's link to logic, whatever carries it: gRPC to a pool of logic instances (a split
//! deployment, [`GrpcLink`]) or direct calls into logic in the same process (`all-in-one`, where
//! the binary implements [`LogicLink`] over the logic library: no loopback HTTP/2, one hop fewer).
//! Shards never see which one they use.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use switchboard_proto::internal::{AuthReply, AuthRequest, ClientReply, ClientRequest, ConnEvent};
use tonic::{Code, Status};

use crate::pool::LogicPool;

/// What a link call resolves to: the reply, or why logic could not be reached (a short text
/// the gateway logs; the client gets `unavailable`).
pub type LinkFuture<T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send + 'static>>;

/// The calls a gateway makes to logic.
pub trait LogicLink: Send + Sync + 'static {
    /// Verifies the access token of an `auth` op.
    fn authenticate(&self, token: String) -> LinkFuture<AuthReply>;
    /// A connection finished `auth` (route table, presence).
    fn connected(&self, ev: ConnEvent) -> LinkFuture<()>;
    /// An authenticated connection closed.
    fn disconnected(&self, ev: ConnEvent) -> LinkFuture<()>;
    /// One client request (every op but `auth` and `ping`), its op and rid already read.
    fn handle(&self, req: ClientRequest) -> LinkFuture<ClientReply>;
}

/// [`LogicLink`] over gRPC through a [`LogicPool`] (P2C, circuit breakers, one retry on another
/// instance), each call bounded by `timeout`.
pub struct GrpcLink {
    pool: Arc<LogicPool>,
    timeout: Duration,
}

impl GrpcLink {
    pub fn new(pool: Arc<LogicPool>, timeout: Duration) -> Self {
        Self { pool, timeout }
    }
}

fn message(s: Status) -> String {
    if s.code() == Code::DeadlineExceeded {
        "logic timed out".to_string()
    } else {
        s.message().to_string()
    }
}

impl LogicLink for GrpcLink {
    fn authenticate(&self, token: String) -> LinkFuture<AuthReply> {
        let (pool, timeout) = (self.pool.clone(), self.timeout);
        let req = AuthRequest { token };
        Box::pin(async move {
            pool.call(timeout, |mut c| {
                let req = req.clone();
                async move { c.authenticate(req).await }
            })
            .await
            .map_err(message)
        })
    }

    fn connected(&self, ev: ConnEvent) -> LinkFuture<()> {
        let (pool, timeout) = (self.pool.clone(), self.timeout);
        Box::pin(async move {
            pool.call(timeout, |mut c| {
                let ev = ev.clone();
                async move { c.connected(ev).await }
            })
            .await
            .map(|_| ())
            .map_err(message)
        })
    }

    fn disconnected(&self, ev: ConnEvent) -> LinkFuture<()> {
        let (pool, timeout) = (self.pool.clone(), self.timeout);
        Box::pin(async move {
            pool.call(timeout, |mut c| {
                let ev = ev.clone();
                async move { c.disconnected(ev).await }
            })
            .await
            .map(|_| ())
            .map_err(message)
        })
    }

    fn handle(&self, req: ClientRequest) -> LinkFuture<ClientReply> {
        let (pool, timeout) = (self.pool.clone(), self.timeout);
        Box::pin(async move {
            pool.call(timeout, |mut c| {
                let req = req.clone();
                async move { c.handle(req).await }
            })
            .await
            .map_err(message)
        })
    }
}
