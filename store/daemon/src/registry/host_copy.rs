//! One copy of a model in the host pool: its chunks, each pending, landed or
//! failed, filled by an io engine on a thread of its own. Replicas wait on
//! individual chunks, so device copies start as soon as a chunk lands rather
//! than when the whole model has. With the manifest's checksums, a chunk
//! counts as landed only once its blocks matched ([`super::checksums`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use super::checksums::{LoadCheck, Released};
use crate::io::{ChunkSpan, IoEngine, IoError, ModelFiles, chunk_reads};
use crate::lock;
use crate::pool::{ChunkLease, SharedChunk};
use sllm_format::partitions::Partitions;

#[derive(Clone)]
enum Slot {
    Pending,
    Landed(SharedChunk),
    Failed(IoError),
}

/// How a finished load went, for logs and metrics.
#[derive(Clone, Debug)]
pub struct LoadOutcome {
    pub bytes: u64,
    pub seconds: f64,
    pub engine: &'static str,
    pub error: Option<IoError>,
}

/// A model's chunks in the pool.
pub struct HostCopy {
    /// The layout this copy was made from (replicas must plan against it).
    spans: Arc<[ChunkSpan]>,
    /// Checks chunks against the manifest before they count as landed.
    check: Option<LoadCheck>,
    slots: Mutex<Vec<Slot>>,
    changed: Condvar,
    cancel: AtomicBool,
    complete: AtomicBool,
    failed: Mutex<Option<IoError>>,
    /// Seconds the whole load took, once it is over.
    seconds: Mutex<Option<f64>>,
}

impl HostCopy {
    /// Starts reading `spans` of the model in `partitions` into `leases`
    /// (one per span) with `engine`, checking them with `check` when given
    /// (made for the same spans); `on_done` runs on the io thread when every
    /// chunk has landed or failed. Fails only if no thread can be started
    /// (the leases then return to the pool).
    pub fn start(
        partitions: Partitions,
        spans: Arc<[ChunkSpan]>,
        leases: Vec<ChunkLease>,
        engine: Arc<dyn IoEngine>,
        max_io_bytes: usize,
        check: Option<LoadCheck>,
        on_done: impl FnOnce(&Arc<HostCopy>, LoadOutcome) + Send + 'static,
    ) -> std::io::Result<Arc<Self>> {
        debug_assert_eq!(spans.len(), leases.len());
        let copy = Arc::new(Self {
            spans: Arc::clone(&spans),
            check,
            slots: Mutex::new(vec![Slot::Pending; spans.len()]),
            changed: Condvar::new(),
            cancel: AtomicBool::new(false),
            complete: AtomicBool::new(spans.is_empty()),
            failed: Mutex::new(None),
            seconds: Mutex::new(spans.is_empty().then_some(0.0)),
        });
        let this = Arc::clone(&copy);
        std::thread::Builder::new()
            .name("sllm-load".into())
            .spawn(move || {
                let started = Instant::now();
                let bytes = spans.iter().map(|s| s.len as u64).sum();
                let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    Self::read_all(
                        &this,
                        &partitions,
                        &spans,
                        leases,
                        engine.as_ref(),
                        max_io_bytes,
                    )
                }));
                if read.is_err() {
                    // Nobody may wait forever on a chunk the engine dropped.
                    this.fail_pending(IoError::Panicked { which: "io" });
                }
                *lock(&this.seconds) = Some(started.elapsed().as_secs_f64());
                let outcome = LoadOutcome {
                    bytes,
                    seconds: started.elapsed().as_secs_f64(),
                    engine: engine.name(),
                    error: lock(&this.failed).clone(),
                };
                on_done(&this, outcome);
            })?;
        Ok(copy)
    }

    /// The layout this copy was made from.
    pub fn spans(&self) -> &Arc<[ChunkSpan]> {
        &self.spans
    }

    fn fail_pending(&self, error: IoError) {
        let pending: Vec<usize> = lock(&self.slots)
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s, Slot::Pending))
            .map(|(i, _)| i)
            .collect();
        for i in pending {
            self.settle(i, Err(error.clone()));
        }
    }

    fn read_all(
        this: &Arc<Self>,
        partitions: &Partitions,
        spans: &[ChunkSpan],
        leases: Vec<ChunkLease>,
        engine: &dyn IoEngine,
        max_io_bytes: usize,
    ) {
        let files = match ModelFiles::open(partitions) {
            Ok(files) => files,
            Err(e) => {
                for i in 0..spans.len() {
                    this.settle(i, Err(e.clone()));
                }
                return;
            }
        };
        let reads = chunk_reads(&files, spans, leases, max_io_bytes);
        engine.run(
            &files,
            reads,
            &this.cancel,
            &mut |chunk_no, result| match &this.check {
                None => this.settle(chunk_no, result),
                Some(check) => this.release(check.land(chunk_no, result)),
            },
        );
        if let Some(check) = &this.check {
            let why = this.error().unwrap_or(IoError::Cancelled);
            this.release(check.finish(why));
        }
    }

    /// Settles what a check released and hands the blocks it made ready to
    /// the hashing threads.
    fn release(self: &Arc<Self>, released: Released) {
        for (chunk_no, result) in released.chunks {
            self.settle(chunk_no, result);
        }
        let Some(check) = &self.check else { return };
        for block in released.blocks {
            let this = Arc::clone(self);
            check.submit(move || {
                let Some(check) = &this.check else { return };
                if this.cancel.load(Ordering::Relaxed) {
                    // The load failed or is being dropped: no use hashing,
                    // and the copy's chunks should return to the pool soon.
                    check.skip_block(block);
                    return;
                }
                let hashed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    check.hash_block(block, &mut |chunk_no, result| this.settle(chunk_no, result))
                }));
                if hashed.is_err() {
                    this.fail_pending(IoError::Panicked { which: "checksum" });
                }
            });
        }
    }

    fn settle(&self, chunk_no: usize, result: Result<SharedChunk, IoError>) {
        let mut slots = lock(&self.slots);
        // A chunk settles once: what waiters saw never changes.
        let Some(slot) = slots
            .get_mut(chunk_no)
            .filter(|s| matches!(s, Slot::Pending))
        else {
            return;
        };
        *slot = match result {
            Ok(chunk) => Slot::Landed(chunk),
            Err(e) => {
                // One failed chunk fails the load: stop reading the rest.
                self.cancel.store(true, Ordering::Relaxed);
                let mut failed = lock(&self.failed);
                // Keep the first real error, not the cancellations it caused.
                if failed.is_none() || matches!(*failed, Some(IoError::Cancelled)) {
                    *failed = Some(e.clone());
                }
                Slot::Failed(e)
            }
        };
        if slots.iter().all(|s| !matches!(s, Slot::Pending)) {
            self.complete.store(true, Ordering::Release);
        }
        drop(slots);
        self.changed.notify_all();
    }

    /// Waits for chunk `i`, giving up when `abort` is set (checked every
    /// 50 ms while waiting) or at `deadline`. A chunk cancelled because
    /// another one failed reports that first failure, the cause worth telling.
    pub fn wait_chunk_or_abort(
        &self,
        i: usize,
        abort: &AtomicBool,
        deadline: Instant,
        poll: std::time::Duration,
    ) -> Result<SharedChunk, IoError> {
        let mut slots = lock(&self.slots);
        loop {
            match slots.get(i) {
                Some(Slot::Landed(chunk)) => return Ok(Arc::clone(chunk)),
                Some(Slot::Failed(e)) => return Err(self.error().unwrap_or_else(|| e.clone())),
                Some(Slot::Pending)
                    if abort.load(Ordering::Relaxed) || Instant::now() >= deadline =>
                {
                    return Err(IoError::Cancelled);
                }
                Some(Slot::Pending) => {
                    slots = crate::wait(&self.changed, slots, Some(poll));
                }
                None => {
                    return Err(IoError::Invariant(format!(
                        "chunk {i} is not part of this copy"
                    )));
                }
            }
        }
    }

    /// Asks the io engine to stop; pending chunks fail as cancelled.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// Every chunk has landed or failed.
    pub fn is_complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }

    /// Chunks landed so far, and chunks in all.
    pub fn progress(&self) -> (usize, usize) {
        let slots = lock(&self.slots);
        let landed = slots
            .iter()
            .filter(|s| matches!(s, Slot::Landed(_)))
            .count();
        (landed, slots.len())
    }

    /// Seconds the load took, once it is over.
    pub fn seconds(&self) -> Option<f64> {
        *lock(&self.seconds)
    }

    /// The load's error, once one chunk failed.
    pub fn error(&self) -> Option<IoError> {
        lock(&self.failed).clone()
    }
}
