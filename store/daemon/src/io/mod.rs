//! Reading a model's bytes from its partitions into pool chunks.
//!
//! A model is read chunk by chunk. The chunk grid restarts at every
//! partition ([`chunk_spans`]): a chunk never straddles two files, so every
//! chunk starts at a chunk-aligned file offset even when a partition written
//! by the reference writer (8-byte padding) ends mid-page; only the last
//! chunk of such a partition is short and has an unaligned tail. Each chunk
//! is planned into [`ReadOp`]s: `O_DIRECT` reads for what is 4 KiB-aligned
//! (no page cache, no copy), buffered reads for unaligned heads and tails.
//!
//! Two engines run the plan behind one trait: [`uring::UringEngine`] (one
//! thread, a deep io_uring queue) and [`pread::PreadEngine`] (a thread pool
//! of blocking `pread`s). `--io-engine auto` picks io_uring where the kernel
//! allows it. Files on filesystems that refuse `O_DIRECT` (tmpfs) are read
//! buffered, whichever the engine.

pub mod pread;
pub mod uring;

use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use sllm_format::partitions::{FileStamp, Partitions};

use crate::pool::{ChunkLease, SharedChunk};

/// Alignment of `O_DIRECT` offsets, lengths and buffers: the largest logical
/// block size in common use, so it is right on every device.
pub const DIRECT_ALIGN: u64 = 4096;

/// Which engine to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    /// io_uring where the kernel allows it, else pread.
    Auto,
    IoUring,
    Pread,
}

/// A read failed; shared by everyone waiting on the chunk.
#[derive(Clone, Debug, thiserror::Error)]
pub enum IoError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        source: Arc<io::Error>,
    },
    #[error("reading {path} at offset {offset}: {source}")]
    Read {
        path: PathBuf,
        offset: u64,
        source: Arc<io::Error>,
    },
    #[error(
        "{path} ended early: expected {expected} bytes at offset {offset}, the file has fewer; \
         the partition was truncated after registration: re-create the model with \
         `sllm-store save --force`"
    )]
    Truncated {
        path: PathBuf,
        offset: u64,
        expected: usize,
    },
    #[error(
        "{path} changed on disk after the model was registered (re-saved, replaced or edited); \
         nothing was read from it: load the model again"
    )]
    Changed { path: PathBuf },
    #[error(
        "{path} is damaged: block {block} (file bytes {start}..{end}) has xxh3 {found}, \
         sllm_manifest.json says {expected}; nothing from it was copied to a device. Check the \
         disk (`sllm-store verify` names the damaged tensors), then re-create the model with \
         `sllm-store save --force`"
    )]
    Checksum {
        path: PathBuf,
        block: usize,
        start: u64,
        end: u64,
        expected: String,
        found: String,
    },
    #[error("the load was cancelled")]
    Cancelled,
    /// A streamed load's ring stayed full: no device took its chunks.
    #[error(
        "no device took the streamed chunks for {seconds} s ({held} chunks waiting in the ring): \
         a model larger than the pool (or than what the pool can spare) is streamed to the \
         devices that load it, not kept in host memory; follow LoadModelAsync(CPU) with \
         LoadModelAsync(GPU), or restart the daemon with a --mem-pool-size larger than the model"
    )]
    NotDrained { seconds: u64, held: usize },
    /// A streamed load found no free chunk in the pool for too long.
    #[error(
        "no chunk of the pool came free for {seconds} s while streaming: other loads and \
         copies hold it; load again when they finish, or raise --mem-pool-size"
    )]
    PoolBusy { seconds: u64 },
    /// A streamed load that no device read yet gave its chunks to another
    /// load that needed the pool (not a failure: the device request that
    /// follows reads the model again).
    #[error(
        "stopped reading ahead to let another load have the pool: no device had asked for \
         this model yet; its LoadModelAsync(GPU) reads it again"
    )]
    Yielded,
    /// The ring or the kernel failed (io_uring_enter, a short submission).
    #[error("the io engine failed: {0}")]
    Engine(String),
    /// A read plan that would reach outside its buffer or its files: a bug
    /// in the planning, refused before any byte is read.
    #[error("the io engine failed: {0}")]
    ReadPlan(#[from] ReadPlanError),
    /// A thread of the load died (`which`: "io", "checksum").
    #[error("the io engine failed: the {which} thread panicked")]
    Panicked { which: &'static str },
    /// An invariant of the load broke: a chunk outside the copy or the
    /// manifest's blocks. A bug, reported rather than absorbed.
    #[error("the io engine failed: {0}")]
    Invariant(String),
}

/// Why a chunk's read plan was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReadPlanError {
    #[error("chunk {chunk} holds {len} bytes but its buffer has {capacity}")]
    Overfull {
        chunk: usize,
        len: usize,
        capacity: usize,
    },
    #[error("chunk {chunk} reads partition {part}, which does not exist")]
    NoPartition { chunk: usize, part: usize },
    #[error(
        "chunk {chunk} reads {len} bytes at buffer offset {offset}, past its {capacity}-byte buffer"
    )]
    PastBuffer {
        chunk: usize,
        len: usize,
        offset: usize,
        capacity: usize,
    },
}

/// One open partition.
#[derive(Debug)]
pub struct PartFile {
    pub path: PathBuf,
    pub size: u64,
    /// Global offset of the partition's first byte.
    pub start: u64,
    /// Opened with `O_DIRECT`, when the filesystem accepts it.
    pub direct: Option<File>,
    pub buffered: File,
}

/// A model's partitions, opened for one load.
#[derive(Debug)]
pub struct ModelFiles {
    pub parts: Vec<PartFile>,
}

impl ModelFiles {
    /// Opens every partition, with `O_DIRECT` where the filesystem accepts it,
    /// and checks that each opened file is the one `partitions` describes
    /// ([`FileStamp`]): a partition replaced or rewritten since it was
    /// discovered fails with [`IoError::Changed`] before a byte is read, so a
    /// load never mixes two versions of a model's files.
    pub fn open(partitions: &Partitions) -> Result<Self, IoError> {
        let mut parts = Vec::with_capacity(partitions.len());
        for p in partitions.iter() {
            let open_err = |source: io::Error| IoError::Open {
                path: p.path.clone(),
                source: Arc::new(source),
            };
            // No symlink may stand where a partition was registered.
            let nofollow = rustix::fs::OFlags::NOFOLLOW.bits() as i32;
            let buffered = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(nofollow)
                .open(&p.path)
                .map_err(open_err)?;
            // Each open is by path: each must find the file discovered.
            let unchanged = |file: &File| -> Result<(), IoError> {
                match file.metadata() {
                    Ok(meta) if FileStamp::of(&meta) == p.stamp => Ok(()),
                    Ok(_) => Err(IoError::Changed {
                        path: p.path.clone(),
                    }),
                    Err(e) => Err(open_err(e)),
                }
            };
            unchanged(&buffered)?;
            let direct = match std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(nofollow | rustix::fs::OFlags::DIRECT.bits() as i32)
                .open(&p.path)
            {
                Ok(f) => {
                    unchanged(&f)?;
                    Some(f)
                }
                Err(e) => {
                    tracing::debug!(path = %p.path.display(), error = %e, "O_DIRECT refused; reading through the page cache");
                    None
                }
            };
            parts.push(PartFile {
                path: p.path.clone(),
                size: p.size,
                start: p.start,
                direct,
                buffered,
            });
        }
        Ok(Self { parts })
    }

    /// The model's size.
    pub fn total_size(&self) -> u64 {
        self.parts.last().map_or(0, |p| p.start + p.size)
    }
}

/// One read: `len` bytes of partition `part` at `file_offset` into the chunk
/// at `chunk_offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadOp {
    pub part: usize,
    pub direct: bool,
    pub file_offset: u64,
    pub chunk_offset: usize,
    pub len: usize,
}

/// Where one chunk of a model comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkSpan {
    pub part: usize,
    pub file_offset: u64,
    /// Global offset of the chunk's first byte.
    pub global_start: u64,
    pub len: usize,
}

impl ChunkSpan {
    /// One past the chunk's last global byte.
    pub fn global_end(&self) -> u64 {
        self.global_start + self.len as u64
    }
}

/// Cuts partitions of `sizes` (in order) into chunks of at most
/// `chunk_bytes`, the grid restarting at each partition.
pub fn chunk_spans(sizes: impl IntoIterator<Item = u64>, chunk_bytes: usize) -> Vec<ChunkSpan> {
    let mut spans = Vec::new();
    let mut global = 0u64;
    for (part, size) in sizes.into_iter().enumerate() {
        let mut file_offset = 0u64;
        while file_offset < size {
            let len = (size - file_offset).min(chunk_bytes as u64) as usize;
            spans.push(ChunkSpan {
                part,
                file_offset,
                global_start: global + file_offset,
                len,
            });
            file_offset += len as u64;
        }
        global += size;
    }
    spans
}

/// Plans the reads that fill one chunk (a page-aligned buffer), no read
/// longer than `max_io`.
pub fn plan_chunk(files: &ModelFiles, span: &ChunkSpan, max_io: usize) -> Vec<ReadOp> {
    let mut ops = Vec::new();
    let can_direct = files.parts[span.part].direct.is_some();
    plan_segment(
        span.part,
        can_direct,
        span.file_offset,
        0,
        span.len,
        max_io,
        &mut ops,
    );
    ops
}

/// Pairs each span with its lease (one per span, in order) and plans its
/// reads: the work list an engine's `run` takes.
pub fn chunk_reads(
    files: &ModelFiles,
    spans: &[ChunkSpan],
    leases: Vec<ChunkLease>,
    max_io: usize,
) -> Vec<ChunkRead> {
    debug_assert_eq!(spans.len(), leases.len());
    chunk_reads_from(files, spans, 0, leases, max_io)
}

/// The reads of chunks `first..first + leases.len()` of the model whose
/// chunks are `spans`, one lease each, numbered as chunks of the model.
pub fn chunk_reads_from(
    files: &ModelFiles,
    spans: &[ChunkSpan],
    first: usize,
    leases: Vec<ChunkLease>,
    max_io: usize,
) -> Vec<ChunkRead> {
    debug_assert!(first + leases.len() <= spans.len());
    spans[first..]
        .iter()
        .zip(leases)
        .enumerate()
        .map(|(i, (span, lease))| ChunkRead::plan(files, span, first + i, lease, max_io))
        .collect()
}

fn plan_segment(
    part: usize,
    can_direct: bool,
    file_offset: u64,
    chunk_offset: usize,
    len: usize,
    max_io: usize,
    ops: &mut Vec<ReadOp>,
) {
    let a = DIRECT_ALIGN;
    let mut push = |direct: bool, skip: usize, n: usize| {
        let mut done = 0;
        while done < n {
            let piece = (n - done).min(max_io);
            ops.push(ReadOp {
                part,
                direct,
                file_offset: file_offset + (skip + done) as u64,
                chunk_offset: chunk_offset + skip + done,
                len: piece,
            });
            done += piece;
        }
    };
    // Buffer and file offsets must share their misalignment to ever align.
    if !can_direct || file_offset % a != chunk_offset as u64 % a {
        push(false, 0, len);
        return;
    }
    let head = (((a - file_offset % a) % a) as usize).min(len);
    let body = (len - head) / a as usize * a as usize;
    let tail = len - head - body;
    push(false, 0, head);
    push(true, head, body);
    push(false, head + body, tail);
}

/// One chunk to fill.
#[derive(Debug)]
pub struct ChunkRead {
    /// The chunk's number within the model.
    pub chunk_no: usize,
    pub lease: ChunkLease,
    /// Bytes of the model in this chunk (the last chunk may be short).
    pub len: usize,
    pub ops: Vec<ReadOp>,
}

impl ChunkRead {
    /// The read of chunk `chunk_no` of a model, whose bytes are `span`,
    /// into `lease`.
    pub fn plan(
        files: &ModelFiles,
        span: &ChunkSpan,
        chunk_no: usize,
        lease: ChunkLease,
        max_io: usize,
    ) -> Self {
        ChunkRead {
            chunk_no,
            lease,
            len: span.len,
            ops: plan_chunk(files, span, max_io),
        }
    }

    /// Checks that a chunk's plan stays inside its buffer and names real
    /// partitions, so no read can reach outside the lease.
    pub fn check(&self, files: &ModelFiles) -> Result<(), ReadPlanError> {
        let (chunk, capacity) = (self.chunk_no, self.lease.capacity());
        if self.len > capacity {
            return Err(ReadPlanError::Overfull {
                chunk,
                len: self.len,
                capacity,
            });
        }
        for op in &self.ops {
            if op.part >= files.parts.len() {
                return Err(ReadPlanError::NoPartition {
                    chunk,
                    part: op.part,
                });
            }
            if op
                .chunk_offset
                .checked_add(op.len)
                .is_none_or(|end| end > capacity)
            {
                return Err(ReadPlanError::PastBuffer {
                    chunk,
                    len: op.len,
                    offset: op.chunk_offset,
                    capacity,
                });
            }
        }
        Ok(())
    }
}

/// Receives each chunk as it lands (or fails), in any order.
pub type Landed<'a> = dyn FnMut(usize, Result<SharedChunk, IoError>) + 'a;

/// What a [`ReadSource`] has for an engine.
#[derive(Debug)]
pub enum Next {
    /// A chunk to read now.
    Read(ChunkRead),
    /// Nothing yet; more will come (ask again, waiting, once nothing of
    /// this engine is in flight).
    NotYet,
    /// Nothing more.
    Done,
}

/// Where an engine's reads come from: all known up front (a `Vec`'s
/// iterator), or handed out as a streamed copy's ring makes room, so the
/// engine keeps the disk busy without waiting for a batch to finish.
pub trait ReadSource {
    /// The next read. With `wait`, never [`Next::NotYet`]: blocks until a
    /// read is ready or none will come (the source itself bounds the wait
    /// and honours cancellation).
    fn next_read(&mut self, wait: bool) -> Next;
}

impl ReadSource for std::vec::IntoIter<ChunkRead> {
    fn next_read(&mut self, _wait: bool) -> Next {
        self.next().map_or(Next::Done, Next::Read)
    }
}

/// Runs read plans.
pub trait IoEngine: Send + Sync {
    /// `io_uring` or `pread`.
    fn name(&self) -> &'static str;

    /// Fills every chunk `source` hands out and reports each to `landed`
    /// exactly once, on the calling thread. Asks the source for more while
    /// it has room, and waits on it only when nothing of its own is in
    /// flight. When `cancel` is set, reads not yet started are reported as
    /// [`IoError::Cancelled`] and the source is not asked again; reads in
    /// flight are waited for, so no buffer is released while the kernel may
    /// write it.
    fn run_source(
        &self,
        files: &ModelFiles,
        source: &mut dyn ReadSource,
        cancel: &AtomicBool,
        landed: &mut Landed<'_>,
    );

    /// [`run_source`](Self::run_source) over reads known up front; every
    /// chunk of `reads` is reported, those it never started as cancelled
    /// (or as the engine's failure).
    fn run(
        &self,
        files: &ModelFiles,
        reads: Vec<ChunkRead>,
        cancel: &AtomicBool,
        landed: &mut Landed<'_>,
    ) {
        let mut reads = reads.into_iter();
        self.run_source(files, &mut reads, cancel, landed);
        for read in reads {
            let error = if cancel.load(std::sync::atomic::Ordering::Relaxed) {
                IoError::Cancelled
            } else {
                IoError::Engine("the engine stopped before reading this chunk".into())
            };
            landed(read.chunk_no, Err(error));
        }
    }
}

/// Chooses the engine; returns it and, for `auto`, why.
pub fn make_engine(
    kind: EngineKind,
    threads: usize,
    queue_depth: u32,
) -> Result<(Arc<dyn IoEngine>, String), IoError> {
    let pread = || Arc::new(pread::PreadEngine::new(threads)) as Arc<dyn IoEngine>;
    match kind {
        EngineKind::Pread => Ok((pread(), "chosen with --io-engine pread".into())),
        EngineKind::IoUring => uring::UringEngine::probe(queue_depth)
            .map(|e| {
                (
                    Arc::new(e) as Arc<dyn IoEngine>,
                    "chosen with --io-engine io_uring".into(),
                )
            })
            .map_err(|e| {
                IoError::Engine(format!(
                    "io_uring is not available here: {e}; use --io-engine pread or auto"
                ))
            }),
        EngineKind::Auto => match uring::UringEngine::probe(queue_depth) {
            Ok(e) => Ok((Arc::new(e), "io_uring is available".into())),
            Err(e) => Ok((pread(), format!("io_uring refused ({e}); using pread"))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(sizes: &[u64], direct: bool) -> (tempfile::TempDir, ModelFiles) {
        let dir = tempfile::tempdir().unwrap();
        let mut parts = Vec::new();
        let mut start = 0;
        for (i, &size) in sizes.iter().enumerate() {
            let path = dir.path().join(format!("p{i}"));
            std::fs::write(&path, vec![0u8; size as usize]).unwrap();
            parts.push(PartFile {
                direct: direct.then(|| File::open(&path).unwrap()),
                buffered: File::open(&path).unwrap(),
                path,
                size,
                start,
            });
            start += size;
        }
        (dir, ModelFiles { parts })
    }

    fn covered(ops: &[ReadOp], len: usize) {
        let mut sorted = ops.to_vec();
        sorted.sort_by_key(|o| o.chunk_offset);
        let mut at = 0;
        for op in &sorted {
            assert_eq!(op.chunk_offset, at, "gap or overlap in {sorted:?}");
            at += op.len;
            if op.direct {
                assert_eq!(op.file_offset % DIRECT_ALIGN, 0);
                assert_eq!(op.chunk_offset as u64 % DIRECT_ALIGN, 0);
                assert_eq!(op.len as u64 % DIRECT_ALIGN, 0);
            }
        }
        assert_eq!(at, len);
    }

    fn plan_all(f: &ModelFiles, chunk: usize, max_io: usize) -> Vec<(ChunkSpan, Vec<ReadOp>)> {
        let sizes: Vec<u64> = f.parts.iter().map(|p| p.size).collect();
        chunk_spans(sizes, chunk)
            .into_iter()
            .map(|s| (s, plan_chunk(f, &s, max_io)))
            .collect()
    }

    #[test]
    fn aligned_partitions_read_direct() {
        let (_d, f) = files(&[16384, 8192], true);
        let plans = plan_all(&f, 8192, 4096);
        assert_eq!(plans.len(), 3);
        for (span, ops) in &plans {
            covered(ops, span.len);
            assert!(ops.iter().all(|o| o.direct && o.len == 4096));
        }
    }

    #[test]
    fn unaligned_partitions_only_have_buffered_tails() {
        // A reference-style first partition of 10000 bytes: the grid restarts
        // at the second partition, so it still reads direct.
        let (_d, f) = files(&[10000, 20000], true);
        let plans = plan_all(&f, 8192, 1 << 20);
        let spans: Vec<(usize, u64, u64, usize)> = plans
            .iter()
            .map(|(s, _)| (s.part, s.file_offset, s.global_start, s.len))
            .collect();
        assert_eq!(
            spans,
            [
                (0, 0, 0, 8192),
                (0, 8192, 8192, 1808),
                (1, 0, 10000, 8192),
                (1, 8192, 18192, 8192),
                (1, 16384, 26384, 3616)
            ]
        );
        for (span, ops) in &plans {
            covered(ops, span.len);
            let buffered: usize = ops.iter().filter(|o| !o.direct).map(|o| o.len).sum();
            assert_eq!(
                buffered,
                span.len % 4096,
                "only the unaligned tail is buffered: {ops:?}"
            );
        }
    }

    #[test]
    fn without_o_direct_everything_is_buffered() {
        let (_d, f) = files(&[5000, 7000], false);
        for (span, ops) in plan_all(&f, 8192, 4096) {
            covered(&ops, span.len);
            assert!(ops.iter().all(|o| !o.direct && o.len <= 4096));
        }
    }

    proptest::proptest! {
        #[test]
        fn plans_cover_every_byte_once(
            sizes in proptest::collection::vec(1u64..40_000, 1..5),
            chunk_kib in 1usize..16,
            max_io_kib in 1usize..9,
            direct in proptest::bool::ANY,
        ) {
            let (_d, f) = files(&sizes, direct);
            let plans = plan_all(&f, chunk_kib * 4096, max_io_kib * 4096);
            let mut global = 0u64;
            for (span, ops) in &plans {
                proptest::prop_assert_eq!(span.global_start, global, "spans tile the model");
                proptest::prop_assert!(span.len <= chunk_kib * 4096);
                covered(ops, span.len);
                global += span.len as u64;
            }
            proptest::prop_assert_eq!(global, f.total_size());
        }
    }
}
