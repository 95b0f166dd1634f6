//! Bridge between shard threads and the tokio runtime: calls over the [`LogicLink`] and shard
//! mailboxes. Closed connections are told to logic in batches ([`Disconnects`]): a mass
//! disconnect costs a queue of events, not a call in flight per connection.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;
use mio::Waker;
use switchboard_proto::internal::{AuthReply, ClientReply, ClientRequest, ConnEvent, Delivery};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, Notify, Semaphore};

use crate::link::LogicLink;
use crate::metrics::GatewayMetrics;

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
    disconnects: Arc<Disconnects>,
    metrics: Arc<GatewayMetrics>,
}

/// One client request relayed to logic, timed for the latency histogram and the debug log.
struct Relay {
    started: std::time::Instant,
    metrics: Arc<GatewayMetrics>,
    gateway: Arc<str>,
    conn_id: u64,
    rid: Option<u64>,
}

impl Relay {
    fn start(bridge: &Bridge, conn_id: u64, rid: Option<u64>) -> Self {
        let (metrics, gateway) = (bridge.metrics.clone(), bridge.advertise.clone());
        Self { started: std::time::Instant::now(), metrics, gateway, conn_id, rid }
    }

    fn done(self, ok: bool) {
        let elapsed = self.started.elapsed();
        self.metrics.latency.logic_calls.observe(elapsed.as_secs_f64());
        // Logic's `request` span carries the same gateway, conn and rid.
        let (gateway, conn, rid) = (&self.gateway, self.conn_id, self.rid);
        tracing::debug!(%gateway, conn, rid, micros = elapsed.as_micros() as u64, ok, "relayed to logic");
    }
}

/// Most closed connections told to logic in one call.
const DISCONNECT_BATCH: usize = 512;
/// Batches of closed connections in flight at once.
const DISCONNECT_CALLS: usize = 4;

/// Closed connections waiting to be told to logic: the queue into the task that tells it, and
/// how many are queued or in flight.
pub(crate) struct Disconnects {
    queue: mpsc::UnboundedSender<ConnEvent>,
    pending: Arc<Pending>,
}

#[derive(Default)]
struct Pending {
    count: AtomicUsize,
    idle: Notify,
}

impl Pending {
    fn done(&self, n: usize) {
        if self.count.fetch_sub(n, Ordering::AcqRel) == n {
            self.idle.notify_waiters();
        }
    }
}

/// Hands queued disconnects to logic, [`DISCONNECT_CALLS`] batches at a time, until the bridge
/// is gone and the queue empty.
async fn tell_disconnects(
    link: Arc<dyn LogicLink>,
    mut queue: mpsc::UnboundedReceiver<ConnEvent>,
    pending: Arc<Pending>,
) {
    let slots = Arc::new(Semaphore::new(DISCONNECT_CALLS));
    while let Some(first) = queue.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let mut batch = vec![first];
        while batch.len() < DISCONNECT_BATCH {
            let Ok(ev) = queue.try_recv() else { break };
            batch.push(ev);
        }
        let (n, call, pending) = (batch.len(), link.disconnected_many(batch), pending.clone());
        tokio::spawn(async move {
            if let Err(e) = call.await {
                tracing::warn!(error = %e, connections = n, "logic disconnected failed");
            }
            pending.done(n);
            drop(slot);
        });
    }
}

impl Bridge {
    /// The bridge, with its task that tells logic about closed connections.
    pub fn new(rt: Handle, link: Arc<dyn LogicLink>, advertise: Arc<str>, metrics: Arc<GatewayMetrics>) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        let pending = Arc::new(Pending::default());
        rt.spawn(tell_disconnects(link.clone(), rx, pending.clone()));
        Self { rt, link, advertise, disconnects: Arc::new(Disconnects { queue, pending }), metrics }
    }

    /// Waits (at most `limit`) until every closed connection so far was told to logic.
    pub async fn disconnects_told(&self, limit: Duration) {
        let p = &self.disconnects.pending;
        let _ = tokio::time::timeout(limit, async {
            loop {
                let idle = p.idle.notified();
                if p.count.load(Ordering::Acquire) == 0 {
                    return;
                }
                idle.await;
            }
        })
        .await;
    }

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
        let relay = Relay::start(self, conn_id, rid);
        self.spawn(self.link.handle(req), move |result| {
            relay.done(result.is_ok());
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

    /// Connection closed: queued, told to logic in a batch soon.
    pub fn disconnected(&self, ev: ConnEvent) {
        let d = &self.disconnects;
        d.pending.count.fetch_add(1, Ordering::AcqRel);
        if d.queue.send(ev).is_err() {
            d.pending.done(1);
        }
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
