//! Group commit for the embedded backend, on two threads:
//! - The **log thread** takes every append job waiting (up to [`MAX_BATCH`]) and runs them back
//!   to back: each reads what it needs (the tail, then the B-trees through a read transaction)
//!   and returns a log record; the batch's records cost one `write` and one `fdatasync` in the
//!   write-ahead log ([`crate::wal`]), after which they are durable and reach the [`Tail`] that
//!   readers see them through. Appends never wait for a B-tree.
//! - The **B-tree thread** owns redb's write transactions. It applies the tail's frozen
//!   generation in one commit (a **checkpoint**: every `checkpoint_interval`, or sooner once the
//!   tail holds `checkpoint_bytes`), sorted per table, then drops that generation and retires the
//!   log segments holding it (recycled, see [`crate::wal`]); and it runs every other write
//!   (accounts, friends, groups), many to one commit with `Durability::Immediate` (one fsync)
//!   before their callers hear back.
//!
//! Readers never see a write before it is durable: an append reaches the tail after its log
//! `fdatasync`, anything else becomes visible with its durable commit.
//!
//! Failures stay small: an append job that fails fails alone (it wrote nothing); a failed log
//! write fails its batch and nothing of it becomes visible; a checkpoint that cannot commit is
//! retried (its records stay in the log and its generation in the tail, so nothing
//! acknowledged is lost, and appends wait once the tail holds twice `checkpoint_bytes`); a
//! plain job that fails with an error fails its batch, whose transaction is dropped.

use std::any::Any;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redb::{Database, Key, ReadOnlyTable, ReadTransaction, TableDefinition, TableHandle, Value, WriteTransaction};

use crate::tail::{Entry, Gen, Tail};
use crate::wal::Segments;
use crate::{Result, StorageError};

/// How a write job ends: `Commit` keeps its changes, `Abort` says it wrote nothing.
pub(crate) enum End<T> {
    Commit(T),
    Abort(T),
}

/// How an append job ends: with its log record and tail entry, or having logged nothing.
pub(crate) enum Logged<T> {
    Appended { value: T, record: Vec<u8>, entry: Entry },
    Unchanged(T),
}

/// Writes a frozen tail generation into a transaction (a checkpoint).
pub(crate) type Apply = fn(&WriteTransaction, &Gen) -> Result<()>;

/// How the log thread batches appends, and when the tail is handed to a checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointPolicy {
    /// Longest time appends wait in the log for their B-tree commit.
    pub interval: Duration,
    /// Most bytes of appended records held in the tail's active generation before a checkpoint;
    /// appends wait while it holds twice this and the previous checkpoint has not committed.
    pub bytes: usize,
    /// Scheduling niceness added to the B-tree thread (Linux; 0 keeps the process's): a
    /// checkpoint is background work, and on a busy core it should yield to the threads that
    /// answer sends (a checkpoint that falls behind makes appends wait at twice `bytes`, so it
    /// is never starved for long).
    pub nice: i32,
    /// Longest time the log thread waits for more appends before writing a batch, once the
    /// batch before held at least [`LINGER_AFTER`] appends (so only under load) and while this
    /// one holds fewer than [`LINGER_UNTIL`]: fewer `fdatasync`s per append at moderate load,
    /// for at most this much more latency. Zero writes each batch as soon as the last is durable.
    pub linger: Duration,
    /// Bytes of the in-memory filter of stored cmids that lets a send with a new cmid skip the
    /// B-tree probe proving it unused (about 10 bits per stored message keep its false "maybe"
    /// under 2 %; a fuller filter only probes more often). Zero: no filter, every send probes.
    pub cmid_filter_bytes: usize,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(200),
            bytes: 32 << 20,
            nice: 10,
            linger: Duration::from_millis(1),
            cmid_filter_bytes: 16 << 20,
        }
    }
}

/// The log thread lingers for more appends only after a batch of at least this many.
const LINGER_AFTER: usize = 4;
/// ... and only while its batch holds fewer than this many (a batch this large amortises its
/// `fdatasync` already; waiting longer would only slow a saturated log).
const LINGER_UNTIL: usize = 32;

/// Hands a finished job's result to its caller once its batch is durable (`None`), or with the
/// reason the batch was not.
type Deliver = Box<dyn FnOnce(Option<&str>) + Send>;
/// An append job: its log record and tail entry (if it logged anything), and its delivery.
type AppendJob = Box<dyn FnOnce(&Reader) -> (Option<(Vec<u8>, Entry)>, Deliver) + Send>;
/// A plain write job: whether it wrote (`Err`: the text that fails the batch), and its delivery.
type PlainJob = Box<dyn FnOnce(&WriteTransaction) -> (std::result::Result<bool, String>, Deliver) + Send>;

/// Most jobs sharing one batch.
const MAX_BATCH: usize = 512;
/// How long the log thread keeps its read transaction open while no job comes.
const READER_IDLE: Duration = Duration::from_millis(50);
/// How long the B-tree thread waits before trying a failed checkpoint again.
const RETRY: Duration = Duration::from_secs(1);

enum LogMsg {
    Job(AppendJob),
    /// The B-tree thread committed the frozen generation.
    Done,
    Stop,
}

enum TreeMsg {
    Plain(PlainJob),
    /// Apply `gen`, then remove the log segments up to `through`.
    Checkpoint {
        gen: Arc<Gen>,
        through: u64,
    },
}

/// Read access for append jobs. Look in the tail (with this batch's staged entries) **first**,
/// then here: the transaction is reopened whenever a checkpoint committed since it was opened,
/// and a checkpoint counts itself before the tail drops its generation, so what is no longer in
/// the tail is always in the transaction. A table is opened once per transaction (opening one
/// reads the table tree and formats its types' names: a sixth of the log thread's lookups).
pub(crate) struct Reader<'a> {
    db: &'a Database,
    commits: &'a AtomicU64,
    tx: RefCell<Option<(u64, ReadTransaction)>>,
    /// Tables opened in `tx`, by name; emptied when `tx` is reopened.
    tables: RefCell<Vec<(String, Rc<dyn Any>)>>,
}

impl<'a> Reader<'a> {
    pub fn new(db: &'a Database, commits: &'a AtomicU64) -> Self {
        Self { db, commits, tx: RefCell::new(None), tables: RefCell::new(Vec::new()) }
    }

    /// Ends the read transaction, if one is open (the next lookup opens a new one). An open
    /// transaction keeps the pages that later commits free from being reused.
    pub fn close(&self) {
        self.tables.borrow_mut().clear();
        self.tx.replace(None);
    }

    /// Runs `f` on the table `def` of a read transaction holding every checkpoint committed
    /// before this call.
    pub fn with<K: Key + 'static, V: Value + 'static, T>(
        &self,
        def: TableDefinition<'static, K, V>,
        f: impl FnOnce(&ReadOnlyTable<K, V>) -> Result<T>,
    ) -> Result<T> {
        let now = self.commits.load(Ordering::SeqCst);
        let current = matches!(&*self.tx.borrow(), Some((at, _)) if *at == now);
        if !current {
            self.tables.borrow_mut().clear();
            self.tx.replace(Some((now, self.db.begin_read()?)));
        }
        let cached = self.tables.borrow().iter().find(|(name, _)| name == def.name()).map(|(_, t)| t.clone());
        let table = match cached.and_then(|t| t.downcast::<ReadOnlyTable<K, V>>().ok()) {
            Some(t) => t,
            None => {
                let tx = self.tx.borrow();
                let table = Rc::new(tx.as_ref().expect("opened above").1.open_table(def)?);
                self.tables.borrow_mut().push((def.name().to_owned(), table.clone()));
                table
            }
        };
        // No borrow is held across `f`: a lookup inside it shares the tables (or, if a checkpoint
        // committed meanwhile, moves to a newer transaction while this one keeps its table).
        f(&table)
    }
}

/// The two threads and the ways to them. Dropping it commits everything logged, stops the
/// threads and waits for them, so the database file is closed (and the log empty) when the
/// store is gone.
pub(crate) struct GroupCommit {
    commits: Arc<AtomicU64>,
    log: mpsc::Sender<LogMsg>,
    tree: Option<mpsc::Sender<TreeMsg>>,
    threads: Vec<JoinHandle<()>>,
}

/// What the log thread needs besides the database.
pub(crate) struct Log {
    pub segments: Segments,
    pub dir: PathBuf,
    pub tail: Tail,
    pub apply: Apply,
    pub policy: CheckpointPolicy,
    /// Runs when a batch's records could not be logged (to forget what was cached from it).
    pub lost: Box<dyn Fn() + Send>,
}

impl GroupCommit {
    /// Starts both threads. Results are handed back through the Tokio runtime this is called
    /// on, if any: one task per batch wakes the callers, instead of one cross-thread wake-up
    /// each.
    pub fn start(db: Arc<Database>, log: Log) -> Result<Self> {
        let (log_tx, log_rx) = mpsc::channel::<LogMsg>();
        let (tree_tx, tree_rx) = mpsc::channel::<TreeMsg>();
        let runtime = tokio::runtime::Handle::try_current().ok();
        let commits = Arc::new(AtomicU64::new(0));
        let nice = log.policy.nice;
        let tree = TreeThread {
            db: db.clone(),
            dir: log.dir.clone(),
            tail: log.tail.clone(),
            apply: log.apply,
            commits: commits.clone(),
            log: log_tx.clone(),
            runtime: runtime.clone(),
        };
        let writer = LogThread {
            db,
            commits: commits.clone(),
            segments: log.segments,
            tail: log.tail,
            policy: log.policy,
            lost: log.lost,
            runtime,
            tree: tree_tx.clone(),
            in_flight: false,
            since: None,
            deferred: VecDeque::new(),
            broken: false,
            stopping: false,
        };
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(|e| StorageError::embedded(format!("starting the {name} thread: {e}")))
        };
        // The B-tree thread lowers its priority before the store is handed out.
        let (niced, is_niced) = mpsc::sync_channel::<()>(1);
        let tree_thread = spawn(
            "sb-redb-writer",
            Box::new(move || {
                lower_priority(nice);
                let _ = niced.send(());
                tree.run(tree_rx)
            }),
        )?;
        let _ = is_niced.recv();
        let log_thread = spawn("sb-store-log", Box::new(move || writer.run(log_rx)))?;
        Ok(Self { commits, log: log_tx, tree: Some(tree_tx), threads: vec![log_thread, tree_thread] })
    }

    /// How many checkpoints have committed (a reader that saw it unchanged around a lookup in
    /// the tail and the B-trees saw every change in one or the other).
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::SeqCst)
    }

    /// Runs `f` inside the next plain batch's write transaction; resolves once its change is
    /// durable by a commit (or with the error that kept it from committing).
    pub async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<End<T>> + Send + 'static,
    {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let job: PlainJob = Box::new(move |tx: &WriteTransaction| {
            let (state, result) = match f(tx) {
                Ok(End::Commit(v)) => (Ok(true), Ok(v)),
                Ok(End::Abort(v)) => (Ok(false), Ok(v)),
                Err(e) => (Err(e.to_string()), Err(e)),
            };
            (state, deliver(reply, result))
        });
        let sent = self.tree.as_ref().is_some_and(|t| t.send(TreeMsg::Plain(job)).is_ok());
        if !sent {
            return Err(stopped());
        }
        rx.await.map_err(|_| stopped())?
    }

    /// Queues an append job before this returns (jobs run in the order of the calls, whenever
    /// their futures are polled); resolves once its log record is durable.
    pub fn append<T, F>(&self, f: F) -> impl std::future::Future<Output = Result<T>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce(&Reader) -> Result<Logged<T>> + Send + 'static,
    {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let job: AppendJob = Box::new(move |reader: &Reader| {
            let (logged, result) = match f(reader) {
                Ok(Logged::Appended { value, record, entry }) => (Some((record, entry)), Ok(value)),
                Ok(Logged::Unchanged(v)) => (None, Ok(v)),
                Err(e) => (None, Err(e)),
            };
            (logged, deliver(reply, result))
        });
        let queued = self.log.send(LogMsg::Job(job)).map_err(|_| stopped());
        async move {
            queued?;
            rx.await.map_err(|_| stopped())?
        }
    }
}

fn stopped() -> StorageError {
    StorageError::embedded("the writer thread has stopped")
}

/// The delivery of `result` through `reply`, turned into an error if its batch failed.
fn deliver<T: Send + 'static>(reply: tokio::sync::oneshot::Sender<Result<T>>, result: Result<T>) -> Deliver {
    Box::new(move |failed: Option<&str>| {
        let result = match (failed, result) {
            (Some(e), Ok(_)) => Err(StorageError::embedded(format!("write not committed: {e}"))),
            (_, r) => r,
        };
        let _ = reply.send(result);
    })
}

/// Runs the deliveries of a batch: on the runtime in one task if there is one.
fn hand_back(runtime: &Option<tokio::runtime::Handle>, done: Vec<Deliver>, failed: Option<String>) {
    match runtime {
        Some(rt) => {
            rt.spawn(async move {
                for d in done {
                    d(failed.as_deref());
                }
            });
        }
        None => {
            for d in done {
                d(failed.as_deref());
            }
        }
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        let _ = self.log.send(LogMsg::Stop);
        self.tree = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The log thread's state.
struct LogThread {
    db: Arc<Database>,
    commits: Arc<AtomicU64>,
    segments: Segments,
    tail: Tail,
    policy: CheckpointPolicy,
    lost: Box<dyn Fn() + Send>,
    runtime: Option<tokio::runtime::Handle>,
    tree: mpsc::Sender<TreeMsg>,
    /// A frozen generation is with the B-tree thread.
    in_flight: bool,
    /// When the active generation got its first entry.
    since: Option<Instant>,
    /// Jobs received while waiting for a checkpoint, run before any newer one.
    deferred: VecDeque<AppendJob>,
    /// The B-tree thread is gone: nothing logged from now on could reach the B-trees, so
    /// appends are refused (the log replays what it holds at the next start).
    broken: bool,
    /// The store is closing: stop once the jobs received before it have run.
    stopping: bool,
}

impl LogThread {
    fn run(mut self, rx: mpsc::Receiver<LogMsg>) {
        // One read transaction for the jobs of many batches, renewed when a checkpoint commits
        // (see [`Reader`]): opening one takes locks the B-tree thread also takes while it
        // builds a checkpoint, and that thread runs niced, so a log thread that opened one per
        // batch sometimes waited for it to be scheduled again (priority inversion).
        let (db, commits) = (self.db.clone(), self.commits.clone());
        let reader = Reader::new(&db, &commits);
        // Appends in the batch written before this one.
        let mut last_batch = 0;
        loop {
            if self.stopping && self.deferred.is_empty() {
                break;
            }
            let first = if let Some(job) = self.deferred.pop_front() {
                job
            } else {
                let deadline = match self.since {
                    Some(since) if !self.in_flight => Some(since + self.policy.interval),
                    _ => None,
                };
                let left = || deadline.map(|d| d.saturating_duration_since(Instant::now()));
                // While jobs keep coming the transaction stays; once none came for a while it
                // is closed, so an idle log never holds back freed pages.
                let first_wait = left().map_or(READER_IDLE, |l| l.min(READER_IDLE));
                let msg = match rx.recv_timeout(first_wait) {
                    Ok(m) => m,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if first_wait == READER_IDLE {
                            reader.close();
                        }
                        let next = match left() {
                            Some(l) => rx.recv_timeout(l),
                            None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                        };
                        match next {
                            Ok(m) => m,
                            Err(mpsc::RecvTimeoutError::Timeout) => {
                                self.checkpoint();
                                continue;
                            }
                            Err(mpsc::RecvTimeoutError::Disconnected) => break,
                        }
                    }
                };
                match msg {
                    LogMsg::Job(job) => job,
                    LogMsg::Done => {
                        self.in_flight = false;
                        self.checkpoint_if_due();
                        continue;
                    }
                    LogMsg::Stop => break,
                }
            };
            let mut jobs = vec![first];
            let linger = if last_batch >= LINGER_AFTER { self.policy.linger } else { Duration::ZERO };
            let deadline = Instant::now() + linger;
            while jobs.len() < MAX_BATCH {
                if let Some(job) = self.deferred.pop_front() {
                    jobs.push(job);
                    continue;
                }
                let msg = match rx.try_recv() {
                    Ok(m) => m,
                    Err(mpsc::TryRecvError::Empty) if !linger.is_zero() && jobs.len() < LINGER_UNTIL => {
                        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                            Ok(m) => m,
                            Err(_) => break,
                        }
                    }
                    Err(_) => break,
                };
                match msg {
                    LogMsg::Job(job) => jobs.push(job),
                    LogMsg::Done => self.in_flight = false,
                    LogMsg::Stop => {
                        self.stopping = true;
                        break;
                    }
                }
            }
            last_batch = jobs.len();
            self.run_batch(jobs, &reader);
            if self.in_flight && self.tail.state().0 >= 2 * self.policy.bytes {
                // Backpressure: the B-tree thread is behind (or failing); hold new appends
                // until it catches up rather than let the tail grow without bound.
                self.wait_done(&rx);
            }
            self.checkpoint_if_due();
        }
        // Everything logged goes to the B-trees before the store closes.
        if self.in_flight {
            self.wait_done(&rx);
        }
        self.checkpoint();
        if self.in_flight {
            self.wait_done(&rx);
        }
    }

    /// Blocks until the B-tree thread commits the frozen generation, keeping the jobs (and a
    /// stop) that arrive meanwhile for later.
    fn wait_done(&mut self, rx: &mpsc::Receiver<LogMsg>) {
        while self.in_flight {
            match rx.recv() {
                Ok(LogMsg::Job(job)) => self.deferred.push_back(job),
                Ok(LogMsg::Done) => self.in_flight = false,
                Ok(LogMsg::Stop) => self.stopping = true,
                Err(_) => return,
            }
        }
    }

    fn run_batch(&mut self, jobs: Vec<AppendJob>, reader: &Reader) {
        if self.broken {
            // Dropped unrun: each caller hears that the writer has stopped.
            return;
        }
        let mut done = Vec::with_capacity(jobs.len());
        let mut framed = Vec::new();
        let mut entries = 0;
        for job in jobs {
            let (logged, deliver) = job(reader);
            if let Some((record, entry)) = logged {
                self.segments.frame(&mut framed, &record);
                // Later jobs of this batch see it; readers only once it is durable.
                self.tail.stage(entry);
                entries += 1;
            }
            done.push(deliver);
        }
        let mut failed = None;
        if entries > 0 {
            let started = Instant::now();
            let appended = self.segments.append(&framed);
            crate::metrics::EMBEDDED_LOG_SYNC.observe(started.elapsed().as_secs_f64());
            crate::metrics::EMBEDDED_LOG_BATCH.observe(entries as f64);
            match appended {
                Ok(()) => {
                    self.tail.publish();
                    self.since.get_or_insert_with(Instant::now);
                }
                Err(e) => {
                    tracing::error!(error = %e, jobs = done.len(), "embedded store: appends not logged");
                    self.tail.discard();
                    (self.lost)();
                    failed = Some(e.to_string());
                }
            }
        }
        hand_back(&self.runtime, done, failed);
    }

    fn checkpoint_if_due(&mut self) {
        let due =
            self.since.is_some_and(|s| s.elapsed() >= self.policy.interval) || self.tail.state().0 >= self.policy.bytes;
        if due {
            self.checkpoint();
        }
    }

    /// Hands the active generation to the B-tree thread, with the log segment holding it.
    fn checkpoint(&mut self) {
        if self.in_flight || self.broken || self.since.is_none() {
            return;
        }
        let through = match self.segments.rotate() {
            Ok(n) => n,
            Err(e) => {
                // The appends stay in the current segment and the tail; tried again later.
                tracing::error!(error = %e, "embedded store: could not start a new log segment");
                self.since = Some(Instant::now());
                return;
            }
        };
        self.since = None;
        if let Some(gen) = self.tail.freeze() {
            if self.tree.send(TreeMsg::Checkpoint { gen, through }).is_ok() {
                self.in_flight = true;
            } else {
                tracing::error!("embedded store: the B-tree writer has stopped; refusing appends");
                self.broken = true;
            }
        }
    }
}

/// The B-tree thread's state.
struct TreeThread {
    db: Arc<Database>,
    dir: PathBuf,
    tail: Tail,
    apply: Apply,
    commits: Arc<AtomicU64>,
    log: mpsc::Sender<LogMsg>,
    runtime: Option<tokio::runtime::Handle>,
}

/// Adds `nice` to the calling thread's niceness (Linux schedules threads one by one; raising
/// one's own niceness needs no privilege). Elsewhere, or if the call fails, nothing changes.
pub(crate) fn lower_priority(nice: i32) {
    if nice <= 0 {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        // SAFETY: plain syscalls on the calling thread with integer arguments.
        let (tid, errno_ok) = unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            let now = libc::getpriority(libc::PRIO_PROCESS, tid);
            (tid, libc::setpriority(libc::PRIO_PROCESS, tid, (now + nice).min(19)) == 0)
        };
        if !errno_ok {
            tracing::debug!(tid, nice, "could not lower the B-tree thread's priority");
        }
    }
}

impl TreeThread {
    fn run(self, rx: mpsc::Receiver<TreeMsg>) {
        let mut waiting: Option<(Arc<Gen>, u64)> = None;
        loop {
            let msg = if waiting.is_some() {
                match rx.recv_timeout(RETRY) {
                    Ok(m) => Some(m),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => break,
                }
            };
            let mut plain = Vec::new();
            match msg {
                Some(TreeMsg::Checkpoint { gen, through }) => waiting = Some((gen, through)),
                Some(TreeMsg::Plain(job)) => plain.push(job),
                None => {}
            }
            while !plain.is_empty() && plain.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(TreeMsg::Plain(job)) => plain.push(job),
                    Ok(TreeMsg::Checkpoint { gen, through }) => waiting = Some((gen, through)),
                    Err(_) => break,
                }
            }
            if let Some((gen, through)) = waiting.take() {
                if !self.checkpoint(&gen, through) {
                    waiting = Some((gen, through));
                }
            }
            if !plain.is_empty() {
                self.run_plain(plain);
            }
        }
        if let Some((gen, through)) = waiting {
            // The last chance before closing; on failure the log replays it at the next start.
            self.checkpoint(&gen, through);
        }
    }

    /// Commits `gen` to the B-trees; whether it did.
    fn checkpoint(&self, gen: &Gen, through: u64) -> bool {
        let started = Instant::now();
        let committed = (|| -> Result<()> {
            let tx = self.db.begin_write()?;
            (self.apply)(&tx, gen)?;
            tx.commit()?;
            Ok(())
        })();
        crate::metrics::EMBEDDED_CHECKPOINT.observe(started.elapsed().as_secs_f64());
        if let Err(e) = committed {
            tracing::error!(error = %e, "embedded store: checkpoint not committed; trying again");
            return false;
        }
        // Counted before the tail lets go of it: see [`Reader`].
        self.commits.fetch_add(1, Ordering::SeqCst);
        self.tail.release();
        if let Err(e) = Segments::retire_through(&self.dir, through) {
            // Harmless for correctness (replay skips what the B-trees hold) but the log grows.
            tracing::error!(error = %e, "embedded store: could not retire committed log segments");
        }
        let _ = self.log.send(LogMsg::Done);
        true
    }

    fn run_plain(&self, jobs: Vec<PlainJob>) {
        let n = jobs.len();
        let mut done = Vec::with_capacity(n);
        let failed = match self.db.begin_write() {
            Err(e) => Some(e.to_string()),
            Ok(tx) => {
                let mut failed = None;
                let mut wrote = false;
                for job in jobs {
                    // After a failure the remaining jobs still run (their results are replaced
                    // by the batch's error), which is simpler than reaching their callers
                    // otherwise.
                    let (state, deliver) = job(&tx);
                    match state {
                        Ok(w) => wrote |= w,
                        Err(e) => {
                            failed.get_or_insert(e);
                        }
                    }
                    done.push(deliver);
                }
                match failed {
                    Some(e) => Some(e),
                    None if wrote => tx.commit().err().map(|e| e.to_string()),
                    None => tx.abort().err().map(|e| e.to_string()),
                }
            }
        };
        if let Some(e) = &failed {
            tracing::error!(error = %e, jobs = n, "embedded store: batch not committed");
        }
        hand_back(&self.runtime, done, failed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: TableDefinition<&str, u64> = TableDefinition::new("t");
    const U: TableDefinition<&str, u64> = TableDefinition::new("u");

    fn put(db: &Database, table: TableDefinition<&str, u64>, key: &str, value: u64) {
        let tx = db.begin_write().unwrap();
        tx.open_table(table).unwrap().insert(key, value).unwrap();
        tx.commit().unwrap();
    }

    /// Tables opened once are read again from the same transaction, two tables of one key and
    /// value type are told apart by name, a lookup nested inside another shares the table, and
    /// once a commit is counted the next read sees it (the opened tables go with the old
    /// transaction).
    #[test]
    fn a_reader_keeps_its_tables_until_a_commit_is_counted() {
        let dir = std::env::temp_dir().join(format!("sb-reader-{}", crate::contract::prefix()));
        std::fs::create_dir_all(&dir).unwrap();
        let db = Database::create(dir.join("r.redb")).unwrap();
        put(&db, T, "k", 1);
        put(&db, U, "k", 10);
        let commits = AtomicU64::new(0);
        let reader = Reader::new(&db, &commits);
        let get = |table, key| reader.with(table, |t| Ok(t.get(key)?.map(|v| v.value())));
        assert_eq!(get(T, "k").unwrap(), Some(1));
        assert_eq!(get(U, "k").unwrap(), Some(10));
        let nested = reader.with(T, |t| Ok((t.get("k")?.unwrap().value(), get(U, "k")?, get(T, "k")?))).unwrap();
        assert_eq!(nested, (1, Some(10), Some(1)));
        assert_eq!(reader.tables.borrow().len(), 2, "a nested lookup shares the opened table");
        // Written but not counted: this reader's transaction predates it.
        put(&db, T, "k", 2);
        assert_eq!(get(T, "k").unwrap(), Some(1));
        commits.fetch_add(1, Ordering::SeqCst);
        assert_eq!(get(T, "k").unwrap(), Some(2));
        assert_eq!(get(U, "k").unwrap(), Some(10));
        assert_eq!(reader.tables.borrow().len(), 2, "one entry per table");
        // Closed, it opens a new transaction at the next lookup, counted or not.
        reader.close();
        assert!(reader.tables.borrow().is_empty() && reader.tx.borrow().is_none());
        put(&db, T, "k", 3);
        assert_eq!(get(T, "k").unwrap(), Some(3));
        drop(reader);
        drop(db);
        std::fs::remove_dir_all(&dir).ok();
    }
}
