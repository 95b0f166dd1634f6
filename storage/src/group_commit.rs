//! Group commit for the embedded backend: one writer thread takes every write job waiting (up to
//! [`MAX_BATCH`]) and runs them back to back inside one redb write transaction.
//!
//! Two kinds of writes become durable in two ways:
//! - **Message appends** ([`GroupCommit::append`]) are durable once their records are in the
//!   write-ahead log ([`crate::wal`]): one `write` and one `fdatasync` per batch. Their changes
//!   stay in the **open** transaction, which later batches keep using, and readers see them
//!   through the [`Tail`] until a checkpoint commits that transaction (every
//!   `checkpoint_interval`, or sooner once the tail holds `checkpoint_bytes`) and empties the log.
//!   Copy-on-write B-tree pages are then written once per checkpoint, not once per batch.
//! - **Every other write** commits the open transaction with `Durability::Immediate` (one fsync,
//!   which makes the appends before it durable in the B-trees too) before its caller hears back.
//!
//! Readers never see a write before it is durable: an append reaches the tail after its log
//! `fdatasync`, anything else becomes visible with its durable commit.
//!
//! Jobs are isolated by construction, not by the database: a job that ends with [`End::Abort`]
//! must not have written anything (every job checks before it writes), and a job that fails with
//! an error fails its whole batch (nothing of it is committed, every caller gets the error and may
//! retry), since its partial writes cannot be taken out of the shared transaction. The open
//! transaction is then dropped and the log replayed into a new one, which restores exactly the
//! appends already acknowledged. If even that fails, the writer refuses every later write (a seq
//! must never be handed out twice) and the log is replayed at the next start.

use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::{Database, Durability, WriteTransaction};

use crate::tail::{Entry, Tail};
use crate::wal::Wal;
use crate::{Result, StorageError};

/// How a write job ends: `Commit` keeps its changes, `Abort` says it wrote nothing.
pub(crate) enum End<T> {
    Commit(T),
    Abort(T),
}

/// How an append job ends: with its log record and tail entry, or having written nothing.
pub(crate) enum Logged<T> {
    Appended { value: T, record: Vec<u8>, entry: Entry },
    Unchanged(T),
}

/// What a job did to the transaction.
enum Effect {
    None,
    Logged { record: Vec<u8>, entry: Entry },
    Plain,
}

/// Re-applies log records (their payloads) to a transaction, skipping what it already holds.
pub(crate) type Replay = fn(&WriteTransaction, &[Vec<u8>]) -> Result<()>;

/// When the open transaction is committed although only appends wrote to it.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointPolicy {
    /// Longest time appends wait in the log for their B-tree commit.
    pub interval: Duration,
    /// Most bytes of appended records held in the tail (and the log) before a commit.
    pub bytes: usize,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        Self { interval: Duration::from_millis(200), bytes: 32 << 20 }
    }
}

/// Hands a finished job's result to its caller once the batch is durable (`None`), or with the
/// reason the batch was not committed.
type Deliver = Box<dyn FnOnce(Option<&str>) + Send>;
/// A write job: runs inside the batch's transaction; `Err` carries the text that fails the batch.
type Job = Box<dyn FnOnce(&WriteTransaction) -> (std::result::Result<Effect, String>, Deliver) + Send>;

/// Most jobs sharing one batch.
const MAX_BATCH: usize = 512;

/// The writer thread and the way to it. Dropping it commits what is open, stops the thread and
/// waits for it, so the database file is closed (and the log empty) when the store is gone.
pub(crate) struct GroupCommit {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl GroupCommit {
    /// Starts the writer thread; `log.lost` runs whenever the open transaction is dropped
    /// unfinished (to forget what was cached from it). Results are handed back through the Tokio runtime
    /// this is called on, if any: one task per batch wakes the callers, instead of one
    /// cross-thread wake-up each.
    pub fn start(db: Arc<Database>, log: Log) -> Result<Self> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let writer = Writer {
            db,
            log,
            runtime: tokio::runtime::Handle::try_current().ok(),
            open: None,
            dirty: false,
            opened: Instant::now(),
            broken: None,
        };
        let thread = std::thread::Builder::new()
            .name("sb-redb-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StorageError::Embedded(format!("starting the writer thread: {e}")))?;
        Ok(Self { jobs: Some(jobs), thread: Some(thread) })
    }

    /// Runs `f` inside the next batch's write transaction; resolves once its change is durable
    /// by a commit (or with the error that kept it from committing).
    pub async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<End<T>> + Send + 'static,
    {
        self.queue(move |tx| {
            f(tx).map(|end| match end {
                End::Commit(v) => (Effect::Plain, v),
                End::Abort(v) => (Effect::None, v),
            })
        })
        .await
    }

    /// Queues an append job before this returns (jobs run in the order of the calls, whenever
    /// their futures are polled); resolves once its log record is durable.
    pub fn append<T, F>(&self, f: F) -> impl std::future::Future<Output = Result<T>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<Logged<T>> + Send + 'static,
    {
        self.queue(move |tx| {
            f(tx).map(|logged| match logged {
                Logged::Appended { value, record, entry } => (Effect::Logged { record, entry }, value),
                Logged::Unchanged(v) => (Effect::None, v),
            })
        })
    }

    fn queue<T, F>(&self, f: F) -> impl std::future::Future<Output = Result<T>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<(Effect, T)> + Send + 'static,
    {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |tx: &WriteTransaction| {
            let (state, result) = match f(tx) {
                Ok((effect, v)) => (Ok(effect), Ok(v)),
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

/// The write-ahead side of the writer: the log, the tail readers see it through, how to replay
/// it, when to checkpoint, and what to forget when the open transaction is lost.
pub(crate) struct Log {
    pub wal: Wal,
    pub tail: Tail,
    pub replay: Replay,
    pub policy: CheckpointPolicy,
    pub lost: Box<dyn Fn() + Send>,
}

/// The writer thread's state.
struct Writer {
    db: Arc<Database>,
    log: Log,
    runtime: Option<tokio::runtime::Handle>,
    /// The transaction holding the appends since the last commit.
    open: Option<WriteTransaction>,
    /// Whether `open` holds any change.
    dirty: bool,
    /// When `open` began.
    opened: Instant,
    /// Why the writer refuses writes, once it could not restore the logged appends.
    broken: Option<String>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        let mut done: Vec<Deliver> = Vec::new();
        loop {
            let first = if self.open.is_some() {
                let wait = (self.opened + self.log.policy.interval).saturating_duration_since(Instant::now());
                match rx.recv_timeout(wait) {
                    Ok(job) => job,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.checkpoint();
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match rx.recv() {
                    Ok(job) => job,
                    Err(_) => break,
                }
            };
            let mut jobs = vec![first];
            while jobs.len() < MAX_BATCH {
                let Ok(job) = rx.try_recv() else {
                    break;
                };
                jobs.push(job);
            }
            let n = jobs.len();
            let failed = self.run_batch(jobs, &mut done);
            if let Some(e) = &failed {
                tracing::error!(error = %e, jobs = n, "embedded store: batch not committed");
            }
            match &self.runtime {
                Some(rt) => {
                    let batch = std::mem::take(&mut done);
                    rt.spawn(async move {
                        for deliver in batch {
                            deliver(failed.as_deref());
                        }
                    });
                }
                None => {
                    for deliver in done.drain(..) {
                        deliver(failed.as_deref());
                    }
                }
            }
        }
        self.checkpoint();
    }

    /// Runs one batch; returns why it did not become durable, if it did not.
    fn run_batch(&mut self, jobs: Vec<Job>, done: &mut Vec<Deliver>) -> Option<String> {
        if let Some(e) = &self.broken {
            // Dropped unrun: each caller hears that the writer has stopped.
            drop(jobs);
            return Some(e.clone());
        }
        let tx = match self.open.take() {
            Some(tx) => tx,
            None => match self.db.begin_write() {
                Ok(tx) => {
                    self.opened = Instant::now();
                    self.dirty = false;
                    tx
                }
                // Nothing can run: dropping the jobs fails their callers (as a stopped writer).
                Err(e) => return Some(e.to_string()),
            },
        };
        let mut failed: Option<String> = None;
        let mut plain = false;
        let mut framed = Vec::new();
        let mut entries = Vec::new();
        for job in jobs {
            // After a failure the remaining jobs still run (their results are replaced by the
            // batch's error), which is simpler than reaching their callers otherwise.
            let (state, deliver) = job(&tx);
            match state {
                Ok(Effect::None) => {}
                Ok(Effect::Plain) => plain = true,
                Ok(Effect::Logged { record, entry }) => {
                    Wal::frame(&mut framed, &record);
                    entries.push(entry);
                }
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
            done.push(deliver);
        }
        if failed.is_some() {
            drop(tx);
            self.restore();
            return failed;
        }
        self.dirty |= plain || !entries.is_empty();
        self.open = Some(tx);
        let due = self.log.tail.bytes() + framed.len() >= self.log.policy.bytes
            || self.opened.elapsed() >= self.log.policy.interval;
        if plain || due {
            // The commit makes this batch's appends durable and visible too: no log record needed.
            return self.checkpoint();
        }
        if framed.is_empty() {
            return None;
        }
        if let Err(e) = self.log.wal.append(&framed) {
            self.open = None;
            self.restore();
            return Some(e.to_string());
        }
        self.log.tail.extend(entries);
        None
    }

    /// Commits the open transaction durably and empties the tail and the log.
    fn checkpoint(&mut self) -> Option<String> {
        let mut tx = self.open.take()?;
        if !self.dirty {
            let _ = tx.abort();
            return None;
        }
        tx.set_durability(Durability::Immediate);
        if let Err(e) = tx.commit() {
            self.restore();
            return Some(e.to_string());
        }
        self.log.tail.clear();
        if let Err(e) = self.log.wal.reset() {
            // Harmless for correctness (replay skips what the B-trees hold) but the log grows.
            tracing::error!(error = %e, "embedded store: could not empty the write-ahead log");
        }
        None
    }

    /// After the open transaction was lost (a failed job, log write or commit): writes the
    /// logged appends again in a new transaction and commits it, so the B-trees hold exactly
    /// what was acknowledged. On failure the writer stops taking writes.
    fn restore(&mut self) {
        self.open = None;
        (self.log.lost)();
        let result = (|| -> Result<()> {
            let records = self.log.wal.records()?;
            let mut tx = self.db.begin_write()?;
            (self.log.replay)(&tx, &records)?;
            tx.set_durability(Durability::Immediate);
            tx.commit()?;
            Ok(())
        })();
        match result {
            Ok(()) => {
                self.log.tail.clear();
                if let Err(e) = self.log.wal.reset() {
                    // What follows the acknowledged records may be a failed batch's: stop rather
                    // than log after it.
                    let why = format!("the writer stopped: the write-ahead log could not be emptied ({e})");
                    tracing::error!("embedded store: {why}");
                    self.broken = Some(why);
                }
            }
            Err(e) => {
                let why =
                    format!("the writer stopped: logged appends could not be restored ({e}); restart to replay them");
                tracing::error!("embedded store: {why}");
                self.broken = Some(why);
            }
        }
    }
}
