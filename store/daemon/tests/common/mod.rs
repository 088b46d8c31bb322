//! The registry in-process, shared by the test files: a small pool, the
//! pread engine and the host backend over a temporary directory, models
//! written by the store's own writer.

#![allow(dead_code, reason = "each test file uses part of the fixture")]

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

pub const CHUNK: usize = 64 << 10;

pub struct Fixture {
    pub tmp: tempfile::TempDir,
    pub registry: Arc<Registry>,
    pub device: String,
}

impl Fixture {
    /// A registry over a pool of `chunks` chunks of 64 KiB.
    pub fn new(chunks: usize, limits: Limits) -> Self {
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

    pub fn models(&self) -> PathBuf {
        self.tmp.path().join("models")
    }

    /// Model `name`: one tensor of `len` bytes, each byte `fill`.
    pub fn write(&self, name: &str, len: usize, fill: u8) {
        write_model(&self.models().join(name), len, fill);
    }

    /// Replaces model `name` as `save --force` does: a new directory
    /// renamed over the old one.
    pub fn resave(&self, name: &str, len: usize, fill: u8) {
        let flat = name.replace('/', "-");
        let staged = self.tmp.path().join(format!("staged-{flat}-{fill}"));
        write_model(&staged, len, fill);
        let old = self.tmp.path().join(format!("old-{flat}-{fill}"));
        std::fs::rename(self.models().join(name), &old).unwrap();
        std::fs::rename(&staged, self.models().join(name)).unwrap();
    }

    /// Loads `model` into the pool and waits until it has landed.
    pub fn load_to_host(&self, model: &str) {
        self.registry.load_to_host(model).unwrap();
        self.wait_loaded(model);
    }

    pub fn wait_loaded(&self, model: &str) {
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

    pub fn state(&self, model: &str) -> HostState {
        self.registry.status(model).unwrap().state
    }

    /// A buffer file of `len` bytes under the backend's directory.
    pub fn buffer(&self, name: &str, len: usize) -> (PathBuf, Vec<u8>) {
        let path = self.tmp.path().join("shm").join(name);
        std::fs::write(&path, vec![0u8; len]).unwrap();
        let handle = path.as_os_str().as_encoded_bytes().to_vec();
        (path, handle)
    }

    /// Starts a replica copying all of `model` (`len` bytes) into a new buffer.
    pub fn start_replica(
        &self,
        model: &str,
        replica: &str,
        len: usize,
    ) -> Result<PathBuf, RegistryError> {
        let (path, handle) = self.buffer(replica, len);
        self.start_with(model, replica, vec![copy(0, len as u64, 0)], vec![handle])?;
        Ok(path)
    }

    pub fn start_with(
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

pub fn me() -> ClientIdentity {
    ClientIdentity::Known {
        uid: rustix::process::getuid().as_raw(),
        gid: Some(rustix::process::getgid().as_raw()),
        pid: None,
    }
}

pub fn copy(src_offset: u64, size: u64, dst_offset: u64) -> RequestedCopy {
    RequestedCopy {
        src_offset,
        size,
        dst_offset,
        handle_idx: 0,
    }
}

pub fn write_model(dir: &Path, len: usize, fill: u8) {
    write_bytes(dir, &vec![fill; len], WriterOptions::default());
}

/// Bytes that differ from chunk to chunk and within each, so a chunk copied
/// to the wrong place shows.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i ^ (i >> 11) ^ (i >> 19)) as u8)
        .collect()
}

/// A model of one tensor holding `bytes`, written with `options`.
pub fn write_bytes(dir: &Path, bytes: &[u8], options: WriterOptions) {
    let len = bytes.len();
    std::fs::create_dir_all(dir).unwrap();
    let mut w = StoreWriter::new(dir, options).unwrap();
    let offset = w.begin_record(len as u64).unwrap();
    w.write(bytes).unwrap();
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

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}
