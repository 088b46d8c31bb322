//! One copy of a model in the host pool: its chunks, each pending, landed,
//! failed or (streamed past) released, filled by an io engine on a thread of
//! its own. Replicas wait on individual chunks, so device copies start as
//! soon as a chunk lands rather than when the whole model has. With the
//! manifest's checksums, a chunk counts as landed only once its blocks
//! matched ([`super::checksums`]).
//!
//! A copy is *whole* (every chunk leased up front and kept) or *streamed*
//! (the model does not fit beside what the pool must keep). A streamed copy
//! keeps a prefix of chunks, `keep`, and passes the rest through a ring:
//! - at most `ring` chunks past the prefix are leased at once (being read,
//!   or landed and not yet taken by every consumer); the io thread reads
//!   ahead as far as the ring and the pool's free chunks allow. It leases
//!   the chunks of a checksum block together, never part of one, so two
//!   streams cannot each hold half a block and wait for the other's; while
//!   it waits for free chunks, the registry evicts idle models for it, and
//!   with nothing idle it lets its own kept prefix go after a second;
//! - each device thread of each replica reading the copy is a [`Consumer`]
//!   and walks the chunks in order; a chunk past the prefix is released (the
//!   copy lets go of it) once every consumer attached has moved past it
//!   (taken a later chunk, or attached beyond it), and returns to the pool
//!   when the last device copy from it completes. A consumer that detaches
//!   leaves its last chunk to the next: requests that each copy the next
//!   stretch of the model (the Python client's windows) read it once;
//! - a consumer attaches only if no chunk from its first one on has been
//!   released; otherwise its replica gets a new copy, which starts from the
//!   chunks still kept;
//! - a ring that no consumer drains for `drain_timeout` fails the copy, so a
//!   load that no device request follows does not hold the pool forever, and
//!   a copy nobody can attach to any more (replaced in the registry) with no
//!   consumer left stops reading;
//! - a stream that no consumer reads (a LoadModelAsync(CPU) whose device
//!   request has not come, perhaps never will: its client died) is idle: it
//!   *gives way* rather than make other loads wait for its drain timeout
//!   when the registry evicts it (for a new load, or for a stream waiting
//!   for chunks). It stops reading, hands its chunks back and ends with
//!   [`IoError::Yielded`]; no consumer attaches to it after, and a device
//!   request that comes later reads a new copy.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::checksums::{LoadCheck, Released};
use crate::io::{
    ChunkRead, ChunkSpan, IoEngine, IoError, ModelFiles, Next, ReadSource, chunk_reads_from,
};
use crate::lock;
use crate::pool::{ChunkLease, HostPool, SharedChunk};
use sllm_format::partitions::Partitions;

/// How often waits of the io thread look at `cancel`.
const POLL: Duration = Duration::from_millis(20);
/// How long a stream that evicted another stream for its chunks waits for
/// them before it evicts anything else.
const RECLAIM_PAUSE: Duration = Duration::from_millis(100);
/// How long a stream waits for the pool, with nothing idle to evict and its
/// consumers stalled, before it lets its kept prefix go.
const GIVE_UP_PREFIX_AFTER: Duration = Duration::from_secs(1);

#[derive(Clone)]
enum Slot {
    Pending,
    Landed(SharedChunk),
    Failed(IoError),
    /// Streamed past: every consumer has it, the copy no longer does.
    Released,
}

/// How a finished load went, for logs and metrics.
#[derive(Clone, Debug)]
pub struct LoadOutcome {
    pub bytes: u64,
    pub seconds: f64,
    pub engine: &'static str,
    pub error: Option<IoError>,
    /// Read through a ring, and the chunks it keeps.
    pub streamed: Option<usize>,
}

/// Where the chunks a copy reads come from.
pub enum Source {
    /// A lease for every chunk not already resident, in order.
    Whole(Vec<ChunkLease>),
    /// Leased from the pool as the ring allows.
    Streamed(Stream),
}

/// A streamed copy's bounds.
#[derive(Clone, Debug)]
pub struct Stream {
    pub pool: HostPool,
    /// Chunks `0..keep` stay once landed.
    pub keep: usize,
    /// Chunks past the prefix held at once, at most.
    pub ring: usize,
    /// How long a full ring may wait for a consumer to take a chunk.
    pub drain_timeout: Duration,
    /// Frees chunks for the stream while it waits for the pool.
    pub reclaim: Reclaim,
}

/// When an evicted copy's chunks return to the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freed {
    Now,
    /// Once the evicted copy's io thread has stopped: about this many.
    Soon(usize),
}

/// Evicts one idle model (the registry's LRU choice) for a stream that
/// waits for pool chunks: what that frees, or `None` when no model is idle.
/// Called on the stream's io thread, holding none of the copy's locks.
#[derive(Clone)]
pub struct Reclaim(pub Arc<dyn Fn() -> Option<Freed> + Send + Sync>);

impl std::fmt::Debug for Reclaim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reclaim")
    }
}

struct State {
    slots: Vec<Slot>,
    /// Chunks `0..keep` are never released (the whole model for a whole
    /// copy).
    keep: usize,
    /// Device threads reading this copy.
    consumers: usize,
    /// Per chunk: consumers attached now that have moved past it.
    taken: Vec<usize>,
    /// Chunks released so far, and the highest.
    released: usize,
    highest_released: Option<usize>,
    /// Chunks past the prefix whose reads were issued.
    issued_past_keep: usize,
    /// When a consumer last took or passed a chunk (or the copy began).
    last_progress: Instant,
    /// The load's first real error (a cancellation only until one comes).
    /// Kept under the same lock as the slots, so that a waiter that finds
    /// a failed chunk reads the cause without taking a second lock: two
    /// locks here once deadlocked a copy thread against the io thread.
    failed: Option<IoError>,
}

impl State {
    /// Releases chunk `i` if it is landed past the prefix and every
    /// consumer has it.
    fn maybe_release(&mut self, i: usize) -> bool {
        if i >= self.keep
            && self.consumers > 0
            && self.taken[i] >= self.consumers
            && matches!(self.slots[i], Slot::Landed(_))
        {
            self.slots[i] = Slot::Released;
            self.released += 1;
            self.highest_released = self.highest_released.max(Some(i));
            return true;
        }
        false
    }

    /// Chunks `from..to` moved past by one more consumer; those every
    /// consumer has moved past are released.
    fn pass(&mut self, from: usize, to: usize) {
        for i in from..to.min(self.taken.len()) {
            self.taken[i] += 1;
            self.maybe_release(i);
        }
        self.last_progress = Instant::now();
    }

    /// Chunks past the prefix the copy holds or is reading.
    fn ring_held(&self) -> usize {
        self.issued_past_keep - self.released
    }

    /// Lets the chunks kept so far (those of `..issued` below `keep`) go as
    /// ring chunks do, released once every consumer has moved past them;
    /// the prefix then ends at 0. False when there is none.
    fn give_up_prefix(&mut self, issued: usize) -> bool {
        if self.keep == 0 {
            return false;
        }
        let kept = self.keep.min(issued);
        // They count as past the prefix now.
        self.issued_past_keep += kept;
        self.keep = 0;
        for i in 0..kept {
            self.maybe_release(i);
        }
        true
    }

    /// Gives way if no consumer reads the copy: from now on none may attach
    /// (see [`HostCopy::give_way`]).
    fn give_way(&mut self) -> bool {
        if self.consumers > 0 {
            return false;
        }
        if matches!(self.failed, None | Some(IoError::Cancelled)) {
            self.failed = Some(IoError::Yielded);
        }
        true
    }
}

/// A model's chunks in the pool.
pub struct HostCopy {
    /// The layout this copy was made from (replicas must plan against it).
    spans: Arc<[ChunkSpan]>,
    /// Checks chunks against the manifest before they count as landed.
    check: Option<LoadCheck>,
    /// `Some(ring)` for a streamed copy.
    ring: Option<usize>,
    /// Bytes read from disk (the chunks not resident at the start).
    read_bytes: u64,
    state: Mutex<State>,
    changed: Condvar,
    cancel: AtomicBool,
    complete: AtomicBool,
    /// Seconds the whole load took, once it is over.
    seconds: Mutex<Option<f64>>,
}

impl HostCopy {
    /// Starts reading the chunks of the model in `partitions` (cut into
    /// `spans`) that `resident` (a prefix of chunks already in the pool)
    /// lacks, from `source` with `engine`, checking them with `check` when
    /// given (made for the same spans); `on_done` runs on the io thread when
    /// every chunk has landed or failed. Fails only if no thread can be
    /// started (the leases then return to the pool).
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        partitions: Partitions,
        spans: Arc<[ChunkSpan]>,
        resident: Vec<SharedChunk>,
        source: Source,
        engine: Arc<dyn IoEngine>,
        max_io_bytes: usize,
        check: Option<LoadCheck>,
        on_done: impl FnOnce(&Arc<HostCopy>, LoadOutcome) + Send + 'static,
    ) -> std::io::Result<Arc<Self>> {
        let n = spans.len();
        let first_missing = resident.len().min(n);
        let (keep, ring) = match &source {
            Source::Whole(leases) => {
                debug_assert_eq!(first_missing + leases.len(), n);
                (n, None)
            }
            Source::Streamed(s) => (s.keep.clamp(first_missing, n), Some(s.ring.max(1))),
        };
        let mut slots = vec![Slot::Pending; n];
        for (slot, chunk) in slots.iter_mut().zip(&resident) {
            *slot = Slot::Landed(Arc::clone(chunk));
        }
        let copy = Arc::new(Self {
            spans: Arc::clone(&spans),
            check,
            ring,
            read_bytes: spans[first_missing..].iter().map(|s| s.len as u64).sum(),
            state: Mutex::new(State {
                slots,
                keep,
                consumers: 0,
                taken: vec![0; n],
                released: 0,
                highest_released: None,
                issued_past_keep: 0,
                last_progress: Instant::now(),
                failed: None,
            }),
            changed: Condvar::new(),
            cancel: AtomicBool::new(false),
            complete: AtomicBool::new(first_missing == n),
            seconds: Mutex::new((first_missing == n).then_some(0.0)),
        });
        let this = Arc::clone(&copy);
        std::thread::Builder::new()
            .name("sllm-load".into())
            .spawn(move || {
                let started = Instant::now();
                let bytes = this.read_bytes;
                let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    this.read_all(
                        &partitions,
                        &resident,
                        source,
                        engine.as_ref(),
                        max_io_bytes,
                    )
                }));
                drop(resident);
                if read.is_err() {
                    // Nobody may wait forever on a chunk the engine dropped.
                    this.fail_pending(IoError::Panicked { which: "io" });
                }
                *lock(&this.seconds) = Some(started.elapsed().as_secs_f64());
                let outcome = LoadOutcome {
                    bytes,
                    seconds: started.elapsed().as_secs_f64(),
                    engine: engine.name(),
                    error: this.error(),
                    streamed: this.ring.map(|_| this.keep()),
                };
                on_done(&this, outcome);
            })?;
        Ok(copy)
    }

    /// The layout this copy was made from.
    pub fn spans(&self) -> &Arc<[ChunkSpan]> {
        &self.spans
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn fail_pending(&self, error: IoError) {
        let pending: Vec<usize> = self
            .state()
            .slots
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
        self: &Arc<Self>,
        partitions: &Partitions,
        resident: &[SharedChunk],
        source: Source,
        engine: &dyn IoEngine,
        max_io_bytes: usize,
    ) {
        let first = resident.len();
        let files = match ModelFiles::open(partitions) {
            Ok(files) => files,
            Err(e) => {
                drop(source);
                self.fail_pending(e);
                return;
            }
        };
        if let Some(check) = &self.check {
            // Blocks that straddle the resident prefix and the rest need the
            // prefix's bytes to be hashed again.
            for c in check.chunks_sharing_blocks_with(first) {
                self.release(check.land(c, Ok(Arc::clone(&resident[c]))));
            }
        }
        let mut landed = |chunk_no, result| match &self.check {
            None => self.settle(chunk_no, result),
            Some(check) => self.release(check.land(chunk_no, result)),
        };
        let mut ring_error = None;
        match source {
            Source::Whole(leases) => {
                let reads = chunk_reads_from(&files, &self.spans, first, leases, max_io_bytes);
                engine.run(&files, reads, &self.cancel, &mut landed);
            }
            Source::Streamed(stream) => {
                let mut source = Ring {
                    copy: self,
                    files: &files,
                    stream: &stream,
                    max_io_bytes,
                    next: first,
                    leased: Default::default(),
                    error: None,
                };
                engine.run_source(&files, &mut source, &self.cancel, &mut landed);
                ring_error = source.error.take();
            }
        }
        if let Some(check) = &self.check {
            let why = self
                .error()
                .or_else(|| ring_error.clone())
                .unwrap_or(IoError::Cancelled);
            self.release(check.finish(why));
        }
        if self.ring.is_some() {
            // Chunks never handed to the engine: failed with the reason the
            // ring stopped, or as cancelled.
            self.fail_pending(ring_error.unwrap_or(IoError::Cancelled));
        }
    }

    /// The leases for the next chunks of a streamed copy, taken together:
    /// from `next` to the end of its first checksum block (one chunk without
    /// a manifest), so that the copy never holds part of a block while it
    /// waits for the pool. Prefix chunks while the pool has them free (the
    /// prefix ends where it has not), else ring chunks once the ring has
    /// room for them and the pool has them free; while it waits for the
    /// pool, the registry evicts idle models for it (`reclaim`). Without
    /// `wait`, `None` when that is not now; with it, waits, giving up on
    /// cancel, when no copy can attach any more, or when neither room nor
    /// chunks come within the drain timeout.
    fn next_leases(
        self: &Arc<Self>,
        next: usize,
        stream: &Stream,
        wait: bool,
    ) -> Result<Option<Vec<ChunkLease>>, IoError> {
        let stopped = || Err(self.error().unwrap_or(IoError::Cancelled));
        if self.cancel.load(Ordering::Relaxed) {
            // Not even a prefix chunk: the engine would only fail its read.
            return stopped();
        }
        let end = self
            .check
            .as_ref()
            .map_or(next + 1, |check| check.block_end(next))
            .min(self.spans.len());
        let n = end - next;
        {
            let mut state = self.state();
            if next < state.keep {
                if let Some(leases) = stream.pool.try_lease(n) {
                    state.issued_past_keep += end.saturating_sub(state.keep);
                    return Ok(Some(leases));
                }
                // Not free to keep: the prefix ends here.
                state.keep = next;
            }
        }
        let mut reclaim_after = Instant::now();
        loop {
            if self.cancel.load(Ordering::Relaxed) {
                return stopped();
            }
            let state = self.state();
            if state.consumers == 0 && Arc::strong_count(self) == 1 {
                // Out of the registry and read by no one: no one can
                // attach any more.
                return Err(IoError::Cancelled);
            }
            // The ring is at least one chunk more than a block spans, or the
            // whole rest of the model: an empty ring always has room.
            if state.ring_held() > 0 && state.ring_held() + n > stream.ring {
                if !wait {
                    return Ok(None);
                }
                if state.last_progress.elapsed() >= stream.drain_timeout {
                    return Err(IoError::NotDrained {
                        seconds: stream.drain_timeout.as_secs(),
                        held: state.ring_held(),
                    });
                }
                drop(crate::wait(&self.changed, state, Some(POLL)));
                continue;
            }
            drop(state);
            if let Some(leases) = stream.pool.try_lease(n) {
                self.state().issued_past_keep += n;
                return Ok(Some(leases));
            }
            if !wait {
                return Ok(None);
            }
            if Instant::now() >= reclaim_after {
                match (stream.reclaim.0)() {
                    Some(Freed::Now) => continue,
                    // Give the evicted stream's reads time to finish
                    // before evicting another model.
                    Some(Freed::Soon(_)) => reclaim_after = Instant::now() + RECLAIM_PAUSE,
                    None => {}
                }
            }
            let mut state = self.state();
            let stalled = state.last_progress.elapsed();
            if stalled >= GIVE_UP_PREFIX_AFTER && state.give_up_prefix(next) {
                // Two streams that each kept a prefix could otherwise wait
                // for each other's chunks with nothing idle to evict.
                tracing::debug!(
                    next,
                    "a stream waiting for the pool lets its kept prefix go"
                );
                continue;
            }
            drop(state);
            if stalled >= stream.drain_timeout {
                return Err(IoError::PoolBusy {
                    seconds: stream.drain_timeout.as_secs(),
                });
            }
            stream.pool.wait_for_free(n, POLL);
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
        let mut guard = self.state();
        let state = &mut *guard;
        // A chunk settles once: what waiters saw never changes.
        let Some(slot) = state
            .slots
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
                // Keep the first real error, not the cancellations it caused.
                if matches!(state.failed, None | Some(IoError::Cancelled)) {
                    state.failed = Some(e.clone());
                }
                Slot::Failed(e)
            }
        };
        // Every consumer may have passed it already.
        state.maybe_release(chunk_no);
        if state.slots.iter().all(|s| !matches!(s, Slot::Pending)) {
            self.complete.store(true, Ordering::Release);
        }
        drop(guard);
        self.changed.notify_all();
    }

    /// Adds one consumer per device thread of a replica, each starting at
    /// the first chunk it needs (`first[d]`; the chunks before count as
    /// passed by it); `None` if one of them was released already (read a new
    /// copy instead).
    pub fn attach(self: &Arc<Self>, first: &[usize]) -> Option<Vec<Consumer>> {
        let mut state = self.state();
        if !Self::can_attach(&state, first.iter().copied().min()?) {
            return None;
        }
        state.consumers += first.len();
        let n = state.taken.len();
        for &f in first {
            state.pass(0, f);
        }
        drop(state);
        self.changed.notify_all();
        Some(
            first
                .iter()
                .map(|&f| Consumer {
                    host: Arc::clone(self),
                    next: f.min(n),
                })
                .collect(),
        )
    }

    fn can_attach(state: &State, first: usize) -> bool {
        state.highest_released.is_none_or(|h| first > h)
            && !matches!(state.failed, Some(IoError::Yielded))
    }

    /// Whether a replica whose first chunk is `first` can still read every
    /// chunk it needs from this copy.
    pub fn attachable(&self, first: usize) -> bool {
        Self::can_attach(&self.state(), first)
    }

    /// Marks chunks `from..to` as moved past by one consumer.
    fn pass(&self, from: usize, to: usize) {
        if from >= to {
            return;
        }
        self.state().pass(from, to);
        self.changed.notify_all();
    }

    /// A consumer that had moved past `..next` leaves: its passes no
    /// longer count, and what every remaining consumer has moved past is
    /// released.
    fn detach(&self, next: usize) {
        let mut state = self.state();
        state.consumers -= 1;
        let n = state.taken.len();
        for i in 0..next.min(n) {
            state.taken[i] -= 1;
        }
        for i in state.keep..n {
            state.maybe_release(i);
        }
        state.last_progress = Instant::now();
        drop(state);
        self.changed.notify_all();
    }

    /// Waits for chunk `i`, giving up when `abort` is set (checked every
    /// `poll` while waiting) or at `deadline`. A chunk cancelled because
    /// another one failed reports that first failure, the cause worth telling.
    fn wait_chunk_or_abort(
        &self,
        i: usize,
        abort: &AtomicBool,
        deadline: Instant,
        poll: Duration,
    ) -> Result<SharedChunk, IoError> {
        let mut state = self.state();
        loop {
            match state.slots.get(i) {
                Some(Slot::Landed(chunk)) => return Ok(Arc::clone(chunk)),
                Some(Slot::Failed(e)) => {
                    return Err(state.failed.clone().unwrap_or_else(|| e.clone()));
                }
                Some(Slot::Pending)
                    if abort.load(Ordering::Relaxed) || Instant::now() >= deadline =>
                {
                    return Err(IoError::Cancelled);
                }
                Some(Slot::Pending) => {
                    state = crate::wait(&self.changed, state, Some(poll));
                }
                Some(Slot::Released) => {
                    return Err(IoError::Invariant(format!(
                        "chunk {i} was released before a consumer of it took it"
                    )));
                }
                None => {
                    return Err(IoError::Invariant(format!(
                        "chunk {i} is not part of this copy"
                    )));
                }
            }
        }
    }

    /// Stops a stream that no consumer reads, so that its chunks return to
    /// the pool (once its io thread has stopped, a moment later); no
    /// consumer can attach to it after. False, and nothing changes, when a
    /// consumer reads it or it is not a stream still reading.
    pub fn give_way(&self) -> bool {
        if !self.is_streamed() {
            return false;
        }
        let mut state = self.state();
        // `complete` is set under the state's lock.
        if self.is_complete() || !state.give_way() {
            return false;
        }
        drop(state);
        self.cancel();
        true
    }

    /// A stream still reading that no consumer reads.
    pub fn is_unread_stream(&self) -> bool {
        self.is_streamed() && !self.is_complete() && self.state().consumers == 0
    }

    /// Asks the io engine to stop; pending chunks fail as cancelled.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
        self.changed.notify_all();
    }

    /// Every chunk has landed, failed or been streamed past.
    pub fn is_complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }

    /// Read through a ring rather than whole.
    pub fn is_streamed(&self) -> bool {
        self.ring.is_some()
    }

    /// Chunks kept once landed.
    pub fn keep(&self) -> usize {
        self.state().keep
    }

    /// Chunks in the pool now, and chunks in all.
    pub fn progress(&self) -> (usize, usize) {
        let state = self.state();
        let landed = state
            .slots
            .iter()
            .filter(|s| matches!(s, Slot::Landed(_)))
            .count();
        (landed, state.slots.len())
    }

    /// Bytes of the model in the pool now.
    pub fn resident_bytes(&self) -> u64 {
        let state = self.state();
        state
            .slots
            .iter()
            .zip(self.spans.iter())
            .filter(|(s, _)| matches!(s, Slot::Landed(_)))
            .map(|(_, span)| span.len as u64)
            .sum()
    }

    /// Bytes read from disk (the chunks not resident when it began).
    pub fn read_bytes(&self) -> u64 {
        self.read_bytes
    }

    /// The kept chunks that have landed, from the first on, up to the first
    /// that has not: what a new copy of the same files can start from.
    pub fn resident_prefix(&self) -> Vec<SharedChunk> {
        let state = self.state();
        state.slots[..state.keep]
            .iter()
            .map_while(|s| match s {
                Slot::Landed(chunk) => Some(Arc::clone(chunk)),
                _ => None,
            })
            .collect()
    }

    /// Seconds the load took, once it is over.
    pub fn seconds(&self) -> Option<f64> {
        *lock(&self.seconds)
    }

    /// The load's error, once one chunk failed.
    pub fn error(&self) -> Option<IoError> {
        self.state().failed.clone()
    }
}

/// A streamed copy's reads, handed to the engine one chunk at a time as
/// the ring makes room: the engine keeps the disk busy without waiting for
/// a batch to finish.
struct Ring<'a> {
    copy: &'a Arc<HostCopy>,
    files: &'a ModelFiles,
    stream: &'a Stream,
    max_io_bytes: usize,
    /// The next chunk to read.
    next: usize,
    /// Leases taken for chunks `next..`, not yet handed to the engine.
    leased: std::collections::VecDeque<ChunkLease>,
    /// Why the ring stopped handing out reads, if it did.
    error: Option<IoError>,
}

impl ReadSource for Ring<'_> {
    fn next_read(&mut self, wait: bool) -> Next {
        if self.leased.is_empty() {
            if self.next >= self.copy.spans.len() || self.error.is_some() {
                return Next::Done;
            }
            match self.copy.next_leases(self.next, self.stream, wait) {
                Ok(Some(leases)) => self.leased = leases.into(),
                Ok(None) => return Next::NotYet,
                Err(e) => {
                    self.error = Some(e);
                    return Next::Done;
                }
            }
        }
        let Some(lease) = self.leased.pop_front() else {
            self.error = Some(IoError::Invariant("the pool leased no chunk".into()));
            return Next::Done;
        };
        let span = &self.copy.spans[self.next];
        let read = ChunkRead::plan(self.files, span, self.next, lease, self.max_io_bytes);
        self.next += 1;
        Next::Read(read)
    }
}

/// One device thread's walk through a copy's chunks, in order. Chunks it
/// skips count as passed; dropping it detaches it, so what it has not moved
/// past no longer waits for it: a device that fails or stops never holds a
/// streamed copy's ring.
pub struct Consumer {
    host: Arc<HostCopy>,
    /// The first chunk it has not moved past.
    next: usize,
}

impl Consumer {
    /// The copy being read.
    pub fn host(&self) -> &HostCopy {
        &self.host
    }

    /// Whether chunk `i` can be taken without waiting.
    pub fn ready(&self, i: usize) -> bool {
        !matches!(self.host.state().slots.get(i), Some(Slot::Pending))
    }

    /// Moves past the chunks before `i`, then waits for chunk `i` (see
    /// [`HostCopy::wait_chunk_or_abort`]); the chunk counts as passed once
    /// a later one is taken.
    pub fn take(
        &mut self,
        i: usize,
        abort: &AtomicBool,
        deadline: Instant,
        poll: Duration,
    ) -> Result<SharedChunk, IoError> {
        debug_assert!(i >= self.next, "chunks are taken in order");
        self.host.pass(self.next, i);
        self.next = self.next.max(i);
        self.host.wait_chunk_or_abort(i, abort, deadline, poll)
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.host.detach(self.next);
    }
}
