//! The io_uring engine: one thread, one ring per load, up to `queue_depth`
//! reads in flight.
//!
//! It exists because a thread pool of blocking `pread`s ([`super::pread`])
//! keeps at most one read per thread in flight, while NVMe drives want tens
//! of requests queued to reach their bandwidth; io_uring queues them all from
//! the caller's thread with one system call per batch, and `O_DIRECT` reads
//! land straight in the pool's chunks.
//!
//! Invariants (the module is one of the rooms allowed `unsafe`):
//! - **Buffer ownership.** A read hands the kernel a raw pointer into a
//!   chunk. The chunk's [`ChunkLease`] stays in its [`ChunkState`] while any
//!   of its reads is in flight (`in_flight > 0`): it is frozen, dropped or
//!   reported only once every completion of that chunk has been reaped. If
//!   that can no longer be known (the ring itself fails while reads are in
//!   flight, or the `landed` callback unwinds), the lease is leaked with
//!   [`std::mem::forget`] rather than returned: the pool loses a chunk, but
//!   no later lease can ever receive bytes the kernel writes late.
//! - **Ordering.** Reads are submitted in the order given: chunk by chunk,
//!   each chunk's reads in plan order, so the first chunks of a model land
//!   first and a pipeline can start copying early. Completions may arrive in
//!   any order; a chunk is reported when its last read completes.
//! - **Exactly once.** Every chunk is reported to `landed` exactly once:
//!   `Ok` when all its reads completed, or its first failed read's error
//!   (the same error [`super::pread`] reports for the same file), or
//!   [`IoError::Cancelled`] / [`IoError::Engine`] for chunks left unread.
//! - **Cancel and ring failure.** Once `cancel` is set (or `io_uring_enter`
//!   fails), nothing new is submitted; reads already in flight are waited for
//!   and only then are the chunks left unread reported as failed.

#![allow(
    unsafe_code,
    reason = "the io_uring engine: buffers handed to the kernel until their completions; every block says why it is sound"
)]

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use io_uring::{IoUring, Probe, SubmissionQueue, opcode, squeue, types};
use rustix::io::Errno;

use super::{DIRECT_ALIGN, IoEngine, IoError, Landed, ModelFiles, Next, ReadOp, ReadSource};
use crate::pool::ChunkLease;

/// Largest queue depth accepted; larger requests are clamped.
pub const MAX_QUEUE_DEPTH: u32 = 4096;

/// Longest single read handed to the kernel (1 GiB: fits the SQE's `u32`
/// and keeps `O_DIRECT` alignment); longer ops continue like short reads.
const MAX_SQE_LEN: usize = 1 << 30;

/// Times one read is retried after `EINTR`/`EAGAIN` before it fails.
const MAX_OP_RETRIES: u32 = 64;

/// Consecutive failed `io_uring_enter` calls tolerated before giving up on
/// the ring (each followed by [`ENTER_RETRY_PAUSE`]).
const MAX_ENTER_FAILURES: u32 = 64;

/// Pause after a failed `io_uring_enter`.
const ENTER_RETRY_PAUSE: Duration = Duration::from_millis(1);

/// Reads with io_uring; a fresh ring per [`IoEngine::run`] call, so the
/// engine itself holds no kernel state and is freely shared.
#[derive(Debug)]
pub struct UringEngine {
    queue_depth: u32,
    /// The kernel accepted `SINGLE_ISSUER | DEFER_TASKRUN` at probe time
    /// (Linux 6.1+): completions are processed only when this thread waits.
    defer_taskrun: bool,
}

impl UringEngine {
    /// Checks that this process may create a ring that supports
    /// `IORING_OP_READ`; `Err` holds a one-line reason (no io_uring in the
    /// kernel, `kernel.io_uring_disabled`, a seccomp filter, ...).
    pub fn probe(queue_depth: u32) -> Result<Self, String> {
        let queue_depth = queue_depth.clamp(1, MAX_QUEUE_DEPTH);
        let (ring, defer_taskrun) = match new_ring(queue_depth, true) {
            Ok(ring) => (ring, true),
            Err(_) => (
                new_ring(queue_depth, false).map_err(|e| setup_refusal(&e))?,
                false,
            ),
        };
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe).map_err(|e| {
            format!("io_uring cannot list its operations (IORING_REGISTER_PROBE, Linux 5.6+): {e}")
        })?;
        if !probe.is_supported(opcode::Read::CODE) {
            return Err("this kernel's io_uring has no IORING_OP_READ (Linux 5.6+)".into());
        }
        Ok(Self {
            queue_depth,
            defer_taskrun,
        })
    }

    /// Reads kept in flight at most.
    pub fn queue_depth(&self) -> u32 {
        self.queue_depth
    }
}

impl IoEngine for UringEngine {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn run_source(
        &self,
        files: &ModelFiles,
        source: &mut dyn ReadSource,
        cancel: &AtomicBool,
        landed: &mut Landed<'_>,
    ) {
        self.run_capped(files, source, cancel, landed, MAX_SQE_LEN);
    }
}

impl UringEngine {
    /// [`IoEngine::run_source`], handing the kernel at most `max_sqe_len`
    /// bytes per read (tests lower it to force continuations).
    fn run_capped(
        &self,
        files: &ModelFiles,
        source: &mut dyn ReadSource,
        cancel: &AtomicBool,
        landed: &mut Landed<'_>,
        max_sqe_len: usize,
    ) {
        let mut ring = match new_ring(self.queue_depth, self.defer_taskrun) {
            Ok(ring) => ring,
            Err(e) => {
                let reason = format!("cannot create an io_uring: {e}");
                // What is ready now fails; the source keeps the rest, which
                // its owner settles.
                while let Next::Read(read) = source.next_read(false) {
                    landed(read.chunk_no, Err(IoError::Engine(reason.clone())));
                }
                return;
            }
        };
        let targets = Targets::register(&ring, files);
        let mut load = Load::new(
            files,
            targets,
            source,
            self.queue_depth as usize,
            max_sqe_len,
        );
        load.drive(&mut ring, cancel, landed);
    }
}

/// A ring of `queue_depth` entries (the kernel rounds up to a power of two;
/// the completion queue is twice that, so it cannot overflow while at most
/// `queue_depth` reads are in flight).
fn new_ring(queue_depth: u32, defer_taskrun: bool) -> io::Result<IoUring> {
    if defer_taskrun {
        IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(queue_depth)
    } else {
        IoUring::new(queue_depth)
    }
}

/// Why `io_uring_setup` failed, in one line.
fn setup_refusal(e: &io::Error) -> String {
    match Errno::from_io_error(e) {
        Some(Errno::NOSYS) => "this kernel has no io_uring (io_uring_setup: ENOSYS)".into(),
        Some(Errno::PERM | Errno::ACCESS) => {
            format!(
                "io_uring_setup was refused ({e}): kernel.io_uring_disabled or a seccomp filter"
            )
        }
        _ => format!("io_uring_setup failed: {e}"),
    }
}

/// The descriptor a read names: a registered file, or a plain fd when
/// registration was refused.
#[derive(Clone, Copy, Debug)]
enum Target {
    Fixed(u32),
    Fd(RawFd),
}

/// Per partition, the target for buffered (`[0]`) and `O_DIRECT` (`[1]`)
/// reads; `[1]` is the buffered file where the filesystem refused `O_DIRECT`.
struct Targets(Vec<[Target; 2]>);

impl Targets {
    /// Registers every partition's files with the ring (saves a file lookup
    /// per read); falls back to plain fds if the kernel refuses.
    fn register(ring: &IoUring, files: &ModelFiles) -> Self {
        let fds = Self::fds(files);
        let flat: Vec<RawFd> = fds.iter().flatten().copied().collect();
        let fixed = !flat.is_empty()
            && u32::try_from(flat.len()).is_ok()
            && ring.submitter().register_files(&flat).is_ok();
        if !fixed {
            tracing::debug!(
                "io_uring refused to register the partitions; using plain file descriptors"
            );
            return Self::plain(&fds);
        }
        // Registered in `flat`'s order: partition i at 2i and 2i + 1.
        let bases = (0u32..).step_by(2).take(fds.len());
        Self(
            bases
                .map(|base| [Target::Fixed(base), Target::Fixed(base + 1)])
                .collect(),
        )
    }

    /// Per partition, the buffered fd and the `O_DIRECT` one (or the
    /// buffered one again).
    fn fds(files: &ModelFiles) -> Vec<[RawFd; 2]> {
        files
            .parts
            .iter()
            .map(|p| {
                let buffered = p.buffered.as_raw_fd();
                [
                    buffered,
                    p.direct.as_ref().map_or(buffered, AsRawFd::as_raw_fd),
                ]
            })
            .collect()
    }

    /// Targets naming the fds themselves.
    fn plain(fds: &[[RawFd; 2]]) -> Self {
        Self(
            fds.iter()
                .map(|&[buffered, direct]| [Target::Fd(buffered), Target::Fd(direct)])
                .collect(),
        )
    }

    /// A read of `len` bytes at `file_offset` of partition `part` into `buf`.
    fn read(
        &self,
        part: usize,
        direct: bool,
        buf: *mut u8,
        len: u32,
        file_offset: u64,
    ) -> Option<squeue::Entry> {
        let entry = match self.0.get(part)?[usize::from(direct)] {
            Target::Fixed(i) => opcode::Read::new(types::Fixed(i), buf, len)
                .offset(file_offset)
                .build(),
            Target::Fd(fd) => opcode::Read::new(types::Fd(fd), buf, len)
                .offset(file_offset)
                .build(),
        };
        Some(entry)
    }
}

/// One chunk of the load.
struct ChunkState {
    chunk_no: usize,
    /// `Some` until the chunk is reported. Must stay here while
    /// `in_flight > 0`: the kernel may be writing into its buffer.
    lease: Option<ChunkLease>,
    len: usize,
    ops: Vec<ReadOp>,
    /// Index of the next op to submit.
    next_op: usize,
    /// Ops read in full.
    ops_done: usize,
    /// Slots holding one of this chunk's ops (in the kernel, or waiting to be
    /// resubmitted).
    in_flight: usize,
    /// The failure of the earliest failed op (its index first), which is the
    /// one a sequential reader would have hit.
    error: Option<(usize, IoError)>,
}

impl ChunkState {
    /// Records `error` for op `op`, keeping the earliest op's.
    fn fail(&mut self, op: usize, error: IoError) {
        if self.error.as_ref().is_none_or(|(first, _)| op < *first) {
            self.error = Some((op, error));
        }
    }

    /// Gives up the lease without freezing it: back to the pool when no read
    /// of this chunk is in flight, else leaked, because the kernel may still
    /// write into it.
    fn discard_lease(&mut self) {
        if let Some(lease) = self.lease.take()
            && self.in_flight > 0
        {
            tracing::error!(
                chunk = self.chunk_no,
                "leaking a pool chunk: the kernel may still write into it"
            );
            std::mem::forget(lease);
        }
    }
}

/// One in-flight read: op `op` of chunk `chunk`, `done_len` bytes of it read.
#[derive(Clone, Copy, Debug)]
struct Slot {
    chunk: usize,
    op: usize,
    done_len: usize,
    /// `EINTR`/`EAGAIN` results in a row.
    retries: u32,
}

/// What one completion means for its read.
enum Outcome {
    /// The op is read in full.
    Done,
    /// Submit the rest (a short read, or a retry).
    Again(Slot),
    Failed(IoError),
}

/// Why submission stopped early.
enum Stop {
    Cancelled,
    Engine(String),
}

/// Result of pushing one read onto the submission queue.
#[derive(PartialEq, Eq)]
enum Pushed {
    Queued,
    /// The submission queue is full; retry after the next submit.
    Full,
    /// The read did not fit its chunk; the chunk has failed.
    Refused,
}

/// The state of one `run`: chunks, slots and counters.
struct Load<'f, 's> {
    files: &'f ModelFiles,
    targets: Targets,
    /// Where the reads come from, and whether it has said it has no more.
    source: &'s mut dyn ReadSource,
    source_done: bool,
    /// The chunks taken from the source so far, in that order.
    chunks: Vec<ChunkState>,
    /// `queue_depth` slots; a read's `user_data` is its slot's index.
    slots: Vec<Option<Slot>>,
    free_slots: Vec<usize>,
    /// Occupied slots whose read must be (re)submitted.
    resubmit: Vec<usize>,
    /// Reads pushed onto the ring and not yet reaped.
    in_kernel: usize,
    /// First chunk that may still have ops to submit.
    cursor: usize,
    stop: Option<Stop>,
    enter_failures: u32,
    /// Longest read handed to the kernel at once.
    max_sqe_len: usize,
}

impl<'f, 's> Load<'f, 's> {
    fn new(
        files: &'f ModelFiles,
        targets: Targets,
        source: &'s mut dyn ReadSource,
        queue_depth: usize,
        max_sqe_len: usize,
    ) -> Self {
        let queue_depth = queue_depth.max(1);
        Self {
            files,
            targets,
            source,
            source_done: false,
            chunks: Vec::new(),
            slots: vec![None; queue_depth],
            free_slots: (0..queue_depth).rev().collect(),
            resubmit: Vec::with_capacity(queue_depth),
            in_kernel: 0,
            cursor: 0,
            stop: None,
            enter_failures: 0,
            max_sqe_len: max_sqe_len.clamp(1, MAX_SQE_LEN),
        }
    }

    /// Submits, waits and reaps until every chunk is reported.
    fn drive(&mut self, ring: &mut IoUring, cancel: &AtomicBool, landed: &mut Landed<'_>) {
        loop {
            if self.stop.is_none() && cancel.load(Ordering::Relaxed) {
                self.stop = Some(Stop::Cancelled);
            }
            self.fill(&mut ring.submission(), landed);
            if self.in_kernel == 0 {
                break;
            }
            if !self.enter(ring) {
                break;
            }
            for cqe in ring.completion() {
                self.complete(cqe.user_data(), cqe.result(), landed);
            }
        }
        self.finish(landed);
    }

    /// Pushes pending resubmissions, then new ops in chunk order, while
    /// slots are free and nothing stopped the load.
    fn fill(&mut self, sq: &mut SubmissionQueue<'_>, landed: &mut Landed<'_>) {
        while let Some(slot) = self.resubmit.pop() {
            if self.stop.is_some() {
                self.release(slot, landed);
            } else if self.push(sq, slot, landed) == Pushed::Full {
                self.resubmit.push(slot);
                return;
            }
        }
        if self.stop.is_some() {
            return;
        }
        while let Some(&slot) = self.free_slots.last() {
            let Some(c) = self.next_chunk(landed) else {
                return;
            };
            self.free_slots.pop();
            let chunk = &mut self.chunks[c];
            self.slots[slot] = Some(Slot {
                chunk: c,
                op: chunk.next_op,
                done_len: 0,
                retries: 0,
            });
            chunk.next_op += 1;
            chunk.in_flight += 1;
            if self.push(sq, slot, landed) == Pushed::Full {
                self.resubmit.push(slot);
                return;
            }
        }
    }

    /// The first chunk with an op left to submit, taking the next read from
    /// the source when every chunk taken so far is submitted (waiting for
    /// it only when nothing is in the kernel); reports the chunks it passes
    /// that are already settled (no ops, or a failed plan).
    fn next_chunk(&mut self, landed: &mut Landed<'_>) -> Option<usize> {
        loop {
            while let Some(chunk) = self.chunks.get(self.cursor) {
                let c = self.cursor;
                if chunk.lease.is_some() && chunk.error.is_none() && chunk.next_op < chunk.ops.len()
                {
                    return Some(c);
                }
                self.cursor += 1;
                self.settle(c, landed);
            }
            if self.source_done {
                return None;
            }
            let wait = self.in_kernel == 0 && self.resubmit.is_empty();
            match self.source.next_read(wait) {
                Next::Read(read) => {
                    let error = read.check(self.files).err().map(|e| (0, IoError::from(e)));
                    self.chunks.push(ChunkState {
                        chunk_no: read.chunk_no,
                        lease: Some(read.lease),
                        len: read.len,
                        ops: read.ops,
                        next_op: 0,
                        ops_done: 0,
                        in_flight: 0,
                        error,
                    });
                }
                Next::NotYet => return None,
                Next::Done => {
                    self.source_done = true;
                    return None;
                }
            }
        }
    }

    /// Pushes the read of slot `slot` onto the submission queue.
    fn push(
        &mut self,
        sq: &mut SubmissionQueue<'_>,
        slot: usize,
        landed: &mut Landed<'_>,
    ) -> Pushed {
        let Some(entry) = self.entry(slot) else {
            if let Some(s) = self.slots[slot] {
                let msg = "a read does not fit its chunk's buffer".to_string();
                self.chunks[s.chunk].fail(s.op, IoError::Engine(msg));
            }
            self.release(slot, landed);
            return Pushed::Refused;
        };
        // SAFETY: `entry` points the kernel at `len` bytes inside the chunk
        // buffer owned by the lease in `chunks[s.chunk]` (bounds checked in
        // `entry`). The slot stays occupied, hence the chunk's `in_flight`
        // stays > 0 and its lease stays in place (never frozen, dropped or
        // handed out), until this read's CQE is reaped in `complete`; on any
        // path where that cannot be waited for, `discard_lease` leaks the
        // lease instead. The pool mapping lives as long as the lease. The fd
        // is one of `files`', borrowed for the whole `run` (a registered
        // file, or an issued read, holds its own reference in the kernel).
        match unsafe { sq.push(&entry) } {
            Ok(()) => {
                self.in_kernel += 1;
                Pushed::Queued
            }
            Err(_) => Pushed::Full,
        }
    }

    /// The SQE for what is left of slot `slot`'s op; `None` if it does not
    /// fit the chunk's buffer (or the slot is empty).
    fn entry(&mut self, slot: usize) -> Option<squeue::Entry> {
        let s = (*self.slots.get(slot)?)?;
        let chunk = self.chunks.get_mut(s.chunk)?;
        let op = *chunk.ops.get(s.op)?;
        let lease = chunk.lease.as_mut()?;
        let len = op.len.checked_sub(s.done_len)?.min(self.max_sqe_len);
        let chunk_offset = op.chunk_offset.checked_add(s.done_len)?;
        if chunk_offset.checked_add(len)? > lease.capacity() {
            return None;
        }
        let file_offset = op.file_offset.checked_add(s.done_len as u64)?;
        // After a short read the rest may be unaligned: read it buffered.
        let direct = op.direct
            && [file_offset, chunk_offset as u64, len as u64]
                .iter()
                .all(|v| v % DIRECT_ALIGN == 0);
        let buf = lease.as_mut_ptr().wrapping_add(chunk_offset);
        let len = u32::try_from(len).ok()?;
        let entry = self.targets.read(op.part, direct, buf, len, file_offset)?;
        Some(entry.user_data(slot as u64))
    }

    /// Submits what is queued and waits for one completion; `false` when
    /// the ring keeps failing and the load must be abandoned.
    fn enter(&mut self, ring: &IoUring) -> bool {
        let e = match ring.submit_and_wait(1) {
            Ok(_) => {
                self.enter_failures = 0;
                return true;
            }
            Err(e) => e,
        };
        let errno = Errno::from_io_error(&e);
        if errno == Some(Errno::INTR) {
            return true;
        }
        self.enter_failures += 1;
        let transient = matches!(errno, Some(Errno::AGAIN | Errno::BUSY));
        if self.stop.is_none() && (!transient || self.enter_failures > MAX_ENTER_FAILURES) {
            self.stop = Some(Stop::Engine(format!("io_uring_enter failed: {e}")));
        }
        if self.enter_failures > MAX_ENTER_FAILURES {
            tracing::error!(error = %e, in_flight = self.in_kernel, "io_uring_enter keeps failing; abandoning the ring");
            return false;
        }
        std::thread::sleep(ENTER_RETRY_PAUSE);
        true
    }

    /// Handles one completion: `res` for the read in slot `user_data`.
    fn complete(&mut self, user_data: u64, res: i32, landed: &mut Landed<'_>) {
        let found = usize::try_from(user_data)
            .ok()
            .and_then(|slot| Some((slot, (*self.slots.get(slot)?)?)));
        let Some((slot, s)) = found else {
            tracing::warn!(
                user_data,
                res,
                "io_uring completion for no read in flight; ignored"
            );
            return;
        };
        // A slot holds a read only while it is in the kernel.
        debug_assert!(
            self.in_kernel > 0,
            "a completion with no read in the kernel"
        );
        self.in_kernel = self.in_kernel.saturating_sub(1);
        let chunk = &mut self.chunks[s.chunk];
        let Some(&op) = chunk.ops.get(s.op) else {
            self.release(slot, landed);
            return;
        };
        match outcome(self.files, s, &op, res) {
            Outcome::Done => {
                chunk.ops_done += 1;
                self.release(slot, landed);
            }
            Outcome::Again(next) if chunk.error.is_none() => {
                self.slots[slot] = Some(next);
                self.resubmit.push(slot);
            }
            Outcome::Again(_) => self.release(slot, landed),
            Outcome::Failed(error) => {
                chunk.fail(s.op, error);
                self.release(slot, landed);
            }
        }
    }

    /// Frees slot `slot` (its read is not in the kernel) and reports its
    /// chunk if that was the chunk's last read.
    fn release(&mut self, slot: usize, landed: &mut Landed<'_>) {
        let Some(s) = self.slots.get_mut(slot).and_then(Option::take) else {
            return;
        };
        self.free_slots.push(slot);
        if let Some(chunk) = self.chunks.get_mut(s.chunk) {
            debug_assert!(
                chunk.in_flight > 0,
                "chunk {} released more reads than it had in flight",
                s.chunk
            );
            chunk.in_flight = chunk.in_flight.saturating_sub(1);
        }
        self.settle(s.chunk, landed);
    }

    /// Reports chunk `c` if it is unreported, nothing of it is in flight,
    /// and it failed or is read in full.
    fn settle(&mut self, c: usize, landed: &mut Landed<'_>) {
        let Some(chunk) = self.chunks.get_mut(c) else {
            return;
        };
        if chunk.in_flight > 0 || chunk.lease.is_none() {
            return;
        }
        if let Some((_, error)) = chunk.error.take() {
            chunk.discard_lease();
            landed(chunk.chunk_no, Err(error));
        } else if chunk.ops_done == chunk.ops.len()
            && let Some(lease) = chunk.lease.take()
        {
            // `ChunkRead::check` made sure `len` fits the buffer.
            landed(chunk.chunk_no, Ok(lease.freeze(chunk.len)));
        }
    }

    /// Reports every chunk still unreported as failed: cancelled, or the
    /// engine error. Chunks with reads still in flight (only when the ring
    /// was abandoned) have their lease leaked.
    fn finish(&mut self, landed: &mut Landed<'_>) {
        while let Some(slot) = self.resubmit.pop() {
            self.release(slot, landed);
        }
        let error = match &self.stop {
            Some(Stop::Cancelled) => IoError::Cancelled,
            Some(Stop::Engine(msg)) => IoError::Engine(msg.clone()),
            None => IoError::Engine("the io_uring engine stopped before reading this chunk".into()),
        };
        for chunk in &mut self.chunks {
            if chunk.lease.is_some() {
                chunk.discard_lease();
                landed(chunk.chunk_no, Err(error.clone()));
            }
        }
        // What the source has ready fails the same way; the rest stays with
        // it, for its owner to settle.
        if !self.source_done {
            while let Next::Read(read) = self.source.next_read(false) {
                landed(read.chunk_no, Err(error.clone()));
            }
        }
    }
}

impl Drop for Load<'_, '_> {
    /// Normally every lease is gone by now. If `landed` unwound mid-load,
    /// leases whose reads may still be in the kernel are leaked, not freed.
    fn drop(&mut self) {
        for chunk in &mut self.chunks {
            chunk.discard_lease();
        }
    }
}

/// What the completion `res` of slot `s` (reading `op`) means; errors are
/// built exactly as the pread engine builds them.
fn outcome(files: &ModelFiles, s: Slot, op: &ReadOp, res: i32) -> Outcome {
    debug_assert!(s.done_len <= op.len, "a read done past its length");
    let rest = op.len.saturating_sub(s.done_len);
    let path = || {
        files
            .parts
            .get(op.part)
            .map(|p| p.path.clone())
            .unwrap_or_default()
    };
    match usize::try_from(res) {
        Ok(0) if rest == 0 => Outcome::Done,
        Ok(0) => Outcome::Failed(IoError::Truncated {
            path: path(),
            offset: op.file_offset,
            expected: op.len,
        }),
        Ok(n) if n >= rest => Outcome::Done,
        Ok(n) => Outcome::Again(Slot {
            done_len: s.done_len + n,
            retries: 0,
            ..s
        }),
        Err(_) => {
            let errno = res.saturating_neg();
            let retry = errno == Errno::INTR.raw_os_error() || errno == Errno::AGAIN.raw_os_error();
            if retry && s.retries < MAX_OP_RETRIES {
                Outcome::Again(Slot {
                    retries: s.retries + 1,
                    ..s
                })
            } else {
                Outcome::Failed(IoError::Read {
                    path: path(),
                    offset: op.file_offset,
                    source: Arc::new(io::Error::from_raw_os_error(errno)),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::fs::File;
    use std::path::Path;

    use sllm_format::partitions::{Partitions, partition_file_name};

    use super::*;
    use crate::io::pread::PreadEngine;
    use crate::io::{ChunkRead, ChunkSpan, PartFile, chunk_reads, chunk_spans};
    use crate::pool::{HostPool, SharedChunk};

    type Results = BTreeMap<usize, Vec<Result<SharedChunk, IoError>>>;

    /// The engine, or `None` (with the reason printed) where the sandbox
    /// refuses io_uring.
    fn engine(queue_depth: u32) -> Option<UringEngine> {
        match UringEngine::probe(queue_depth) {
            Ok(e) => Some(e),
            Err(reason) => {
                eprintln!("skipped: io_uring is not available here: {reason}");
                None
            }
        }
    }

    /// Deterministic pseudo-random bytes (xorshift).
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// Writes partitions of `sizes` into `dir`; returns their bytes.
    fn write_model(dir: &Path, sizes: &[usize]) -> Vec<Vec<u8>> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| {
                let data = noise(size, 0x9e37_79b9 + i as u64);
                std::fs::write(dir.join(partition_file_name(i)), &data).unwrap();
                data
            })
            .collect()
    }

    fn open(dir: &Path) -> ModelFiles {
        ModelFiles::open(&Partitions::discover(dir).unwrap()).unwrap()
    }

    fn spans(files: &ModelFiles, chunk_bytes: usize) -> Vec<ChunkSpan> {
        chunk_spans(files.parts.iter().map(|p| p.size), chunk_bytes)
    }

    /// Leases one chunk per span and plans it.
    fn plan(files: &ModelFiles, pool: &HostPool, max_io: usize) -> Vec<ChunkRead> {
        let spans = spans(files, pool.chunk_bytes());
        let leases = pool
            .try_lease(spans.len())
            .expect("the pool holds the model");
        chunk_reads(files, &spans, leases, max_io)
    }

    fn collect(
        engine: &dyn IoEngine,
        files: &ModelFiles,
        reads: Vec<ChunkRead>,
        cancel: &AtomicBool,
    ) -> Results {
        let mut results = Results::new();
        engine.run(files, reads, cancel, &mut |chunk_no, r| {
            results.entry(chunk_no).or_default().push(r);
        });
        results
    }

    /// Every chunk reported exactly once; returns one result per chunk.
    fn once(results: Results, chunks: usize) -> Vec<Result<SharedChunk, IoError>> {
        assert_eq!(results.len(), chunks, "every chunk is reported");
        results
            .into_iter()
            .map(|(chunk_no, mut r)| {
                assert_eq!(r.len(), 1, "chunk {chunk_no} reported {} times", r.len());
                r.remove(0)
            })
            .collect()
    }

    fn expected<'a>(data: &'a [Vec<u8>], span: &ChunkSpan) -> &'a [u8] {
        let start = span.file_offset as usize;
        &data[span.part][start..start + span.len]
    }

    fn pool(chunks: usize, chunk_bytes: usize) -> HostPool {
        HostPool::new(chunks * chunk_bytes, chunk_bytes, 1).unwrap()
    }

    const SIZES: [usize; 4] = [10000, 70000, 4096 * 9, 123];

    /// How the equivalence test treats `O_DIRECT`.
    #[derive(Clone, Copy)]
    enum Direct {
        /// The filesystem must accept it, and some ops must use it.
        Required,
        /// Every partition read through the page cache.
        Stripped,
        /// Whatever the filesystem does (tmpfs accepts it since Linux 6.6).
        AsOpened,
    }

    /// Reads the model in `dir` every way and compares with the files and
    /// with the pread engine.
    fn equivalence(dir: &Path, direct: Direct) {
        let data = write_model(dir, &SIZES);
        let mut files = open(dir);
        let opened_direct = files.parts.iter().all(|p| p.direct.is_some());
        let expect_direct = match direct {
            Direct::Required => {
                assert!(opened_direct, "{} accepts O_DIRECT", dir.display());
                true
            }
            Direct::Stripped => {
                files.parts.iter_mut().for_each(|p| p.direct = None);
                false
            }
            Direct::AsOpened => {
                eprintln!("O_DIRECT accepted in {}: {opened_direct}", dir.display());
                opened_direct
            }
        };
        let cancel = AtomicBool::new(false);
        for chunk_bytes in [8 << 10, 64 << 10] {
            let pool = pool(32, chunk_bytes);
            let spans = spans(&files, chunk_bytes);
            for max_io in [4 << 10, 1 << 20] {
                let reads = plan(&files, &pool, max_io);
                let direct_ops = reads
                    .iter()
                    .flat_map(|r| &r.ops)
                    .filter(|o| o.direct)
                    .count();
                assert_eq!(
                    direct_ops > 0,
                    expect_direct,
                    "direct ops planned: {direct_ops}"
                );
                let pread = once(
                    collect(&PreadEngine::new(2), &files, reads, &cancel),
                    spans.len(),
                );
                for (span, r) in spans.iter().zip(&pread) {
                    assert_eq!(r.as_ref().unwrap().bytes(), expected(&data, span));
                }
                drop(pread);
                for queue_depth in [1, 4, 64] {
                    let Some(engine) = engine(queue_depth) else {
                        return;
                    };
                    let reads = plan(&files, &pool, max_io);
                    let got = once(collect(&engine, &files, reads, &cancel), spans.len());
                    for (span, r) in spans.iter().zip(&got) {
                        let chunk = r
                            .as_ref()
                            .unwrap_or_else(|e| panic!("{span:?} at depth {queue_depth}: {e}"));
                        assert!(
                            chunk.bytes() == expected(&data, span),
                            "{span:?}, chunk {chunk_bytes}, max_io {max_io}, depth {queue_depth}"
                        );
                    }
                    drop(got);
                    assert_eq!(pool.free_chunks(), pool.total_chunks());
                }
            }
        }
    }

    /// Where `tempfile::tempdir` puts files, unless that is tmpfs.
    fn disk_tempdir() -> Option<tempfile::TempDir> {
        const TMPFS_MAGIC: i64 = 0x0102_1994;
        let dir = tempfile::tempdir().unwrap();
        let fs = rustix::fs::statfs(dir.path()).unwrap();
        if fs.f_type as i64 == TMPFS_MAGIC {
            eprintln!(
                "skipped: {} is tmpfs; the O_DIRECT path is not exercised",
                dir.path().display()
            );
            return None;
        }
        Some(dir)
    }

    #[test]
    fn probe_succeeds_and_clamps_the_depth() {
        let Some(engine) = engine(64) else { return };
        assert_eq!(engine.name(), "io_uring");
        assert_eq!(engine.queue_depth(), 64);
        assert_eq!(UringEngine::probe(0).unwrap().queue_depth(), 1);
        assert_eq!(
            UringEngine::probe(u32::MAX).unwrap().queue_depth(),
            MAX_QUEUE_DEPTH
        );
    }

    #[test]
    fn matches_pread_on_disk_with_o_direct() {
        if let Some(dir) = disk_tempdir() {
            equivalence(dir.path(), Direct::Required);
        }
    }

    #[test]
    fn matches_pread_on_disk_buffered_only() {
        equivalence(tempfile::tempdir().unwrap().path(), Direct::Stripped);
    }

    #[test]
    fn matches_pread_on_tmpfs() {
        equivalence(
            tempfile::tempdir_in("/dev/shm").unwrap().path(),
            Direct::AsOpened,
        );
    }

    #[test]
    fn matches_pread_on_tmpfs_buffered_only() {
        equivalence(
            tempfile::tempdir_in("/dev/shm").unwrap().path(),
            Direct::Stripped,
        );
    }

    /// Shortens partition 1 after opening: chunks past its new end report
    /// `Truncated` exactly as pread does; the others land.
    fn truncated(dir: &Path) {
        let data = write_model(dir, &SIZES);
        let files = open(dir);
        File::options()
            .write(true)
            .open(&files.parts[1].path)
            .unwrap()
            .set_len(30000)
            .unwrap();
        let cancel = AtomicBool::new(false);
        let chunk_bytes = 8 << 10;
        let pool = pool(64, chunk_bytes);
        let spans = spans(&files, chunk_bytes);
        for max_io in [4 << 10, 1 << 20] {
            let want = once(
                collect(
                    &PreadEngine::new(2),
                    &files,
                    plan(&files, &pool, max_io),
                    &cancel,
                ),
                spans.len(),
            );
            for queue_depth in [1, 64] {
                let Some(engine) = engine(queue_depth) else {
                    return;
                };
                let got = once(
                    collect(&engine, &files, plan(&files, &pool, max_io), &cancel),
                    spans.len(),
                );
                let mut truncated = 0;
                for ((span, got), want) in spans.iter().zip(&got).zip(&want) {
                    match (got, want) {
                        (Ok(g), Ok(w)) => {
                            assert!(g.bytes() == w.bytes() && g.bytes() == expected(&data, span));
                            assert!(span.part != 1 || span.file_offset + span.len as u64 <= 30000);
                        }
                        (
                            Err(IoError::Truncated {
                                path,
                                offset,
                                expected,
                            }),
                            Err(IoError::Truncated {
                                path: p,
                                offset: o,
                                expected: e,
                            }),
                        ) => {
                            assert_eq!((path, offset, expected), (p, o, e), "{span:?}");
                            assert_eq!(span.part, 1);
                            truncated += 1;
                        }
                        (g, w) => panic!(
                            "{span:?}, max_io {max_io}, depth {queue_depth}: io_uring {g:?}, pread {w:?}"
                        ),
                    }
                }
                let past_end = spans
                    .iter()
                    .filter(|s| s.part == 1 && s.file_offset + s.len as u64 > 30000);
                assert_eq!(truncated, past_end.count());
            }
        }
        want_free(&pool);
    }

    /// Asserts every chunk went back to the pool.
    fn want_free(pool: &HostPool) {
        assert_eq!(
            pool.free_chunks(),
            pool.total_chunks(),
            "every lease returned"
        );
    }

    #[test]
    fn truncated_partition_on_disk() {
        if let Some(dir) = disk_tempdir() {
            truncated(dir.path());
        }
    }

    #[test]
    fn truncated_partition_on_tmpfs() {
        truncated(tempfile::tempdir_in("/dev/shm").unwrap().path());
    }

    /// Reads handed to the kernel in pieces continue like short reads: whole
    /// pages stay direct, unaligned remainders go through the page cache.
    #[test]
    fn long_ops_continue_in_pieces() {
        let Some(engine) = engine(8) else { return };
        let dir = tempfile::tempdir().unwrap();
        let data = write_model(dir.path(), &SIZES);
        let files = open(dir.path());
        let chunk_bytes = 64 << 10;
        let pool = pool(8, chunk_bytes);
        let spans = spans(&files, chunk_bytes);
        for max_sqe_len in [4096, 1000, 1] {
            let mut results = Results::new();
            let reads = plan(&files, &pool, 1 << 20);
            engine.run_capped(
                &files,
                &mut reads.into_iter(),
                &AtomicBool::new(false),
                &mut |chunk_no, r| results.entry(chunk_no).or_default().push(r),
                max_sqe_len,
            );
            for (span, r) in spans.iter().zip(once(results, spans.len())) {
                assert!(
                    r.unwrap().bytes() == expected(&data, span),
                    "{span:?}, pieces of {max_sqe_len}"
                );
            }
        }
        want_free(&pool);
    }

    /// Both ring setups (with and without `DEFER_TASKRUN`) and both ways of
    /// naming files (registered or plain fds) read the same bytes.
    #[test]
    fn every_ring_setup_reads_the_same() {
        let Some(probed) = engine(4) else { return };
        let dir = tempfile::tempdir().unwrap();
        let data = write_model(dir.path(), &SIZES);
        let files = open(dir.path());
        let pool = pool(32, 8 << 10);
        let spans = spans(&files, 8 << 10);
        for defer_taskrun in [false, probed.defer_taskrun] {
            for fixed in [false, true] {
                let mut ring = new_ring(4, defer_taskrun).unwrap();
                let targets = if fixed {
                    Targets::register(&ring, &files)
                } else {
                    Targets::plain(&Targets::fds(&files))
                };
                assert_eq!(matches!(targets.0[0][0], Target::Fixed(_)), fixed);
                let mut reads = plan(&files, &pool, 4 << 10).into_iter();
                let mut results = Results::new();
                let mut load = Load::new(&files, targets, &mut reads, 4, MAX_SQE_LEN);
                load.drive(&mut ring, &AtomicBool::new(false), &mut |chunk_no, r| {
                    results.entry(chunk_no).or_default().push(r)
                });
                drop(load);
                for (span, r) in spans.iter().zip(once(results, spans.len())) {
                    assert!(r.unwrap().bytes() == expected(&data, span), "{span:?}");
                }
                want_free(&pool);
            }
        }
    }

    #[test]
    fn completions_map_to_outcomes() {
        let files = ModelFiles { parts: vec![] };
        let op = ReadOp {
            part: 0,
            direct: false,
            file_offset: 4096,
            chunk_offset: 0,
            len: 100,
        };
        let s = Slot {
            chunk: 0,
            op: 0,
            done_len: 0,
            retries: 0,
        };
        let at_40 = Slot { done_len: 40, ..s };
        let eintr = -Errno::INTR.raw_os_error();
        let eagain = -Errno::AGAIN.raw_os_error();
        assert!(matches!(outcome(&files, s, &op, 100), Outcome::Done));
        assert!(matches!(outcome(&files, at_40, &op, 60), Outcome::Done));
        assert!(matches!(
            outcome(&files, s, &op, 40),
            Outcome::Again(Slot { done_len: 40, .. })
        ));
        assert!(matches!(
            outcome(&files, at_40, &op, 0),
            Outcome::Failed(IoError::Truncated {
                offset: 4096,
                expected: 100,
                ..
            })
        ));
        assert!(matches!(
            outcome(&files, at_40, &op, eintr),
            Outcome::Again(Slot {
                done_len: 40,
                retries: 1,
                ..
            })
        ));
        assert!(matches!(
            outcome(&files, s, &op, eagain),
            Outcome::Again(Slot { retries: 1, .. })
        ));
        let worn = Slot {
            retries: MAX_OP_RETRIES,
            ..s
        };
        assert!(matches!(
            outcome(&files, worn, &op, eintr),
            Outcome::Failed(IoError::Read { offset: 4096, .. })
        ));
        match outcome(&files, s, &op, -Errno::IO.raw_os_error()) {
            Outcome::Failed(IoError::Read { source, .. }) => {
                assert_eq!(source.raw_os_error(), Some(Errno::IO.raw_os_error()));
            }
            _ => panic!("EIO is a read error"),
        }
    }

    #[test]
    fn cancelled_before_run_reads_nothing() {
        let Some(engine) = engine(8) else { return };
        let dir = tempfile::tempdir().unwrap();
        write_model(dir.path(), &SIZES);
        let files = open(dir.path());
        let pool = pool(32, 8 << 10);
        let reads = plan(&files, &pool, 4 << 10);
        let chunks = reads.len();
        let results = once(
            collect(&engine, &files, reads, &AtomicBool::new(true)),
            chunks,
        );
        assert!(
            results.iter().all(|r| matches!(r, Err(IoError::Cancelled))),
            "{results:?}"
        );
        want_free(&pool);
    }

    #[test]
    fn cancelled_after_the_first_chunk_loses_nothing() {
        let Some(engine) = engine(4) else { return };
        let dir = tempfile::tempdir().unwrap();
        let data = write_model(dir.path(), &SIZES);
        let files = open(dir.path());
        let pool = pool(32, 8 << 10);
        let spans = spans(&files, 8 << 10);
        let reads = plan(&files, &pool, 4 << 10);
        let cancel = AtomicBool::new(false);
        let mut results = Results::new();
        engine.run(&files, reads, &cancel, &mut |chunk_no, r| {
            cancel.store(true, Ordering::Relaxed);
            results.entry(chunk_no).or_default().push(r);
        });
        let results = once(results, spans.len());
        let mut cancelled = 0;
        for (span, r) in spans.iter().zip(&results) {
            match r {
                Ok(chunk) => assert!(chunk.bytes() == expected(&data, span)),
                Err(IoError::Cancelled) => cancelled += 1,
                Err(e) => panic!("{span:?}: {e}"),
            }
        }
        // At most `queue_depth` ops were in flight when the first chunk landed.
        assert!(
            cancelled >= spans.len() - 4,
            "{cancelled} of {} cancelled",
            spans.len()
        );
        assert!(results[0].is_ok());
        drop(results);
        want_free(&pool);
    }

    #[test]
    fn read_errors_match_pread() {
        let Some(engine) = engine(4) else { return };
        // A directory opens but cannot be read: EISDIR.
        let dir = tempfile::tempdir().unwrap();
        let files = ModelFiles {
            parts: vec![PartFile {
                path: dir.path().to_path_buf(),
                size: 20000,
                start: 0,
                direct: None,
                buffered: File::open(dir.path()).unwrap(),
            }],
        };
        let pool = pool(8, 8 << 10);
        let cancel = AtomicBool::new(false);
        let want = once(
            collect(
                &PreadEngine::new(1),
                &files,
                plan(&files, &pool, 4 << 10),
                &cancel,
            ),
            3,
        );
        let got = once(
            collect(&engine, &files, plan(&files, &pool, 4 << 10), &cancel),
            3,
        );
        for (g, w) in got.iter().zip(&want) {
            match (g, w) {
                (
                    Err(IoError::Read {
                        path,
                        offset,
                        source,
                    }),
                    Err(IoError::Read {
                        path: p,
                        offset: o,
                        source: s,
                    }),
                ) => {
                    assert_eq!((path, offset), (p, o));
                    assert_eq!(source.raw_os_error(), s.raw_os_error());
                    assert_eq!(source.raw_os_error(), Some(Errno::ISDIR.raw_os_error()));
                }
                (g, w) => panic!("io_uring {g:?}, pread {w:?}"),
            }
        }
        want_free(&pool);
    }

    #[test]
    fn plans_outside_the_buffer_fail_without_reading() {
        let Some(engine) = engine(4) else { return };
        let dir = tempfile::tempdir().unwrap();
        write_model(dir.path(), &[8192]);
        let files = open(dir.path());
        let pool = pool(4, 4096);
        let mut reads = plan(&files, &pool, 4096);
        reads[1].ops[0].chunk_offset = 1;
        let mut leases = pool.try_lease(1).unwrap();
        reads.push(ChunkRead {
            chunk_no: 2,
            lease: leases.remove(0),
            len: 8192,
            ops: vec![],
        });
        let results = once(collect(&engine, &files, reads, &AtomicBool::new(false)), 3);
        assert!(results[0].is_ok());
        assert!(
            matches!(&results[1], Err(IoError::ReadPlan(e)) if e.to_string().contains("past its")),
            "{:?}",
            results[1]
        );
        assert!(
            matches!(&results[2], Err(IoError::ReadPlan(e)) if e.to_string().contains("holds 8192")),
            "{:?}",
            results[2]
        );
        drop(results);
        want_free(&pool);
    }

    #[test]
    fn chunks_without_ops_land_empty() {
        let Some(engine) = engine(4) else { return };
        let files = ModelFiles { parts: vec![] };
        let pool = pool(2, 4096);
        let reads = pool
            .try_lease(2)
            .unwrap()
            .into_iter()
            .enumerate()
            .map(|(chunk_no, lease)| ChunkRead {
                chunk_no,
                lease,
                len: 0,
                ops: vec![],
            })
            .collect();
        let results = once(collect(&engine, &files, reads, &AtomicBool::new(false)), 2);
        assert!(
            results
                .iter()
                .all(|r| r.as_ref().is_ok_and(|c| c.bytes().is_empty()))
        );
        drop(results);
        want_free(&pool);
    }
}
