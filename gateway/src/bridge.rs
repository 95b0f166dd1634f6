//! Bridge between shard threads and the tokio runtime: calls over the [`LogicLink`] and shard
//! mailboxes.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_channel::Sender;
use mio::Waker;
use switchboard_proto::internal::{AuthReply, ClientReply, ClientRequest, ConnEvent, Delivery};
use tokio::runtime::Handle;

use crate::link::LogicLink;

/// Messages delivered to a shard thread.
pub(crate) enum ShardMsg {
    /// Result of `authenticate` for a connection.
    AuthDone { conn_id: u64, rid: Option<u64>, result: Result<AuthReply, String> },
    /// Result of `handle` for a connection's request.
    HandleDone { conn_id: u64, rid: Option<u64>, result: Result<ClientReply, String> },
    /// Deliveries for connections of this shard; the shard answers with the gone ids.
    Push { deliveries: Vec<Delivery>, reply: tokio::sync::oneshot::Sender<Vec<u64>> },
    /// Tell logic again about every authenticated connection (the route table was lost, e.g.
    /// Redis restarted without persistence).
    Reannounce,
    /// Graceful drain and exit.
    Shutdown,
}

/// A shard's mailbox: channel plus the waker of its poll loop. Wake-ups are coalesced: a
/// sender wakes the shard only if no wake-up is pending since the shard last emptied its mailbox
/// (one eventfd write per batch of messages, not per message).
#[derive(Clone)]
pub(crate) struct ShardLink {
    pub tx: Sender<ShardMsg>,
    pub waker: Arc<Waker>,
    pub woken: Arc<AtomicBool>,
}

impl ShardLink {
    pub fn new(tx: Sender<ShardMsg>, waker: Arc<Waker>) -> Self {
        Self { tx, waker, woken: Arc::new(AtomicBool::new(false)) }
    }

    /// Queues `msg` and wakes the shard; false if the shard is gone.
    pub fn send(&self, msg: ShardMsg) -> bool {
        if self.tx.send(msg).is_err() {
            return false;
        }
        if !self.woken.swap(true, Ordering::AcqRel) {
            if let Err(e) = self.waker.wake() {
                tracing::warn!(error = %e, "failed to wake shard");
            }
        }
        true
    }

    /// The shard is about to empty its mailbox: later messages must wake it again.
    pub fn rearm(&self) {
        self.woken.store(false, Ordering::Release);
    }
}

/// Submits logic calls from shard threads onto the tokio runtime (never blocks) and hands the
/// outcomes back to the shard's mailbox.
#[derive(Clone)]
pub(crate) struct Bridge {
    pub rt: Handle,
    pub link: Arc<dyn LogicLink>,
    pub advertise: Arc<str>,
}

impl Bridge {
    /// Authenticates a token and, when it is good, registers the connection with logic (route,
    /// presence) before the result goes back to `shard` as [`ShardMsg::AuthDone`]: by the time
    /// the client reads `auth.ok`, pushes already find it. A failed registration fails the auth
    /// (`unavailable`; the client retries).
    pub fn authenticate(&self, shard: &ShardLink, conn_id: u64, rid: Option<u64>, token: String) {
        let shard = shard.clone();
        let call = self.link.auth_connect(token, self.advertise.clone(), conn_id);
        self.rt.spawn(async move {
            let result = call.await;
            shard.send(ShardMsg::AuthDone { conn_id, rid, result });
        });
    }

    /// Handles a request; the result goes back to `shard` as [`ShardMsg::HandleDone`].
    pub fn handle(&self, shard: &ShardLink, rid: Option<u64>, req: ClientRequest) {
        let shard = shard.clone();
        let conn_id = req.conn.as_ref().map(|c| c.conn_id).unwrap_or(0);
        self.spawn(self.link.handle(req), move |result| {
            shard.send(ShardMsg::HandleDone { conn_id, rid, result });
        });
    }

    /// Like [`Bridge::handle`], after `before` (requests whose replies are dropped) ran one by
    /// one: a connection's held acks reach logic before its next request.
    pub fn handle_after(&self, shard: &ShardLink, rid: Option<u64>, before: Vec<ClientRequest>, req: ClientRequest) {
        let shard = shard.clone();
        let conn_id = req.conn.as_ref().map(|c| c.conn_id).unwrap_or(0);
        let link = self.link.clone();
        self.rt.spawn(async move {
            for b in before {
                if let Err(e) = link.handle(b).await {
                    tracing::warn!(error = %e, "logic handle (held ack) failed");
                }
            }
            let result = link.handle(req).await;
            shard.send(ShardMsg::HandleDone { conn_id, rid, result });
        });
    }

    /// A request the gateway makes on a client's behalf: fire and forget, the reply is dropped.
    pub fn handle_detached(&self, req: ClientRequest) {
        self.fire_and_forget("handle (gateway-made request)", self.link.handle(req));
    }

    /// Connection authenticated, fire and forget.
    pub fn connected(&self, ev: ConnEvent) {
        self.fire_and_forget("connected", self.link.connected(ev));
    }

    /// Connection closed, fire and forget.
    pub fn disconnected(&self, ev: ConnEvent) {
        self.fire_and_forget("disconnected", self.link.disconnected(ev));
    }

    fn fire_and_forget<T: Send + 'static>(
        &self,
        what: &'static str,
        call: impl Future<Output = Result<T, String>> + Send + 'static,
    ) {
        self.spawn(call, move |r| {
            if let Err(e) = r {
                tracing::warn!(error = %e, "logic {what} failed");
            }
        });
    }

    /// Runs `call` on the runtime without blocking the caller and hands the outcome to `done`.
    fn spawn<T: Send + 'static>(
        &self,
        call: impl Future<Output = Result<T, String>> + Send + 'static,
        done: impl FnOnce(Result<T, String>) + Send + 'static,
    ) {
        self.rt.spawn(async move { done(call.await) });
    }
}
