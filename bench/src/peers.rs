//! The Python peers (`bench/peers.py`), run as subprocesses: buffered
//! mmap-and-copy (what safetensors does underneath) and the `safetensors`
//! package itself loading the source checkpoint to CPU.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::report::Sample;

/// What a peer reported.
#[derive(Debug, Deserialize)]
pub struct PeerRun {
    pub wall_s: f64,
    pub cpu_s: f64,
    /// Bytes the peer ended up holding.
    pub bytes: u64,
}

impl PeerRun {
    pub fn sample(&self) -> Sample {
        Sample {
            wall_s: self.wall_s,
            cpu_s: self.cpu_s,
        }
    }
}

/// Why the Python peers cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    let ok = Command::new("python3")
        .args(["-c", "import numpy, safetensors"])
        .output()
        .is_ok_and(|o| o.status.success());
    (!ok).then(|| {
        "python3 with numpy and safetensors is needed: `python3 -m pip install numpy safetensors`"
            .to_owned()
    })
}

/// Runs peer `mode` (`mmap-copy` or `safetensors`) over `files`.
pub fn run(mode: &str, files: &[PathBuf]) -> anyhow::Result<PeerRun> {
    let out = crate::scripts::PEERS
        .run(std::iter::once(mode.as_ref()).chain(files.iter().map(|f| f.as_os_str())))?;
    if !out.status.success() {
        bail!(
            "the {mode} peer failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let run: PeerRun = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("reading the {mode} peer's report"))?;
    anyhow::ensure!(run.bytes > 0, "the {mode} peer read nothing");
    Ok(run)
}
