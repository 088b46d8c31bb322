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
         --model {model} --storage-path {root}`"
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
        "model {model} is {} and streams through the pool, which must then hold at least {} ({}) \
         but holds only {}; restart the daemon with a larger --mem-pool-size (or \
         $MEM_POOL_SIZE){}",
        human_bytes(*size),
        human_bytes(*ring as u64 * *chunk),
        ring_reason(*size, *ring, *chunk, *block),
        human_bytes(*pool),
        smaller_chunks(*chunk, *block, *pool)
    )]
    PoolTooSmall {
        model: String,
        size: u64,
        /// Chunks the ring needs.
        ring: usize,
        chunk: u64,
        /// The manifest's checksum block, `None` without one.
        block: Option<u64>,
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
    #[error(
        "replica {uuid:?} of model {model} is already in use; use a fresh replica_uuid per load"
    )]
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

/// Why a streamed load of a model of `size` bytes needs `ring` chunks of
/// `chunk` bytes.
fn ring_reason(size: u64, ring: usize, chunk: u64, block: Option<u64>) -> String {
    match block {
        Some(block) if ring as u64 * chunk >= size => format!(
            "all of its {ring} chunks of {}: one checksum block of {} spans them, and they all \
             land before it is hashed",
            human_bytes(chunk),
            human_bytes(block)
        ),
        Some(block) => format!(
            "{ring} chunks of {}: the chunks one checksum block of {} can span, all landed \
             before it is hashed, and one more for the copy in progress",
            human_bytes(chunk),
            human_bytes(block)
        ),
        None => format!(
            "{ring} chunks of {}: one being copied while the next is read",
            human_bytes(chunk)
        ),
    }
}

/// The other fix, where smaller chunks would need less: with a manifest the
/// ring then approaches one checksum block; without one it is two chunks,
/// so chunks of half the pool fit. Sizes offered are whole 4 KiB pages, as
/// `--chunk-size` needs.
fn smaller_chunks(chunk: u64, block: Option<u64>, pool: u64) -> String {
    const PAGE: u64 = 4096;
    let (smaller, needs) = match block {
        Some(block) => {
            let smaller = (chunk / 4) / PAGE * PAGE;
            if smaller < 1 << 20 {
                return String::new();
            }
            (smaller, (block.div_ceil(smaller) + 2) * smaller)
        }
        None => {
            let smaller = (pool / 2) / PAGE * PAGE;
            if smaller < PAGE {
                return String::new();
            }
            (smaller, 2 * smaller)
        }
    };
    format!(
        ", or a smaller --chunk-size (with chunks of {} it needs {})",
        human_bytes(smaller),
        human_bytes(needs)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_too_small_to_stream_says_what_it_needs_and_what_smaller_chunks_need() {
        let e = RegistryError::PoolTooSmall {
            model: "o/m".into(),
            size: 1 << 30,
            ring: 3,
            chunk: 32 << 20,
            block: Some(32 << 20),
            pool: 32 << 20,
        };
        let text = e.to_string();
        for needle in [
            "at least 96.00 MiB (3 chunks of 32.00 MiB",
            "holds only 32.00 MiB",
            "with chunks of 8.00 MiB it needs 48.00 MiB",
        ] {
            assert!(text.contains(needle), "{needle:?} in {text}");
        }
        // Without a manifest the ring is two chunks: half the pool each
        // fits. Offered sizes are whole pages.
        let e = RegistryError::PoolTooSmall {
            model: "o/m".into(),
            size: 1 << 30,
            ring: 2,
            chunk: 32 << 20,
            block: None,
            pool: (48 << 20) + 4096,
        };
        let text = e.to_string();
        assert!(
            text.contains("with chunks of 24.00 MiB it needs 48.00 MiB"),
            "{text}"
        );
    }
}
