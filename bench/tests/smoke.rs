//! A smoke run of `sllm-bench load` at a tiny size: every scenario runs
//! (fio, both engines, the reference pool, the Python peers, the daemon end
//! to end, the ceilings, pool start-up) and the results are written. It
//! checks behaviour, not speed: figures from a run this small mean nothing.

use std::path::PathBuf;
use std::process::Command;

#[test]
#[ignore = "slow tier (fio, both engines, the peers, the daemon): cargo test -- --include-ignored"]
fn load_benchmark_runs_every_scenario_and_writes_results() {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_sllm-bench"));
    let store = bench.with_file_name("sllm-store");
    assert!(
        store.is_file(),
        "{} not built: run `cargo build -p sllm-store` first",
        store.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let out = Command::new(&bench)
        .args([
            "load",
            "--quick",
            "--size",
            "8MiB",
            "--runs",
            "1",
            "--pool-startup",
            "64MiB",
        ])
        .arg("--dir")
        .arg(dir.path().join("data"))
        .arg("--json")
        .arg(&json)
        .arg("--sllm-store")
        .arg(&store)
        .args(["--device", "host"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sllm-bench load failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let names: Vec<String> = results["scenarios"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            format!(
                "{} ({})",
                s["name"].as_str().unwrap(),
                s["cache"].as_str().unwrap()
            )
        })
        .collect();
    for wanted in [
        "limit: fio",
        "sllm io_uring engine (cold)",
        "sllm pread engine (cold)",
        "ServerlessLLM-style pread pool (cold)",
        "mmap + copy (buffered) (cold)",
        "Python safetensors to CPU (cold)",
        "daemon end to end (host) (cold)",
        "daemon end to end (host) (warm)",
        "memcpy of the same bytes (warm)",
        "pwrite into a /dev/shm file (warm)",
    ] {
        assert!(
            names.iter().any(|n| n.starts_with(wanted)),
            "{wanted} missing from {names:?}"
        );
    }
    for s in results["scenarios"].as_array().unwrap() {
        let wall = s["median_wall_s"].as_f64().unwrap();
        assert!(wall > 0.0 && wall.is_finite(), "{s}");
    }
    let targets = results["targets"].as_array().unwrap();
    assert!(targets.len() >= 5, "{targets:?}");
    let startup = results["pool_startup"].as_array().unwrap();
    assert!(startup.iter().any(|p| p["pool_bytes"] == 64 << 20));
    assert!(
        startup
            .iter()
            .all(|p| p["median_s"].as_f64().unwrap() > 0.0)
    );
    assert_eq!(results["model_bytes"].as_u64().map(|b| b > 0), Some(true));
    let md = std::fs::read_to_string(json.with_extension("md")).unwrap();
    assert!(md.contains("| scenario |") && md.contains("## Targets"));
}
