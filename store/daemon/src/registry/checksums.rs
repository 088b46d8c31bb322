//! Checking a model's bytes against its manifest as they are read from disk.
//!
//! The manifest holds an xxh3-64 checksum per block of every partition
//! ([`BlockSums`]); the pool holds the model in chunks. Both grids restart
//! at each partition, but their sizes may differ, so a block may span several
//! chunks and a chunk several blocks. The rule is the same either way:
//! - a block is hashed as soon as every chunk it overlaps has landed;
//! - a chunk is published to replicas only once every block it overlaps has
//!   matched. A block that does not match fails every chunk it overlaps, so
//!   nothing from it is ever copied to a device.
//!
//! Hashing runs on a [`HashPool`] shared by all loads, off the io thread, so
//! it overlaps the reads still in flight.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};

use crossbeam_channel::{Receiver, Sender};
use sllm_format::manifest::checksum_hex;
use xxhash_rust::xxh3::Xxh3;

use super::on_disk::BlockSums;
use crate::io::{ChunkSpan, IoError};
use crate::lock;
use crate::pool::SharedChunk;

type Job = Box<dyn FnOnce() + Send>;

/// Threads that hash blocks for every load of the daemon. Cloning shares
/// the threads; they end when the last clone is dropped.
#[derive(Clone)]
pub struct HashPool {
    jobs: Sender<Job>,
}

impl HashPool {
    /// Starts `threads` hashing threads (at least one).
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let threads = threads.max(1);
        let (jobs, rx) = crossbeam_channel::unbounded::<Job>();
        for _ in 0..threads {
            let rx: Receiver<Job> = rx.clone();
            std::thread::Builder::new()
                .name("sllm-hash".into())
                .spawn(move || {
                    for job in rx {
                        // A job that panics must not take the thread (and
                        // every later load's hashing) with it; the job's
                        // own guards settle what it leaves.
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                    }
                })?;
        }
        Ok(Self { jobs })
    }

    fn submit(&self, job: Job) {
        // The threads live as long as any sender: a send cannot fail while
        // `self` exists.
        let _ = self.jobs.send(job);
    }
}

/// What a chunk's arrival or a block's verdict releases: chunks to publish
/// (or fail), and blocks now ready to hash.
#[derive(Default)]
pub struct Released {
    pub chunks: Vec<(usize, Result<SharedChunk, IoError>)>,
    pub blocks: Vec<usize>,
}

/// One load's check.
pub struct LoadCheck {
    sums: Arc<BlockSums>,
    spans: Arc<[ChunkSpan]>,
    partition_paths: Vec<PathBuf>,
    /// Global block number -> (partition, block in partition).
    blocks: Vec<(usize, usize)>,
    /// Chunk -> its blocks (global numbers).
    chunk_blocks: Vec<Range<usize>>,
    /// Block -> the chunks it overlaps.
    block_chunks: Vec<Range<usize>>,
    pool: HashPool,
    state: Mutex<State>,
    idle: Condvar,
}

struct State {
    /// Landed chunks waiting for their blocks' verdicts.
    held: Vec<Option<SharedChunk>>,
    /// Per chunk: blocks not yet matched.
    blocks_unmatched: Vec<usize>,
    /// Per block: chunks not yet landed.
    chunks_missing: Vec<usize>,
    /// Blocks being hashed.
    hashing: usize,
}

impl LoadCheck {
    /// A check of the chunks `spans` against `sums`; `partition_paths` name
    /// the files in errors. The partitions must agree with the manifest
    /// (sizes and block counts), as [`super::on_disk::OnDisk`] ensures.
    pub fn new(
        sums: Arc<BlockSums>,
        spans: Arc<[ChunkSpan]>,
        partition_paths: Vec<PathBuf>,
        pool: HashPool,
    ) -> Self {
        let block_bytes = sums.block_bytes;
        let mut blocks = Vec::new();
        let mut first_block = Vec::with_capacity(sums.partitions.len());
        for (p, list) in sums.partitions.iter().enumerate() {
            first_block.push(blocks.len());
            blocks.extend((0..list.len()).map(|b| (p, b)));
        }
        let chunk_blocks: Vec<Range<usize>> = spans
            .iter()
            .map(|s| {
                let base = first_block.get(s.part).copied().unwrap_or(blocks.len());
                let first = (s.file_offset / block_bytes) as usize;
                let last = ((s.file_offset + s.len as u64 - 1) / block_bytes) as usize;
                (base + first).min(blocks.len())..(base + last + 1).min(blocks.len())
            })
            .collect();
        // Chunks are in global order, so each block's chunks are a range.
        let mut block_chunks = vec![0..0; blocks.len()];
        for (c, range) in chunk_blocks.iter().enumerate() {
            for b in range.clone() {
                let r = &mut block_chunks[b];
                // An end of 0 means no chunk yet: a set range ends past chunk 0.
                *r = if r.end == 0 { c..c + 1 } else { r.start..c + 1 };
            }
        }
        let state = State {
            held: vec![None; spans.len()],
            blocks_unmatched: chunk_blocks.iter().map(|r| r.len()).collect(),
            chunks_missing: block_chunks.iter().map(|r| r.len()).collect(),
            hashing: 0,
        };
        Self {
            sums,
            spans,
            partition_paths,
            blocks,
            chunk_blocks,
            block_chunks,
            pool,
            state: Mutex::new(state),
            idle: Condvar::new(),
        }
    }

    /// A chunk landed (or failed) on the io thread. Failures pass through at
    /// once; a landed chunk is held until its blocks match.
    pub fn land(&self, chunk_no: usize, result: Result<SharedChunk, IoError>) -> Released {
        let mut out = Released::default();
        let chunk = match result {
            Ok(chunk) => chunk,
            Err(e) => {
                out.chunks.push((chunk_no, Err(e)));
                return out;
            }
        };
        let Some(blocks) = self.chunk_blocks.get(chunk_no).cloned() else {
            out.chunks.push((chunk_no, Ok(chunk)));
            return out;
        };
        if blocks.is_empty() {
            // Bytes the manifest has no block for; cannot happen once the
            // partitions agree with it, and never published unchecked.
            out.chunks.push((
                chunk_no,
                Err(IoError::Invariant(format!(
                    "chunk {chunk_no} lies outside the manifest's checksum blocks"
                ))),
            ));
            return out;
        }
        let mut state = lock(&self.state);
        state.held[chunk_no] = Some(chunk);
        for b in blocks {
            state.chunks_missing[b] -= 1;
            if state.chunks_missing[b] == 0 {
                state.hashing += 1;
                out.blocks.push(b);
            }
        }
        out
    }

    /// Hashes block `b` (every chunk it overlaps has landed) and hands
    /// `settle` the chunks it decides: matched chunks once all their blocks
    /// matched, every chunk of a block that does not match as failed. The
    /// block counts as hashed (for [`finish`](Self::finish)) only once they
    /// are settled.
    pub fn hash_block(
        &self,
        b: usize,
        settle: &mut dyn FnMut(usize, Result<SharedChunk, IoError>),
    ) {
        // Counts the block as done however this returns, a panic included,
        // so that `finish` never waits forever.
        let _done = BlockDone(self);
        let (p, in_part) = self.blocks[b];
        let block_bytes = self.sums.block_bytes;
        let block_start = in_part as u64 * block_bytes;
        let chunks: Vec<(usize, SharedChunk)> = {
            let state = lock(&self.state);
            self.block_chunks[b]
                .clone()
                .filter_map(|c| state.held[c].clone().map(|chunk| (c, chunk)))
                .collect()
        };
        let mut hasher = Xxh3::new();
        let mut block_end = block_start;
        for (c, chunk) in &chunks {
            let span = &self.spans[*c];
            let from = block_start.max(span.file_offset);
            let to = (block_start + block_bytes).min(span.file_offset + span.len as u64);
            let bytes = chunk.bytes();
            let lo = (from - span.file_offset) as usize;
            let hi = ((to - span.file_offset) as usize).min(bytes.len());
            hasher.update(&bytes[lo.min(hi)..hi]);
            block_end = block_end.max(to);
        }
        drop(chunks);
        let found = hasher.digest();
        let expected = self.sums.partitions[p][in_part];

        let mut decided = Vec::new();
        let mut state = lock(&self.state);
        for c in self.block_chunks[b].clone() {
            if found == expected {
                state.blocks_unmatched[c] -= 1;
                if state.blocks_unmatched[c] == 0
                    && let Some(chunk) = state.held[c].take()
                {
                    decided.push((c, Ok(chunk)));
                }
            } else if state.held[c].take().is_some() {
                decided.push((
                    c,
                    Err(IoError::Checksum {
                        path: self.partition_paths[p].clone(),
                        block: in_part,
                        start: block_start,
                        end: block_end,
                        expected: checksum_hex(expected),
                        found: checksum_hex(found),
                    }),
                ));
            }
        }
        drop(state);
        for (c, result) in decided {
            settle(c, result);
        }
    }

    /// Gives up on block `b` without hashing it (the load is being
    /// cancelled or has failed): its chunks stay held, and
    /// [`finish`](Self::finish) fails them.
    pub fn skip_block(&self, _b: usize) {
        drop(BlockDone(self));
    }

    /// Waits for the blocks being hashed, then fails the chunks still held:
    /// a block of theirs never completed because another of its chunks
    /// failed to land. Call once every chunk has been handed to
    /// [`land`](Self::land).
    pub fn finish(&self, why: IoError) -> Released {
        let mut state = lock(&self.state);
        while state.hashing > 0 {
            state = crate::wait(&self.idle, state, None);
        }
        let mut out = Released::default();
        for (c, held) in state.held.iter_mut().enumerate() {
            if held.take().is_some() {
                out.chunks.push((c, Err(why.clone())));
            }
        }
        out
    }

    /// The end of the chunks, from `next` on, that must all land before the
    /// first block of chunk `next` can be hashed: a stream leases them
    /// together, so that it never holds part of a block while it waits for
    /// the pool (two streams doing so could wait for each other).
    pub fn block_end(&self, next: usize) -> usize {
        self.chunk_blocks
            .get(next)
            .and_then(|blocks| self.block_chunks.get(blocks.start))
            .map_or(next + 1, |chunks| chunks.end.max(next + 1))
    }

    /// The chunks before `first` that share a checksum block with chunk
    /// `first`: a copy that starts with chunks `..first` already resident
    /// lands these again, so that those blocks can be hashed whole.
    pub fn chunks_sharing_blocks_with(&self, first: usize) -> Range<usize> {
        let Some(blocks) = self.chunk_blocks.get(first) else {
            return 0..0;
        };
        let start = blocks
            .clone()
            .map(|b| self.block_chunks[b].start)
            .min()
            .unwrap_or(first);
        start.min(first)..first
    }

    /// Submits `job` to the hashing threads.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) {
        self.pool.submit(Box::new(job));
    }
}

/// Marks one block's hashing as over when dropped.
struct BlockDone<'a>(&'a LoadCheck);

impl Drop for BlockDone<'_> {
    fn drop(&mut self) {
        lock(&self.0.state).hashing -= 1;
        self.0.idle.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::chunk_spans;
    use crate::pool::HostPool;
    use sllm_format::manifest::checksum;

    /// Lands every chunk of `data` (one partition per slice) through a
    /// check with the given grid sizes, running hashes inline; returns each
    /// chunk's outcome by number.
    fn run(
        data: &[Vec<u8>],
        chunk: usize,
        block: u64,
        damage: Option<(usize, usize)>,
        order: &[usize],
    ) -> Vec<Option<Result<Vec<u8>, String>>> {
        let sums = BlockSums {
            block_bytes: block,
            partitions: data
                .iter()
                .map(|d| d.chunks(block as usize).map(checksum).collect())
                .collect(),
        };
        let spans: Arc<[ChunkSpan]> =
            chunk_spans(data.iter().map(|d| d.len() as u64), chunk).into();
        let pool = HostPool::new(spans.len() * chunk, chunk, 1).unwrap();
        let paths = (0..data.len())
            .map(|p| PathBuf::from(format!("tensor.data_{p}")))
            .collect();
        let check = LoadCheck::new(
            Arc::new(sums),
            Arc::clone(&spans),
            paths,
            HashPool::new(1).unwrap(),
        );
        let mut leases: Vec<_> = pool
            .try_lease(spans.len())
            .unwrap()
            .into_iter()
            .map(Some)
            .collect();
        let mut outcome = vec![None; spans.len()];
        let mut record = |released: Released, pending: &mut Vec<usize>| {
            for (c, r) in released.chunks {
                assert!(outcome[c].is_none(), "chunk {c} released twice");
                outcome[c] = Some(r.map(|ch| ch.bytes().to_vec()).map_err(|e| e.to_string()));
            }
            pending.extend(released.blocks);
        };
        let mut pending = Vec::new();
        for &c in order {
            let span = spans[c];
            let mut lease = leases[c].take().unwrap();
            let src = &data[span.part][span.file_offset as usize..][..span.len];
            lease.as_mut_slice()[..span.len].copy_from_slice(src);
            if damage == Some((span.part, span.file_offset as usize)) {
                lease.as_mut_slice()[0] ^= 1;
            }
            record(check.land(c, Ok(lease.freeze(span.len))), &mut pending);
            while let Some(b) = pending.pop() {
                let mut decided = Released::default();
                check.hash_block(b, &mut |c, r| decided.chunks.push((c, r)));
                record(decided, &mut pending);
            }
        }
        record(check.finish(IoError::Cancelled), &mut pending);
        outcome
    }

    fn model() -> Vec<Vec<u8>> {
        (0..3u32)
            .map(|p| {
                (0..(10_000 + p * 3000))
                    .map(|i| (i * 7 + p) as u8)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn every_chunk_is_published_whole_whatever_the_grids_and_the_order() {
        let data = model();
        for (chunk, block) in [
            (4096, 4096),
            (4096, 8192),
            (8192, 4096),
            (12288, 8192),
            (4096, 1 << 20),
        ] {
            let n = chunk_spans(data.iter().map(|d| d.len() as u64), chunk).len();
            let forward: Vec<usize> = (0..n).collect();
            let backward: Vec<usize> = (0..n).rev().collect();
            for order in [forward, backward] {
                let out = run(&data, chunk, block as u64, None, &order);
                let spans = chunk_spans(data.iter().map(|d| d.len() as u64), chunk);
                for (c, span) in spans.iter().enumerate() {
                    let want = &data[span.part][span.file_offset as usize..][..span.len];
                    assert_eq!(
                        out[c].as_ref().unwrap().as_ref().unwrap(),
                        want,
                        "chunk {c} ({chunk}/{block})"
                    );
                }
            }
        }
    }

    #[test]
    fn a_damaged_block_fails_exactly_the_chunks_it_overlaps() {
        let data = model();
        // Chunks of 4096, blocks of 8192: damage in partition 1 at 8192
        // (block 1 of that partition) fails its two chunks only.
        let n = chunk_spans(data.iter().map(|d| d.len() as u64), 4096).len();
        let out = run(
            &data,
            4096,
            8192,
            Some((1, 8192)),
            &(0..n).collect::<Vec<_>>(),
        );
        let spans = chunk_spans(data.iter().map(|d| d.len() as u64), 4096);
        for (c, span) in spans.iter().enumerate() {
            let r = out[c].as_ref().unwrap();
            if span.part == 1 && (8192..16384).contains(&span.file_offset) {
                let e = r.as_ref().unwrap_err();
                assert!(
                    e.contains("tensor.data_1 is damaged: block 1 (file bytes 8192..13000)"),
                    "{e}"
                );
            } else {
                assert!(r.is_ok(), "chunk {c}: {r:?}");
            }
        }
        // Chunks larger than blocks: the one chunk holding the bad block fails.
        let n = chunk_spans(data.iter().map(|d| d.len() as u64), 12288).len();
        let out = run(
            &data,
            12288,
            4096,
            Some((0, 0)),
            &(0..n).collect::<Vec<_>>(),
        );
        assert!(out[0].as_ref().unwrap().is_err());
        assert!(out[1..].iter().all(|r| r.as_ref().unwrap().is_ok()));
    }

    #[test]
    fn chunks_whose_block_never_completes_fail_with_the_reason_given() {
        let data = model();
        // Blocks of 8192 over chunks of 4096: land only the first chunk.
        let out = run(&data, 4096, 8192, None, &[0]);
        assert_eq!(
            out[0].as_ref().unwrap().as_ref().unwrap_err(),
            "the load was cancelled"
        );
        assert!(out[1..].iter().all(Option::is_none));
    }
}
