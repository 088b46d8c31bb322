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
    let out = Command::new("python3")
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "client/python/tests",
        ])
        .current_dir(root)
        .env("SLLM_STORE_BIN", env!("CARGO_BIN_EXE_sllm-store"))
        .env("PYTHONPATH", root.join("client/python"))
        .output()
        .expect("python3 runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pytest failed:\n{text}");
    println!("{text}");
}
