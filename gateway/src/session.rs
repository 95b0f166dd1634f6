//! The gateway end of the long-lived link to one logic instance (`Logic.Link`): calls from every
//! shard share one gRPC bidirectional stream, written in batches cut by count and bytes by one
//! writer task and answered in batches read by one reader task, matched by call id. The stream
//! opens on first use, and again on the first call after it broke; a broken stream fails every
//! call waiting on it as `unavailable` (a transport failure: the pool retries the call on another
//! instance and counts it against this one's breaker). A call given up (timed out, cancelled)
//! forgets its id, so nothing waits for ever on an instance that stopped answering.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchboard_proto::internal::link_call::Call;
use switchboard_proto::internal::link_result::Result as Outcome;
use switchboard_proto::internal::logic_client::LogicClient;
use switchboard_proto::internal::{LinkCall, LinkDown, LinkUp};
use switchboard_proto::{batch, cluster_auth};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Request, Status, Streaming};

/// Longest wait for logic to answer the opening of a link.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Calls queued for the writer of one link (callers wait beyond it).
const QUEUE: usize = 4096;
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
}

/// The link to one logic instance.
pub(crate) struct LinkSession {
    client: LogicClient<Channel>,
    secret: Option<Arc<MetadataValue<Ascii>>>,
    live: Mutex<Option<Arc<Live>>>,
}

impl LinkSession {
    pub(crate) fn new(client: LogicClient<Channel>, secret: Option<Arc<MetadataValue<Ascii>>>) -> Self {
        Self { client, secret, live: Mutex::new(None) }
    }

    /// The open stream, opening one if there is none or it broke.
    fn live(&self) -> Arc<Live> {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = live.as_ref().filter(|l| !l.broken()) {
            return l.clone();
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let waiting = Arc::new(Mutex::new(Ok(HashMap::new())));
        tokio::spawn(run(self.client.clone(), self.secret.clone(), rx, waiting.clone()));
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
        if let Ok(w) = lock(&live.waiting).as_mut() {
            w.insert(id, tx);
        } else {
            return Err(live.failed());
        }
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
