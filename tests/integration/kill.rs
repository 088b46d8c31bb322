//! A save killed part-way leaves no model at the final path, and the next
//! save cleans up what it left and succeeds. A save interrupted (Ctrl-C,
//! SIGTERM) removes its partial copy itself and says so.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use sllm_convert::synth::{SynthSpec, write_synthetic};

use crate::common::*;

/// Bytes written so far into any staging partition under `storage`.
fn staged_bytes(storage: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(storage.join(".sllm-staging")) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| std::fs::metadata(e.path().join("tensor.data_0")).ok())
        .map(|m| m.len())
        .sum()
}

/// A 96 MiB synthetic checkpoint at `home/src`: large enough that a save
/// can be stopped part-way.
fn big_source(home: &Path, seed: u64) -> std::path::PathBuf {
    let src = home.join("src");
    write_synthetic(
        &src,
        &SynthSpec {
            target_bytes: 96 << 20,
            shards: 2,
            seed,
        },
    )
    .unwrap();
    src
}

/// Waits until the save `child` has written into its staging directory
/// under `storage`, and is still running (to be stopped part-way).
fn wait_until_staging(storage: &Path, child: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while staged_bytes(storage) == 0 {
        assert!(Instant::now() < deadline, "the save never started writing");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the save ended before it could be stopped"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_killed_save_leaves_nothing_and_the_next_one_cleans_up() {
    let tmp = tempfile::tempdir().unwrap();
    let src = big_source(tmp.path(), 3);
    let storage = tmp.path().join("models");
    let target = storage.join("org/killed");
    let save = || {
        let mut cmd = sllm_store(tmp.path());
        cmd.args(["save", "--model", "org/killed", "--local-model-path"])
            .arg(&src)
            .arg("--storage-path")
            .arg(&storage)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    };

    let mut child = save().spawn().unwrap();
    wait_until_staging(&storage, &mut child);
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(9),
        "killed part-way, not finished: {status:?}"
    );
    assert!(!target.exists(), "a killed save must not publish");
    assert!(
        staged_bytes(&storage) > 0,
        "the killed save left its staging directory"
    );

    run_ok(&mut save());
    assert!(target.join("tensor_index.json").exists());
    let left = std::fs::read_dir(storage.join(".sllm-staging"))
        .unwrap()
        .count();
    assert_eq!(left, 0, "the second save removed the leftovers");
    run_ok(
        sllm_store(tmp.path())
            .args(["verify", "org/killed", "--storage-path"])
            .arg(&storage),
    );
}

#[test]
fn an_interrupted_save_removes_its_partial_copy_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let src = big_source(tmp.path(), 4);
    let storage = tmp.path().join("models");
    // 128 + the signal's number, as a shell reports it.
    for (signal, code) in [
        (rustix::process::Signal::INT, 130),
        (rustix::process::Signal::TERM, 143),
    ] {
        let mut child = sllm_store(tmp.path())
            .args(["save", "--model", "org/stopped", "--local-model-path"])
            .arg(&src)
            .arg("--storage-path")
            .arg(&storage)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_until_staging(&storage, &mut child);
        let pid = rustix::process::Pid::from_child(&child);
        rustix::process::kill_process(pid, signal).unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{signal:?}: {stderr}");
        assert!(
            stderr.contains("interrupted; nothing was saved"),
            "{stderr}"
        );
        assert!(!storage.join("org/stopped").exists(), "nothing published");
        let left: Vec<_> = std::fs::read_dir(storage.join(".sllm-staging"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "the partial copy is gone: {left:?}");
    }
}
