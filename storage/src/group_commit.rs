//! Group commit for the embedded backend: one writer thread runs every write
//! transaction back to back without an fsync (redb `Durability::None`, each
//! still atomic and isolated on its own), then makes the whole batch durable
//! with one `Durability::Immediate` commit before any caller hears back. Under
//! load many writes share one fsync; alone, a write costs what it did before.

use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use redb::{Database, Durability, WriteTransaction};

use crate::{Result, StorageError};

/// How a write transaction ends: `Commit` makes its changes durable,
/// `Abort` leaves the database as it was (nothing to write, no fsync).
pub(crate) enum End<T> {
    Commit(T),
    Abort(T),
}

/// Hands a finished job's result to its caller once the batch is durable (or
/// with the error that kept it from becoming durable).
type Deliver = Box<dyn FnOnce(Option<&str>) + Send>;
/// A write job: runs its transaction and says whether it committed anything.
type Job = Box<dyn FnOnce(&Database) -> (bool, Deliver) + Send>;

/// Most jobs sharing one fsync.
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

    /// Runs `f` in its own write transaction; resolves once that transaction
    /// (committed on [`End::Commit`], dropped on [`End::Abort`] or an error) is
    /// durable together with the rest of its batch.
    pub async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<End<T>> + Send + 'static,
    {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |db: &Database| {
            let (committed, result) = match run_one(db, f) {
                Ok((committed, v)) => (committed, Ok(v)),
                Err(e) => (false, Err(e)),
            };
            let deliver: Deliver = Box::new(move |barrier: Option<&str>| {
                let result = match (barrier, result) {
                    (Some(e), Ok(_)) if committed => {
                        Err(StorageError::Embedded(format!("commit was not made durable: {e}")))
                    }
                    (_, r) => r,
                };
                let _ = reply.send(result);
            });
            (committed, deliver)
        });
        let stopped = || StorageError::Embedded("the writer thread has stopped".into());
        self.jobs.as_ref().ok_or_else(stopped)?.send(job).map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
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

fn run_one<T>(db: &Database, f: impl FnOnce(&WriteTransaction) -> Result<End<T>>) -> Result<(bool, T)> {
    let mut tx = db.begin_write()?;
    tx.set_durability(Durability::None);
    match f(&tx)? {
        End::Commit(v) => {
            tx.commit()?;
            Ok((true, v))
        }
        End::Abort(v) => Ok((false, v)),
    }
}

fn barrier(db: &Database) -> Result<()> {
    let mut tx = db.begin_write()?;
    tx.set_durability(Durability::Immediate);
    tx.commit()?;
    Ok(())
}

fn run(db: &Database, rx: mpsc::Receiver<Job>) {
    let mut done: Vec<Deliver> = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut dirty = false;
        let (committed, deliver) = first(db);
        dirty |= committed;
        done.push(deliver);
        while done.len() < MAX_BATCH {
            let Ok(job) = rx.try_recv() else {
                break;
            };
            let (committed, deliver) = job(db);
            dirty |= committed;
            done.push(deliver);
        }
        let failed = if dirty { barrier(db).err().map(|e| e.to_string()) } else { None };
        if let Some(e) = &failed {
            tracing::error!(error = %e, jobs = done.len(), "embedded store: durable commit failed");
        }
        for deliver in done.drain(..) {
            deliver(failed.as_deref());
        }
    }
}
