//! One copy of a model in the host pool: its chunks, each pending, landed or
//! failed, filled by an io engine on a thread of its own. Replicas wait on
//! individual chunks, so device copies start as soon as a chunk lands rather
//! than when the whole model has.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use crate::io::{ChunkRead, ChunkSpan, IoEngine, IoError, ModelFiles, plan_chunk};
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
    /// (one per span) with `engine`; `on_done` runs on the io thread when
    /// every chunk has landed or failed.
    pub fn start(
        partitions: Partitions,
        spans: Arc<[ChunkSpan]>,
        leases: Vec<ChunkLease>,
        engine: Arc<dyn IoEngine>,
        max_io_bytes: usize,
        on_done: impl FnOnce(&Arc<HostCopy>, LoadOutcome) + Send + 'static,
    ) -> Arc<Self> {
        debug_assert_eq!(spans.len(), leases.len());
        let copy = Arc::new(Self {
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
                this.read_all(&partitions, &spans, leases, engine.as_ref(), max_io_bytes);
                *this.seconds.lock().expect("lock") = Some(started.elapsed().as_secs_f64());
                let outcome = LoadOutcome {
                    bytes,
                    seconds: started.elapsed().as_secs_f64(),
                    engine: engine.name(),
                    error: this.failed.lock().expect("lock").clone(),
                };
                on_done(&this, outcome);
            })
            .expect("spawning a load thread");
        copy
    }

    fn read_all(
        &self,
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
                    self.settle(i, Err(e.clone()));
                }
                return;
            }
        };
        let reads = spans
            .iter()
            .zip(leases)
            .enumerate()
            .map(|(chunk_no, (span, lease))| ChunkRead {
                chunk_no,
                lease,
                len: span.len,
                ops: plan_chunk(&files, span, max_io_bytes),
            })
            .collect();
        engine.run(&files, reads, &self.cancel, &mut |chunk_no, result| {
            if result.is_err() {
                // One failed chunk fails the load: stop reading the rest.
                self.cancel.store(true, Ordering::Relaxed);
            }
            self.settle(chunk_no, result);
        });
    }

    fn settle(&self, chunk_no: usize, result: Result<SharedChunk, IoError>) {
        let mut slots = self.slots.lock().expect("lock");
        slots[chunk_no] = match result {
            Ok(chunk) => Slot::Landed(chunk),
            Err(e) => {
                let mut failed = self.failed.lock().expect("lock");
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

    /// Waits for chunk `i`. A chunk cancelled because another one failed
    /// reports that first failure, the cause worth telling.
    pub fn wait_chunk(&self, i: usize) -> Result<SharedChunk, IoError> {
        let mut slots = self.slots.lock().expect("lock");
        loop {
            match &slots[i] {
                Slot::Landed(chunk) => return Ok(Arc::clone(chunk)),
                Slot::Failed(e) => return Err(self.error().unwrap_or_else(|| e.clone())),
                Slot::Pending => slots = self.changed.wait(slots).expect("lock"),
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
        let slots = self.slots.lock().expect("lock");
        let landed = slots
            .iter()
            .filter(|s| matches!(s, Slot::Landed(_)))
            .count();
        (landed, slots.len())
    }

    /// Seconds the load took, once it is over.
    pub fn seconds(&self) -> Option<f64> {
        *self.seconds.lock().expect("lock")
    }

    /// The load's error, once one chunk failed.
    pub fn error(&self) -> Option<IoError> {
        self.failed.lock().expect("lock").clone()
    }
}
