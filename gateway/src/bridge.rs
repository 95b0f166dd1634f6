//! Bridge between shard threads and the tokio runtime: logic RPCs and shard mailboxes.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;
use mio::Waker;
use switchboard_proto::internal::logic_client::LogicClient;
use switchboard_proto::internal::{AuthReply, AuthRequest, ClientReply, ClientRequest, ConnEvent, Delivery};
use tokio::runtime::Handle;
use tonic::transport::Channel;
use tonic::{Code, Response, Status};

use crate::pool::LogicPool;

/// Messages delivered to a shard thread.
pub(crate) enum ShardMsg {
    /// Result of `Logic.Authenticate` for a connection.
    AuthDone { conn_id: u64, rid: Option<u64>, result: Result<AuthReply, String> },
    /// Result of `Logic.Handle` for a connection's request.
    HandleDone { conn_id: u64, rid: Option<u64>, result: Result<ClientReply, String> },
    /// Deliveries for connections of this shard; the shard answers with the gone ids.
    Push { deliveries: Vec<Delivery>, reply: tokio::sync::oneshot::Sender<Vec<u64>> },
    /// Graceful drain and exit.
    Shutdown,
}

/// A shard's mailbox: channel plus the waker of its poll loop.
#[derive(Clone)]
pub(crate) struct ShardLink {
    pub tx: Sender<ShardMsg>,
    pub waker: Arc<Waker>,
}

impl ShardLink {
    /// Queues `msg` and wakes the shard; false if the shard is gone.
    pub fn send(&self, msg: ShardMsg) -> bool {
        if self.tx.send(msg).is_err() {
            return false;
        }
        if let Err(e) = self.waker.wake() {
            tracing::warn!(error = %e, "failed to wake shard");
        }
        true
    }
}

/// Submits logic RPCs from shard threads onto the tokio runtime (never blocks); every RPC goes
/// through the [`LogicPool`] (P2C, circuit breakers, one retry on another instance).
#[derive(Clone)]
pub(crate) struct Bridge {
    pub rt: Handle,
    pub pool: Arc<LogicPool>,
    pub advertise: Arc<str>,
    pub timeout: Duration,
}

fn message(s: Status) -> String {
    if s.code() == Code::DeadlineExceeded {
        "logic timed out".to_string()
    } else {
        s.message().to_string()
    }
}

impl Bridge {
    /// `Logic.Authenticate`; the result goes back to `link` as [`ShardMsg::AuthDone`].
    pub fn authenticate(&self, link: &ShardLink, conn_id: u64, rid: Option<u64>, token: String) {
        let link = link.clone();
        self.spawn_call(
            AuthRequest { token },
            |mut c, req| async move { c.authenticate(req).await },
            move |r| {
                link.send(ShardMsg::AuthDone { conn_id, rid, result: r.map_err(message) });
            },
        );
    }

    /// `Logic.Handle`; the result goes back to `link` as [`ShardMsg::HandleDone`].
    pub fn handle(&self, link: &ShardLink, rid: Option<u64>, req: ClientRequest) {
        let link = link.clone();
        let conn_id = req.conn.as_ref().map(|c| c.conn_id).unwrap_or(0);
        self.spawn_call(
            req,
            |mut c, req| async move { c.handle(req).await },
            move |r| {
                link.send(ShardMsg::HandleDone { conn_id, rid, result: r.map_err(message) });
            },
        );
    }

    /// `Logic.Handle` for a request the gateway makes on a client's behalf: fire and
    /// forget, the reply is dropped.
    pub fn handle_detached(&self, req: ClientRequest) {
        self.fire_and_forget(
            "Logic.Handle (gateway-made request)",
            req,
            |mut c, req| async move { c.handle(req).await },
        );
    }

    /// `Logic.Connected`, fire and forget.
    pub fn connected(&self, ev: ConnEvent) {
        self.fire_and_forget("Logic.Connected", ev, |mut c, ev| async move { c.connected(ev).await });
    }

    /// `Logic.Disconnected`, fire and forget.
    pub fn disconnected(&self, ev: ConnEvent) {
        self.fire_and_forget("Logic.Disconnected", ev, |mut c, ev| async move { c.disconnected(ev).await });
    }

    /// Runs `rpc` with `req` through the pool on the runtime, a failure only logged as
    /// `"{what} failed"`; the reply is dropped.
    fn fire_and_forget<Req, T, F, Fut>(&self, what: &'static str, req: Req, rpc: F)
    where
        Req: Clone + Send + Sync + 'static,
        T: Send + 'static,
        F: FnMut(LogicClient<Channel>, Req) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Response<T>, Status>> + Send,
    {
        self.spawn_call(req, rpc, move |r| {
            if let Err(s) = r {
                tracing::warn!(status = %s, "{what} failed");
            }
        });
    }

    /// Runs `rpc` with `req` through the pool (within the bridge's timeout) on the runtime,
    /// without blocking the caller, and hands the outcome to `done`.
    fn spawn_call<Req, T, F, Fut>(&self, req: Req, mut rpc: F, done: impl FnOnce(Result<T, Status>) + Send + 'static)
    where
        Req: Clone + Send + Sync + 'static,
        T: Send + 'static,
        F: FnMut(LogicClient<Channel>, Req) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Response<T>, Status>> + Send,
    {
        let pool = self.pool.clone();
        let timeout = self.timeout;
        self.rt.spawn(async move {
            let r = pool.call(timeout, |c| rpc(c, req.clone())).await;
            done(r);
        });
    }
}
