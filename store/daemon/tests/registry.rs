//! The registry in-process: a small pool, the pread engine and the host
//! backend over a temporary directory, models written by the store's own
//! writer. What the integration tests reach only through the binary, checked
//! here directly: eviction order, the limits, replica retention, a model
//! changed under a load, and the abort paths.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sllm_daemon::device::host::HostBackend;
use sllm_daemon::device::{ClientIdentity, DeviceBackend};
use sllm_daemon::io::IoEngine;
use sllm_daemon::io::pread::PreadEngine;
use sllm_daemon::pool::HostPool;
use sllm_daemon::registry::checksums::HashPool;
use sllm_daemon::registry::copy_plan::RequestedCopy;
use sllm_daemon::registry::{HostState, Limits, Registry, RegistryConfig, RegistryError};
use sllm_format::{StoreWriter, TensorEntry, WriterOptions};

const CHUNK: usize = 64 << 10;

struct Fixture {
    tmp: tempfile::TempDir,
    registry: Arc<Registry>,
    device: String,
}

impl Fixture {
    /// A registry over a pool of `chunks` chunks of 64 KiB.
    fn new(chunks: usize, limits: Limits) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        for dir in ["models", "shm"] {
            std::fs::create_dir(tmp.path().join(dir)).unwrap();
        }
        let pool = HostPool::new(chunks * CHUNK, CHUNK, 1).unwrap();
        let engine: Arc<dyn IoEngine> = Arc::new(PreadEngine::new(2));
        let backend: Arc<dyn DeviceBackend> =
            Arc::new(HostBackend::new(1, &tmp.path().join("shm")).unwrap());
        let device = backend.devices()[0].uuid.clone();
        let cfg = RegistryConfig {
            storage_root: tmp.path().join("models"),
            registration_required: false,
            max_io_bytes: 1 << 20,
            verify_checksums: true,
            limits,
        };
        let registry = Registry::new(cfg, pool, engine, backend, HashPool::new(1).unwrap());
        Self {
            tmp,
            registry,
            device,
        }
    }

    fn models(&self) -> PathBuf {
        self.tmp.path().join("models")
    }

    /// Model `name`: one tensor of `len` bytes, each byte `fill`.
    fn write(&self, name: &str, len: usize, fill: u8) {
        write_model(&self.models().join(name), len, fill);
    }

    /// Replaces model `name` as `save --force` does: a new directory
    /// renamed over the old one.
    fn resave(&self, name: &str, len: usize, fill: u8) {
        let flat = name.replace('/', "-");
        let staged = self.tmp.path().join(format!("staged-{flat}-{fill}"));
        write_model(&staged, len, fill);
        let old = self.tmp.path().join(format!("old-{flat}-{fill}"));
        std::fs::rename(self.models().join(name), &old).unwrap();
        std::fs::rename(&staged, self.models().join(name)).unwrap();
    }

    /// Loads `model` into the pool and waits until it has landed.
    fn load_to_host(&self, model: &str) {
        self.registry.load_to_host(model).unwrap();
        self.wait_loaded(model);
    }

    fn wait_loaded(&self, model: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.registry.status(model).unwrap().state {
                HostState::Loaded => return,
                HostState::Failed(e) => panic!("{model} failed to load: {e}"),
                _ if Instant::now() > deadline => panic!("{model} did not load in 20 s"),
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    fn state(&self, model: &str) -> HostState {
        self.registry.status(model).unwrap().state
    }

    /// A buffer file of `len` bytes under the backend's directory.
    fn buffer(&self, name: &str, len: usize) -> (PathBuf, Vec<u8>) {
        let path = self.tmp.path().join("shm").join(name);
        std::fs::write(&path, vec![0u8; len]).unwrap();
        let handle = path.as_os_str().as_encoded_bytes().to_vec();
        (path, handle)
    }

    /// Starts a replica copying all of `model` (`len` bytes) into a new buffer.
    fn start_replica(
        &self,
        model: &str,
        replica: &str,
        len: usize,
    ) -> Result<PathBuf, RegistryError> {
        let (path, handle) = self.buffer(replica, len);
        self.start_with(model, replica, vec![copy(0, len as u64, 0)], vec![handle])?;
        Ok(path)
    }

    fn start_with(
        &self,
        model: &str,
        replica: &str,
        copies: Vec<RequestedCopy>,
        handles: Vec<Vec<u8>>,
    ) -> Result<(), RegistryError> {
        self.registry.load_to_devices(
            model,
            replica,
            HashMap::from([(self.device.clone(), copies)]),
            HashMap::from([(self.device.clone(), handles)]),
            &me(),
        )
    }
}

fn me() -> ClientIdentity {
    ClientIdentity::Known {
        uid: rustix::process::getuid().as_raw(),
        gid: Some(rustix::process::getgid().as_raw()),
        pid: None,
    }
}

fn copy(src_offset: u64, size: u64, dst_offset: u64) -> RequestedCopy {
    RequestedCopy {
        src_offset,
        size,
        dst_offset,
        handle_idx: 0,
    }
}

fn write_model(dir: &Path, len: usize, fill: u8) {
    std::fs::create_dir_all(dir).unwrap();
    let mut w = StoreWriter::new(dir, WriterOptions::default()).unwrap();
    let offset = w.begin_record(len as u64).unwrap();
    w.write(&vec![fill; len]).unwrap();
    w.end_record().unwrap();
    w.add_entry(
        "w".into(),
        TensorEntry {
            offset,
            size: len as u64,
            shape: vec![len as u64],
            stride: vec![1],
            dtype: "torch.uint8".into(),
        },
    );
    w.finish(None).unwrap();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

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
fn a_model_larger_than_the_pool_is_refused_with_the_sizes() {
    let f = Fixture::new(2, Limits::default());
    f.write("o/big", 3 * CHUNK, 1);
    let e = f.registry.load_to_host("o/big").unwrap_err();
    assert!(matches!(e, RegistryError::PoolTooSmall { .. }), "{e}");
    assert!(e.to_string().contains("--mem-pool-size"), "{e}");
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
