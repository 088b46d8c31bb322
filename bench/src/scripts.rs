//! The Python helpers the benchmarks run (`bench/peers.py`,
//! `bench/gpu/h2d.py`), embedded in the binary: a copied or installed
//! `sllm-bench` runs from any directory, with no path into its source tree.

use std::process::{Command, Output};

use anyhow::Context;

/// The Python peers: buffered mmap + copy, and `safetensors` to CPU.
pub const PEERS: Script = Script {
    name: "peers.py",
    source: include_str!("../peers.py"),
};

/// The PCIe link's ceiling: pinned host-to-device copies with torch.
pub const H2D: Script = Script {
    name: "h2d.py",
    source: include_str!("../gpu/h2d.py"),
};

/// A Python script carried in the binary.
pub struct Script {
    pub name: &'static str,
    pub source: &'static str,
}

impl Script {
    /// Runs `python3 <script> <args>` from a temporary copy, which is
    /// removed when it ends.
    pub fn run<I, S>(&self, args: I) -> anyhow::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let dir = tempfile::tempdir().context("a temporary directory for the Python helper")?;
        let path = dir.path().join(self.name);
        std::fs::write(&path, self.source)
            .with_context(|| format!("writing {}", path.display()))?;
        Command::new("python3")
            .arg(&path)
            .args(args)
            .output()
            .with_context(|| format!("running python3 {}", self.name))
    }
}
