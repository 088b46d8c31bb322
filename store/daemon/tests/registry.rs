//! The registry in-process: a small pool, the pread engine and the host
//! backend over a temporary directory, models written by the store's own
//! writer. What the integration tests reach only through the binary, checked
//! here directly: eviction order, the limits, replica retention, a model
//! changed under a load, and the abort paths.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{CHUNK, Fixture, copy, me, runtime};
use sllm_daemon::registry::{HostState, Limits, RegistryError};

#[test]
fn the_least_recently_used_idle_model_is_evicted_first() {
    // Room for two models of two chunks each.
    let f = Fixture::new(4, Limits::default());
    for (name, fill) in [("o/a", 1), ("o/b", 2), ("o/c", 3)] {
        f.write(name, 2 * CHUNK - 100, fill);
    }
    // A copy becomes evictable once its io thread has let go of it, a
    // moment after it reads as loaded: give each that moment, so the choice
    // below is between two idle copies.
    let settle = || std::thread::sleep(Duration::from_millis(200));
    f.load_to_host("o/a");
    f.load_to_host("o/b");
    f.load_to_host("o/a"); // used again: b is now the least recently used
    settle();
    f.load_to_host("o/c");
    assert_eq!(f.state("o/a"), HostState::Loaded);
    assert_eq!(f.state("o/b"), HostState::NotLoaded);
    assert_eq!(f.state("o/c"), HostState::Loaded);
}

#[test]
fn every_request_limit_is_enforced_before_any_work() {
    let limits = Limits {
        max_copies_per_request: 3,
        max_handles_per_device: 2,
        ..Limits::default()
    };
    let f = Fixture::new(4, limits);
    f.write("o/m", 10_000, 7);
    f.load_to_host("o/m");
    let (_p, h) = f.buffer("b", 10_000);
    let expect = |r: Result<(), RegistryError>, needle: &str| {
        let e = r.expect_err(needle);
        assert!(e.to_string().contains(needle), "{needle:?} in {e}");
    };
    // Too many copies in one request.
    expect(
        f.start_with("o/m", "r1", vec![copy(0, 10, 0); 4], vec![h.clone()]),
        "4 copies in one request; the limit is 3",
    );
    // Too many handles for one device.
    expect(
        f.start_with(
            "o/m",
            "r2",
            vec![copy(0, 10, 0)],
            vec![h.clone(), h.clone(), h.clone()],
        ),
        "3 handles for device",
    );
    // A replica id out of bounds.
    expect(
        f.start_with("o/m", "", vec![copy(0, 10, 0)], vec![h.clone()]),
        "replica_uuid must be 1 to 128 characters",
    );
    expect(
        f.start_with(
            "o/m",
            &"r".repeat(129),
            vec![copy(0, 10, 0)],
            vec![h.clone()],
        ),
        "replica_uuid must be 1 to 128 characters",
    );
    // No copies at all.
    expect(
        f.registry
            .load_to_devices("o/m", "r3", HashMap::new(), HashMap::new(), &me()),
        "lists no copies",
    );
    // Beyond the model, beyond the buffer.
    expect(
        f.start_with("o/m", "r4", vec![copy(1 << 20, 2_000, 0)], vec![h.clone()]),
        "o/m",
    );
    expect(
        f.start_with("o/m", "r5", vec![copy(0, 100, 9_950)], vec![h.clone()]),
        "outside buffer 0",
    );
    // An unknown device.
    let e = f
        .registry
        .load_to_devices(
            "o/m",
            "r6",
            HashMap::from([("no-such-gpu".to_owned(), vec![copy(0, 10, 0)])]),
            HashMap::from([("no-such-gpu".to_owned(), vec![h.clone()])]),
            &me(),
        )
        .unwrap_err();
    assert!(matches!(e, RegistryError::UnknownDevice { .. }), "{e}");
    // None of these left a replica behind.
    assert_eq!(f.registry.status("o/m").unwrap().replicas_copying, 0);
    // And a good request still works.
    f.start_with("o/m", "ok", vec![copy(0, 10_000, 0)], vec![h])
        .unwrap();
    runtime().block_on(f.registry.confirm("o/m", "ok")).unwrap();
}

#[test]
fn replicas_at_once_are_bounded() {
    let limits = Limits {
        max_active_replicas: 0,
        ..Limits::default()
    };
    let f = Fixture::new(4, limits);
    f.write("o/m", 10_000, 7);
    f.load_to_host("o/m");
    let e = f.start_replica("o/m", "r", 10_000).unwrap_err();
    assert!(matches!(e, RegistryError::TooManyReplicas(0)), "{e}");
    assert!(e.to_string().contains("retry when some finish"), "{e}");
}

#[test]
fn bytes_at_once_are_bounded() {
    let limits = Limits {
        max_active_copy_bytes: 5_000,
        ..Limits::default()
    };
    let f = Fixture::new(4, limits);
    f.write("o/m", 10_000, 7);
    f.load_to_host("o/m");
    let e = f.start_replica("o/m", "r", 10_000).unwrap_err();
    assert!(matches!(e, RegistryError::TooMuchWork { .. }), "{e}");
    // Within the bound: fine.
    let (path, h) = f.buffer("small", 4_000);
    f.start_with("o/m", "small", vec![copy(0, 4_000, 0)], vec![h])
        .unwrap();
    runtime()
        .block_on(f.registry.confirm("o/m", "small"))
        .unwrap();
    assert_eq!(std::fs::read(path).unwrap(), vec![7u8; 4_000]);
}

#[test]
fn pieces_at_once_are_bounded() {
    let limits = Limits {
        max_active_pieces: 2,
        ..Limits::default()
    };
    let f = Fixture::new(4, limits);
    f.write("o/m", 3 * CHUNK, 7);
    f.load_to_host("o/m");
    // Three chunks: three pieces, over the bound of two.
    let e = f.start_replica("o/m", "r", 3 * CHUNK).unwrap_err();
    assert!(matches!(e, RegistryError::TooMuchWork { .. }), "{e}");
    assert!(e.to_string().contains("2 pieces"), "{e}");
    // One chunk's worth: fine.
    let (_p, h) = f.buffer("one", CHUNK);
    f.start_with("o/m", "one", vec![copy(0, CHUNK as u64, 0)], vec![h])
        .unwrap();
    runtime()
        .block_on(f.registry.confirm("o/m", "one"))
        .unwrap();
}

#[test]
fn a_finished_replica_nobody_confirms_is_forgotten_after_the_retention() {
    let limits = Limits {
        replica_retention: Duration::from_millis(50),
        unknown_replica_wait: Duration::from_millis(20),
        ..Limits::default()
    };
    let f = Fixture::new(4, limits);
    f.write("o/m", 10_000, 7);
    f.load_to_host("o/m");
    let path = f.start_replica("o/m", "kept", 10_000).unwrap();
    // Confirmed within the retention: fine, and the bytes are there.
    runtime()
        .block_on(f.registry.confirm("o/m", "kept"))
        .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), vec![7u8; 10_000]);

    f.start_replica("o/m", "left", 10_000).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // The next request sweeps finished replicas older than the retention.
    f.start_replica("o/m", "sweeper", 10_000).unwrap();
    let e = runtime()
        .block_on(f.registry.confirm("o/m", "left"))
        .unwrap_err();
    assert!(matches!(e, RegistryError::ReplicaUnknown { .. }), "{e}");
    runtime()
        .block_on(f.registry.confirm("o/m", "sweeper"))
        .unwrap();
}

#[test]
fn a_model_resaved_after_its_host_load_serves_the_new_bytes_only() {
    let f = Fixture::new(4, Limits::default());
    f.write("o/m", 100_000, 1);
    f.load_to_host("o/m");
    f.resave("o/m", 100_000, 2);
    // The replica is planned against the files as they are now; the old
    // copy in the pool serves no new replica.
    let path = f.start_replica("o/m", "after", 100_000).unwrap();
    runtime()
        .block_on(f.registry.confirm("o/m", "after"))
        .unwrap();
    assert_eq!(std::fs::read(path).unwrap(), vec![2u8; 100_000]);
    // Loaded again, it is the new model.
    f.load_to_host("o/m");
    let path = f.start_replica("o/m", "again", 100_000).unwrap();
    runtime()
        .block_on(f.registry.confirm("o/m", "again"))
        .unwrap();
    assert_eq!(std::fs::read(path).unwrap(), vec![2u8; 100_000]);
}

#[test]
fn shutdown_aborts_copies_and_refuses_new_work() {
    let f = Fixture::new(4, Limits::default());
    f.write("o/m", 3 * CHUNK, 7);
    f.registry.load_to_host("o/m").unwrap();
    f.start_replica("o/m", "r", 3 * CHUNK).unwrap();
    f.registry.shutdown();
    // The replica either finished before the abort or failed because of it;
    // either way the waiter gets an answer.
    let _ = runtime().block_on(f.registry.confirm("o/m", "r"));
    let e = f.registry.load_to_host("o/m").unwrap_err();
    assert!(matches!(e, RegistryError::ShuttingDown), "{e}");
    let e = f.start_replica("o/m", "late", 3 * CHUNK).unwrap_err();
    assert!(matches!(e, RegistryError::ShuttingDown), "{e}");
}

#[test]
fn unload_during_a_copy_keeps_the_chunks_until_the_copy_ends() {
    let f = Fixture::new(4, Limits::default());
    f.write("o/m", 3 * CHUNK, 9);
    f.load_to_host("o/m");
    let path = f.start_replica("o/m", "r", 3 * CHUNK).unwrap();
    f.registry.unload("o/m").unwrap();
    assert_eq!(f.state("o/m"), HostState::NotLoaded);
    // The copy in flight still completes with the right bytes.
    runtime().block_on(f.registry.confirm("o/m", "r")).unwrap();
    assert_eq!(std::fs::read(path).unwrap(), vec![9u8; 3 * CHUNK]);
    // And the pool has every chunk back.
    assert_eq!(f.registry.pool_used_bytes(), 0);
}

/// A model id that names a file inside a model (found by the request
/// fuzzing: it came back INTERNAL, "Not a directory") is NOT_FOUND, with a
/// message that says what a model is.
#[test]
fn a_model_id_naming_a_file_is_not_found_and_says_why() {
    let f = Fixture::new(4, Limits::default());
    f.write("o/m", 1000, 7);
    for id in ["o/m/tensor.data_0", "o/m/tensor_index.json"] {
        let e = f.registry.load_to_host(id).unwrap_err();
        assert!(
            matches!(e, RegistryError::NotADirectory { .. }),
            "{id}: {e:?}"
        );
        let status = sllm_daemon::server::to_status(e);
        assert_eq!(status.code(), tonic::Code::NotFound, "{id}: {status:?}");
        assert!(
            status.message().contains("is not a directory")
                && status
                    .message()
                    .contains("tensor_index.json and tensor.data_0"),
            "{}",
            status.message()
        );
    }
    // The model itself still loads.
    f.load_to_host("o/m");
}
