//! Disk-to-memory loads measured in this process: our two engines exactly
//! as the daemon drives them (pool chunks, read plans, `IoEngine::run`), a
//! pread thread pool shaped like ServerlessLLM's loader (4 threads, one
//! 32 MB `O_DIRECT` pread per chunk), and a plain memcpy of the same bytes.
//! Buffers are allocated and faulted in before the clock starts.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{Context, bail};
use serde::Serialize;
use sllm_daemon::io::{EngineKind, ModelFiles, chunk_reads, chunk_spans, make_engine};
use sllm_daemon::pool::HostPool;
use sllm_format::partitions::Partitions;

use crate::report::{Sample, self_cpu_s};

/// Settings of one run of our engine.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct EngineSettings {
    pub engine: &'static str,
    /// pread threads (io_uring uses one thread whatever this says).
    pub threads: usize,
    /// io_uring reads in flight.
    pub queue_depth: u32,
    pub chunk_bytes: usize,
    pub io_bytes: usize,
}

impl EngineSettings {
    /// The daemon's defaults for `engine` (`sllm-store start --help`).
    pub fn daemon_default(engine: &'static str) -> Self {
        Self {
            engine,
            threads: 4,
            queue_depth: 64,
            chunk_bytes: 32 << 20,
            io_bytes: 4 << 20,
        }
    }
}

impl std::fmt::Display for EngineSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: usize| b >> 20;
        match self.engine {
            "pread" => write!(
                f,
                "pread threads={} chunk={}MiB io={}MiB",
                self.threads,
                mib(self.chunk_bytes),
                mib(self.io_bytes)
            ),
            _ => write!(
                f,
                "io_uring depth={} chunk={}MiB io={}MiB",
                self.queue_depth,
                mib(self.chunk_bytes),
                mib(self.io_bytes)
            ),
        }
    }
}

/// Reads the model in `model_dir` into a fresh pool with our engine.
pub fn our_engine(model_dir: &Path, s: EngineSettings) -> anyhow::Result<Sample> {
    let kind = match s.engine {
        "pread" => EngineKind::Pread,
        _ => EngineKind::IoUring,
    };
    let partitions = Partitions::discover(model_dir)
        .with_context(|| format!("listing the partitions of {}", model_dir.display()))?;
    let sizes: Vec<u64> = partitions.iter().map(|p| p.size).collect();
    let spans = chunk_spans(sizes, s.chunk_bytes);
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
    let pool = HostPool::new(spans.len().max(1) * s.chunk_bytes, s.chunk_bytes, threads)?;
    let (engine, _) = make_engine(kind, s.threads, s.queue_depth)?;
    let leases = pool
        .try_lease(spans.len())
        .context("the benchmark's pool is too small")?;

    let cpu = self_cpu_s();
    let start = Instant::now();
    let files = ModelFiles::open(&partitions)?;
    let reads = chunk_reads(&files, &spans, leases, s.io_bytes);
    let mut landed = Vec::with_capacity(spans.len());
    let mut failure = None;
    engine.run(
        &files,
        reads,
        &AtomicBool::new(false),
        &mut |_, r| match r {
            Ok(chunk) => landed.push(chunk),
            Err(e) => failure = Some(e),
        },
    );
    let sample = Sample {
        wall_s: start.elapsed().as_secs_f64(),
        cpu_s: self_cpu_s() - cpu,
    };
    if let Some(e) = failure {
        bail!("{s}: {e}");
    }
    let bytes: usize = landed.iter().map(|c| c.bytes().len()).sum();
    anyhow::ensure!(
        bytes as u64 == files.total_size(),
        "{s}: {bytes} of {} bytes landed",
        files.total_size()
    );
    Ok(sample)
}

/// ServerlessLLM's loader, reduced to its I/O: `threads` threads take
/// `chunk`-sized pieces of each partition in order and fill each with
/// `O_DIRECT` preads into one preallocated buffer.
pub fn reference_pread_pool(
    files: &[std::path::PathBuf],
    threads: usize,
    chunk: usize,
) -> anyhow::Result<Sample> {
    const ALIGN: usize = 4096;
    let mut opened = Vec::new();
    let mut pieces = Vec::new(); // (file, offset, len rounded up for O_DIRECT)
    for path in files {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(path)
            .with_context(|| format!("opening {} with O_DIRECT", path.display()))?;
        let size = file.metadata()?.len() as usize;
        for offset in (0..size).step_by(chunk) {
            let len = (size - offset).min(chunk).next_multiple_of(ALIGN);
            pieces.push((opened.len(), offset as u64, len));
        }
        opened.push(file);
    }
    let mut buffer = memmap2::MmapMut::map_anon(pieces.len().max(1) * chunk)?;
    for page in buffer.chunks_mut(ALIGN) {
        page[0] = 1;
    }
    let work: Vec<_> = pieces.iter().zip(buffer.chunks_mut(chunk)).collect();
    let work = Mutex::new(work.into_iter());
    let failure = Mutex::new(None);

    let cpu = self_cpu_s();
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let Some((&(file, offset, len), buf)) = work.lock().expect("work").next()
                    else {
                        return;
                    };
                    if let Err(e) = read_fully(&opened[file], &mut buf[..len], offset) {
                        *failure.lock().expect("failure") = Some(e);
                        return;
                    }
                }
            });
        }
    });
    let sample = Sample {
        wall_s: start.elapsed().as_secs_f64(),
        cpu_s: self_cpu_s() - cpu,
    };
    if let Some(e) = failure.into_inner().expect("failure") {
        bail!("reference pread pool: {e}");
    }
    Ok(sample)
}

/// Reads until `buf` is full or the file ends (a short last `O_DIRECT` read).
fn read_fully(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => return Ok(()),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One single-threaded memcpy of `bytes` between two faulted-in buffers:
/// the host backend's warm-load ceiling.
pub fn memcpy(bytes: usize) -> Sample {
    let src = vec![1u8; bytes];
    let mut dst = vec![2u8; bytes];
    let cpu = self_cpu_s();
    let start = Instant::now();
    dst.copy_from_slice(&src);
    let wall_s = start.elapsed().as_secs_f64();
    std::hint::black_box(&dst);
    Sample {
        wall_s,
        cpu_s: self_cpu_s() - cpu,
    }
}

/// `pwrite`s of `bytes` from a faulted-in buffer into a written-once file
/// in `dir` (tmpfs: the host backend's destination), in 32 MiB pieces, one
/// thread: the host backend's own ceiling, below memcpy because the kernel
/// copies page by page under the file's lock.
pub fn pwrite_shm(bytes: usize, dir: &Path) -> anyhow::Result<Sample> {
    const PIECE: usize = 32 << 20;
    let file = tempfile::tempfile_in(dir)
        .with_context(|| format!("creating a file in {}", dir.display()))?;
    rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, bytes as u64)
        .with_context(|| format!("allocating {bytes} bytes in {}", dir.display()))?;
    // Written once before the clock starts, as the client writes its
    // buffers (client/src/shm.rs): resident, like cudaMalloc'd memory.
    let zeros = vec![0u8; PIECE.min(bytes)];
    for offset in (0..bytes).step_by(PIECE) {
        file.write_all_at(&zeros[..PIECE.min(bytes - offset)], offset as u64)?;
    }
    let src = vec![1u8; PIECE.min(bytes)];
    let cpu = self_cpu_s();
    let start = Instant::now();
    for offset in (0..bytes).step_by(PIECE) {
        let len = PIECE.min(bytes - offset);
        file.write_all_at(&src[..len], offset as u64)?;
    }
    Ok(Sample {
        wall_s: start.elapsed().as_secs_f64(),
        cpu_s: self_cpu_s() - cpu,
    })
}
