//! The host memory pool: one large mapping made at start-up, cut into
//! fixed-size chunks that models lease while they are in host memory.
//!
//! The mapping is anonymous, backed by huge pages where the kernel has them
//! reserved (`MAP_HUGETLB`), else advised for transparent huge pages; its
//! pages are touched in parallel at start-up so no load pays for page faults,
//! and it is `mlock`ed when `RLIMIT_MEMLOCK` allows. The CUDA backend
//! additionally registers it with the driver (page-locked for DMA).
//!
//! Ownership is the safety story (one of the three rooms allowed `unsafe`):
//! - a [`ChunkLease`] is the only handle to a chunk's bytes; the free list
//!   hands each chunk to at most one lease at a time;
//! - a lease is mutable while an I/O fills it, then frozen into a
//!   [`SharedChunk`] (`Arc`) that readers (device copies) may share but no one
//!   may write;
//! - dropping the last handle returns the chunk to the free list; the mapping
//!   outlives every lease because each lease holds the pool's `Arc`.

#![allow(
    unsafe_code,
    reason = "the pinned pool: chunk slices over one mapping, and its page-locking; every block says why it is sound"
)]

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use memmap2::{Advice, MmapMut, MmapOptions};

/// Smallest chunk accepted: one page, the unit of `O_DIRECT`.
pub const MIN_CHUNK_BYTES: usize = 4096;
/// Largest chunk accepted.
pub const MAX_CHUNK_BYTES: usize = 1 << 30;
/// Explicit huge page size tried first (2 MiB, `MAP_HUGETLB`).
const HUGE_PAGE_BITS: u8 = 21;

/// The pool could not be created.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(
        "chunk size {} must be a multiple of 4096 bytes between 4KiB and 1GiB; set \
         --chunk-size (or $SLLM_CHUNK_SIZE), e.g. 32MB",
        shown(*.0)
    )]
    BadChunkSize(usize),
    #[error(
        "pool size {} is smaller than one chunk ({}); raise --mem-pool-size \
         (or $MEM_POOL_SIZE) or lower --chunk-size",
        shown(*pool), shown(*chunk)
    )]
    TooSmall { pool: usize, chunk: usize },
    #[error(
        "cannot reserve {} of host memory for the pool: {source}; lower \
         --mem-pool-size (or $MEM_POOL_SIZE) to fit the machine's free memory",
        shown(*bytes)
    )]
    Map {
        bytes: usize,
        source: std::io::Error,
    },
}

/// A size in words, with the byte count where the unit rounds it.
fn shown(bytes: usize) -> String {
    let words = sllm_format::units::human_bytes(bytes as u64);
    if bytes.is_multiple_of(1 << 10) {
        words
    } else {
        format!("{words} ({bytes} bytes)")
    }
}

/// How the pool's memory was obtained, for the start-up log and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolBacking {
    /// Explicit 2 MiB huge pages (`MAP_HUGETLB`).
    pub hugetlb: bool,
    /// Locked in RAM with `mlock`.
    pub locked: bool,
}

struct PoolInner {
    /// Owns the mapping; never accessed through `&`/`&mut` after start-up,
    /// only through `base` by leases.
    _map: MmapMut,
    base: *mut u8,
    chunk_bytes: usize,
    chunks: usize,
    free: Mutex<Vec<usize>>,
    /// Notified whenever a chunk returns to the free list.
    returned: Condvar,
}

// SAFETY: `base` points into `_map`, which lives as long as the inner pool.
// Distinct chunks are disjoint byte ranges, and each chunk is reachable only
// through the lease that owns it (exclusive while mutable, shared read-only
// once frozen), so sharing the pool between threads creates no data race.
unsafe impl Send for PoolInner {}
// SAFETY: as above; the free list is behind a mutex.
unsafe impl Sync for PoolInner {}

/// The pool. Cheap to clone (an `Arc`).
#[derive(Clone)]
pub struct HostPool {
    inner: Arc<PoolInner>,
    backing: PoolBacking,
}

impl std::fmt::Debug for HostPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostPool")
            .field("chunks", &self.inner.chunks)
            .field("chunk_bytes", &self.inner.chunk_bytes)
            .field("free", &self.free_chunks())
            .finish()
    }
}

impl HostPool {
    /// Maps `pool_bytes` (rounded down to whole chunks) and touches every page
    /// with `threads` threads.
    pub fn new(pool_bytes: usize, chunk_bytes: usize, threads: usize) -> Result<Self, PoolError> {
        if !(MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(&chunk_bytes)
            || !chunk_bytes.is_multiple_of(MIN_CHUNK_BYTES)
        {
            return Err(PoolError::BadChunkSize(chunk_bytes));
        }
        let chunks = pool_bytes / chunk_bytes;
        if chunks == 0 {
            return Err(PoolError::TooSmall {
                pool: pool_bytes,
                chunk: chunk_bytes,
            });
        }
        let bytes = chunks * chunk_bytes;
        let huge = bytes
            .is_multiple_of(1 << HUGE_PAGE_BITS)
            .then(|| {
                MmapOptions::new()
                    .len(bytes)
                    .huge(Some(HUGE_PAGE_BITS))
                    .map_anon()
                    .ok()
            })
            .flatten();
        let hugetlb = huge.is_some();
        let mut map = match huge {
            Some(map) => map,
            None => MmapOptions::new()
                .len(bytes)
                .map_anon()
                .map_err(|source| PoolError::Map { bytes, source })?,
        };
        if !hugetlb {
            // Advice only: fewer TLB misses for multi-GiB copies when granted.
            let _ = map.advise(Advice::HugePage);
        }
        touch_pages(&mut map, threads.max(1));
        let locked = match map.lock() {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %e, "pool not mlocked (RLIMIT_MEMLOCK); it may be swapped under pressure");
                false
            }
        };
        let base = map.as_mut_ptr();
        // Hand out low chunks first: pop() takes from the end.
        let free = (0..chunks).rev().collect();
        Ok(Self {
            inner: Arc::new(PoolInner {
                _map: map,
                base,
                chunk_bytes,
                chunks,
                free: Mutex::new(free),
                returned: Condvar::new(),
            }),
            backing: PoolBacking { hugetlb, locked },
        })
    }

    /// Bytes per chunk.
    pub fn chunk_bytes(&self) -> usize {
        self.inner.chunk_bytes
    }

    /// Number of chunks.
    pub fn total_chunks(&self) -> usize {
        self.inner.chunks
    }

    /// Pool size in bytes (whole chunks).
    pub fn total_bytes(&self) -> usize {
        self.inner.chunks * self.inner.chunk_bytes
    }

    /// Chunks not leased right now.
    pub fn free_chunks(&self) -> usize {
        crate::lock(&self.inner.free).len()
    }

    /// How the memory was obtained.
    pub fn backing(&self) -> PoolBacking {
        self.backing
    }

    /// The whole mapping, for registering it with a device driver or the
    /// kernel. Callers must not read or write through it.
    pub fn region(&self) -> (*mut u8, usize) {
        (self.inner.base, self.total_bytes())
    }

    /// Leases `n` chunks, all or none.
    pub fn try_lease(&self, n: usize) -> Option<Vec<ChunkLease>> {
        let mut free = crate::lock(&self.inner.free);
        if free.len() < n {
            return None;
        }
        let at = free.len() - n;
        let mut indices: Vec<usize> = free.drain(at..).collect();
        indices.reverse();
        drop(free);
        Some(
            indices
                .into_iter()
                .map(|index| ChunkLease {
                    pool: Arc::clone(&self.inner),
                    index,
                })
                .collect(),
        )
    }

    /// Waits at most `timeout` for chunks to return while fewer than `n`
    /// are free.
    pub fn wait_for_free(&self, n: usize, timeout: Duration) {
        let free = crate::lock(&self.inner.free);
        if free.len() < n {
            drop(crate::wait(&self.inner.returned, free, Some(timeout)));
        }
    }
}

/// Writes one byte per page so every page is faulted in now, in parallel.
fn touch_pages(map: &mut MmapMut, threads: usize) {
    const PAGE: usize = 4096;
    let per_thread = map.len().div_ceil(threads).next_multiple_of(PAGE);
    std::thread::scope(|scope| {
        for part in map.chunks_mut(per_thread) {
            scope.spawn(move || {
                for page in part.chunks_mut(PAGE) {
                    page[0] = 0;
                }
            });
        }
    });
}

/// Exclusive, writable ownership of one chunk.
pub struct ChunkLease {
    pool: Arc<PoolInner>,
    index: usize,
}

impl std::fmt::Debug for ChunkLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChunkLease({})", self.index)
    }
}

impl ChunkLease {
    /// The chunk's number in the pool.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The chunk's size in bytes.
    pub fn capacity(&self) -> usize {
        self.pool.chunk_bytes
    }

    fn ptr(&self) -> *mut u8 {
        // SAFETY: index < chunks, so the offset stays inside the mapping.
        unsafe { self.pool.base.add(self.index * self.pool.chunk_bytes) }
    }

    /// The chunk's bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the free list gave chunk `index` to this lease alone, the
        // range lies inside the live mapping, and `&mut self` makes this the
        // only reference for its lifetime.
        unsafe { std::slice::from_raw_parts_mut(self.ptr(), self.pool.chunk_bytes) }
    }

    /// The chunk's bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: as in `as_mut_slice`; `&self` only allows shared reads.
        unsafe { std::slice::from_raw_parts(self.ptr(), self.pool.chunk_bytes) }
    }

    /// Start of the chunk, for an I/O engine that hands it to the kernel.
    /// The caller must keep the lease alive and untouched until the kernel
    /// is done writing.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr()
    }

    /// Freezes the chunk's first `len` bytes: readable by many, writable by none.
    pub fn freeze(self, len: usize) -> SharedChunk {
        assert!(
            len <= self.capacity(),
            "frozen length {len} exceeds the chunk"
        );
        Arc::new(FrozenChunk { lease: self, len })
    }
}

impl Drop for ChunkLease {
    fn drop(&mut self) {
        crate::lock(&self.pool.free).push(self.index);
        self.pool.returned.notify_all();
    }
}

/// A chunk whose bytes have landed; shared read-only.
pub type SharedChunk = Arc<FrozenChunk>;

/// The landed bytes of a chunk.
#[derive(Debug)]
pub struct FrozenChunk {
    lease: ChunkLease,
    len: usize,
}

impl FrozenChunk {
    /// The landed bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.lease.as_slice()[..self.len]
    }

    /// The chunk's number in the pool.
    pub fn index(&self) -> usize {
        self.lease.index()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_all_or_none_and_return_on_drop() {
        let pool = HostPool::new(10 * 4096 + 100, 4096, 2).unwrap();
        assert_eq!(pool.total_chunks(), 10);
        let mut a = pool.try_lease(7).unwrap();
        assert!(pool.try_lease(4).is_none());
        assert_eq!(pool.free_chunks(), 3);
        a[0].as_mut_slice().fill(7);
        let frozen = a.remove(0).freeze(100);
        assert!(frozen.bytes().iter().all(|&b| b == 7));
        assert_eq!(frozen.bytes().len(), 100);
        let copy = Arc::clone(&frozen);
        drop(a);
        assert_eq!(pool.free_chunks(), 9);
        drop(frozen);
        assert_eq!(pool.free_chunks(), 9, "a clone still holds the chunk");
        drop(copy);
        assert_eq!(pool.free_chunks(), 10);
    }

    #[test]
    fn chunks_are_disjoint() {
        let pool = HostPool::new(4 * 8192, 8192, 1).unwrap();
        let mut leases = pool.try_lease(4).unwrap();
        for (i, l) in leases.iter_mut().enumerate() {
            l.as_mut_slice().fill(i as u8);
        }
        for (i, l) in leases.iter().enumerate() {
            assert!(l.as_slice().iter().all(|&b| b == i as u8));
        }
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(
            HostPool::new(1 << 20, 1000, 1),
            Err(PoolError::BadChunkSize(1000))
        ));
        assert!(matches!(
            HostPool::new(4096, 8192, 1),
            Err(PoolError::TooSmall { .. })
        ));
        let e = HostPool::new(1 << 20, 3 << 30, 1).unwrap_err().to_string();
        assert!(e.contains("--chunk-size"), "{e}");
    }
}
