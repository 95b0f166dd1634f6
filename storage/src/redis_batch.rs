//! Many sends per Redis script call: the cluster's seq reservations and completions.
//!
//! Every send of a cluster runs two Redis scripts (reserve a seq, then mark it done once the
//! broker has the message). Called one by one, each costs Redis a script call and a network
//! read and write per send. Here a task per kind takes what is waiting when Redis answered the
//! previous call and sends it as one call ([`RedisStore::alloc_many`],
//! [`RedisStore::complete_many`]), so the calls grow with the load and a lone send goes at
//! once. Each send is still answered as if alone: the scripts run the same steps per send, in
//! order, in one atomic call.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::redis::{Alloc, AllocRequest, CompleteRequest, Completion, RedisStore};
use crate::{now_ms, Result, StorageError};

/// Sends in one script call at most.
const MAX_BATCH: usize = 256;
/// Sends waiting for a call at most; more wait for room.
const QUEUE: usize = 8192;

type Waiting<Req, Answer> = (Req, oneshot::Sender<Result<Answer>>);

/// The handle sends go through; the tasks behind it end when the last handle is dropped.
#[derive(Clone)]
pub struct ScriptBatcher {
    allocs: mpsc::Sender<Waiting<AllocRequest, Alloc>>,
    completes: mpsc::Sender<Waiting<CompleteRequest, Completion>>,
}

impl ScriptBatcher {
    /// Starts both tasks on the current Tokio runtime.
    pub fn start(redis: RedisStore) -> Self {
        // shared by reference: a call clones a pointer, not the store's strings
        let redis = Arc::new(redis);
        let r = redis.clone();
        let allocs = spawn(move |reqs: Vec<AllocRequest>| {
            let r = r.clone();
            async move { r.alloc_many(&reqs, now_ms()).await }
        });
        let completes = spawn(move |reqs: Vec<CompleteRequest>| {
            let r = redis.clone();
            async move { r.complete_many(&reqs).await }
        });
        Self { allocs, completes }
    }

    /// [`RedisStore::alloc`], sharing a script call with the sends waiting alongside.
    pub async fn alloc(&self, req: AllocRequest) -> Result<Alloc> {
        call(&self.allocs, req).await
    }

    /// [`RedisStore::complete`], sharing a script call with the sends waiting alongside.
    pub async fn complete(&self, req: CompleteRequest) -> Result<Completion> {
        call(&self.completes, req).await
    }
}

async fn call<Req, Answer>(tx: &mpsc::Sender<Waiting<Req, Answer>>, req: Req) -> Result<Answer> {
    let (done, answer) = oneshot::channel();
    tx.send((req, done)).await.map_err(|_| StorageError::redis("the script batcher stopped"))?;
    answer.await.map_err(|_| StorageError::redis("the script batcher stopped"))?
}

/// A task that calls `many` with what waits, one call at a time, and answers each sender.
fn spawn<Req, Answer, F, Fut>(many: F) -> mpsc::Sender<Waiting<Req, Answer>>
where
    Req: Send + 'static,
    Answer: Send + 'static,
    F: Fn(Vec<Req>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Vec<Answer>>> + Send,
{
    let (tx, mut rx) = mpsc::channel::<Waiting<Req, Answer>>(QUEUE);
    tokio::spawn(async move {
        let mut batch = Vec::new();
        while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
            let (reqs, waiting): (Vec<Req>, Vec<_>) = batch.drain(..).unzip();
            match many(reqs).await {
                Ok(answers) => {
                    for (w, a) in waiting.into_iter().zip(answers) {
                        let _ = w.send(Ok(a));
                    }
                }
                Err(e) => {
                    // The first sender gets the error itself, the others its words.
                    let words = e.to_string();
                    let mut waiting = waiting.into_iter();
                    if let Some(first) = waiting.next() {
                        let _ = first.send(Err(e));
                    }
                    for w in waiting {
                        let _ = w.send(Err(StorageError::redis(words.clone())));
                    }
                }
            }
        }
    });
    tx
}
