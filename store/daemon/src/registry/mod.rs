//! The models the daemon knows, their copies in the host pool, and the
//! replicas being copied to devices: the state machine behind every RPC.
//!
//! Per model: registered (partitions indexed) -> resident (a [`HostCopy`]
//! loading or loaded in the pool) -> replicas copying from it. A host copy is
//! *idle* when it has finished loading and no replica copies from it; only
//! idle copies are evicted, least recently used first, when a load needs
//! chunks. A failed load gives its chunks back and leaves the model
//! registered, so the next load retries from disk.
//!
//! Every request that names a model first checks that its files are still
//! the ones the registry read ([`on_disk::ModelStamp`]): a model re-saved or
//! edited on disk is read again, and the copy of its old bytes in the pool is
//! dropped once no replica reads from it. Bytes read from disk are checked
//! against the manifest's checksums before any replica may copy them
//! ([`checksums`]).
//!
//! Locking: one mutex over the model table, held only for bookkeeping (never
//! across I/O or waits). Loads and copies run on threads of their own.

pub mod checksums;
pub mod copy_plan;
mod error;
pub mod host_copy;
mod limits;
pub mod on_disk;
pub mod replica;
mod table;

pub use self::error::RegistryError;
pub use self::limits::Limits;
use self::table::{ModelEntry, ModelInfo, Table};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Instant;

use sllm_format::ModelId;
use sllm_format::units::{gib_per_s, human_bytes};

use self::checksums::{HashPool, LoadCheck};
use self::copy_plan::{RequestedCopy, plan_copies};
use self::host_copy::{Freed, HostCopy, LoadOutcome, Reclaim, Source, Stream};
use self::on_disk::{ModelStamp, OnDisk, OnDiskError};
pub use self::replica::ReplicaError;
use self::replica::{DeviceCopy, Replica, ReplicaStatus};
use crate::device::DeviceBackend;
use crate::io::{ChunkSpan, IoEngine, IoError, chunk_spans};
use crate::lock;
use crate::pool::HostPool;

/// What the registry needs to know at start-up.
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    pub storage_root: PathBuf,
    pub registration_required: bool,
    pub max_io_bytes: usize,
    /// Check bytes read from disk against the manifest's checksums, and the
    /// index against the manifest (`--skip-checksums` turns it off).
    pub verify_checksums: bool,
    pub limits: Limits,
}

/// Where a model stands in host memory.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelStatus {
    pub size: u64,
    pub state: HostState,
    pub chunks_landed: usize,
    pub chunks_total: usize,
    pub load_seconds: Option<f64>,
    pub replicas_copying: usize,
    /// Bytes in the pool now.
    pub resident_bytes: u64,
    /// The copy in the pool was streamed (keeps a prefix at most).
    pub streamed: bool,
    /// Bytes the copy in the pool read from disk: less than the model's
    /// size when it started from chunks a streamed copy kept.
    pub read_bytes: u64,
    /// Copies of the model started in the pool since its files were read.
    pub host_loads: u64,
}

/// A model's host copy, from the outside.
#[derive(Clone, Debug, PartialEq)]
pub enum HostState {
    NotLoaded,
    Loading,
    Loaded,
    Failed(String),
}

/// The daemon's state.
pub struct Registry {
    cfg: RegistryConfig,
    pool: HostPool,
    engine: Arc<dyn IoEngine>,
    backend: Arc<dyn DeviceBackend>,
    hashers: HashPool,
    table: Mutex<Table>,
    this: Weak<Registry>,
}

impl Registry {
    pub fn new(
        cfg: RegistryConfig,
        pool: HostPool,
        engine: Arc<dyn IoEngine>,
        backend: Arc<dyn DeviceBackend>,
        hashers: HashPool,
    ) -> Arc<Self> {
        Arc::new_cyclic(|this| Self {
            cfg,
            pool,
            engine,
            backend,
            hashers,
            table: Mutex::new(Table::default()),
            this: this.clone(),
        })
    }

    /// The storage path, canonical.
    pub fn storage_root(&self) -> &Path {
        &self.cfg.storage_root
    }

    pub fn pool(&self) -> &HostPool {
        &self.pool
    }

    pub fn backend(&self) -> &dyn DeviceBackend {
        self.backend.as_ref()
    }

    pub fn engine_name(&self) -> &'static str {
        self.engine.name()
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        lock(&self.table)
    }

    /// Indexes the model's partitions; returns its size. Idempotent; a
    /// model whose files changed since is read again.
    pub fn register(&self, model: &str) -> Result<u64, RegistryError> {
        self.refresh(model).map(|info| info.size)
    }

    /// The model's info, read again when its files are no longer the ones
    /// last read (re-saved, replaced, edited): then the copy of the old bytes
    /// in the pool is dropped (a load still reading them is cancelled;
    /// replicas copying from it finish with the old bytes, whole).
    fn refresh(&self, model: &str) -> Result<Arc<ModelInfo>, RegistryError> {
        let id = ModelId::parse(model)?;
        let stamp = self
            .model_dir(&id)
            .and_then(|real| ModelStamp::read(&real).map_err(|e| self.unreadable(&id, &real, e)));
        let stamp = match stamp {
            Ok(stamp) => stamp,
            Err(e) => {
                // Gone from disk (or unreadable): stop serving its old bytes.
                if let Some(entry) = self.table().models.get_mut(model) {
                    entry.drop_host_copy();
                }
                return Err(e);
            }
        };
        if let Some(entry) = self.table().models.get(model)
            && entry.info.stamp == stamp
        {
            return Ok(Arc::clone(&entry.info));
        }
        let ticket = {
            let mut table = self.table();
            table.reads += 1;
            table.reads
        };
        let info = Arc::new(self.index_model(&id, stamp.real_dir(), ticket)?);
        let mut table = self.table();
        let clock = table.clock;
        match table.models.get_mut(model) {
            // The same files, or a reading begun after this one installed
            // already: keep it (and the copy in the pool made from it).
            Some(entry)
                if entry.info.stamp == info.stamp || entry.info.read_ticket > info.read_ticket =>
            {
                return Ok(Arc::clone(&entry.info));
            }
            Some(entry) => {
                metrics::counter!("sllm_models_reread_total").increment(1);
                if entry.host.is_some() {
                    tracing::info!(
                        model,
                        "changed on disk: reading it again; the old copy leaves the pool once no replica reads it"
                    );
                }
                entry.drop_host_copy();
                entry.last_error = None;
                entry.host_loads = 0;
                entry.info = Arc::clone(&info);
            }
            None => {
                table.models.insert(
                    model.to_owned(),
                    ModelEntry {
                        info: Arc::clone(&info),
                        host: None,
                        last_used: clock,
                        replicas: HashMap::new(),
                        last_error: None,
                        host_loads: 0,
                    },
                );
            }
        }
        Ok(info)
    }

    /// The model's directory, symlinks resolved, checked to lie inside the
    /// storage path (the id has no `..`, but a symlink could lead out).
    fn model_dir(&self, id: &ModelId) -> Result<PathBuf, RegistryError> {
        let root = &self.cfg.storage_root;
        let dir = id.dir_in(root);
        let real = dir
            .canonicalize()
            .map_err(|e| self.unreadable(id, &dir, e))?;
        if !real.starts_with(root) {
            return Err(RegistryError::Escapes {
                model: id.to_string(),
                path: dir,
                root: root.clone(),
            });
        }
        if !real.is_dir() {
            return Err(RegistryError::NotADirectory {
                model: id.to_string(),
                path: dir,
                root: root.clone(),
            });
        }
        Ok(real)
    }

    fn not_found(&self, id: &ModelId) -> RegistryError {
        RegistryError::NotFound {
            model: id.to_string(),
            path: id.dir_in(&self.cfg.storage_root),
            root: self.cfg.storage_root.clone(),
        }
    }

    fn unreadable(&self, id: &ModelId, path: &Path, source: std::io::Error) -> RegistryError {
        if source.kind() == std::io::ErrorKind::NotFound {
            self.not_found(id)
        } else {
            RegistryError::Unreadable {
                model: id.to_string(),
                path: path.to_owned(),
                source,
            }
        }
    }

    /// Reads the model in `real` (its canonical directory).
    fn index_model(
        &self,
        id: &ModelId,
        real: &Path,
        read_ticket: u64,
    ) -> Result<ModelInfo, RegistryError> {
        let on_disk = OnDisk::read(real, self.cfg.verify_checksums).map_err(|e| match e {
            OnDiskError::Io { path, source } => self.unreadable(id, &path, source),
            OnDiskError::Symlink { path } => RegistryError::Escapes {
                model: id.to_string(),
                path,
                root: self.cfg.storage_root.clone(),
            },
            source => RegistryError::OnDisk {
                model: id.to_string(),
                source,
            },
        })?;
        let OnDisk {
            stamp,
            partitions,
            checksums,
        } = on_disk;
        if partitions.is_empty() {
            return Err(self.not_found(id));
        }
        if self.cfg.verify_checksums && checksums.is_none() {
            tracing::warn!(
                model = %id,
                "no sllm_manifest.json (written by the reference tools?): its bytes are not \
                 checked when loaded; convert it with `sllm-store save` to have them checked"
            );
        }
        let spans: Arc<[ChunkSpan]> =
            chunk_spans(partitions.iter().map(|p| p.size), self.pool.chunk_bytes()).into();
        Ok(ModelInfo {
            read_ticket,
            stamp,
            size: partitions.total_size(),
            partitions,
            spans,
            checksums,
        })
    }

    /// The model's current info, registering it first unless registration
    /// is required (then it must have been registered).
    fn ensure_registered(&self, model: &str) -> Result<Arc<ModelInfo>, RegistryError> {
        if self.cfg.registration_required && !self.table().models.contains_key(model) {
            ModelId::parse(model)?;
            return Err(RegistryError::NotRegistered {
                model: model.into(),
            });
        }
        self.refresh(model)
    }

    /// Starts loading `model` into the pool (no-op when loading or loaded).
    pub fn load_to_host(&self, model: &str) -> Result<(), RegistryError> {
        self.ensure_registered(model)?;
        self.host_copy(model, None).map(|_| ())
    }

    /// The model's host copy, starting a load when there is none, or when
    /// a streamed one has gone past what is needed: past chunk `first` for a
    /// replica; for a load to host memory (`None`), once it is over. Blocking:
    /// may wait briefly for chunks an evicted copy is still handing back.
    fn host_copy(&self, model: &str, first: Option<usize>) -> Result<Arc<HostCopy>, RegistryError> {
        // A copy that just finished loading is evictable a moment before its
        // io thread lets go of it; give such chunks a bounded time to return
        // before streaming a model that would fit whole.
        let limits = &self.cfg.limits;
        for attempt in 0.. {
            let patient = attempt < limits.pool_busy_retries;
            match self.try_host_copy(model, first, patient) {
                Err(RegistryError::PoolBusy { .. }) if patient => {
                    std::thread::sleep(limits.pool_busy_pause)
                }
                other => return other,
            }
        }
        unreachable!("the loop returns")
    }

    fn try_host_copy(
        &self,
        model: &str,
        first: Option<usize>,
        patient: bool,
    ) -> Result<Arc<HostCopy>, RegistryError> {
        let mut table = self.table();
        if table.shutting_down {
            return Err(RegistryError::ShuttingDown);
        }
        table.clock += 1;
        let clock = table.clock;
        let entry = table.entry_mut(model)?;
        entry.last_used = clock;
        let mut resident = Vec::new();
        if let Some(host) = entry.host.as_ref().filter(|h| h.error().is_none()) {
            let usable = match first {
                Some(first) => host.attachable(first),
                None => !host.is_streamed() || !host.is_complete(),
            };
            if usable {
                return Ok(Arc::clone(host));
            }
            // Streamed past: a new copy starts from what it kept; the old one
            // goes on for the replicas reading it, and stops once they are
            // done.
            resident = host.resident_prefix();
        }
        entry.host = None;
        entry.last_error = None;
        let info = Arc::clone(&entry.info);
        resident.truncate(info.spans.len());
        let source = self.source_for(&mut table, model, &info, resident.len(), patient)?;
        if let Source::Streamed(stream) = &source {
            tracing::info!(
                model,
                size = %human_bytes(info.size),
                pool = %human_bytes(self.pool.total_bytes() as u64),
                resident_chunks = resident.len(),
                keep_chunks = stream.keep,
                ring_chunks = stream.ring,
                "streaming through the pool: it does not fit beside what the pool keeps"
            );
            metrics::counter!("sllm_streamed_loads_total").increment(1);
        }
        let this = self.this.clone();
        let name = model.to_owned();
        let check = info.checksums.as_ref().map(|sums| {
            LoadCheck::new(
                Arc::clone(sums),
                Arc::clone(&info.spans),
                info.partitions.iter().map(|p| p.path.clone()).collect(),
                self.hashers.clone(),
            )
        });
        let host = HostCopy::start(
            info.partitions.clone(),
            Arc::clone(&info.spans),
            resident,
            source,
            Arc::clone(&self.engine),
            self.cfg.max_io_bytes,
            check,
            move |copy, outcome| {
                if let Some(registry) = this.upgrade() {
                    registry.load_finished(&name, copy, outcome);
                }
            },
        )
        .map_err(RegistryError::NoThread)?;
        let entry = table.models.get_mut(model).expect("entry exists");
        entry.host = Some(Arc::clone(&host));
        entry.host_loads += 1;
        Ok(host)
    }

    /// Where a new copy of `model` gets its chunks: leased whole up front
    /// when the missing ones fit in what is free plus what idle models
    /// hold (evicting those least recently used), else through a ring.
    /// A streamed copy keeps as many chunks as are free beyond its ring; it
    /// evicts only to make room for the ring. Streams that no device reads
    /// yet are idle too: evicted, they stop and hand their chunks back a
    /// moment later, worth a short wait ([`RegistryError::PoolBusy`]).
    fn source_for(
        &self,
        table: &mut Table,
        model: &str,
        info: &ModelInfo,
        resident: usize,
        patient: bool,
    ) -> Result<Source, RegistryError> {
        let pool = &self.pool;
        let missing = info.spans.len() - resident;
        let idle_chunks: usize = table
            .models
            .iter()
            .filter(|(name, e)| name.as_str() != model && e.evictable())
            .filter_map(|(_, e)| e.host.as_ref())
            .map(|h| h.progress().0)
            .sum();
        // Chunks of evicted streams, back once their reading has stopped.
        let mut coming = 0;
        let evict = |table: &mut Table, coming: &mut usize| match evict_one(
            table,
            model,
            "its load begins",
        ) {
            Some(Freed::Now) => true,
            Some(Freed::Soon(chunks)) => {
                *coming += chunks;
                true
            }
            None => false,
        };
        if missing <= pool.free_chunks() + idle_chunks {
            loop {
                if let Some(leases) = pool.try_lease(missing) {
                    return Ok(Source::Whole(leases));
                }
                if pool.free_chunks() + coming >= missing || !evict(table, &mut coming) {
                    break;
                }
            }
        }
        // Chunks of copies that are done but still held for a moment: worth
        // a short wait when the model would fit whole.
        let soon_free = coming > 0
            || table.models.iter().any(|(name, e)| {
                name.as_str() != model
                    && !e.busy()
                    && e.host.as_ref().is_some_and(|h| h.is_complete())
            });
        if patient && soon_free && missing <= pool.total_chunks() {
            return Err(RegistryError::PoolBusy {
                model: model.into(),
                size: info.size,
                free: (pool.free_chunks() * pool.chunk_bytes()) as u64,
                pool: pool.total_bytes() as u64,
            });
        }
        let chunk = pool.chunk_bytes() as u64;
        let limits = &self.cfg.limits;
        // A checksum block spans at most this many chunks; a ring smaller
        // than that could never verify one.
        let block_chunks = info
            .checksums
            .as_ref()
            .map_or(1, |s| s.block_bytes.div_ceil(chunk) as usize + 1);
        let ring = ((limits.stream_ring_bytes / chunk) as usize)
            .min(pool.total_chunks() / 2)
            .max(2)
            // A consumer holds the chunk it is on while the next ones are
            // read, and a block's chunks must all land before it is hashed.
            .max(block_chunks + 1)
            .min(missing.max(1));
        if ring > pool.total_chunks() {
            return Err(RegistryError::PoolTooSmall {
                model: model.into(),
                size: info.size,
                ring,
                chunk,
                block: info.checksums.as_ref().map(|s| s.block_bytes),
                pool: pool.total_bytes() as u64,
            });
        }
        while pool.free_chunks() + coming < ring && evict(table, &mut coming) {}
        // With no chunk free now, the copy waits for chunks that loads and
        // copies in progress hand back (for at most the drain timeout).
        let free = pool.free_chunks();
        let this = self.this.clone();
        let name = model.to_owned();
        Ok(Source::Streamed(Stream {
            pool: pool.clone(),
            keep: resident + free.saturating_sub(ring),
            ring,
            drain_timeout: limits.stream_drain_timeout,
            reclaim: Reclaim(Arc::new(move || {
                let registry = this.upgrade()?;
                let mut table = registry.table();
                evict_one(&mut table, &name, "its stream waits for free chunks")
            })),
        }))
    }

    fn load_finished(&self, model: &str, copy: &Arc<HostCopy>, outcome: LoadOutcome) {
        match &outcome.error {
            None => {
                tracing::info!(
                    model,
                    bytes = outcome.bytes,
                    seconds = outcome.seconds,
                    gib_per_s = gib_per_s(outcome.bytes, outcome.seconds),
                    engine = outcome.engine,
                    kept_chunks = outcome.streamed,
                    "{}",
                    if outcome.streamed.is_some() {
                        "streamed through the host pool"
                    } else {
                        "loaded into the host pool"
                    }
                );
                metrics::counter!("sllm_bytes_loaded_total", "target" => "host")
                    .increment(outcome.bytes);
                metrics::histogram!("sllm_load_seconds", "target" => "host")
                    .record(outcome.seconds);
            }
            Some(IoError::Cancelled) => tracing::info!(model, "load cancelled"),
            Some(IoError::Yielded) => {
                tracing::info!(
                    model,
                    "stopped reading ahead: another load needed the pool before a device \
                     asked for this model; its device request will read it again"
                );
                metrics::counter!("sllm_streams_yielded_total").increment(1);
                self.forget_copy(model, copy, |_| None);
            }
            Some(e) => {
                tracing::error!(model, error = %e, "load failed; its chunks return to the pool");
                let kind = if matches!(e, IoError::Checksum { .. }) {
                    "checksum"
                } else {
                    "load"
                };
                metrics::counter!("sllm_errors_total", "kind" => kind).increment(1);
                // Drop the failed copy so its chunks return once its last
                // reader is gone, and the next load reads the disk again.
                self.forget_copy(model, copy, |entry| {
                    Some(match e {
                        IoError::NotDrained { .. } => format!(
                            "model {model} is {} and the pool holds {}: {e}",
                            human_bytes(entry.info.size),
                            human_bytes(self.pool.total_bytes() as u64)
                        ),
                        e => e.to_string(),
                    })
                });
            }
        }
    }

    /// Drops `copy` from `model`'s entry if it is still the model's copy,
    /// noting the error `why` gives for GetModelStatus.
    fn forget_copy(
        &self,
        model: &str,
        copy: &Arc<HostCopy>,
        why: impl FnOnce(&ModelEntry) -> Option<String>,
    ) {
        let mut table = self.table();
        if let Some(entry) = table.models.get_mut(model)
            && entry.host.as_ref().is_some_and(|h| Arc::ptr_eq(h, copy))
        {
            entry.host = None;
            entry.last_error = why(entry);
        }
    }

    /// Starts copying `model` into the buffers behind `handles`, per device
    /// UUID; returns once every copy has been checked and the copying begun.
    pub fn load_to_devices(
        &self,
        model: &str,
        replica_uuid: &str,
        chunks: HashMap<String, Vec<RequestedCopy>>,
        handles: HashMap<String, Vec<Vec<u8>>>,
        client: &crate::device::ClientIdentity,
    ) -> Result<(), RegistryError> {
        let request =
            self.validate_device_request(model, replica_uuid, &chunks, &handles, client)?;
        self.start_replica(model, replica_uuid, request)
    }

    /// Every check of a LoadModelAsync(GPU) that needs no pool or replica
    /// state: the replica id, the counts, each device and its handles, and
    /// every copy against the model and the buffers. Opens the targets;
    /// nothing is copied.
    fn validate_device_request(
        &self,
        model: &str,
        replica_uuid: &str,
        chunks: &HashMap<String, Vec<RequestedCopy>>,
        handles: &HashMap<String, Vec<Vec<u8>>>,
        client: &crate::device::ClientIdentity,
    ) -> Result<DeviceRequest, RegistryError> {
        let invalid = |m: String| RegistryError::InvalidRequest(m);
        let limits = &self.cfg.limits;
        let max_id = limits.max_replica_id_bytes;
        if replica_uuid.is_empty() || replica_uuid.len() > max_id {
            return Err(invalid(format!(
                "replica_uuid must be 1 to {max_id} characters (a UUID)"
            )));
        }
        if chunks.is_empty() {
            return Err(invalid(format!(
                "LoadModelAsync(GPU) for {model} lists no copies"
            )));
        }
        let copies: usize = chunks.values().map(Vec::len).sum();
        if copies > limits.max_copies_per_request {
            return Err(invalid(format!(
                "{copies} copies in one request; the limit is {}: coalesce adjacent tensors",
                limits.max_copies_per_request
            )));
        }
        let info = self.ensure_registered(model)?;
        self.table()
            .entry(model)?
            .ensure_replica_free(replica_uuid, model)?;

        let mut device_copies = Vec::with_capacity(chunks.len());
        for (uuid, list) in chunks {
            let device = self
                .backend
                .devices()
                .iter()
                .find(|d| &d.uuid == uuid)
                .ok_or_else(|| RegistryError::UnknownDevice {
                    uuid: uuid.clone(),
                    known: self
                        .backend
                        .devices()
                        .iter()
                        .map(|d| d.uuid.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
            let device_handles = handles.get(uuid).filter(|h| !h.is_empty()).ok_or_else(|| {
                invalid(format!("copies for device {uuid} but no handles for it"))
            })?;
            if device_handles.len() > limits.max_handles_per_device {
                return Err(invalid(format!(
                    "{} handles for device {uuid}; the limit is {}",
                    device_handles.len(),
                    limits.max_handles_per_device
                )));
            }
            let opening = Instant::now();
            let target = self.backend.open_target(device, device_handles, client)?;
            let open_s = opening.elapsed().as_secs_f64();
            let plan = plan_copies(&info.spans, info.size, list, target.buffer_sizes()).map_err(
                |source| RegistryError::InvalidCopy {
                    model: model.into(),
                    source,
                },
            )?;
            device_copies.push(DeviceCopy {
                device: device.clone(),
                target,
                plan,
                open_s,
            });
        }
        if let Some(extra) = handles.keys().find(|k| !chunks.contains_key(*k)) {
            return Err(invalid(format!(
                "handles for device {extra} but no copies for it"
            )));
        }
        Ok(DeviceRequest {
            info,
            copies: device_copies,
        })
    }

    /// Runs a validated request: takes the model's host copy (loading it if
    /// needed), checks the work of all replicas against the limits under
    /// the table's lock, and starts the replica's threads.
    fn start_replica(
        &self,
        model: &str,
        replica_uuid: &str,
        request: DeviceRequest,
    ) -> Result<(), RegistryError> {
        let DeviceRequest {
            info,
            copies: device_copies,
        } = request;
        let limits = &self.cfg.limits;
        // A streamed copy that another replica has begun to drain lacks
        // chunks this one needs: then a new copy is made, a few times over
        // if other replicas keep winning the race.
        let first: Vec<usize> = device_copies.iter().map(|c| c.plan.first_chunk()).collect();
        for _ in 0..3 {
            let host = self.host_copy(model, first.iter().copied().min())?;
            if !Arc::ptr_eq(host.spans(), &info.spans) {
                // Re-registered (re-saved) between planning and loading.
                return Err(RegistryError::ModelChanged {
                    model: model.into(),
                });
            }
            let mut table = self.table();
            // Forget finished replicas nobody confirmed, on every model.
            for e in table.models.values_mut() {
                e.replicas.retain(|_, r| {
                    r.status().is_copying() || r.started.elapsed() < limits.replica_retention
                });
            }
            self.check_work(&table, &device_copies)?;
            let entry = table.entry_mut(model)?;
            entry.ensure_replica_free(replica_uuid, model)?;
            let Some(consumers) = host.attach(&first) else {
                continue;
            };
            let deadline = Instant::now() + limits.confirm_timeout;
            let on_done = replica_outcome_logger(model, replica_uuid, self.backend.kind());
            let replica = Replica::start(
                replica_uuid.into(),
                device_copies.into_iter().zip(consumers).collect(),
                deadline,
                limits.chunk_wait_poll,
                on_done,
            )
            .map_err(RegistryError::NoThread)?;
            entry.replicas.insert(replica_uuid.into(), replica);
            return Ok(());
        }
        Err(RegistryError::StreamBusy {
            model: model.into(),
        })
    }

    /// Refuses a replica that would take the work of the replicas copying
    /// now past the limits: their number, their bytes, their pieces.
    fn check_work(&self, table: &Table, adding: &[DeviceCopy]) -> Result<(), RegistryError> {
        let limits = &self.cfg.limits;
        let active: Vec<&Arc<Replica>> = table
            .models
            .values()
            .flat_map(|e| e.replicas.values())
            .filter(|r| r.status().is_copying())
            .collect();
        if active.len() >= limits.max_active_replicas {
            return Err(RegistryError::TooManyReplicas(active.len()));
        }
        let bytes: u64 = active.iter().map(|r| r.bytes()).sum();
        let new_bytes: u64 = adding.iter().map(|c| c.plan.bytes).sum();
        if bytes.saturating_add(new_bytes) > limits.max_active_copy_bytes {
            return Err(RegistryError::TooMuchWork {
                what: human_bytes(bytes),
                adding: human_bytes(new_bytes),
                limit: human_bytes(limits.max_active_copy_bytes),
            });
        }
        let pieces: usize = active.iter().map(|r| r.pieces()).sum();
        let new_pieces: usize = adding.iter().map(|c| c.plan.pieces()).sum();
        if pieces.saturating_add(new_pieces) > limits.max_active_pieces {
            return Err(RegistryError::TooMuchWork {
                what: format!("{pieces} copy pieces"),
                adding: format!("{new_pieces}"),
                limit: format!("{} pieces", limits.max_active_pieces),
            });
        }
        Ok(())
    }

    /// Waits until replica `uuid` of `model` is copied; forgets it after.
    pub async fn confirm(&self, model: &str, uuid: &str) -> Result<(), RegistryError> {
        let limits = &self.cfg.limits;
        let deadline = Instant::now() + limits.unknown_replica_wait;
        let replica = loop {
            let found = self
                .table()
                .models
                .get(model)
                .and_then(|e| e.replicas.get(uuid).cloned());
            match found {
                Some(r) => break r,
                None if Instant::now() >= deadline => {
                    return Err(RegistryError::ReplicaUnknown {
                        uuid: uuid.into(),
                        model: model.into(),
                    });
                }
                None => tokio::time::sleep(limits.unknown_replica_poll).await,
            }
        };
        let status = match tokio::time::timeout(limits.confirm_timeout, replica.finished()).await {
            Ok(status) => status,
            Err(_) => {
                // Stop the copies and wait for them to let go of the
                // client's buffers before telling it to give up on them.
                replica.abort("ConfirmModel timed out");
                let _ = tokio::time::timeout(limits.abort_wait, replica.finished()).await;
                return Err(RegistryError::ConfirmTimeout {
                    uuid: uuid.into(),
                    model: model.into(),
                    seconds: limits.confirm_timeout.as_secs(),
                });
            }
        };
        if let Some(entry) = self.table().models.get_mut(model) {
            entry.replicas.remove(uuid);
        }
        match status {
            ReplicaStatus::Done { .. } => Ok(()),
            ReplicaStatus::Failed(reason) => Err(RegistryError::ReplicaFailed {
                uuid: uuid.into(),
                model: model.into(),
                reason: Box::new(reason),
            }),
            ReplicaStatus::Copying => unreachable!("finished() waits for a final status"),
        }
    }

    /// Where `model` stands (registering it first unless registration is
    /// required).
    pub fn status(&self, model: &str) -> Result<ModelStatus, RegistryError> {
        self.ensure_registered(model)?;
        let table = self.table();
        let entry = table.entry(model)?;
        let replicas_copying = entry
            .replicas
            .values()
            .filter(|r| r.status().is_copying())
            .count();
        let chunks_total = entry.info.spans.len();
        let (state, chunks_landed, load_seconds) = match &entry.host {
            None => match &entry.last_error {
                Some(e) => (HostState::Failed(e.clone()), 0, None),
                None => (HostState::NotLoaded, 0, None),
            },
            Some(host) => {
                let (landed, _) = host.progress();
                let state = match host.error() {
                    Some(e) => HostState::Failed(e.to_string()),
                    None if host.is_complete() => HostState::Loaded,
                    None => HostState::Loading,
                };
                (state, landed, host.seconds())
            }
        };
        Ok(ModelStatus {
            size: entry.info.size,
            state,
            chunks_landed,
            chunks_total,
            load_seconds,
            replicas_copying,
            resident_bytes: entry.host.as_ref().map_or(0, |h| h.resident_bytes()),
            streamed: entry.host.as_ref().is_some_and(|h| h.is_streamed()),
            read_bytes: entry.host.as_ref().map_or(0, |h| h.read_bytes()),
            host_loads: entry.host_loads,
        })
    }

    /// Frees the model's pool chunks (once in-flight copies from them end).
    pub fn unload(&self, model: &str) -> Result<(), RegistryError> {
        ModelId::parse(model)?;
        let mut table = self.table();
        table.entry_mut(model)?.drop_host_copy();
        Ok(())
    }

    /// Frees every model's pool chunks.
    pub fn clear(&self) {
        for entry in self.table().models.values_mut() {
            entry.drop_host_copy();
        }
    }

    /// Refuses new work, cancels loads and stops copies in progress.
    pub fn shutdown(&self) {
        let mut table = self.table();
        table.shutting_down = true;
        for entry in table.models.values_mut() {
            for replica in entry.replicas.values() {
                replica.abort("the daemon is shutting down");
            }
            if let Some(host) = entry.host.take() {
                host.cancel();
            }
        }
    }

    /// Every known model's bytes in the pool (0 once it left), for metrics.
    pub fn resident_bytes(&self) -> Vec<(String, u64)> {
        self.table()
            .models
            .iter()
            .map(|(name, e)| {
                (
                    name.clone(),
                    e.host.as_ref().map_or(0, |h| h.resident_bytes()),
                )
            })
            .collect()
    }

    /// Bytes of the pool in use, for metrics.
    pub fn pool_used_bytes(&self) -> u64 {
        ((self.pool.total_chunks() - self.pool.free_chunks()) * self.pool.chunk_bytes()) as u64
    }
}

/// Evicts the idle model (not `model`) used least recently, for `model`
/// at the moment `when` says (for the log); `None` when none is idle.
fn evict_one(table: &mut Table, model: &str, when: &str) -> Option<Freed> {
    let (victim, entry) = table
        .models
        .iter_mut()
        .filter(|(name, e)| name.as_str() != model && e.evictable())
        .min_by_key(|(_, e)| e.last_used)?;
    let host = entry.host.take()?;
    metrics::counter!("sllm_evictions_total").increment(1);
    if host.give_way() {
        tracing::info!(
            model = %victim,
            to_load = model,
            when,
            "evicting from the pool a stream no device reads yet: another load needs the pool"
        );
        return Some(Freed::Soon(host.progress().0));
    }
    tracing::info!(
        model = %victim,
        to_load = model,
        when,
        "evicting from the pool (least recently used)"
    );
    Some(if Arc::strong_count(&host) == 1 {
        Freed::Now
    } else {
        Freed::Soon(host.progress().0)
    })
}

/// A LoadModelAsync(GPU) that passed every check: the model's layout it was
/// planned against, and each device's opened target and plan.
struct DeviceRequest {
    info: Arc<ModelInfo>,
    copies: Vec<DeviceCopy>,
}

/// What a replica's end is logged and counted as.
fn replica_outcome_logger(
    model: &str,
    replica: &str,
    backend: crate::device::BackendKind,
) -> impl Fn(&ReplicaStatus) + Send + Sync + 'static {
    let (name, uuid) = (model.to_owned(), replica.to_owned());
    move |status| match status {
        ReplicaStatus::Done {
            bytes,
            seconds,
            figures: f,
        } => {
            tracing::info!(
                model = %name,
                replica = %uuid,
                bytes,
                seconds,
                gib_per_s = gib_per_s(*bytes, *seconds),
                %backend,
                open_s = f.open_s,
                wait_s = f.wait_s,
                issue_s = f.issue_s,
                sync_s = f.sync_s,
                close_s = f.close_s,
                device_s = f.device_s,
                device_gib_per_s = f.device_s.map(|s| gib_per_s(*bytes, s)),
                "copied to the devices"
            );
            metrics::counter!("sllm_bytes_loaded_total", "target" => "device").increment(*bytes);
            metrics::histogram!("sllm_load_seconds", "target" => "device").record(*seconds);
        }
        ReplicaStatus::Failed(reason) => {
            tracing::error!(model = %name, replica = %uuid, %reason, "copy to the devices failed");
            metrics::counter!("sllm_errors_total", "kind" => "copy").increment(1);
        }
        ReplicaStatus::Copying => {}
    }
}
