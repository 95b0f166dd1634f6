//! Group commit for the embedded backend: one writer thread takes every write job waiting (up to
//! [`MAX_BATCH`]), runs them back to back inside **one** redb write transaction, and commits it
//! once with `Durability::Immediate` (one fsync) before any caller hears back. Under load many
//! writes share one transaction and one fsync; alone, a write costs what it always did.
//!
//! Readers never see a write before it is durable: the batch becomes visible with the one durable
//! commit, so a reader can never return a seq that a crash would take back.
//!
//! Jobs are isolated by construction, not by the database: a job that ends with [`End::Abort`]
//! must not have written anything (every job checks before it writes), and a job that fails with
//! an error fails its whole batch (nothing of it is committed, every caller gets the error and may
//! retry), since its partial writes cannot be taken out of the shared transaction.

use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use redb::{Database, Durability, WriteTransaction};

use crate::{Result, StorageError};

/// How a write job ends: `Commit` keeps its changes, `Abort` says it wrote nothing.
pub(crate) enum End<T> {
    Commit(T),
    Abort(T),
}

/// Hands a finished job's result to its caller once the batch is durable (`None`), or with the
/// reason the batch was not committed.
type Deliver = Box<dyn FnOnce(Option<&str>) + Send>;
/// A write job: runs inside the batch's transaction; `Err` carries the text that fails the batch.
type Job = Box<dyn FnOnce(&WriteTransaction) -> (std::result::Result<bool, String>, Deliver) + Send>;

/// Most jobs sharing one transaction and fsync.
const MAX_BATCH: usize = 512;

/// The writer thread and the way to it. Dropping it stops the thread and waits
/// for it, so the database file is closed when the store is gone.
pub(crate) struct GroupCommit {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl GroupCommit {
    pub fn start(db: Arc<Database>) -> Result<Self> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("sb-redb-writer".into())
            .spawn(move || run(&db, rx))
            .map_err(|e| StorageError::Embedded(format!("starting the writer thread: {e}")))?;
        Ok(Self { jobs: Some(jobs), thread: Some(thread) })
    }

    /// Runs `f` inside the next batch's write transaction; resolves once that batch is durable
    /// (or with the error that kept it from committing).
    pub async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<End<T>> + Send + 'static,
    {
        self.submit(f).await
    }

    /// [`GroupCommit::write`], with the job queued before this returns: jobs run in the order of
    /// the calls, whenever their futures are polled.
    pub fn submit<T, F>(&self, f: F) -> impl std::future::Future<Output = Result<T>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<End<T>> + Send + 'static,
    {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |tx: &WriteTransaction| {
            let (state, result) = match f(tx) {
                Ok(End::Commit(v)) => (Ok(true), Ok(v)),
                Ok(End::Abort(v)) => (Ok(false), Ok(v)),
                Err(e) => (Err(e.to_string()), Err(e)),
            };
            let deliver: Deliver = Box::new(move |failed: Option<&str>| {
                let result = match (failed, result) {
                    (Some(e), Ok(_)) => Err(StorageError::Embedded(format!("write not committed: {e}"))),
                    (_, r) => r,
                };
                let _ = reply.send(result);
            });
            (state, deliver)
        });
        let stopped = || StorageError::Embedded("the writer thread has stopped".into());
        let queued = self.jobs.as_ref().ok_or_else(stopped).and_then(|j| j.send(job).map_err(|_| stopped()));
        async move {
            queued?;
            rx.await.map_err(|_| stopped())?
        }
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs one batch in one transaction; returns why it was not committed, if it was not.
fn run_batch(db: &Database, jobs: Vec<Job>, done: &mut Vec<Deliver>) -> Option<String> {
    let mut tx = match db.begin_write() {
        Ok(tx) => tx,
        // Nothing can run: dropping the jobs fails their callers (as a stopped writer).
        Err(e) => return Some(e.to_string()),
    };
    tx.set_durability(Durability::Immediate);
    let mut failed: Option<String> = None;
    let mut dirty = false;
    for job in jobs {
        // After a failure the remaining jobs still run (their results are replaced by the
        // batch's error), which is simpler than reaching their callers otherwise.
        let (state, deliver) = job(&tx);
        match state {
            Ok(wrote) => dirty |= wrote,
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
        done.push(deliver);
    }
    if failed.is_some() || !dirty {
        let _ = tx.abort();
        return failed;
    }
    tx.commit().err().map(|e| e.to_string())
}

fn run(db: &Database, rx: mpsc::Receiver<Job>) {
    let mut done: Vec<Deliver> = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            let Ok(job) = rx.try_recv() else {
                break;
            };
            jobs.push(job);
        }
        let n = jobs.len();
        let failed = run_batch(db, jobs, &mut done);
        if let Some(e) = &failed {
            tracing::error!(error = %e, jobs = n, "embedded store: batch not committed");
        }
        for deliver in done.drain(..) {
            deliver(failed.as_deref());
        }
    }
}
