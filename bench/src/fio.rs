//! The disk's limit: raw `O_DIRECT` sequential reads of the model's own
//! partition files by fio, with its io_uring and psync engines at a few block
//! sizes and queue depths (shared/DESIGN.md section 7). The fastest setting
//! is the limit every load is compared with.
//!
//! Buffers matter as much as the engine: `O_DIRECT` pins the buffer's pages
//! for every read, and on some machines (this project's VMs) reads into 4 KiB
//! pages run at a half or a third of reads into 2 MiB huge pages. Our pool
//! uses huge pages, so the limit is measured with fio's huge-page buffers
//! too (`--iomem=shmhuge`, for which huge pages are reserved for the run, as
//! root, and given back after).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use serde::Serialize;

use crate::report::Sample;

/// One fio setting.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct FioJob {
    pub engine: &'static str,
    pub block: &'static str,
    /// Reads in flight (io_uring only; psync has one).
    pub depth: u32,
    /// fio's buffer memory: `malloc` (4 KiB pages) or `shmhuge` (2 MiB).
    pub iomem: &'static str,
}

impl std::fmt::Display for FioJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} bs={} depth={} mem={}",
            self.engine, self.block, self.depth, self.iomem
        )
    }
}

/// Huge pages reserved for fio's largest buffer (16 MiB x 64), plus slack.
const HUGE_PAGES_FOR_FIO: u64 = 16 * 64 / 2 + 16;
const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// The settings tried to find the limit; huge-page buffers only where huge
/// pages can be reserved. `quick`: two settings with 4 KiB buffers, for
/// smoke runs (the limit it finds may be low).
pub fn grid(quick: bool) -> Vec<FioJob> {
    if quick {
        return ["io_uring", "psync"]
            .into_iter()
            .map(|engine| FioJob {
                engine,
                block: "4M",
                depth: if engine == "psync" { 1 } else { 16 },
                iomem: "malloc",
            })
            .collect();
    }
    let iomems: &[&'static str] = if HugePages::reserve().is_some() {
        &["malloc", "shmhuge"]
    } else {
        tracing::warn!("cannot reserve huge pages (needs root): fio runs with 4 KiB buffers only");
        &["malloc"]
    };
    let mut jobs = Vec::new();
    for &iomem in iomems {
        for block in ["1M", "4M", "16M"] {
            for depth in [4, 16, 64] {
                jobs.push(FioJob {
                    engine: "io_uring",
                    block,
                    depth,
                    iomem,
                });
            }
            jobs.push(FioJob {
                engine: "psync",
                block,
                depth: 1,
                iomem,
            });
        }
    }
    jobs
}

/// Huge pages added to the system's reserve for one fio run; the reserve
/// is put back when dropped.
struct HugePages {
    before: u64,
}

impl HugePages {
    fn reserve() -> Option<Self> {
        let before: u64 = std::fs::read_to_string(NR_HUGEPAGES)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let wanted = before + HUGE_PAGES_FOR_FIO;
        std::fs::write(NR_HUGEPAGES, wanted.to_string()).ok()?;
        let got: u64 = std::fs::read_to_string(NR_HUGEPAGES)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let guard = Self { before };
        (got >= wanted).then_some(guard)
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, self.before.to_string());
    }
}

/// fio's path; installs it with apt-get when missing and allowed (root).
pub fn ensure_fio() -> anyhow::Result<PathBuf> {
    if let Some(path) = which("fio") {
        return Ok(path);
    }
    if rustix::process::geteuid().is_root() && which("apt-get").is_some() {
        tracing::info!("fio is missing; installing it with apt-get");
        let ok = Command::new("sh")
            .arg("-c")
            .arg("apt-get install -y -q fio >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q fio >/dev/null 2>&1)")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success());
        if ok && let Some(path) = which("fio") {
            return Ok(path);
        }
    }
    bail!(
        "fio is not installed and could not be installed here; install it (`apt-get install fio`, \
         `dnf install fio`) and run the benchmark again"
    )
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
}

/// Reads every file in `files`, in order, once with `job`; the time and CPU
/// fio reports, scaled to `total_bytes` (fio skips a partial last block).
pub fn run(fio: &Path, job: FioJob, files: &[PathBuf], total_bytes: u64) -> anyhow::Result<Sample> {
    let names: Vec<String> = files
        .iter()
        .map(|f| f.display().to_string().replace(':', "\\:"))
        .collect();
    let _huge = match job.iomem {
        "shmhuge" => Some(HugePages::reserve().context("reserving huge pages for fio")?),
        _ => None,
    };
    let mut cmd = Command::new(fio);
    cmd.args([
        "--name=limit",
        "--rw=read",
        "--direct=1",
        "--invalidate=1",
        "--file_service_type=sequential",
        "--output-format=json",
    ])
    .arg(format!("--ioengine={}", job.engine))
    .arg(format!("--bs={}", job.block))
    .arg(format!("--iomem={}", job.iomem))
    .arg(format!("--filename={}", names.join(":")));
    if job.engine != "psync" {
        cmd.arg(format!("--iodepth={}", job.depth));
    }
    let out = cmd
        .output()
        .with_context(|| format!("running {}", fio.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "fio ({job}) failed: {}{}",
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // fio skips each file's partial last block.
    let block: u64 = job
        .block
        .parse::<sllm_format::units::ByteSize>()
        .map_or(16 << 20, |b| b.bytes());
    let at_least = total_bytes.saturating_sub(block * files.len() as u64);
    parse(&stdout, total_bytes, at_least).with_context(|| format!("reading fio's report ({job})"))
}

fn parse(stdout: &str, total_bytes: u64, at_least: u64) -> anyhow::Result<Sample> {
    // fio may print notes before its JSON.
    let json = &stdout[stdout.find('{').context("no JSON in fio's output")?..];
    let value: serde_json::Value = serde_json::from_str(json)?;
    let job = &value["jobs"][0];
    let read = &job["read"];
    let io_bytes = read["io_bytes"].as_f64().context("no read.io_bytes")?;
    let runtime_s = read["runtime"].as_f64().context("no read.runtime")? / 1000.0;
    anyhow::ensure!(io_bytes > 0.0 && runtime_s > 0.0, "fio read nothing");
    anyhow::ensure!(
        io_bytes >= at_least as f64,
        "fio read {io_bytes} of {total_bytes} bytes"
    );
    let cpu_pct = job["usr_cpu"].as_f64().unwrap_or(0.0) + job["sys_cpu"].as_f64().unwrap_or(0.0);
    let scale = total_bytes as f64 / io_bytes;
    Ok(Sample {
        wall_s: runtime_s * scale,
        cpu_s: cpu_pct / 100.0 * runtime_s * scale,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fio_json_after_a_note() {
        let out = "note: both iodepth >= 1 and synchronous I/O engine are selected\n{\"jobs\": [{\"usr_cpu\": 1.5, \"sys_cpu\": 8.5, \"read\": {\"io_bytes\": 2147483648, \"runtime\": 1000}}]}";
        let s = parse(out, 2 << 30, 1 << 30).unwrap();
        assert!((s.wall_s - 1.0).abs() < 1e-9);
        assert!((s.cpu_s - 0.1).abs() < 1e-9);
        assert!(
            parse(
                "{\"jobs\": [{\"read\": {\"io_bytes\": 0, \"runtime\": 0}}]}",
                1,
                0
            )
            .is_err()
        );
        assert!(parse(out, 4 << 30, 3 << 30).is_err(), "read too little");
    }
}
