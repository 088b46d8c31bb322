//! The client side of one load, as an inference engine does it: register,
//! load to host, plan, allocate device buffers (shared-memory files for the
//! host backend, GPU memory shared by IPC handle for CUDA), load to the
//! devices, confirm; optionally read the buffers back and compare them with
//! the files. [`LoadReport`] is what `sllm-store load --json` prints and
//! what the benchmarks read back: one type on both sides.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sllm_format::partitions::{FileStamp, Partitions};
use sllm_format::units::{gib_per_s, human_bytes};
use sllm_format::{INDEX_FILE, ModelId, TensorIndex};
use sllm_proto::BackendKind;

use crate::client::{ClientError, ServerConfig, StoreClient};
use crate::cuda::{CudaBuffer, CudaDevice, CudaError};
use crate::plan::{DeviceMap, Layout, LoadPlan, PlanError, plan};
use crate::shm::ShmBuffer;

/// What one load through the daemon took. Serialized as the JSON line of
/// `sllm-store load --json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    pub model: String,
    /// Bytes copied to the device.
    pub bytes: u64,
    pub model_size: u64,
    pub tensors: usize,
    /// `host` or `cuda`.
    pub backend: String,
    pub io_engine: String,
    /// `mirrored` or `packed`.
    pub layout: String,
    pub register_s: f64,
    /// The client's own part: planning, finding the devices and allocating
    /// the buffers (a new CUDA context in a fresh process; an inference
    /// engine has done all this before it loads). Part of `total_s`.
    #[serde(default)]
    pub alloc_s: f64,
    /// The daemon's own time to read the model into its pool for this
    /// load (0 when it was there already).
    pub host_load_s: f64,
    /// The whole model was in the daemon's pool before this load.
    #[serde(default)]
    pub from_pool: bool,
    /// From LoadModelAsync (host) to the replica confirmed.
    pub device_copy_s: f64,
    /// The model did not fit beside what the pool keeps and was streamed
    /// through it.
    #[serde(default)]
    pub streamed: bool,
    /// Bytes of the model left in the daemon's pool after the load.
    #[serde(default)]
    pub resident_bytes: u64,
    pub total_s: f64,
    pub gib_per_s: f64,
    /// With `verify`: whether every tensor matched the files (and they
    /// their manifest).
    pub verified: Option<bool>,
    /// With `verify`: each difference found, one line each ("mismatch:
    /// tensor ..." or "damaged: ...").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

impl LoadReport {
    /// The phases, one per line, for people.
    pub fn phases(&self) -> String {
        let host = if self.from_pool {
            "  host load    from the pool (loaded before, nothing read from disk)\n".to_owned()
        } else {
            format!(
                "  host load    {:>8.3} s  {:>7.2} GiB/s  (in the daemon)\n",
                self.host_load_s,
                gib_per_s(self.model_size, self.host_load_s)
            )
        };
        let mut out = format!(
            "  register     {:>8.3} s\n  allocate     {:>8.3} s  (this client's buffers)\n{host}  \
             device copy  {:>8.3} s  {:>7.2} GiB/s  (overlaps the host load)\n  total        {:>8.3} s  {:>7.2} GiB/s\n",
            self.register_s,
            self.alloc_s,
            self.device_copy_s,
            gib_per_s(self.bytes, self.device_copy_s),
            self.total_s,
            gib_per_s(self.bytes, self.total_s),
        );
        if self.streamed {
            out += &format!(
                "  streamed     larger than what the pool can spare: {} of {} stayed in it for the next load\n",
                human_bytes(self.resident_bytes),
                human_bytes(self.model_size)
            );
        }
        if let Some(ok) = self.verified {
            out += &format!(
                "  verified     {}\n",
                if ok {
                    "every tensor matches the files"
                } else {
                    "MISMATCH"
                }
            );
        }
        out
    }
}

/// A load that could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("the daemon serves no devices")]
    NoDevice,
    #[error(
        "reading the model's index: {0}; pass --storage-path pointing at the daemon's storage path"
    )]
    Index(#[from] sllm_format::index::IndexError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Cuda(#[from] CudaError),
    #[error("allocating host-backend buffers in {dir}: {source}")]
    Shm {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{model} changed on disk during the load (a `sllm-store save --force`?); the bytes may \
         not match the index read before it: load it again"
    )]
    Changed { model: String },
    #[error("reading back the buffers of {model}: {source}")]
    ReadBack {
        model: String,
        source: std::io::Error,
    },
    #[error("checking {model} against its files: {reason}")]
    Verify { model: String, reason: String },
}

/// Device buffers of either backend.
enum Buffers<'d> {
    Shm(Vec<ShmBuffer>),
    Cuda(Vec<CudaBuffer<'d>>),
}

impl Buffers<'_> {
    fn handle(&self, i: usize) -> Result<Vec<u8>, LoadError> {
        Ok(match self {
            Buffers::Shm(b) => b[i].handle(),
            Buffers::Cuda(b) => b[i].ipc_handle()?,
        })
    }

    fn read_at(&self, i: usize, buf: &mut [u8], offset: u64) -> Result<(), LoadError> {
        match self {
            Buffers::Shm(b) => b[i]
                .read_at(buf, offset)
                .map_err(|source| LoadError::ReadBack {
                    model: String::new(),
                    source,
                }),
            Buffers::Cuda(b) => Ok(b[i].read_at(buf, offset)?),
        }
    }
}

/// Loads `model` (its directory is `model_dir`) through `client` onto the
/// first device the daemon serves, in `layout`; with `verify_bytes`, reads
/// the buffers back and compares them with the files.
pub async fn load_model(
    client: &mut StoreClient,
    config: &ServerConfig,
    model: &ModelId,
    model_dir: &Path,
    layout: Layout,
    verify_bytes: bool,
) -> Result<LoadReport, LoadError> {
    let device = config
        .device_uuids
        .first()
        .ok_or(LoadError::NoDevice)?
        .clone();
    let total = Instant::now();
    let t = Instant::now();
    let model_size = client.register(model.as_str()).await?;
    let register_s = t.elapsed().as_secs_f64();

    let index_stamp = || {
        std::fs::metadata(model_dir.join(INDEX_FILE))
            .ok()
            .map(|m| FileStamp::of(&m))
    };
    let stamp_before = index_stamp();
    let allocating = Instant::now();
    let index = TensorIndex::read(model_dir)?;
    let plan = plan(&index, &DeviceMap::single(&device), layout)?;
    let gpus: Vec<CudaDevice> = if config.device_backend == BackendKind::Cuda {
        plan.buffers
            .iter()
            .map(|b| CudaDevice::by_uuid(&b.uuid))
            .collect::<Result<_, _>>()?
    } else {
        Vec::new()
    };
    let buffers = if config.device_backend == BackendKind::Cuda {
        Buffers::Cuda(
            plan.buffers
                .iter()
                .zip(&gpus)
                .map(|(b, gpu)| gpu.alloc(b.size_bytes))
                .collect::<Result<_, _>>()?,
        )
    } else {
        let dir = PathBuf::from(&config.host_shm_dir);
        Buffers::Shm(
            plan.buffers
                .iter()
                .map(|b| ShmBuffer::create(&dir, b.size_bytes))
                .collect::<Result<_, _>>()
                .map_err(|source| LoadError::Shm { dir, source })?,
        )
    };

    let alloc_s = allocating.elapsed().as_secs_f64();
    let before = client.model_status(model.as_str()).await?;
    let from_pool = before.host_state == sllm_proto::HostState::Loaded as i32
        && before.chunks_landed == before.chunks_total
        && before.chunks_total > 0;
    client.load_to_host(model.as_str()).await?;
    let copy_started = Instant::now();
    let replica = uuid::Uuid::new_v4().to_string();
    let handles = plan
        .buffers
        .iter()
        .enumerate()
        .map(|(i, b)| Ok((b.uuid.clone(), vec![buffers.handle(i)?])))
        .collect::<Result<_, LoadError>>()?;
    let bytes = plan.copy_bytes();
    if bytes > 0 {
        client
            .load_to_devices(model.as_str(), &replica, plan.copies_by_device(), handles)
            .await?;
        client.confirm(model.as_str(), &replica).await?;
    }
    let device_copy_s = copy_started.elapsed().as_secs_f64();
    // The daemon served the files on disk when asked: with the index the same
    // file throughout, the bytes belong to the index the plan was made from.
    if index_stamp() != stamp_before {
        return Err(LoadError::Changed {
            model: model.to_string(),
        });
    }
    let total_s = total.elapsed().as_secs_f64();
    let status = client.model_status(model.as_str()).await?;
    let host_load_s = if from_pool {
        0.0
    } else {
        status.host_load_seconds
    };
    let mut problems = Vec::new();
    let verified = if verify_bytes {
        problems = verify(model, model_dir, &index, &plan, &buffers)?;
        Some(problems.is_empty())
    } else {
        None
    };
    Ok(LoadReport {
        model: model.to_string(),
        bytes,
        model_size,
        tensors: index.len(),
        backend: config.device_backend.as_str().to_owned(),
        io_engine: config.io_engine.clone(),
        layout: match layout {
            Layout::Mirrored => "mirrored",
            Layout::Packed => "packed",
        }
        .to_owned(),
        register_s,
        alloc_s,
        host_load_s,
        from_pool,
        device_copy_s,
        streamed: status.streamed,
        resident_bytes: status.resident_bytes.max(0) as u64,
        total_s,
        gib_per_s: gib_per_s(bytes, total_s),
        verified,
        problems,
    })
}

/// Compares every tensor in the buffers with its bytes in the partitions,
/// and the partitions with their manifest's checksums: bytes that match
/// damaged files are not verified. Returns the differences, none when all
/// is well.
fn verify(
    model: &ModelId,
    model_dir: &Path,
    index: &TensorIndex,
    plan: &LoadPlan,
    buffers: &Buffers<'_>,
) -> Result<Vec<String>, LoadError> {
    let failed = |reason: String| LoadError::Verify {
        model: model.to_string(),
        reason,
    };
    let parts = Partitions::discover(model_dir).map_err(|e| failed(e.to_string()))?;
    let mut open = Vec::new();
    let mut problems = Vec::new();
    for (name, e) in index.iter() {
        let place = &plan.tensors[name];
        let buffer = plan
            .buffers
            .iter()
            .position(|b| b.uuid == place.device)
            .ok_or_else(|| failed("a planned device has no buffer".into()))?;
        let mut expected = vec![0u8; e.size as usize];
        let mut loaded = vec![0u8; e.size as usize];
        parts
            .read_exact_at(&mut open, e.offset, &mut expected)
            .map_err(|e| failed(e.to_string()))?;
        buffers
            .read_at(buffer, &mut loaded, place.offset)
            .map_err(|e| match e {
                LoadError::ReadBack { source, .. } => LoadError::ReadBack {
                    model: model.to_string(),
                    source,
                },
                other => other,
            })?;
        if expected != loaded {
            problems.push(format!(
                "mismatch: tensor {name:?} differs from {}",
                model_dir.display()
            ));
        }
    }
    let report =
        sllm_format::verify::verify_model(model_dir, &()).map_err(|e| failed(e.to_string()))?;
    problems.extend(report.problems.iter().map(|p| format!("damaged: {p}")));
    Ok(problems)
}
