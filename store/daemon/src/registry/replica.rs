//! A replica: one client's copy of a model into its device buffers. One
//! thread per device walks the model's chunks in order, waits for each to
//! land, and starts that chunk's copies; the replica is done when every
//! device has synchronized.
//!
//! A replica's final status is published only once every device thread has
//! finished (and so synchronized its copies and released its buffers): a
//! client told "failed" may free its memory at once. The first error, an
//! abort (ConfirmModel timing out, shutdown) or the replica's deadline
//! passing stops the other devices at their next piece.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::copy_plan::CopyPlan;
use super::host_copy::Consumer;
use crate::device::{DeviceInfo, DeviceTarget};
use crate::io::IoError;
use crate::lock;

/// Where a replica stands.
#[derive(Clone, Debug)]
pub enum ReplicaStatus {
    Copying,
    Done {
        bytes: u64,
        seconds: f64,
        figures: CopyFigures,
    },
    Failed(ReplicaError),
}

/// Where a replica's time went, each figure the longest of its devices':
/// what the log's "copied to the devices" line reports, to tell the link's
/// speed from the daemon's own costs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CopyFigures {
    /// Opening the client's buffers (IPC handles), before the copies.
    pub open_s: f64,
    /// Waiting for chunks to land in the pool.
    pub wait_s: f64,
    /// Starting copies, with waits for chunks still being copied.
    pub issue_s: f64,
    /// Waiting for the last copies to complete.
    pub sync_s: f64,
    /// Letting go of the client's buffers (closing IPC handles).
    pub close_s: f64,
    /// The device's own time from the first copy to the last (CUDA).
    pub device_s: Option<f64>,
}

impl CopyFigures {
    fn max(self, other: Self) -> Self {
        Self {
            open_s: self.open_s.max(other.open_s),
            wait_s: self.wait_s.max(other.wait_s),
            issue_s: self.issue_s.max(other.issue_s),
            sync_s: self.sync_s.max(other.sync_s),
            close_s: self.close_s.max(other.close_s),
            device_s: match (self.device_s, other.device_s) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            },
        }
    }
}

impl ReplicaStatus {
    pub fn is_copying(&self) -> bool {
        matches!(self, Self::Copying)
    }
}

/// Why a replica failed: the first error of any of its devices, cloned to
/// everyone who waits on it. Typed, so that a damaged block reaches the
/// client as DATA_LOSS, not as an internal error.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ReplicaError {
    /// A chunk it needed did not land (a damaged block, a changed or
    /// truncated file, an I/O error).
    #[error("device {device}: {source}")]
    Read { device: String, source: IoError },
    /// The device refused a copy or a synchronize.
    #[error("device {device}: {reason}")]
    Device { device: String, reason: String },
    #[error(
        "device {device}: still copying at the replica's deadline (the daemon's confirm \
         timeout); load it again with fewer replicas at once"
    )]
    Deadline { device: String },
    #[error("device {device}: stopped (another device failed, or the replica was aborted)")]
    Stopped { device: String },
    #[error("aborted: {0}")]
    Aborted(String),
    #[error("cannot start a copy thread: {0}")]
    NoThread(String),
    #[error("device {device}: the copy thread panicked (a bug: please report it with the log)")]
    Panicked { device: String },
    #[error("the copy threads ended without a result")]
    Lost,
}

impl ReplicaError {
    /// The read error behind it, if a chunk failed to land.
    pub fn read_error(&self) -> Option<&IoError> {
        match self {
            Self::Read { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// One device's share of a replica.
pub struct DeviceCopy {
    pub device: DeviceInfo,
    pub target: Box<dyn DeviceTarget>,
    pub plan: CopyPlan,
    /// Seconds it took to open `target`.
    pub open_s: f64,
}

/// A replica in progress or finished.
pub struct Replica {
    pub uuid: String,
    status: watch::Receiver<ReplicaStatus>,
    pub started: Instant,
    shared: Arc<Shared>,
}

impl Replica {
    /// Starts copying to every device of `copies`, each reading its host
    /// copy as its own [`Consumer`]; copies still
    /// running at `deadline` stop and fail the replica (a copy waiting for a
    /// chunk looks at the deadline and for an abort every `poll`). Fails
    /// only if a thread cannot be started (then nothing was copied by it, and the
    /// devices already started are aborted).
    pub fn start(
        uuid: String,
        copies: Vec<(DeviceCopy, Consumer)>,
        deadline: Instant,
        poll: Duration,
        on_done: impl Fn(&ReplicaStatus) + Send + Sync + 'static,
    ) -> std::io::Result<Arc<Self>> {
        let (tx, rx) = watch::channel(ReplicaStatus::Copying);
        let started = Instant::now();
        let shared = Arc::new(Shared {
            tx,
            remaining: AtomicUsize::new(copies.len()),
            bytes: copies.iter().map(|(c, _)| c.plan.bytes).sum(),
            pieces: copies.iter().map(|(c, _)| c.plan.pieces()).sum(),
            on_done: Box::new(on_done),
            started,
            abort: AtomicBool::new(false),
            first_error: Mutex::new(None),
            figures: Mutex::new(CopyFigures::default()),
        });
        let replica = Arc::new(Self {
            uuid,
            status: rx,
            started,
            shared: Arc::clone(&shared),
        });
        if copies.is_empty() {
            shared.finish();
        }
        let mut copies = copies.into_iter();
        while let Some((copy, consumer)) = copies.next() {
            let worker = Arc::clone(&shared);
            let spawned = std::thread::Builder::new()
                .name("sllm-copy".into())
                .spawn(move || {
                    let device = copy.device.uuid.clone();
                    // A device thread that panics still counts as done (its
                    // consumer and target are dropped on the way out), so
                    // the replica fails rather than copying forever.
                    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        run_device_copy(consumer, copy, &worker.abort, deadline, poll)
                    }));
                    let error = match ran {
                        Ok((result, figures)) => {
                            let mut all = lock(&worker.figures);
                            *all = all.max(figures);
                            result.err()
                        }
                        Err(_) => Some(ReplicaError::Panicked { device }),
                    };
                    worker.device_done(error);
                });
            if let Err(e) = spawned {
                // Devices never started count as done; started ones stop.
                shared.record(ReplicaError::NoThread(e.to_string()));
                shared.abort.store(true, Ordering::Relaxed);
                for _ in 0..=copies.len() {
                    shared.device_done(None);
                }
                return Err(e);
            }
        }
        Ok(replica)
    }

    /// Bytes this replica copies, all devices together.
    pub fn bytes(&self) -> u64 {
        self.shared.bytes
    }

    /// Pieces this replica copies, all devices together.
    pub fn pieces(&self) -> usize {
        self.shared.pieces
    }

    /// The current status.
    pub fn status(&self) -> ReplicaStatus {
        self.status.borrow().clone()
    }

    /// Stops the copies at their next piece; the replica then fails with `why`.
    pub fn abort(&self, why: &str) {
        self.shared.abort(why);
    }

    /// Waits until the replica is no longer copying.
    pub async fn finished(&self) -> ReplicaStatus {
        let mut rx = self.status.clone();
        match rx.wait_for(|s| !s.is_copying()).await {
            Ok(status) => status.clone(),
            Err(_) => ReplicaStatus::Failed(ReplicaError::Lost),
        }
    }
}

struct Shared {
    tx: watch::Sender<ReplicaStatus>,
    remaining: AtomicUsize,
    bytes: u64,
    pieces: usize,
    on_done: Box<dyn Fn(&ReplicaStatus) + Send + Sync>,
    started: Instant,
    abort: AtomicBool,
    first_error: Mutex<Option<ReplicaError>>,
    figures: Mutex<CopyFigures>,
}

impl Shared {
    fn record(&self, error: ReplicaError) {
        lock(&self.first_error).get_or_insert(error);
    }

    fn abort(&self, why: &str) {
        self.record(ReplicaError::Aborted(why.to_owned()));
        self.abort.store(true, Ordering::Relaxed);
    }

    fn device_done(&self, error: Option<ReplicaError>) {
        if let Some(e) = error {
            self.record(e);
            self.abort.store(true, Ordering::Relaxed);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.finish();
        }
    }

    /// Publishes the final status: only once no device thread is running.
    fn finish(&self) {
        let error = lock(&self.first_error).clone();
        let status = match error {
            Some(e) => ReplicaStatus::Failed(e),
            None => ReplicaStatus::Done {
                bytes: self.bytes,
                seconds: self.started.elapsed().as_secs_f64(),
                figures: *lock(&self.figures),
            },
        };
        self.tx.send_replace(status.clone());
        (self.on_done)(&status);
    }
}

/// Copies one device's share; the target (the client's buffers) is closed
/// before it returns, and its figures say where the time went.
fn run_device_copy(
    mut consumer: Consumer,
    mut copy: DeviceCopy,
    abort: &AtomicBool,
    deadline: Instant,
    poll: Duration,
) -> (Result<(), ReplicaError>, CopyFigures) {
    let mut figures = CopyFigures {
        open_s: copy.open_s,
        ..CopyFigures::default()
    };
    let result = copy_pieces(
        &mut consumer,
        &mut copy,
        abort,
        deadline,
        poll,
        &mut figures,
    );
    // The rest of the chunks are passed: a streamed copy may go on without
    // this device.
    drop(consumer);
    figures.device_s = copy.target.device_seconds();
    let closing = Instant::now();
    drop(copy);
    figures.close_s = closing.elapsed().as_secs_f64();
    (result, figures)
}

fn copy_pieces(
    consumer: &mut Consumer,
    copy: &mut DeviceCopy,
    abort: &AtomicBool,
    deadline: Instant,
    poll: Duration,
    figures: &mut CopyFigures,
) -> Result<(), ReplicaError> {
    let device = copy.device.uuid.clone();
    let late = |device: String| {
        abort.store(true, Ordering::Relaxed);
        ReplicaError::Deadline { device }
    };
    let refused = |device: &str, e: crate::device::DeviceError| ReplicaError::Device {
        device: device.to_owned(),
        reason: e.to_string(),
    };
    for (i, pieces) in copy.plan.per_chunk.iter().enumerate() {
        if pieces.is_empty() {
            continue;
        }
        let waiting = Instant::now();
        if consumer.host().is_streamed() && !consumer.ready(i) {
            // The ring may need chunks this device still holds for copies
            // that have completed: hand them back before waiting.
            copy.target.synchronize().map_err(|e| refused(&device, e))?;
        }
        let chunk = consumer.take(i, abort, deadline, poll);
        figures.wait_s += waiting.elapsed().as_secs_f64();
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(_) if Instant::now() >= deadline => return Err(late(device)),
            Err(source) => return Err(ReplicaError::Read { device, source }),
        };
        let issuing = Instant::now();
        for p in pieces {
            if abort.load(Ordering::Relaxed) {
                return Err(ReplicaError::Stopped { device });
            }
            if Instant::now() >= deadline {
                return Err(late(device));
            }
            copy.target
                .copy(&chunk, p)
                .map_err(|e| refused(&device, e))?;
        }
        drop(chunk);
        copy.target.end_chunk().map_err(|e| refused(&device, e))?;
        figures.issue_s += issuing.elapsed().as_secs_f64();
    }
    let syncing = Instant::now();
    copy.target.synchronize().map_err(|e| refused(&device, e))?;
    figures.sync_s = syncing.elapsed().as_secs_f64();
    Ok(())
}
