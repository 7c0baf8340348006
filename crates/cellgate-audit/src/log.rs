//! The writer: one thread owns the log file; handles submit records through a bounded queue.
//!
//! - [`AuditLog::submit`] never waits: it puts the record in the queue or returns
//!   [`AuditError::Overflow`], and the caller fails closed. This is how allows never wait on
//!   the disk yet no record is ever dropped silently.
//! - [`AuditLog::submit_durable`] resolves once the record is written and `sync_data` has
//!   returned: a denial is durable before the denial is sent.
//! - Group commit: the writer takes everything queued (up to [`MAX_BATCH_RECORDS`]), chains it
//!   in the order received, writes it with one `write`, and syncs once if anyone waits for
//!   durability (or [`AuditOptions::sync_interval`] has passed since the last sync). After each
//!   sync it replaces the head anchor (`<log>.head`, temp file + rename).
//! - Linger: when a batch holds plain records only, the writer waits up to
//!   [`AuditOptions::linger`] for more before writing, so a steady stream of allows costs one
//!   wake-up and one `write` per linger period instead of one per record. A durable
//!   submission, a flush or a close ends the linger at once.
//! - A write or sync failure fails the log closed: every waiter gets
//!   [`AuditError::Unavailable`], so does every later submission, and plain records that were
//!   accepted but not written are counted in [`AuditStats::lost`] and logged.
//!
//! The writer runs on a thread of its own (`cellgate-audit`, with a single-threaded runtime for
//! its timers), so file I/O never stalls a worker of the caller's runtime, and a batch costs
//! no hand-offs: the thread that takes the records writes them. A plain submission wakes that
//! thread only when it is idle; durable waiters are answered from it directly.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::future::Future;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot, watch, Notify};
use tokio::time::{self, Instant, MissedTickBehavior};

use crate::chain::{self, head_path, Head};
use crate::error::{AuditError, VerifyError};
use crate::record::Record;
use crate::verify::{verify_path, VerifyReport};

/// Most records written by one `write` call. Bounds the writer's buffer (a typical record is
/// under 1 KiB, so about 1 MiB) and how long a durable submission can wait behind a flood.
pub const MAX_BATCH_RECORDS: usize = 1024;

/// Permissions of a new log and of its head: the node writes, its group (log shippers) reads.
const FILE_MODE: u32 = 0o640;

/// How the writer behaves.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// Records that may wait for the writer before [`AuditLog::submit`] overflows.
    pub queue_capacity: usize,
    /// Longest time a plain submission stays written but not synced.
    pub sync_interval: Duration,
    /// Records a [`AuditLog::subscribe`] receiver may fall behind before it lags.
    pub subscriber_capacity: usize,
    /// Longest time plain records wait for company before a write (zero: write at once).
    /// Durable submissions never wait for it.
    pub linger: Duration,
}

impl Default for AuditOptions {
    fn default() -> Self {
        AuditOptions {
            queue_capacity: 65_536,
            sync_interval: Duration::from_millis(100),
            subscriber_capacity: 4096,
            linger: Duration::from_millis(1),
        }
    }
}

impl AuditOptions {
    /// Checks the ranges (the tokio primitives underneath panic on zero).
    ///
    /// # Errors
    ///
    /// [`AuditError::InvalidOptions`] naming the first option out of range.
    pub fn validate(&self) -> Result<(), AuditError> {
        /// Far beyond any sensible queue; keeps a typo from reserving gigabytes.
        const MAX_QUEUE: usize = 1 << 24;
        if !(1..=MAX_QUEUE).contains(&self.queue_capacity) {
            return Err(AuditError::InvalidOptions {
                name: "queue_capacity",
                value: self.queue_capacity.to_string(),
                hint: "must be between 1 and 16777216",
            });
        }
        if self.sync_interval.is_zero() {
            return Err(AuditError::InvalidOptions {
                name: "sync_interval",
                value: format!("{:?}", self.sync_interval),
                hint: "must be above zero",
            });
        }
        if self.linger >= self.sync_interval {
            return Err(AuditError::InvalidOptions {
                name: "linger",
                value: format!("{:?}", self.linger),
                hint: "must be below sync_interval",
            });
        }
        if !(1..=MAX_QUEUE).contains(&self.subscriber_capacity) {
            return Err(AuditError::InvalidOptions {
                name: "subscriber_capacity",
                value: self.subscriber_capacity.to_string(),
                hint: "must be between 1 and 16777216",
            });
        }
        Ok(())
    }
}

/// A snapshot of the writer's counters, read without locks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuditStats {
    /// Records written to the file.
    pub written: u64,
    /// `write` calls (batches); `written / writes` is the mean group-commit size.
    pub writes: u64,
    /// `sync_data` calls.
    pub syncs: u64,
    /// Syncs made because a durable submission or a flush was waiting.
    pub durable_syncs: u64,
    /// Submissions refused because the queue was full.
    pub overflows: u64,
    /// Accepted plain submissions that a writer failure kept from the file.
    pub lost: u64,
    /// Submissions waiting for the writer (approximate).
    pub queue_depth: u64,
    /// `seq` of the last record written.
    pub last_seq: u64,
}

/// The writer; await it after [`AuditLog::close`] for its final result. Its output is `Err` only
/// if the writer thread died without reporting (a panic).
#[derive(Debug)]
pub struct WriterHandle(oneshot::Receiver<Result<(), AuditError>>);

/// The writer thread ended without reporting its result.
#[derive(Debug, thiserror::Error)]
#[error("the audit writer thread ended without a result")]
pub struct WriterGone;

impl Future for WriterHandle {
    type Output = Result<Result<(), AuditError>, WriterGone>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.map_err(|_| WriterGone))
    }
}

type Ack = oneshot::Sender<Result<(), AuditError>>;

enum Command {
    Record(Record),
    Durable(Record, Ack),
    Flush(Ack),
    Close(Ack),
}

#[derive(Debug, Default)]
struct Counters {
    written: AtomicU64,
    writes: AtomicU64,
    syncs: AtomicU64,
    durable_syncs: AtomicU64,
    overflows: AtomicU64,
    lost: AtomicU64,
    last_seq: AtomicU64,
}

#[derive(Debug)]
struct State {
    counters: Counters,
    /// Ends the writer's linger: a durable submission, a flush or a close is queued.
    urgent: Notify,
    events: broadcast::Sender<Arc<Record>>,
    /// Set once, by the writer, when it fails.
    failure: OnceLock<String>,
    capacity: usize,
    /// The last record known synced: its `seq` and `hash` (0 and [`crate::ZERO_HASH`] when none).
    durable: watch::Sender<Head>,
}

/// Handle to an audit log. Cheap to clone; the writer stops when every handle is dropped or
/// [`AuditLog::close`] is called.
#[derive(Debug, Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Command>,
    state: Arc<State>,
}

impl AuditLog {
    /// Opens (or creates) the log at `path` and starts its writer task.
    ///
    /// An existing log is verified first, head anchor included, and the chain resumes after
    /// its last record. The file is locked (`flock`) for as long as the writer runs.
    ///
    /// # Errors
    ///
    /// [`AuditError::Broken`] naming the first bad record if the existing log does not verify
    /// (the node must not append to a broken chain), [`AuditError::Locked`] if another writer
    /// holds it, [`AuditError::Open`] on I/O errors, [`AuditError::InvalidOptions`].
    ///
    /// # Caveats
    ///
    /// Must be called inside a tokio runtime. A crash in the middle of a write leaves an
    /// incomplete last line: a record that was never synced, so never acknowledged. Open moves
    /// it to `<log>.torn` and cuts it, and the chain resumes after the last complete record
    /// (which the head anchor, written only after a sync, never names beyond).
    pub async fn open(
        path: impl AsRef<Path>,
        options: AuditOptions,
    ) -> Result<(AuditLog, WriterHandle), AuditError> {
        options.validate()?;
        let path = path.as_ref().to_owned();
        let opened = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || open_and_verify(&path)).await
        };
        let (file, report) = opened.map_err(|e| AuditError::Open {
            path: path.clone(),
            source: io::Error::other(e),
        })??;
        tracing::info!(
            path = %path.display(),
            records = report.records,
            "audit log opened"
        );
        start(file, path.clone(), report, &options)
            .map_err(|source| AuditError::Open { path, source })
    }

    /// Queues a record without waiting. The chain fields are overwritten by the writer.
    ///
    /// # Errors
    ///
    /// [`AuditError::Overflow`] if the queue is full, [`AuditError::Unavailable`] after a
    /// writer failure, [`AuditError::Closed`] after [`AuditLog::close`]. On any error the
    /// record was not accepted and the caller must fail closed.
    pub fn submit(&self, rec: Record) -> Result<(), AuditError> {
        self.try_queue(Command::Record(rec))
    }

    /// Queues without waiting; a full queue is counted and refused.
    fn try_queue(&self, cmd: Command) -> Result<(), AuditError> {
        self.check_failed()?;
        match self.tx.try_send(cmd) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.state
                    .counters
                    .overflows
                    .fetch_add(1, Ordering::Relaxed);
                Err(AuditError::Overflow {
                    capacity: self.state.capacity,
                })
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(self.closed_error()),
        }
    }

    /// Queues a record and resolves once it is written and synced to disk.
    ///
    /// Waits for room in the queue rather than overflowing: the caller is already waiting on
    /// the disk.
    ///
    /// # Errors
    ///
    /// [`AuditError::Unavailable`] if the writer failed before the record was synced (it may
    /// or may not be in the file), [`AuditError::Closed`] after [`AuditLog::close`].
    ///
    /// # Caveats
    ///
    /// Dropping the future after the record entered the queue does not withdraw the record.
    pub async fn submit_durable(&self, rec: Record) -> Result<(), AuditError> {
        self.check_failed()?;
        let (ack, done) = oneshot::channel();
        if !self.send_urgent(Command::Durable(rec, ack)).await {
            return Err(self.closed_error());
        }
        done.await.unwrap_or_else(|_| Err(self.closed_error()))
    }

    /// Queues a record for durable writing without waiting, and returns what resolves once it
    /// is written and synced: for callers that must submit now, from synchronous code, and wait
    /// later.
    ///
    /// # Errors
    ///
    /// As [`AuditLog::submit`] (a full queue is [`AuditError::Overflow`]: the caller fails
    /// closed); the returned future fails as [`AuditLog::submit_durable`] does.
    pub fn submit_durable_now(
        &self,
        rec: Record,
    ) -> Result<
        impl std::future::Future<Output = Result<(), AuditError>> + Send + 'static,
        AuditError,
    > {
        let (ack, done) = oneshot::channel();
        self.try_queue(Command::Durable(rec, ack))?;
        self.state.urgent.notify_one();
        let state = Arc::clone(&self.state);
        Ok(async move { done.await.unwrap_or_else(|_| Err(state.closed_error())) })
    }

    /// Resolves once every record submitted before the call is written and synced, and the
    /// head anchor names the last of them.
    ///
    /// # Errors
    ///
    /// As [`AuditLog::submit_durable`].
    pub async fn flush(&self) -> Result<(), AuditError> {
        self.check_failed()?;
        let (ack, done) = oneshot::channel();
        if !self.send_urgent(Command::Flush(ack)).await {
            return Err(self.closed_error());
        }
        done.await.unwrap_or_else(|_| Err(self.closed_error()))
    }

    /// Queues a command someone waits on and ends the writer's linger; `false` when the log is
    /// closed. A full queue empties only when the writer writes, so then the linger is ended
    /// before waiting for room (the writer, done with its batch, takes the command next; one
    /// notification, not two: a spare one would cut the next linger short).
    async fn send_urgent(&self, cmd: Command) -> bool {
        match self.tx.try_reserve() {
            Ok(permit) => {
                permit.send(cmd);
                self.state.urgent.notify_one();
            }
            Err(mpsc::error::TrySendError::Full(())) => {
                self.state.urgent.notify_one();
                match self.tx.reserve().await {
                    Ok(permit) => permit.send(cmd),
                    Err(_) => return false,
                }
            }
            Err(mpsc::error::TrySendError::Closed(())) => return false,
        }
        true
    }

    /// Stops accepting records (from every handle), writes and syncs everything already
    /// accepted, updates the head anchor, and resolves when the file is final.
    ///
    /// # Errors
    ///
    /// [`AuditError::Unavailable`] if the writer failed. Closing a closed log is not an error.
    pub async fn close(self) -> Result<(), AuditError> {
        self.check_failed()?;
        let (ack, done) = oneshot::channel();
        if !self.send_urgent(Command::Close(ack)).await {
            return match self.closed_error() {
                AuditError::Closed => Ok(()),
                e => Err(e),
            };
        }
        done.await.unwrap_or_else(|_| match self.closed_error() {
            AuditError::Closed => Ok(()),
            e => Err(e),
        })
    }

    /// Records as they are written, with their chain fields filled, in chain order.
    ///
    /// # Caveats
    ///
    /// A receiver that falls more than [`AuditOptions::subscriber_capacity`] records behind
    /// gets `RecvError::Lagged` and misses records from its stream (never from the file):
    /// exporters must resume from the file by `seq`.
    #[must_use]
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Record>> {
        self.state.events.subscribe()
    }

    /// The writer's counters.
    #[must_use]
    pub fn stats(&self) -> AuditStats {
        let c = &self.state.counters;
        let free = self.tx.capacity();
        AuditStats {
            written: c.written.load(Ordering::Relaxed),
            writes: c.writes.load(Ordering::Relaxed),
            syncs: c.syncs.load(Ordering::Relaxed),
            durable_syncs: c.durable_syncs.load(Ordering::Relaxed),
            overflows: c.overflows.load(Ordering::Relaxed),
            lost: c.lost.load(Ordering::Relaxed),
            queue_depth: u64::try_from(self.state.capacity.saturating_sub(free))
                .unwrap_or(u64::MAX),
            last_seq: c.last_seq.load(Ordering::Relaxed),
        }
    }

    /// The last record known to be on disk (written and synced): its `seq` and `hash`; `seq` 0
    /// and [`crate::ZERO_HASH`] for an empty log. What was found in the file at open counts as
    /// durable (open syncs it). This is what [`crate::Anchorer`] signs.
    #[must_use]
    pub fn durable_head(&self) -> Head {
        self.state.durable.borrow().clone()
    }

    /// Why the writer failed, once it has: every later submission is refused with this reason.
    pub fn failure(&self) -> Option<String> {
        self.state.failure.get().cloned()
    }

    fn check_failed(&self) -> Result<(), AuditError> {
        match self.state.failure.get() {
            Some(reason) => Err(AuditError::Unavailable {
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    fn closed_error(&self) -> AuditError {
        self.state.closed_error()
    }
}

impl State {
    /// Why a submission can no longer be answered: the writer's failure, or a plain close.
    fn closed_error(&self) -> AuditError {
        match self.failure.get() {
            Some(reason) => AuditError::Unavailable {
                reason: reason.clone(),
            },
            None => AuditError::Closed,
        }
    }
}

/// Starts the writer thread on an opened, verified log.
fn start(
    file: File,
    path: PathBuf,
    report: VerifyReport,
    options: &AuditOptions,
) -> io::Result<(AuditLog, WriterHandle)> {
    let (tx, rx) = mpsc::channel(options.queue_capacity);
    let (events, _) = broadcast::channel(options.subscriber_capacity);
    let (durable, _) = watch::channel(Head {
        seq: report.records,
        hash: report.last_hash.clone(),
    });
    let state = Arc::new(State {
        counters: Counters::default(),
        urgent: Notify::new(),
        events,
        failure: OnceLock::new(),
        capacity: options.queue_capacity,
        durable,
    });
    state
        .counters
        .last_seq
        .store(report.records, Ordering::Relaxed);
    let writer = Writer {
        rx,
        state: Arc::clone(&state),
        file,
        head_path: head_path(&path),
        path,
        head_seq: report.head.as_ref().map_or(0, |h| h.seq),
        seq: report.records,
        hash: report.last_hash,
        sync_interval: options.sync_interval,
        linger: options.linger,
        dirty: false,
        last_sync: Instant::now(),
        durable: Vec::new(),
        flushers: Vec::new(),
        closers: Vec::new(),
        batch_plain: 0,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    let (done_tx, done_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("cellgate-audit".into())
        .spawn(move || {
            let result = runtime.block_on(writer.run());
            // Nobody may be waiting for the result; that is fine.
            let _ = done_tx.send(result);
        })?;
    Ok((AuditLog { tx, state }, WriterHandle(done_rx)))
}

/// Opens the log for appending, locks it, and verifies what it already holds.
fn open_and_verify(path: &Path) -> Result<(File, VerifyReport), AuditError> {
    let open_err = |source| AuditError::Open {
        path: path.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(FILE_MODE)
        .open(path)
        .map_err(open_err)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            return Err(AuditError::Locked {
                path: path.to_owned(),
            })
        }
        Err(TryLockError::Error(e)) => return Err(open_err(e)),
    }
    let torn = cut_torn_tail(&file, path).map_err(open_err)?;
    let verified = verify_path(path);
    if let Some(torn) = &torn {
        if verified.is_ok() {
            tracing::warn!(
                path = %path.display(),
                torn_bytes = torn.len(),
                "the audit log ended in an incomplete record (a crash during a write); it was never synced, so never acknowledged: moved to <log>.torn and cut"
            );
        } else {
            // Not a crash's leftover (the head anchor names a record beyond the cut, or the
            // rest is broken): the file is put back as it was, for the verifier's verdict.
            let mut f = &file;
            f.write_all(torn).map_err(open_err)?;
            file.sync_all().map_err(open_err)?;
        }
    }
    let report = verified.map_err(|e| match e {
        VerifyError::Io { path, source } => AuditError::Open { path, source },
        other => AuditError::Broken {
            path: path.to_owned(),
            source: other,
        },
    })?;
    // What a previous process wrote but never synced may still sit in the page cache: synced
    // now, so that the records found count as durable (`AuditLog::durable_head`).
    file.sync_data().map_err(open_err)?;
    Ok((file, report))
}

/// How much of the log's end is read at a time while looking for its last complete line.
const TAIL_CHUNK: u64 = 64 * 1024;

/// A crash in the middle of a write leaves an incomplete last line: part of a batch whose
/// `write` did not finish, so it was never synced and nothing waiting on it was answered (a
/// denial is sent only after the sync, and the head anchor is replaced only after it). Those
/// bytes are appended to `<log>.torn`, for inspection, and cut from the log, so the chain
/// resumes after its last complete record. Returns the bytes cut, if any; the caller puts them
/// back when the log does not verify without them (then they are not a crash's leftover).
pub(crate) fn cut_torn_tail(file: &File, path: &Path) -> io::Result<Option<Vec<u8>>> {
    use std::os::unix::fs::FileExt as _;
    let len = file.metadata()?.len();
    // The writer's handle is append-only: read through one of our own.
    let reader = File::open(path)?;
    let mut last = [0u8; 1];
    if len == 0 {
        return Ok(None);
    }
    reader.read_exact_at(&mut last, len.saturating_sub(1))?;
    if last == [b'\n'] {
        return Ok(None);
    }
    // The end of the last complete line: after the last newline, or the file's start.
    let mut keep = 0u64;
    let mut end = len;
    let mut buf = vec![0u8; usize::try_from(TAIL_CHUNK).unwrap_or(65_536)];
    while end > 0 {
        let start = end.saturating_sub(TAIL_CHUNK);
        let n = usize::try_from(end.saturating_sub(start)).unwrap_or(0);
        let chunk = buf.get_mut(..n).unwrap_or_default();
        reader.read_exact_at(chunk, start)?;
        if let Some(i) = chunk.iter().rposition(|b| *b == b'\n') {
            keep = start
                .saturating_add(u64::try_from(i).unwrap_or(0))
                .saturating_add(1);
            break;
        }
        end = start;
    }
    let torn_len = len.saturating_sub(keep);
    let mut torn = vec![0u8; usize::try_from(torn_len).unwrap_or(0)];
    reader.read_exact_at(&mut torn, keep)?;
    let mut torn_path = path.as_os_str().to_owned();
    torn_path.push(".torn");
    let mut out = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(FILE_MODE)
        .open(PathBuf::from(torn_path))?;
    out.write_all(&torn)?;
    out.write_all(b"\n")?;
    out.sync_all()?;
    file.set_len(keep)?;
    file.sync_all()?;
    Ok(Some(torn))
}

/// Replaces the head anchor atomically: temp file, rename.
fn write_head(path: &Path, head: &Head) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(&tmp)?;
    let mut bytes = head.to_json();
    bytes.push(b'\n');
    f.write_all(&bytes)?;
    // Not synced: a second fsync per group commit would double what a denial waits for. The
    // head is written only after the records it names are synced, so after a crash it is the
    // new head, the previous (stale) one, or an empty file, which the verifier treats like a
    // missing head (deleting the head is no harder than emptying it).
    drop(f);
    fs::rename(&tmp, path)
}

/// What one batch wrote.
struct Written {
    seq: u64,
    hash: String,
    records: Vec<Arc<Record>>,
}

/// Chains `records` after (`seq`, `hash`), appends them with one write, and syncs if asked.
fn write_batch(
    mut file: &File,
    records: Vec<Record>,
    mut seq: u64,
    mut hash: String,
    sync: bool,
) -> io::Result<Written> {
    /// Initial buffer per record; a typical record line is a few hundred bytes.
    const LINE_HINT: usize = 512;
    let mut buf = Vec::with_capacity(records.len().saturating_mul(LINE_HINT));
    let mut sealed = Vec::with_capacity(records.len());
    for mut rec in records {
        seq = seq
            .checked_add(1)
            .ok_or_else(|| io::Error::other("audit sequence number overflow"))?;
        chain::seal(&mut rec, seq, &hash, &mut buf)?;
        hash.clone_from(&rec.hash);
        sealed.push(Arc::new(rec));
    }
    if !buf.is_empty() {
        file.write_all(&buf)?;
    }
    if sync {
        file.sync_data()?;
    }
    Ok(Written {
        seq,
        hash,
        records: sealed,
    })
}

struct Writer {
    rx: mpsc::Receiver<Command>,
    state: Arc<State>,
    file: File,
    path: PathBuf,
    head_path: PathBuf,
    /// `seq` the head anchor on disk names (0: none).
    head_seq: u64,
    /// Last record written.
    seq: u64,
    hash: String,
    sync_interval: Duration,
    linger: Duration,
    /// Written but not yet synced.
    dirty: bool,
    last_sync: Instant,
    /// Waiters of the current batch.
    durable: Vec<Ack>,
    flushers: Vec<Ack>,
    /// Waiters of `close`, answered when the queue is drained.
    closers: Vec<Ack>,
    /// Plain records in the current batch (lost if it fails).
    batch_plain: u64,
}

// Lives on the stack for one loop iteration; boxing the command would cost an allocation per
// record for nothing.
#[allow(clippy::large_enum_variant)]
enum Event {
    Command(Option<Command>),
    Tick,
}

impl Writer {
    async fn run(mut self) -> Result<(), AuditError> {
        match self.run_inner().await {
            Ok(()) => {
                let closers = std::mem::take(&mut self.closers);
                // The file (and its lock) is released before the closers hear of it: the log
                // can be opened again as soon as `close` returns.
                drop(self);
                for ack in closers {
                    // The closer may have gone away; nothing to tell it then.
                    let _ = ack.send(Ok(()));
                }
                Ok(())
            }
            Err(e) => Err(self.fail(e).await),
        }
    }

    async fn run_inner(&mut self) -> io::Result<()> {
        let mut ticker = time::interval(self.sync_interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let event = tokio::select! {
                cmd = self.rx.recv() => Event::Command(cmd),
                _ = ticker.tick() => Event::Tick,
            };
            match event {
                Event::Tick => {
                    if self.dirty && self.last_sync.elapsed() >= self.sync_interval {
                        self.commit(Vec::new(), true).await?;
                    }
                }
                Event::Command(None) => break,
                Event::Command(Some(cmd)) => {
                    let mut records = Vec::new();
                    self.take(cmd, &mut records);
                    self.take_queued(&mut records);
                    if !self.linger.is_zero()
                        && !self.has_waiters()
                        && records.len() < MAX_BATCH_RECORDS
                    {
                        // Plain records only: let more arrive. Senders of plain records do
                        // not wake the writer while it sleeps here; waiters do.
                        tokio::select! {
                            () = time::sleep(self.linger) => {}
                            () = self.state.urgent.notified() => {}
                        }
                        self.take_queued(&mut records);
                    }
                    let sync = self.has_waiters() || self.last_sync.elapsed() >= self.sync_interval;
                    self.commit(records, sync).await?;
                }
            }
        }
        // Closed (or every handle dropped) and drained.
        self.commit(Vec::new(), true).await
    }

    /// Someone waits for this batch to be synced.
    fn has_waiters(&self) -> bool {
        !self.durable.is_empty() || !self.flushers.is_empty() || !self.closers.is_empty()
    }

    /// Takes what is queued, up to a full batch.
    fn take_queued(&mut self, records: &mut Vec<Record>) {
        while records.len() < MAX_BATCH_RECORDS {
            match self.rx.try_recv() {
                Ok(cmd) => self.take(cmd, records),
                Err(_) => break,
            }
        }
    }

    fn take(&mut self, cmd: Command, records: &mut Vec<Record>) {
        match cmd {
            Command::Record(rec) => {
                records.push(rec);
                self.batch_plain = self.batch_plain.saturating_add(1);
            }
            Command::Durable(rec, ack) => {
                records.push(rec);
                self.durable.push(ack);
            }
            Command::Flush(ack) => self.flushers.push(ack),
            Command::Close(ack) => {
                self.closers.push(ack);
                // Refuse new submissions; what is already queued is still written.
                self.rx.close();
            }
        }
    }

    /// Writes `records`, syncs if `sync` and there is anything unsynced, updates the head,
    /// and answers the batch's waiters.
    async fn commit(&mut self, records: Vec<Record>, sync: bool) -> io::Result<()> {
        let sync = sync && (self.dirty || !records.is_empty());
        if !records.is_empty() || sync {
            // The writer's own thread: blocking here stalls nobody else.
            let written = write_batch(&self.file, records, self.seq, self.hash.clone(), sync)?;
            let c = &self.state.counters;
            let n = u64::try_from(written.records.len()).unwrap_or(u64::MAX);
            c.written.fetch_add(n, Ordering::Relaxed);
            if n > 0 {
                c.writes.fetch_add(1, Ordering::Relaxed);
            }
            c.last_seq.store(written.seq, Ordering::Relaxed);
            self.seq = written.seq;
            self.hash = written.hash;
            if sync {
                c.syncs.fetch_add(1, Ordering::Relaxed);
                if !self.durable.is_empty() || !self.flushers.is_empty() {
                    c.durable_syncs.fetch_add(1, Ordering::Relaxed);
                }
                self.dirty = false;
                self.last_sync = Instant::now();
            } else if n > 0 {
                self.dirty = true;
            }
            for rec in written.records {
                // No subscriber is not an error.
                let _ = self.state.events.send(rec);
            }
        }
        self.batch_plain = 0;
        if !self.dirty {
            // Everything written is synced.
            let (seq, hash) = (self.seq, &self.hash);
            self.state.durable.send_if_modified(|h| {
                if h.seq == seq {
                    return false;
                }
                h.seq = seq;
                h.hash.clone_from(hash);
                true
            });
        }
        for ack in self.durable.drain(..) {
            let _ = ack.send(Ok(()));
        }
        if !self.dirty && self.head_seq != self.seq {
            let head = Head {
                seq: self.seq,
                hash: self.hash.clone(),
            };
            write_head(&self.head_path, &head)?;
            self.head_seq = self.seq;
        }
        for ack in self.flushers.drain(..) {
            let _ = ack.send(Ok(()));
        }
        Ok(())
    }

    /// Fails the log closed: answers every waiter and every queued submission with
    /// [`AuditError::Unavailable`] and counts the plain records that will never be written.
    async fn fail(&mut self, err: io::Error) -> AuditError {
        let reason = format!("writing {}: {err}", self.path.display());
        let reason = self.state.failure.get_or_init(|| reason).clone();
        let unavailable = || AuditError::Unavailable {
            reason: reason.clone(),
        };
        self.rx.close();
        let mut lost = self.batch_plain;
        for ack in self
            .durable
            .drain(..)
            .chain(self.flushers.drain(..))
            .chain(self.closers.drain(..))
        {
            let _ = ack.send(Err(unavailable()));
        }
        while let Some(cmd) = self.rx.recv().await {
            match cmd {
                Command::Record(_) => lost = lost.saturating_add(1),
                Command::Durable(_, ack) | Command::Flush(ack) | Command::Close(ack) => {
                    let _ = ack.send(Err(unavailable()));
                }
            }
        }
        self.state.counters.lost.fetch_add(lost, Ordering::Relaxed);
        tracing::error!(
            reason = %reason,
            lost,
            "audit writer failed: the log is closed and every submission now fails"
        );
        unavailable()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Decision, ZERO_HASH};

    fn rec(i: u32) -> Record {
        let mut r = Record::new("n1", "intake", "http", Decision::Allow, "ok");
        r.request_id = Some(format!("r{i}"));
        r
    }

    /// A write error fails every waiter and every later submission, and counts what is lost.
    #[tokio::test]
    async fn write_failure_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        File::create(&path).unwrap();
        // Read-only descriptor: the first write fails with EBADF.
        let file = File::open(&path).unwrap();
        let report = VerifyReport {
            records: 0,
            last_hash: ZERO_HASH.to_owned(),
            head: None,
        };
        let options = AuditOptions {
            sync_interval: Duration::from_secs(3600),
            ..AuditOptions::default()
        };
        let (log, writer) = start(file, path, report, &options).unwrap();
        log.submit(rec(1)).unwrap();
        log.submit(rec(2)).unwrap();
        let err = log.submit_durable(rec(3)).await.unwrap_err();
        assert!(matches!(err, AuditError::Unavailable { .. }), "{err}");
        assert!(err.to_string().contains("audit.jsonl"), "{err}");
        assert!(matches!(
            log.submit(rec(4)),
            Err(AuditError::Unavailable { .. })
        ));
        assert!(matches!(
            log.submit_durable(rec(5)).await,
            Err(AuditError::Unavailable { .. })
        ));
        assert!(matches!(
            log.flush().await,
            Err(AuditError::Unavailable { .. })
        ));
        assert!(matches!(
            writer.await.unwrap(),
            Err(AuditError::Unavailable { .. })
        ));
        let stats = log.stats();
        assert_eq!((stats.lost, stats.written), (2, 0));
        assert!(log.close().await.is_err());
    }

    #[test]
    fn options_are_validated() {
        for bad in [
            AuditOptions {
                queue_capacity: 0,
                ..AuditOptions::default()
            },
            AuditOptions {
                sync_interval: Duration::ZERO,
                ..AuditOptions::default()
            },
            AuditOptions {
                subscriber_capacity: 0,
                ..AuditOptions::default()
            },
            AuditOptions {
                linger: Duration::from_millis(100),
                sync_interval: Duration::from_millis(100),
                ..AuditOptions::default()
            },
        ] {
            assert!(matches!(
                bad.validate(),
                Err(AuditError::InvalidOptions { .. })
            ));
        }
        AuditOptions::default().validate().unwrap();
    }
}
