//! The gateway end of the long-lived link to one logic instance (`Logic.Link`): calls from every
//! shard share one gRPC bidirectional stream, written in batches cut by count and bytes by one
//! writer task and answered in batches read by one reader task, matched by call id. The stream
//! opens on first use, and again on the first call after it broke; a broken stream fails every
//! call waiting on it as `unavailable` (a transport failure: the pool retries the call on another
//! instance and counts it against this one's breaker). A call given up (timed out, cancelled)
//! forgets its id, so nothing waits for ever on an instance that stopped answering.
//!
//! Once the gateway serves pushes on its links ([`PushEnd`]), each link opens a second stream
//! beside its calls, `Logic.Pushes`, naming the gateway's push address: logic sends the
//! gateway's pushes down it. The push task hands each batch to the shards in the order it came,
//! and a task per batch answers with the connections that were gone. A push stream that ends
//! while its link lives (a stopping instance ends it first, then finishes the link's calls) is
//! opened again [`REOPEN`] later; one logic does not serve (an older instance) is not asked for
//! again. While a link has no push stream, logic pushes to this gateway over `Gateway.Push`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use switchboard_proto::internal::link_call::Call;
use switchboard_proto::internal::link_result::Result as Outcome;
use switchboard_proto::internal::logic_client::LogicClient;
use switchboard_proto::internal::{LinkCall, LinkDown, LinkUp, PushAnswer};
use switchboard_proto::{batch, cluster_auth};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Request, Status, Streaming};

use crate::push::LocalPush;

/// Longest wait for logic to answer the opening of a link.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Calls queued for the writer of one link (callers wait beyond it).
const QUEUE: usize = 4096;
/// Push answers queued for the push stream's writer (one per batch logic has in flight).
const ANSWERS: usize = 256;
/// Wait before opening a link's push stream again after it ended.
const REOPEN: Duration = Duration::from_secs(1);
/// Most calls in one `LinkUp` batch.
const BATCH: usize = 512;
/// A batch is cut before it passes this many bytes (a single larger call goes alone).
const BATCH_BYTES: usize = 1 << 20;

/// Callers waiting for their results, by call id; why the stream broke, once it did.
type Waiting = Mutex<Result<HashMap<u64, oneshot::Sender<Outcome>>, String>>;

fn lock(w: &Waiting) -> std::sync::MutexGuard<'_, Result<HashMap<u64, oneshot::Sender<Outcome>>, String>> {
    w.lock().unwrap_or_else(|e| e.into_inner())
}

/// One open stream: where calls are queued and who waits for what.
struct Live {
    tx: mpsc::Sender<LinkCall>,
    waiting: Arc<Waiting>,
    next: AtomicU64,
}

impl Live {
    fn broken(&self) -> bool {
        lock(&self.waiting).is_err()
    }

    /// The status of a call the link could not complete.
    fn failed(&self) -> Status {
        match &*lock(&self.waiting) {
            Err(why) => Status::unavailable(format!("logic link broken: {why}")),
            Ok(_) => Status::unavailable("logic link closed"),
        }
    }

    /// Registers `tx` as the waiter of call `id`; `Err` (the call's status) if the link broke
    /// since it was handed out.
    fn wait_for(&self, id: u64, tx: oneshot::Sender<Outcome>) -> Result<(), Status> {
        // One statement, so the lock is released before `failed` takes it again (a guard in an
        // `if let` scrutinee lives through its `else` block: the link that broke in between
        // once deadlocked the calling thread here).
        let registered = lock(&self.waiting).as_mut().map(|w| w.insert(id, tx)).is_ok();
        if registered {
            Ok(())
        } else {
            Err(self.failed())
        }
    }
}

/// What a gateway serves on its links: its push address, as routes name it, and its shards.
pub(crate) struct PushEnd {
    pub name: MetadataValue<Ascii>,
    pub local: LocalPush,
}

/// Set once the gateway's shards exist; shared by the links to every logic instance.
pub(crate) type PushSlot = Arc<OnceLock<PushEnd>>;

/// The link to one logic instance.
pub(crate) struct LinkSession {
    client: LogicClient<Channel>,
    secret: Option<Arc<MetadataValue<Ascii>>>,
    pushes: PushSlot,
    live: Mutex<Option<Arc<Live>>>,
}

impl LinkSession {
    pub(crate) fn new(
        client: LogicClient<Channel>,
        secret: Option<Arc<MetadataValue<Ascii>>>,
        pushes: PushSlot,
    ) -> Self {
        Self { client, secret, pushes, live: Mutex::new(None) }
    }

    /// Opens the link now if none is open (logic can push down it before the first call).
    pub(crate) fn open(&self) {
        self.live();
    }

    /// The open stream, opening one if there is none or it broke.
    fn live(&self) -> Arc<Live> {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = live.as_ref().filter(|l| !l.broken()) {
            return l.clone();
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let waiting = Arc::new(Mutex::new(Ok(HashMap::new())));
        tokio::spawn(run(self.client.clone(), self.secret.clone(), self.pushes.clone(), rx, waiting.clone()));
        let l = Arc::new(Live { tx, waiting, next: AtomicU64::new(1) });
        *live = Some(l.clone());
        l
    }

    /// Makes one call over the link; logic's failure answers come back as the status the unary
    /// RPC would have returned.
    pub(crate) async fn call(&self, call: Call) -> Result<Outcome, Status> {
        let live = self.live();
        let id = live.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        live.wait_for(id, tx)?;
        let _forget = Forget { waiting: &live.waiting, id };
        live.tx.send(LinkCall { id, call: Some(call) }).await.map_err(|_| live.failed())?;
        match rx.await.map_err(|_| live.failed())? {
            Outcome::Failure(f) => Err(Status::new(Code::from(f.code), f.message)),
            outcome => Ok(outcome),
        }
    }
}

/// Removes a call's waiter when the call ends, however it ends.
struct Forget<'a> {
    waiting: &'a Waiting,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        if let Ok(w) = lock(self.waiting).as_mut() {
            w.remove(&self.id);
        }
    }
}

/// Fails every waiting call of a link (their senders are dropped) and marks it broken.
fn break_link(waiting: &Waiting, why: &str) {
    let gone = std::mem::replace(&mut *lock(waiting), Err(why.to_string()));
    if let Ok(gone) = gone {
        tracing::debug!(waiting = gone.len(), why, "logic link broke");
    }
}

/// Opens the stream and writes batches until the link breaks or every caller handle is gone.
async fn run(
    mut client: LogicClient<Channel>,
    secret: Option<Arc<MetadataValue<Ascii>>>,
    pushes: PushSlot,
    mut rx: mpsc::Receiver<LinkCall>,
    waiting: Arc<Waiting>,
) {
    let (up_tx, up_rx) = mpsc::channel::<LinkUp>(2);
    let req = cluster_auth::attach(Request::new(ReceiverStream::new(up_rx)), secret.as_deref());
    let down = match tokio::time::timeout(OPEN_TIMEOUT, client.link(req)).await {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(s)) => return break_link(&waiting, s.message()),
        Err(_) => return break_link(&waiting, "logic did not answer the link's opening"),
    };
    // The push stream lives as long as this link's writer.
    let _pushes = pushes.get().map(|_| {
        let task = tokio::spawn(take_pushes(client.clone(), secret.clone(), pushes.clone()));
        AbortOnDrop(task)
    });
    // The writer ends with the reader (the link broke or logic ended it): that closes the
    // request side, which a stopping logic instance waits for.
    let mut reader = tokio::spawn(read(down, waiting.clone()));
    let mut carry: Option<LinkCall> = None;
    loop {
        let first = match carry.take() {
            Some(c) => c,
            None => tokio::select! {
                c = rx.recv() => match c {
                    Some(c) => c,
                    None => return,
                },
                _ = &mut reader => return,
            },
        };
        let (calls, next) = batch::cut(first, || rx.try_recv().ok(), BATCH, BATCH_BYTES);
        carry = next;
        if lock(&waiting).is_err() {
            return;
        }
        tokio::select! {
            sent = up_tx.send(LinkUp { calls }) => if sent.is_err() {
                // The results of calls already sent may still come: the reader breaks the link.
                return;
            },
            _ = &mut reader => return,
        }
    }
}

/// Ends a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keeps the link's push stream open (the link's writer ends this task with the link), unless
/// logic does not serve one.
async fn take_pushes(mut client: LogicClient<Channel>, secret: Option<Arc<MetadataValue<Ascii>>>, pushes: PushSlot) {
    let Some(end) = pushes.get() else { return };
    while push_stream(&mut client, secret.as_deref(), end).await {
        tokio::time::sleep(REOPEN).await;
    }
}

/// Opens a push stream and hands every batch logic sends down it to the shards, in order,
/// answering each once the shards did, until the stream ends; `false` when logic does not
/// serve push streams (it pushes over `Gateway.Push`).
async fn push_stream(client: &mut LogicClient<Channel>, secret: Option<&MetadataValue<Ascii>>, end: &PushEnd) -> bool {
    let (answers, answers_rx) = mpsc::channel::<PushAnswer>(ANSWERS);
    let mut req = cluster_auth::attach(Request::new(ReceiverStream::new(answers_rx)), secret);
    req.metadata_mut().insert(cluster_auth::GATEWAY_HEADER, end.name.clone());
    let mut down = match tokio::time::timeout(OPEN_TIMEOUT, client.pushes(req)).await {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(s)) => {
            tracing::debug!(status = %s, "logic refused the push stream");
            return s.code() != Code::Unimplemented;
        }
        Err(_) => {
            tracing::debug!("logic did not answer the push stream's opening");
            return true;
        }
    };
    let why = loop {
        match down.message().await {
            Ok(Some(p)) => {
                let dispatched = end.local.dispatch(p.deliveries);
                let answers = answers.clone();
                tokio::spawn(async move {
                    let _ = answers.send(PushAnswer { id: p.id, gone: dispatched.gone().await }).await;
                });
            }
            Ok(None) => break "logic closed it".to_string(),
            Err(s) => break s.to_string(),
        }
    };
    tracing::debug!(%why, "push stream ended");
    true
}

/// Hands each result to its caller until the stream ends, then breaks the link.
async fn read(mut down: Streaming<LinkDown>, waiting: Arc<Waiting>) {
    let why = loop {
        match down.message().await {
            Ok(Some(batch)) => {
                let mut w = lock(&waiting);
                let Ok(w) = w.as_mut() else { return };
                for r in batch.results {
                    if let Some(tx) = w.remove(&r.id) {
                        let outcome = r.result.unwrap_or_else(|| {
                            Outcome::Failure(switchboard_proto::internal::LinkFailure {
                                code: Code::Internal as i32,
                                message: "empty link result".into(),
                            })
                        });
                        let _ = tx.send(outcome);
                    }
                }
            }
            Ok(None) => break "logic closed the link".to_string(),
            Err(s) => break s.to_string(),
        }
    };
    break_link(&waiting, &why);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call registering on a link that broke after it was handed out gets `unavailable`
    /// (it used to wait for ever on the link's lock, which it held itself).
    #[test]
    fn a_call_on_a_link_broken_meanwhile_fails_at_once() {
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (tx, _rx) = mpsc::channel(1);
            let live = Live { tx, waiting: Arc::new(Mutex::new(Ok(HashMap::new()))), next: AtomicU64::new(1) };
            let (waiter, _) = oneshot::channel();
            assert!(live.wait_for(1, waiter).is_ok());
            assert_eq!(lock(&live.waiting).as_ref().map(HashMap::len), Ok(1));
            break_link(&live.waiting, "stream reset");
            let (waiter, _) = oneshot::channel();
            let _ = done.send(live.wait_for(2, waiter).map_err(|s| (s.code(), s.message().to_string())));
        });
        let result = finished.recv_timeout(Duration::from_secs(10)).expect("the call never returned (deadlock)");
        assert_eq!(result, Err((Code::Unavailable, "logic link broken: stream reset".to_string())));
    }
}
