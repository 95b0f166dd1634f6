//! The gateway's link to logic, whatever carries it: long-lived gRPC streams to a pool of logic
//! instances (a split deployment, [`GrpcLink`]) or direct calls into logic in the same process (`all-in-one`, where
//! the binary implements [`LogicLink`] over the logic library: no loopback HTTP/2, one hop fewer).
//! Shards never see which one they use.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use switchboard_proto::internal::link_call::Call;
use switchboard_proto::internal::link_result::Result as Outcome;
use switchboard_proto::internal::{AuthConnect, AuthReply, ClientReply, ClientRequest, ConnEvent, ConnEvents};
use tonic::{Code, Status};

use crate::pool::LogicPool;

/// What a link call resolves to: the reply, or why logic could not be reached (a short text
/// the gateway logs; the client gets `unavailable`).
pub type LinkFuture<T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send + 'static>>;

/// The calls a gateway makes to logic.
pub trait LogicLink: Send + Sync + 'static {
    /// Verifies the token of an `auth` op and, when it is good, registers the connection
    /// (`connected`) in the same call: by the time the client reads `auth.ok`, pushes find it.
    /// A failed registration is an error (the client gets `unavailable` and retries).
    fn auth_connect(&self, token: String, gateway: Arc<str>, conn_id: u64) -> LinkFuture<AuthReply>;
    /// A connection finished `auth` (route table, presence).
    fn connected(&self, ev: ConnEvent) -> LinkFuture<()>;
    /// Authenticated connections closed, in this order.
    fn disconnected_many(&self, evs: Vec<ConnEvent>) -> LinkFuture<()>;
    /// One client request (every op but `auth` and `ping`), its op and rid already read.
    fn handle(&self, req: ClientRequest) -> LinkFuture<ClientReply>;
}

/// [`LogicLink`] over the long-lived gRPC links of a [`LogicPool`] (P2C, circuit breakers, one
/// retry on another instance), each call bounded by `timeout`.
pub struct GrpcLink {
    pool: Arc<LogicPool>,
    timeout: Duration,
}

impl GrpcLink {
    pub fn new(pool: Arc<LogicPool>, timeout: Duration) -> Self {
        Self { pool, timeout }
    }

    /// Makes `call` through the pool and takes the result `pick` expects from it.
    fn call<T: Send + 'static>(&self, call: Call, pick: fn(Outcome) -> Option<T>) -> LinkFuture<T> {
        let (pool, timeout) = (self.pool.clone(), self.timeout);
        Box::pin(async move {
            let outcome = pool.call(timeout, call).await.map_err(message)?;
            pick(outcome).ok_or_else(|| "logic answered with another kind of result".to_string())
        })
    }
}

fn message(s: Status) -> String {
    if s.code() == Code::DeadlineExceeded {
        "logic timed out".to_string()
    } else {
        s.message().to_string()
    }
}

fn auth(o: Outcome) -> Option<AuthReply> {
    match o {
        Outcome::Auth(a) => Some(a),
        _ => None,
    }
}

fn done(o: Outcome) -> Option<()> {
    matches!(o, Outcome::Done(_)).then_some(())
}

impl LogicLink for GrpcLink {
    fn auth_connect(&self, token: String, gateway: Arc<str>, conn_id: u64) -> LinkFuture<AuthReply> {
        self.call(Call::AuthConnect(AuthConnect { token, gateway: gateway.to_string(), conn_id }), auth)
    }

    fn connected(&self, ev: ConnEvent) -> LinkFuture<()> {
        self.call(Call::Connected(ev), done)
    }

    fn disconnected_many(&self, events: Vec<ConnEvent>) -> LinkFuture<()> {
        self.call(Call::DisconnectedMany(ConnEvents { events }), done)
    }

    fn handle(&self, req: ClientRequest) -> LinkFuture<ClientReply> {
        self.call(Call::Handle(req), |o| match o {
            Outcome::Reply(r) => Some(r),
            _ => None,
        })
    }
}
