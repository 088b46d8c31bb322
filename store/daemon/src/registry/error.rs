//! What the registry refuses or could not carry out, typed for the server
//! (the only place errors become gRPC codes).

use std::path::PathBuf;

use sllm_format::model_id::ModelIdError;
use sllm_format::units::human_bytes;

use super::copy_plan::PlanError;
use super::on_disk::OnDiskError;
use super::replica::ReplicaError;
use crate::device::DeviceError;
use crate::io::IoError;

/// A request the registry refuses or could not carry out. The server maps
/// each kind to a gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    BadModelId(#[from] ModelIdError),
    #[error("model {model}: {path} leads outside the storage path {root}; refusing to read it")]
    Escapes {
        model: String,
        path: PathBuf,
        root: PathBuf,
    },
    #[error(
        "model {model} not found: {path} has no tensor.data_0; convert it with `sllm-store save \
         --model {model}` (storage path {root})"
    )]
    NotFound {
        model: String,
        path: PathBuf,
        root: PathBuf,
    },
    #[error(
        "model {model} names {path}, which is not a directory: a model is the directory that \
         holds tensor_index.json and tensor.data_0 (storage path {root})"
    )]
    NotADirectory {
        model: String,
        path: PathBuf,
        root: PathBuf,
    },
    #[error(
        "model {model} is not registered and the daemon runs with --registration-required; call RegisterModel first"
    )]
    NotRegistered { model: String },
    #[error(
        "model {model} is {} and streams through the pool, which must then hold at least {} \
         (one checksum block of its manifest, in whole chunks) but holds only {}; restart the \
         daemon with a larger --mem-pool-size (or $MEM_POOL_SIZE), or a smaller --chunk-size",
        human_bytes(*size), human_bytes(*needed), human_bytes(*pool)
    )]
    PoolTooSmall {
        model: String,
        size: u64,
        needed: u64,
        pool: u64,
    },
    #[error("model {model}: other replicas are streaming it; send the request again")]
    StreamBusy { model: String },
    #[error(
        "model {model} needs {} of pool memory; {} of {} are free and the rest belongs to models \
         in use; wait for them, unload some, or raise --mem-pool-size",
        human_bytes(*size), human_bytes(*free), human_bytes(*pool)
    )]
    PoolBusy {
        model: String,
        size: u64,
        free: u64,
        pool: u64,
    },
    #[error("{0}")]
    InvalidRequest(String),
    #[error("unknown device {uuid}; this daemon serves {known}")]
    UnknownDevice { uuid: String, known: String },
    #[error("model {model}: {source}")]
    InvalidCopy { model: String, source: PlanError },
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("replica {uuid} of model {model} is already in use; use a fresh replica_uuid per load")]
    ReplicaExists { uuid: String, model: String },
    #[error(
        "no replica {uuid} of model {model} was requested; send LoadModelAsync to the GPU first"
    )]
    ReplicaUnknown { uuid: String, model: String },
    #[error("{0} replicas are already being copied; retry when some finish")]
    TooManyReplicas(usize),
    #[error("replica {uuid} of model {model} failed: {reason}")]
    ReplicaFailed {
        uuid: String,
        model: String,
        reason: Box<ReplicaError>,
    },
    #[error("replica {uuid} of model {model} is still copying after {seconds} s")]
    ConfirmTimeout {
        uuid: String,
        model: String,
        seconds: u64,
    },
    #[error("loading model {model} failed: {source}")]
    Load { model: String, source: IoError },
    #[error("model {model} is not known to this daemon (never registered or loaded)")]
    UnknownModel { model: String },
    #[error("model {model}: cannot read {path}: {source}")]
    Unreadable {
        model: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("model {model} changed on disk while this request was being planned; send it again")]
    ModelChanged { model: String },
    #[error("model {model}: {source}")]
    OnDisk { model: String, source: OnDiskError },
    #[error(
        "the replicas being copied already hold {what}; this request adds {adding} more, past \
         the limit of {limit}: retry when some finish"
    )]
    TooMuchWork {
        what: String,
        adding: String,
        limit: String,
    },
    #[error("cannot start a worker thread: {0}; the machine is out of threads or memory")]
    NoThread(std::io::Error),
    #[error("the daemon is shutting down")]
    ShuttingDown,
}
