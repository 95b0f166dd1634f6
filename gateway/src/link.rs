//! The gateway's link to logic, whatever carries it: gRPC to a pool of logic instances (a split
//! deployment, [`GrpcLink`]) or direct calls into logic in the same process (`all-in-one`, where
//! the binary implements [`LogicLink`] over the logic library: no loopback HTTP/2, one hop fewer).
//! Shards never see which one they use.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use switchboard_proto::cluster_auth;
use switchboard_proto::internal::logic_client::LogicClient;
use switchboard_proto::internal::{AuthReply, AuthRequest, ClientReply, ClientRequest, ConnEvent};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

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
/// instance), each call bounded by `timeout` and carrying the cluster secret.
pub struct GrpcLink {
    pool: Arc<LogicPool>,
    timeout: Duration,
    secret: Option<Arc<MetadataValue<Ascii>>>,
}

impl GrpcLink {
    pub fn new(pool: Arc<LogicPool>, timeout: Duration, secret: Option<MetadataValue<Ascii>>) -> Self {
        Self { pool, timeout, secret: secret.map(Arc::new) }
    }

    fn parts(&self) -> (Arc<LogicPool>, Duration, Option<Arc<MetadataValue<Ascii>>>) {
        (self.pool.clone(), self.timeout, self.secret.clone())
    }
}

fn request<T>(msg: T, secret: &Option<Arc<MetadataValue<Ascii>>>) -> Request<T> {
    cluster_auth::attach(Request::new(msg), secret.as_deref())
}

fn message(s: Status) -> String {
    if s.code() == Code::DeadlineExceeded {
        "logic timed out".to_string()
    } else {
        s.message().to_string()
    }
}

impl GrpcLink {
    /// Runs one RPC through the pool with the cluster secret attached to every attempt.
    fn call<Req, T, F, Fut>(&self, msg: Req, rpc: F) -> LinkFuture<T>
    where
        Req: Clone + Send + Sync + 'static,
        T: Send + 'static,
        F: Fn(LogicClient<Channel>, Request<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<tonic::Response<T>, Status>> + Send + 'static,
    {
        let (pool, timeout, secret) = self.parts();
        Box::pin(async move { pool.call(timeout, |c| rpc(c, request(msg.clone(), &secret))).await.map_err(message) })
    }
}

impl LogicLink for GrpcLink {
    fn authenticate(&self, token: String) -> LinkFuture<AuthReply> {
        self.call(AuthRequest { token }, |mut c, r| async move { c.authenticate(r).await })
    }

    fn connected(&self, ev: ConnEvent) -> LinkFuture<()> {
        let call = self.call(ev, |mut c, r| async move { c.connected(r).await });
        Box::pin(async move { call.await.map(|_| ()) })
    }

    fn disconnected(&self, ev: ConnEvent) -> LinkFuture<()> {
        let call = self.call(ev, |mut c, r| async move { c.disconnected(r).await });
        Box::pin(async move { call.await.map(|_| ()) })
    }

    fn handle(&self, req: ClientRequest) -> LinkFuture<ClientReply> {
        self.call(req, |mut c, r| async move { c.handle(r).await })
    }
}
