//! Pushes to clients: looks up the recipients' connections in the route table (one lookup for
//! all recipients of a push), serialises the frame once, and hands one [`Delivery`] per gateway
//! (the frame plus the list of target connections) to that gateway's sender task, which cuts the
//! queue into batches bounded in count and bytes and sends them through the [`PushTransport`]
//! (gRPC, or straight into a gateway of this process), or down the gateway's own link when it
//! holds one ([`crate::link_push`]). One FIFO queue per gateway keeps the order in which
//! deliveries were enqueued, one batch in flight at a time; each queue is bounded in bytes
//! (callers wait for room).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use switchboard_proto::cluster_auth;
use switchboard_proto::cluster_tls::{self, ClusterTls};
use switchboard_proto::internal::gateway_client::GatewayClient;
use switchboard_proto::internal::{Delivery, PushRequest, Target};
use switchboard_storage::{ConnRef, RouteTable};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tonic::metadata::{Ascii, MetadataValue};

use crate::link_push::{LinkPushes, ViaLinks};
use crate::metrics::{inc, LogicMetrics};
use crate::sessions::SessionWatch;

/// Most deliveries sent in one batch.
const BATCH: usize = 1024;
/// HTTP/2 flow-control window of push streams: a whole batch fits without waiting for a window update.
const PUSH_WINDOW: u32 = 4 << 20;

/// What a push call resolves to: the ids of target connections that are gone, or why the batch
/// could not be delivered.
pub type PushFuture = Pin<Box<dyn Future<Output = Result<Vec<u64>, PushFailed>> + Send + 'static>>;

/// A batch that did not reach its gateway, handed back for the one retry (a sink that keeps no
/// copy of what it sent returns `None`, and the batch is not retried).
#[derive(Debug)]
pub struct PushFailed {
    pub error: String,
    pub batch: Option<Vec<Delivery>>,
}

/// Delivers batches to one gateway.
pub trait GatewaySink: Send + Sync + 'static {
    fn push(&self, deliveries: Vec<Delivery>) -> PushFuture;
}

/// Opens the way to a gateway named by its push address (as routes name it).
pub trait PushTransport: Send + Sync + 'static {
    fn connect(&self, gateway: &str) -> Result<Arc<dyn GatewaySink>, String>;
}

/// Limits of the push path, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct PushLimits {
    /// Most deliveries queued per gateway.
    pub queue: usize,
    /// Most bytes (frames plus targets) queued per gateway; senders wait beyond it.
    pub queue_bytes: usize,
    /// A batch is cut before it passes this many bytes (a single larger delivery goes alone).
    pub batch_bytes: usize,
    /// Largest gRPC message on push links, both ends (must exceed `batch_bytes` plus one frame).
    pub max_message_bytes: usize,
}

impl Default for PushLimits {
    fn default() -> Self {
        Self { queue: 10_000, queue_bytes: 64 << 20, batch_bytes: 1 << 20, max_message_bytes: 16 << 20 }
    }
}

/// [`PushTransport`] over the gateways' gRPC `Gateway.Push`, every call carrying the cluster
/// secret.
pub struct GrpcPush {
    max_message_bytes: usize,
    secret: Option<MetadataValue<Ascii>>,
    tls: Option<ClusterTls>,
}

impl GrpcPush {
    pub fn new(max_message_bytes: usize, secret: Option<MetadataValue<Ascii>>) -> Self {
        Self { max_message_bytes, secret, tls: None }
    }

    /// Talks mutual TLS to the gateways (`http://` push URLs are dialled as `https://`).
    pub fn with_tls(mut self, tls: Option<ClusterTls>) -> Self {
        self.tls = tls;
        self
    }
}

struct GrpcSink {
    client: GatewayClient<tonic::transport::Channel>,
    secret: Option<MetadataValue<Ascii>>,
}

impl GatewaySink for GrpcSink {
    fn push(&self, deliveries: Vec<Delivery>) -> PushFuture {
        let mut client = self.client.clone();
        // The request owns its deliveries; a copy is kept for the retry of a dropped connection.
        let keep = deliveries.clone();
        let req = cluster_auth::attach(tonic::Request::new(PushRequest { deliveries }), self.secret.as_ref());
        Box::pin(async move {
            client
                .push(req)
                .await
                .map(|r| r.into_inner().gone)
                .map_err(|e| PushFailed { error: e.to_string(), batch: Some(keep) })
        })
    }
}

impl PushTransport for GrpcPush {
    fn connect(&self, gateway: &str) -> Result<Arc<dyn GatewaySink>, String> {
        let ep = cluster_tls::endpoint(gateway, self.tls.as_ref())?;
        let channel = ep
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(PUSH_WINDOW))
            .initial_connection_window_size(Some(2 * PUSH_WINDOW))
            .connect_lazy();
        let client = GatewayClient::new(channel)
            .max_encoding_message_size(self.max_message_bytes)
            .max_decoding_message_size(self.max_message_bytes);
        Ok(Arc::new(GrpcSink { client, secret: self.secret.clone() }))
    }
}

/// One queued delivery with the room it holds in its gateway's byte budget.
type Queued = (Delivery, OwnedSemaphorePermit);

struct Queue {
    tx: mpsc::Sender<Queued>,
    room: Arc<Semaphore>,
}

pub struct Pusher {
    routes: Arc<dyn RouteTable>,
    transport: Arc<dyn PushTransport>,
    /// Gateways' links that carry their pushes (preferred to `transport`).
    links: Arc<LinkPushes>,
    /// Found per push (foldhash: a push's gateway name is looked up once per delivery).
    queues: Mutex<HashMap<String, Queue, foldhash::fast::RandomState>>,
    limits: PushLimits,
    metrics: Arc<LogicMetrics>,
    /// Told of every pushed-to connection, to close those whose session ended.
    sessions: Arc<SessionWatch>,
}

/// Gateways a push's targets are grouped among by a search of the list; more are indexed.
const LINEAR_GATEWAYS: usize = 8;

/// A push's target connections, one list per gateway (each gateway once).
pub type Targets = Vec<(String, Vec<Target>)>;

/// What a push is about, for the gateway's re-push of unacked messages.
#[derive(Clone, Copy)]
pub struct MsgRef<'a> {
    pub conv: &'a str,
    pub seq: u64,
}

/// Bytes a delivery takes in a batch (frame, targets and framing, roughly).
fn delivery_bytes(d: &Delivery) -> usize {
    d.frame.len() + d.conv.len() + 16 + d.targets.iter().map(|t| t.user.len() + 16).sum::<usize>()
}

impl Pusher {
    /// Appends `switchboard_logic_push_queue_bytes{gateway}`: bytes of pushes queued for each
    /// gateway and not yet handed over (bounded by `push_queue_bytes`).
    pub fn render_queues(&self, out: &mut String) {
        use std::fmt::Write;
        let name = "switchboard_logic_push_queue_bytes";
        let _ = writeln!(out, "# HELP {name} Bytes of pushes queued for each gateway, not yet handed over.");
        let _ = writeln!(out, "# TYPE {name} gauge");
        let queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        for (gateway, q) in queues.iter() {
            let held = self.limits.queue_bytes.max(1).saturating_sub(q.room.available_permits());
            let gateway = gateway.replace('\\', "\\\\").replace('"', "\\\"");
            let _ = writeln!(out, "{name}{{gateway=\"{gateway}\"}} {held}");
        }
    }

    pub fn new(
        routes: Arc<dyn RouteTable>,
        transport: Arc<dyn PushTransport>,
        limits: PushLimits,
        metrics: Arc<LogicMetrics>,
        sessions: Arc<SessionWatch>,
    ) -> Self {
        let links = Arc::default();
        Self { routes, transport, links, queues: Mutex::default(), limits, metrics, sessions }
    }

    /// The gateways' links that carry pushes: a link registers there (see [`crate::link`]).
    pub fn links(&self) -> &Arc<LinkPushes> {
        &self.links
    }

    /// Sends `frame` to every connection of `user` except `skip`. Returns how many connections
    /// it was queued for.
    pub async fn to_user(
        &self,
        user: &str,
        frame: &serde_json::Value,
        msg: Option<MsgRef<'_>>,
        skip: Option<(&str, u64)>,
    ) -> usize {
        let bytes = Bytes::from(serde_json::to_vec(frame).expect("JSON values always serialize"));
        self.to_users(std::slice::from_ref(&user.to_owned()), bytes, msg, skip).await
    }

    /// The connections of `users` (one route lookup for all of them), grouped by gateway.
    pub async fn targets(&self, users: &[String], skip: Option<(&str, u64)>) -> Targets {
        let routes = match self.routes.get_many(users).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, users = users.len(), "route lookup failed; recipients will sync");
                return Targets::new();
            }
        };
        self.sessions.pushed_to(users.iter().zip(&routes).flat_map(|(u, cs)| cs.iter().map(move |c| (u.as_str(), c))));
        // A push usually reaches a handful of gateways: a short list searched from its last hit
        // beats hashing each target's gateway name; past `LINEAR_GATEWAYS` a hash index keeps a
        // push to many gateways linear in its targets.
        let mut by_gateway = Targets::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut last = 0;
        for (user, conns) in users.iter().zip(&routes) {
            for c in conns.iter() {
                if skip.is_some_and(|(g, id)| g == c.gateway && id == c.conn_id) {
                    continue;
                }
                if by_gateway.get(last).is_none_or(|(g, _)| *g != c.gateway) {
                    let found = if by_gateway.len() <= LINEAR_GATEWAYS {
                        by_gateway.iter().position(|(g, _)| *g == c.gateway)
                    } else {
                        for (i, (g, _)) in by_gateway.iter().enumerate().skip(index.len()) {
                            index.insert(g.clone(), i);
                        }
                        index.get(&c.gateway).copied()
                    };
                    last = found.unwrap_or_else(|| {
                        by_gateway.push((c.gateway.clone(), Vec::new()));
                        by_gateway.len() - 1
                    });
                }
                by_gateway[last].1.push(Target { conn_id: c.conn_id, user: user.clone() });
            }
        }
        by_gateway
    }

    /// Sends one frame (serialised once) to every connection of `users` except `skip`.
    pub async fn to_users(
        &self,
        users: &[String],
        frame: Bytes,
        msg: Option<MsgRef<'_>>,
        skip: Option<(&str, u64)>,
    ) -> usize {
        let targets = self.targets(users, skip).await;
        self.enqueue(targets, frame, msg).await
    }

    /// Queues one delivery per gateway of `targets` (found earlier with [`Pusher::targets`]).
    pub async fn enqueue(&self, targets: Targets, frame: Bytes, msg: Option<MsgRef<'_>>) -> usize {
        let mut n = 0;
        for (gateway, targets) in targets {
            n += targets.len();
            let d = Delivery {
                targets,
                frame: frame.clone(),
                conv: msg.map(|m| m.conv.to_owned()).unwrap_or_default(),
                seq: msg.map(|m| m.seq).unwrap_or(0),
                close: false,
            };
            self.send(&gateway, d).await;
        }
        n
    }

    /// Queues one delivery to one connection of `user`.
    pub async fn to_conn(&self, user: &str, conn: &ConnRef, frame: Bytes, msg: Option<MsgRef<'_>>, close: bool) {
        let d = Delivery {
            targets: vec![Target { conn_id: conn.conn_id, user: user.to_owned() }],
            frame,
            conv: msg.map(|m| m.conv.to_owned()).unwrap_or_default(),
            seq: msg.map(|m| m.seq).unwrap_or(0),
            close,
        };
        self.send(&conn.gateway, d).await;
    }

    async fn send(&self, gateway: &str, d: Delivery) {
        let (tx, room) = self.queue(gateway);
        let targets = d.targets.len() as u64;
        let size = delivery_bytes(&d).min(self.limits.queue_bytes) as u32;
        let Ok(permit) = room.acquire_many_owned(size).await else {
            inc(&self.metrics.push_failures);
            return;
        };
        self.metrics.pushes.fetch_add(targets, std::sync::atomic::Ordering::Relaxed);
        if tx.send((d, permit)).await.is_err() {
            inc(&self.metrics.push_failures);
        }
    }

    fn queue(&self, gateway: &str) -> (mpsc::Sender<Queued>, Arc<Semaphore>) {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(q) = queues.get(gateway).filter(|q| !q.tx.is_closed()) {
            return (q.tx.clone(), q.room.clone());
        }
        let fallback = self.transport.connect(gateway).unwrap_or_else(|error| {
            tracing::error!(%gateway, %error, "bad gateway address: only its links can carry its pushes");
            Arc::new(Unreachable(error))
        });
        let sink = Arc::new(ViaLinks {
            gateway: gateway.to_owned(),
            links: self.links.clone(),
            fallback,
            metrics: self.metrics.clone(),
        });
        let (tx, rx) = mpsc::channel(self.limits.queue.max(1));
        let room = Arc::new(Semaphore::new(self.limits.queue_bytes.max(1)));
        queues.insert(gateway.to_owned(), Queue { tx: tx.clone(), room: room.clone() });
        tokio::spawn(sender(
            gateway.to_owned(),
            rx,
            sink,
            self.limits.batch_bytes,
            self.routes.clone(),
            self.metrics.clone(),
        ));
        (tx, room)
    }
}

/// The sink of a gateway whose address cannot be dialled.
struct Unreachable(String);

impl GatewaySink for Unreachable {
    fn push(&self, _: Vec<Delivery>) -> PushFuture {
        let error = self.0.clone();
        Box::pin(async move { Err(PushFailed { error, batch: None }) })
    }
}

/// Takes from `pending` (then `rx`, without waiting) the next batch: at most [`BATCH`]
/// deliveries and, past the first, at most `max_bytes`.
fn cut_batch(pending: &mut std::collections::VecDeque<Queued>, max_bytes: usize) -> (Vec<Delivery>, usize) {
    let mut batch = Vec::new();
    let mut bytes = 0;
    while let Some((d, _)) = pending.front() {
        let size = delivery_bytes(d);
        if !batch.is_empty() && (bytes + size > max_bytes || batch.len() >= BATCH) {
            break;
        }
        bytes += size;
        let (d, _permit) = pending.pop_front().expect("front exists");
        batch.push(d);
    }
    (batch, bytes)
}

async fn sender(
    gateway: String,
    mut rx: mpsc::Receiver<Queued>,
    sink: Arc<dyn GatewaySink>,
    batch_bytes: usize,
    routes: Arc<dyn RouteTable>,
    metrics: Arc<LogicMetrics>,
) {
    let mut incoming = Vec::with_capacity(BATCH);
    let mut pending = std::collections::VecDeque::new();
    while rx.recv_many(&mut incoming, BATCH).await > 0 {
        pending.extend(incoming.drain(..));
        while !pending.is_empty() {
            let (batch, _) = cut_batch(&mut pending, batch_bytes);
            // One retry covers a dropped connection; after that the recipients
            // catch up with `sync` (every pushed message is already durable).
            let started = std::time::Instant::now();
            let mut reply = sink.push(batch).await;
            metrics.latency.push_batch.observe(started.elapsed().as_secs_f64());
            if let Err(PushFailed { batch: Some(batch), .. }) = reply {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                reply = sink.push(batch).await;
            }
            match reply.map_err(|f| f.error) {
                Ok(gone) => {
                    for id in gone {
                        let _ = routes.remove_conn(&gateway, id).await;
                    }
                }
                Err(e) => {
                    inc(&metrics.push_failures);
                    tracing::warn!(%gateway, error = %e, "push failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(frame_len: usize, room: &Arc<Semaphore>) -> Queued {
        let d = Delivery {
            targets: vec![Target { conn_id: 1, user: "u".into() }],
            frame: Bytes::from(vec![b'x'; frame_len]),
            ..Default::default()
        };
        (d, room.clone().try_acquire_many_owned(1).unwrap())
    }

    /// Targets grouped per gateway: each gateway once, its targets in the users' order, the
    /// sender's own connection skipped, with few gateways (searched) and many (indexed).
    #[tokio::test]
    async fn targets_are_grouped_per_gateway() {
        for gateways in [3, 20] {
            let routes = Arc::new(switchboard_storage::memory_routes::MemoryRoutes::default());
            let users: Vec<String> = (0..40).map(|u| format!("u{u}")).collect();
            for (u, user) in users.iter().enumerate() {
                for d in 0..3 {
                    let gateway = format!("http://gw{}:9000", (u * 7 + d) % gateways);
                    let conn = ConnRef {
                        gateway,
                        conn_id: (u * 10 + d) as u64,
                        device: format!("d{d}"),
                        session: String::new(),
                    };
                    routes.add(user, conn).await.unwrap();
                }
            }
            let (sessions, _checks) = SessionWatch::new(std::time::Duration::from_secs(60));
            let pusher = Pusher::new(
                routes,
                Arc::new(GrpcPush::new(1 << 20, None)),
                PushLimits::default(),
                Arc::new(LogicMetrics::default()),
                Arc::new(sessions),
            );
            let skip = ("http://gw0:9000", 0);
            let targets = pusher.targets(&users, Some(skip)).await;
            let names: std::collections::HashSet<&str> = targets.iter().map(|(g, _)| g.as_str()).collect();
            assert_eq!(names.len(), targets.len(), "each gateway once");
            assert_eq!(targets.len(), gateways);
            let mut seen = 0;
            for (gateway, list) in &targets {
                seen += list.len();
                let ids: Vec<u64> = list.iter().map(|t| t.conn_id).collect();
                let mut sorted = ids.clone();
                sorted.sort_unstable();
                assert_eq!(ids, sorted, "targets keep the users' order");
                for t in list {
                    let (u, d) = (t.conn_id / 10, t.conn_id % 10);
                    assert_eq!(t.user, format!("u{u}"));
                    assert_eq!(*gateway, format!("http://gw{}:9000", (u * 7 + d) % gateways as u64));
                }
            }
            assert_eq!(seen, 40 * 3 - 1, "every connection but the sender's");
            assert!(!targets.iter().any(|(g, l)| g == skip.0 && l.iter().any(|t| t.conn_id == skip.1)));
        }
    }

    #[test]
    fn batches_are_cut_by_bytes_and_count() {
        let room = Arc::new(Semaphore::new(1 << 20));
        let mut pending: std::collections::VecDeque<Queued> = (0..10).map(|_| queued(60_000, &room)).collect();
        let (b, bytes) = cut_batch(&mut pending, 200_000);
        assert_eq!(b.len(), 3);
        assert!(bytes <= 200_000);
        // one delivery larger than the cut goes alone
        let mut big: std::collections::VecDeque<Queued> = [queued(500_000, &room), queued(10, &room)].into();
        assert_eq!(cut_batch(&mut big, 200_000).0.len(), 1);
        assert_eq!(cut_batch(&mut big, 200_000).0.len(), 1);
        let mut many: std::collections::VecDeque<Queued> = (0..3000).map(|_| queued(1, &room)).collect();
        assert_eq!(cut_batch(&mut many, usize::MAX).0.len(), BATCH);
    }
}
