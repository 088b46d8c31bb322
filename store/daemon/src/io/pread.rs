//! The pread engine: a pool of threads, each filling whole chunks with
//! blocking `pread`s. The fallback where io_uring is refused, and the
//! baseline the io_uring engine must beat.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{ChunkRead, IoEngine, IoError, Landed, ModelFiles, Next, ReadSource};
use crate::pool::SharedChunk;

/// Blocking reads on `threads` threads; chunks are taken in order, so the
/// first chunks of a model land first.
pub struct PreadEngine {
    threads: usize,
}

impl PreadEngine {
    pub fn new(threads: usize) -> Self {
        Self {
            threads: threads.max(1),
        }
    }
}

impl IoEngine for PreadEngine {
    fn name(&self) -> &'static str {
        "pread"
    }

    fn run_source(
        &self,
        files: &ModelFiles,
        source: &mut dyn ReadSource,
        cancel: &AtomicBool,
        landed: &mut Landed<'_>,
    ) {
        // Two reads per thread queued: a thread never idles for want of
        // work while the source has some.
        let depth = self.threads * 2;
        let (work_tx, work_rx) = crossbeam_channel::bounded::<ChunkRead>(depth);
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        std::thread::scope(|scope| {
            for _ in 0..self.threads {
                let (work_rx, done_tx) = (work_rx.clone(), done_tx.clone());
                scope.spawn(move || {
                    while let Ok(read) = work_rx.recv() {
                        let chunk_no = read.chunk_no;
                        let result = if cancel.load(Ordering::Relaxed) {
                            Err(IoError::Cancelled)
                        } else {
                            fill(files, read)
                        };
                        if done_tx.send((chunk_no, result)).is_err() {
                            return;
                        }
                    }
                });
            }
            drop(done_tx);
            let mut in_flight = 0usize;
            let mut source_done = false;
            loop {
                while !source_done && in_flight < depth && !cancel.load(Ordering::Relaxed) {
                    match source.next_read(in_flight == 0) {
                        Next::Read(read) => {
                            if let Err(unsent) = work_tx.send(read) {
                                // No worker is left (they only stop with the
                                // channel); never drop a chunk unreported.
                                let read = unsent.into_inner();
                                landed(read.chunk_no, Err(IoError::Panicked { which: "io" }));
                                continue;
                            }
                            in_flight += 1;
                        }
                        Next::NotYet => break,
                        Next::Done => source_done = true,
                    }
                }
                if in_flight == 0 {
                    break;
                }
                match done_rx.recv() {
                    Ok((chunk_no, result)) => {
                        in_flight -= 1;
                        landed(chunk_no, result);
                    }
                    Err(_) => break,
                }
            }
            drop(work_tx);
        });
    }
}

/// Runs one chunk's reads in order.
fn fill(files: &ModelFiles, mut read: ChunkRead) -> Result<SharedChunk, IoError> {
    read.check(files)?;
    let buf = read.lease.as_mut_slice();
    for op in &read.ops {
        let part = &files.parts[op.part];
        let file = match (&part.direct, op.direct) {
            (Some(direct), true) => direct,
            _ => &part.buffered,
        };
        let dst = &mut buf[op.chunk_offset..op.chunk_offset + op.len];
        file.read_exact_at(dst, op.file_offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                IoError::Truncated {
                    path: part.path.clone(),
                    offset: op.file_offset,
                    expected: op.len,
                }
            } else {
                IoError::Read {
                    path: part.path.clone(),
                    offset: op.file_offset,
                    source: Arc::new(e),
                }
            }
        })?;
    }
    Ok(read.lease.freeze(read.len))
}
