//! Models larger than the pool through the real daemon: loaded byte-exactly
//! with `sllm-store load --verify` while the daemon's memory stays at the
//! pool's size, a client that dies before its device request (the pool is
//! freed for others at once, and for all after the drain timeout), and a
//! SIGTERM in the middle of a stream.

use std::path::Path;
use std::time::{Duration, Instant};

use sllm_convert::synth::{SynthSpec, write_synthetic};

use crate::common::*;

/// A 64 MiB pool in 8 MiB chunks: the manifest's 32 MiB checksum blocks
/// need a ring of six, which leaves two chunks to keep.
const POOL: &[&str] = &["--mem-pool-size", "64MiB", "--chunk-size", "8MiB"];

/// Saves a synthetic model of about `bytes` as `org/big`, and removes its
/// source so that the tests, run side by side, hold each big model on disk
/// once (CI's disk can be nearly full).
fn save_big(home: &Path, storage: &Path, bytes: u64) {
    let src = home.join("src");
    write_synthetic(
        &src,
        &SynthSpec {
            target_bytes: bytes,
            shards: 2,
            seed: 5,
        },
    )
    .unwrap();
    run_ok(
        sllm_store(home)
            .args(["save", "--model", "org/big", "--local-model-path"])
            .arg(&src)
            .arg("--storage-path")
            .arg(storage),
    );
    std::fs::remove_dir_all(&src).unwrap();
}

/// Saves `org/small`, 3 MiB: it fits in the pool.
fn save_small(home: &Path, storage: &Path) {
    save_model(home, storage, "org/small", &tensors_of(3 << 20, 2), "1MiB");
}

/// `sllm-store load --verify` of `model` succeeds.
fn load_verified(daemon: &Daemon, home: &Path, storage: &Path, model: &str) {
    let out = run_ok(load_cmd(home, storage, &daemon.addr, model).args(["--verify", "--json"]));
    assert!(out.contains("\"verified\":true"), "{out}");
}

async fn wait_status(
    daemon: &Daemon,
    what: &str,
    mut done: impl FnMut(&sllm_proto::GetModelStatusResponse) -> bool,
) -> sllm_proto::GetModelStatusResponse {
    let mut client = daemon.client().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = client.model_status("org/big").await.unwrap();
        if done(&st) {
            return st;
        }
        assert!(Instant::now() < deadline, "{what}: not within 30 s: {st:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn a_model_four_times_the_pool_loads_byte_exactly_and_the_daemon_stays_at_the_pool() {
    let tmp = tempfile::tempdir().unwrap();
    let storage = tmp.path().join("models");
    save_big(tmp.path(), &storage, 256 << 20);
    let daemon = Daemon::start(tmp.path(), &storage, POOL);
    let before = rss_bytes(daemon.child.id());
    for run in ["cold", "with the kept prefix"] {
        let out = run_ok(
            load_cmd(tmp.path(), &storage, &daemon.addr, "org/big").args(["--verify", "--json"]),
        );
        let report: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(report["verified"], true, "{run}: {out}");
        assert_eq!(report["streamed"], true, "{run}: {out}");
        assert!(
            report["model_size"].as_u64().unwrap() > 4 * (64 << 20) - (16 << 20),
            "{out}"
        );
    }
    let grown = rss_bytes(daemon.child.id()).saturating_sub(before);
    assert!(
        grown < 24 << 20,
        "the daemon grew by {grown} bytes streaming 4x its pool"
    );
    let log = daemon.log_text();
    assert!(log.contains("streaming through the pool"), "{log}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let st = rt.block_on(wait_status(&daemon, "a kept prefix", |st| st.streamed));
    // The kept prefix, and the last chunk (left for a request that would
    // copy on from it).
    assert!(
        st.resident_bytes > 16 << 20 && st.resident_bytes <= 24 << 20,
        "{st:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_dies_before_its_device_request_frees_the_pool_after_the_drain_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let storage = tmp.path().join("models");
    save_big(tmp.path(), &storage, 96 << 20);
    let mut extra = POOL.to_vec();
    extra.extend(["--stream-drain-timeout", "1"]);
    let daemon = Daemon::start(tmp.path(), &storage, &extra);
    {
        let mut client = daemon.client().await;
        client.load_to_host("org/big").await.unwrap();
        // The client goes away without a LoadModelAsync(GPU).
    }
    // The failure shows first; the chunks go back once the load's thread
    // has ended (a moment later, longer on a busy machine).
    let st = wait_status(&daemon, "the stream to fail and let go of the pool", |st| {
        !st.error.is_empty() && st.resident_bytes == 0
    })
    .await;
    for needle in ["no device took", "LoadModelAsync(GPU)", "--mem-pool-size"] {
        assert!(st.error.contains(needle), "{needle:?} in {}", st.error);
    }
    // The pool is whole again: a model that fits loads whole.
    save_small(tmp.path(), &storage);
    load_verified(&daemon, tmp.path(), &storage, "org/small");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_dies_before_its_device_request_does_not_hold_up_other_models() {
    let tmp = tempfile::tempdir().unwrap();
    let storage = tmp.path().join("models");
    save_big(tmp.path(), &storage, 96 << 20);
    save_small(tmp.path(), &storage);
    // The default drain timeout: minutes.
    let daemon = Daemon::start(tmp.path(), &storage, POOL);
    {
        let mut client = daemon.client().await;
        client.load_to_host("org/big").await.unwrap();
    }
    wait_status(&daemon, "the abandoned stream's ring to fill", |st| {
        st.resident_bytes >= 56 << 20
    })
    .await;
    let started = Instant::now();
    load_verified(&daemon, tmp.path(), &storage, "org/small");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "waited {:?} for a stream no device reads",
        started.elapsed()
    );
    let log = daemon.log_text();
    assert!(log.contains("a stream no device reads yet"), "{log}");
    // The abandoned model is no failure: it loads when asked.
    load_verified(&daemon, tmp.path(), &storage, "org/big");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_in_the_middle_of_a_stream_stops_the_daemon_promptly() {
    let tmp = tempfile::tempdir().unwrap();
    let storage = tmp.path().join("models");
    save_big(tmp.path(), &storage, 96 << 20);
    let mut daemon = Daemon::start(tmp.path(), &storage, POOL);
    let mut client = daemon.client().await;
    client.load_to_host("org/big").await.unwrap();
    // The ring fills and waits for a device that never asks.
    wait_status(&daemon, "chunks in the ring", |st| st.chunks_landed > 1).await;
    let started = Instant::now();
    let status = daemon.terminate(15).expect("the daemon stops on SIGTERM");
    assert!(status.success(), "{status:?}: {}", daemon.log_text());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
}
