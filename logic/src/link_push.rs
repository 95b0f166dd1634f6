//! Pushes down the gateways' own links: a gateway opens `Logic.Pushes` beside its `Logic.Link`
//! (same HTTP/2 connection) naming its push address in the `x-sb-gateway` metadata; the stream
//! is registered here while it is open, and [`ViaLinks`] sends that gateway's push batches down
//! it, matched with the gateway's answers by id. No HTTP/2 stream and no call per batch. A
//! gateway with no such stream gets its pushes through the [`GatewaySink`] the transport gave
//! (gRPC `Gateway.Push`). Answers have a stream of their own, read by a task that does nothing
//! else, so an answer never waits behind calls the link is not reading yet (calls can wait for
//! push-queue room, which answers free).
//!
//! A push whose stream ends, or that is not answered within [`ANSWER_TIMEOUT`], fails with its
//! batch handed back, so the pusher's one retry goes down another stream of that gateway or over
//! gRPC (a copy of a message delivered twice is dropped by the client, which dedupes by
//! conversation and seq).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use switchboard_proto::internal::{Delivery, LinkPush, PushAnswer};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::link::{closed, Closing};
use crate::metrics::LogicMetrics;
use crate::push::{GatewaySink, PushFailed, PushFuture};

/// Longest wait for a gateway's answer to a push sent down its link.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a push stream's response side is written.
pub type Down = mpsc::Sender<Result<LinkPush, Status>>;

/// The response side of `Logic.Pushes`.
pub type PushStream = ReceiverStream<Result<LinkPush, Status>>;

/// Serves one gateway's push stream: registers it as `gateway`'s until the gateway closes it,
/// it breaks, or `closing` turns `true` (pushes waiting for an answer then fail and are retried
/// elsewhere).
pub fn serve(
    links: Arc<LinkPushes>,
    mut up: Streaming<PushAnswer>,
    gateway: String,
    mut closing: Closing,
) -> PushStream {
    let (tx, rx) = mpsc::channel(4);
    let registered = links.register(gateway, &tx);
    tokio::spawn(async move {
        // the stream's response side ends when this task does
        let _tx = tx;
        loop {
            tokio::select! {
                biased;
                _ = closed(&mut closing) => break,
                m = up.message() => match m {
                    Ok(Some(a)) => registered.end().answer(a),
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "gateway push stream broke");
                        break;
                    }
                },
            }
        }
        drop(registered);
    });
    ReceiverStream::new(rx)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One gateway link that carries pushes.
pub struct LinkEnd {
    /// Weak: the stream's response side ends with the task serving it.
    down: mpsc::WeakSender<Result<LinkPush, Status>>,
    /// Pushes sent and not answered, by id; `None` once the link is unregistered.
    waiting: Mutex<Option<HashMap<u64, oneshot::Sender<Vec<u64>>>>>,
    next: AtomicU64,
}

impl LinkEnd {
    /// Hands the gateway's answer to the push waiting for it (an unknown id is ignored: its push
    /// timed out).
    pub fn answer(&self, a: PushAnswer) {
        if let Some(tx) = lock(&self.waiting).as_mut().and_then(|w| w.remove(&a.id)) {
            let _ = tx.send(a.gone);
        }
    }

    /// Sends one batch down the link and waits for its answer.
    async fn push(&self, deliveries: Vec<Delivery>) -> Result<Vec<u64>, String> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        match lock(&self.waiting).as_mut() {
            Some(w) => w.insert(id, tx),
            None => return Err("the gateway's link closed".into()),
        };
        let forget = Forget { end: self, id };
        let down = self.down.upgrade().ok_or("the gateway's link closed")?;
        let sent = down.send(Ok(LinkPush { id, deliveries })).await;
        drop(down);
        sent.map_err(|_| "the gateway's link closed")?;
        let answer = tokio::time::timeout(ANSWER_TIMEOUT, rx).await;
        drop(forget);
        match answer {
            Ok(Ok(gone)) => Ok(gone),
            Ok(Err(_)) => Err("the gateway's link closed before it answered".into()),
            Err(_) => Err("the gateway did not answer the push in time".into()),
        }
    }
}

/// Forgets a push's waiter however its wait ends.
struct Forget<'a> {
    end: &'a LinkEnd,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        if let Some(w) = lock(&self.end.waiting).as_mut() {
            w.remove(&self.id);
        }
    }
}

/// The gateways' links that carry pushes, by the gateway's push address.
#[derive(Default)]
pub struct LinkPushes {
    links: Mutex<HashMap<String, Vec<Arc<LinkEnd>>>>,
}

impl LinkPushes {
    /// Registers a link of `gateway`, written through `down`, until the returned guard drops.
    pub fn register(self: &Arc<Self>, gateway: String, down: &Down) -> Registered {
        let end = Arc::new(LinkEnd {
            down: down.downgrade(),
            waiting: Mutex::new(Some(HashMap::new())),
            next: AtomicU64::new(1),
        });
        lock(&self.links).entry(gateway.clone()).or_default().push(end.clone());
        Registered { pushes: Arc::downgrade(self), gateway, end }
    }

    /// The newest registered link of `gateway`.
    fn link(&self, gateway: &str) -> Option<Arc<LinkEnd>> {
        lock(&self.links).get(gateway).and_then(|l| l.last().cloned())
    }
}

/// A link registered for pushes; dropping it unregisters the link and fails its pushes waiting
/// for an answer.
pub struct Registered {
    pushes: Weak<LinkPushes>,
    gateway: String,
    end: Arc<LinkEnd>,
}

impl Registered {
    pub fn end(&self) -> &LinkEnd {
        &self.end
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        lock(&self.end.waiting).take();
        let Some(pushes) = self.pushes.upgrade() else { return };
        let mut links = lock(&pushes.links);
        if let Some(l) = links.get_mut(&self.gateway) {
            l.retain(|e| !Arc::ptr_eq(e, &self.end));
            if l.is_empty() {
                links.remove(&self.gateway);
            }
        }
    }
}

/// A gateway's sink that sends down the gateway's newest link when it holds one, and through
/// `fallback` otherwise.
pub struct ViaLinks {
    pub gateway: String,
    pub links: Arc<LinkPushes>,
    pub fallback: Arc<dyn GatewaySink>,
    pub metrics: Arc<LogicMetrics>,
}

impl GatewaySink for ViaLinks {
    fn push(&self, deliveries: Vec<Delivery>) -> PushFuture {
        let Some(end) = self.links.link(&self.gateway) else {
            return self.fallback.push(deliveries);
        };
        self.metrics.link_pushes.fetch_add(1, Ordering::Relaxed);
        // The link's batch owns its deliveries; a copy is kept for the one retry.
        let keep = deliveries.clone();
        Box::pin(async move { end.push(deliveries).await.map_err(|error| PushFailed { error, batch: Some(keep) }) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_proto::internal::Target;

    struct Refuse;

    impl GatewaySink for Refuse {
        fn push(&self, _: Vec<Delivery>) -> PushFuture {
            Box::pin(async { Err(PushFailed { error: "fallback".into(), batch: None }) })
        }
    }

    fn batch(conn_id: u64) -> Vec<Delivery> {
        vec![Delivery { targets: vec![Target { conn_id, user: "u".into() }], ..Default::default() }]
    }

    /// A registered link carries the gateway's pushes and their answers; a second link of the
    /// gateway takes over; an unregistered link's waiting push fails with its batch, and with no
    /// link left the fallback is used.
    #[tokio::test]
    async fn pushes_ride_the_newest_link_until_it_is_gone() {
        let links = Arc::new(LinkPushes::default());
        let metrics = Arc::new(LogicMetrics::default());
        let sink = ViaLinks { gateway: "gw".into(), links: links.clone(), fallback: Arc::new(Refuse), metrics };
        let err = sink.push(batch(1)).await.unwrap_err();
        assert_eq!(err.error, "fallback", "no link: the fallback");

        let (tx1, mut rx1) = mpsc::channel(4);
        let first = links.register("gw".into(), &tx1);
        let pushing = tokio::spawn(sink.push(batch(7)));
        let p = rx1.recv().await.unwrap().unwrap();
        assert_eq!(p.deliveries[0].targets[0].conn_id, 7);
        first.end().answer(PushAnswer { id: p.id + 100, gone: vec![1] });
        first.end().answer(PushAnswer { id: p.id, gone: vec![7] });
        assert_eq!(pushing.await.unwrap().unwrap(), vec![7], "the answer with the push's id");

        let (tx2, mut rx2) = mpsc::channel(4);
        let second = links.register("gw".into(), &tx2);
        let pushing = tokio::spawn(sink.push(batch(8)));
        let p = rx2.recv().await.unwrap().unwrap();
        assert_eq!(p.deliveries[0].targets[0].conn_id, 8, "the newest link");
        drop(second);
        let failed = pushing.await.unwrap().unwrap_err();
        assert_eq!(failed.batch.unwrap()[0].targets[0].conn_id, 8, "handed back for the retry");

        let pushing = tokio::spawn(sink.push(batch(9)));
        assert_eq!(rx1.recv().await.unwrap().unwrap().deliveries[0].targets[0].conn_id, 9);
        drop(first);
        assert!(pushing.await.unwrap().unwrap_err().batch.is_some());
        assert!(rx1.try_recv().is_err() && rx2.try_recv().is_err());
        assert_eq!(sink.push(batch(1)).await.unwrap_err().error, "fallback", "no link left");
        assert_eq!(sink.metrics.link_pushes.load(Ordering::Relaxed), 3);
    }
}
