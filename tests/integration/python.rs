//! The Python client's pytest suite (client/python/tests), run against this
//! build's `sllm-store`, so that `cargo test --workspace` is the one test
//! command for the whole project.

use std::path::Path;
use std::process::Command;

#[test]
fn python_client_suite() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root");
    let deps = Command::new("python3")
        .args([
            "-c",
            "import pytest, grpc, google.protobuf, numpy, ml_dtypes",
        ])
        .status();
    assert!(
        matches!(deps, Ok(s) if s.success()),
        "the Python client's test dependencies are missing: run \
         `python3 -m pip install -e 'client/python[test]'` (CI does)"
    );
    pytest(Path::new("python3"), root, "client/python/tests");
}

/// Runs the pytest files under `dir` (relative to the workspace `root`)
/// with `python`, against this build's `sllm-store`; panics with the tail
/// of pytest's output if any fails.
pub fn pytest(python: &Path, root: &Path, dir: &str) {
    let out = Command::new(python)
        // No cache, and no temporary directories kept after the run
        // (pytest keeps its last three by default: hundreds of MiB here).
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .args(["-o", "tmp_path_retention_policy=none", dir])
        .current_dir(root)
        .env("SLLM_STORE_BIN", env!("CARGO_BIN_EXE_sllm-store"))
        .env("PYTHONPATH", root.join("client/python"))
        .output()
        .unwrap_or_else(|e| panic!("{} runs: {e}", python.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let skip = text.chars().count().saturating_sub(20_000);
    let tail: String = text.chars().skip(skip).collect();
    assert!(out.status.success(), "pytest {dir} failed:\n{tail}");
    println!("pytest {dir}: {}", text.lines().last().unwrap_or_default());
}
