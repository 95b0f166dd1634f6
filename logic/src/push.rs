//! Pushes to clients: looks up a user's connections in the route table and
//! hands deliveries to one sender task per gateway, which batches them into
//! `Gateway.Push` RPCs. One FIFO queue per gateway keeps the order in which
//! deliveries were enqueued.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use switchboard_proto::internal::gateway_client::GatewayClient;
use switchboard_proto::internal::{Delivery, PushRequest};
use switchboard_storage::{ConnRef, RouteTable};
use tokio::sync::mpsc;

use crate::metrics::{inc, LogicMetrics};

/// Most deliveries sent in one Push RPC.
const BATCH: usize = 1024;
/// HTTP/2 flow-control window of push streams: a whole batch fits without waiting for a window update.
const PUSH_WINDOW: u32 = 4 << 20;

pub struct Pusher {
    routes: Arc<dyn RouteTable>,
    queues: Mutex<HashMap<String, mpsc::Sender<Delivery>>>,
    capacity: usize,
    metrics: Arc<LogicMetrics>,
}

/// What a push is about, for the gateway's re-push of unacked messages.
#[derive(Clone, Copy)]
pub struct MsgRef<'a> {
    pub conv: &'a str,
    pub seq: u64,
}

impl Pusher {
    pub fn new(routes: Arc<dyn RouteTable>, capacity: usize, metrics: Arc<LogicMetrics>) -> Self {
        Self { routes, queues: Mutex::new(HashMap::new()), capacity, metrics }
    }

    /// Sends `frame` to every connection of `user` except `skip`. Returns
    /// how many connections it was queued for.
    pub async fn to_user(
        &self,
        user: &str,
        frame: &serde_json::Value,
        msg: Option<MsgRef<'_>>,
        skip: Option<(&str, u64)>,
    ) -> usize {
        let conns = match self.routes.get(user).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, user, "route lookup failed; recipient will sync");
                return 0;
            }
        };
        let bytes = serde_json::to_vec(frame).expect("JSON values always serialize");
        let mut n = 0;
        for c in conns {
            if skip.is_some_and(|(g, id)| g == c.gateway && id == c.conn_id) {
                continue;
            }
            self.to_conn(&c, bytes.clone(), msg, false).await;
            n += 1;
        }
        n
    }

    /// Queues one delivery to one connection.
    pub async fn to_conn(&self, conn: &ConnRef, frame: Vec<u8>, msg: Option<MsgRef<'_>>, close: bool) {
        let d = Delivery {
            conn_id: conn.conn_id,
            frame,
            conv: msg.map(|m| m.conv.to_owned()).unwrap_or_default(),
            seq: msg.map(|m| m.seq).unwrap_or(0),
            close,
        };
        let tx = self.queue(&conn.gateway);
        inc(&self.metrics.pushes);
        if tx.send(d).await.is_err() {
            inc(&self.metrics.push_failures);
        }
    }

    fn queue(&self, gateway: &str) -> mpsc::Sender<Delivery> {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = queues.get(gateway).filter(|tx| !tx.is_closed()) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::channel(self.capacity);
        queues.insert(gateway.to_owned(), tx.clone());
        tokio::spawn(sender(gateway.to_owned(), rx, self.routes.clone(), self.metrics.clone()));
        tx
    }
}

async fn sender(
    gateway: String,
    mut rx: mpsc::Receiver<Delivery>,
    routes: Arc<dyn RouteTable>,
    metrics: Arc<LogicMetrics>,
) {
    let client = match tonic::transport::Endpoint::from_shared(gateway.clone()) {
        Ok(ep) => GatewayClient::new(
            ep.tcp_nodelay(true)
                .initial_stream_window_size(Some(PUSH_WINDOW))
                .initial_connection_window_size(Some(2 * PUSH_WINDOW))
                .connect_lazy(),
        ),
        Err(e) => {
            tracing::error!(%gateway, error = %e, "bad gateway address; dropping its pushes");
            return;
        }
    };
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let req = PushRequest { deliveries: std::mem::take(&mut batch) };
        // One retry covers a dropped connection; after that the recipients
        // catch up with `sync` (every pushed message is already durable).
        let mut reply = client.clone().push(req.clone()).await;
        if reply.is_err() {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            reply = client.clone().push(req).await;
        }
        match reply {
            Ok(r) => {
                for id in r.into_inner().gone {
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
