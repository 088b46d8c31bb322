//! The gRPC service `storage.Storage`, wire-compatible with ServerlessLLM's,
//! over the [`Registry`]. The only place where errors become gRPC status
//! codes ([`to_status`]); blocking registry work runs on tokio's blocking
//! pool so the service never stalls.

use sllm_proto::BackendKind;
use std::collections::HashMap;
use std::sync::Arc;

use sllm_proto::storage_server::Storage;
use sllm_proto::{
    ClearMemRequest, ClearMemResponse, ConfirmModelRequest, ConfirmModelResponse, DeviceType,
    GetModelStatusRequest, GetModelStatusResponse, GetServerConfigRequest, GetServerConfigResponse,
    LoadModelRequest, LoadModelResponse, RegisterModelRequest, RegisterModelResponse,
    UnloadModelRequest, UnloadModelResponse,
};
use tonic::{Request, Response, Status};

use crate::device::DeviceError;
use crate::io::IoError;
use crate::registry::copy_plan::RequestedCopy;
use crate::registry::on_disk::OnDiskError;
use crate::registry::{HostState, Registry, RegistryError};

/// The service.
pub struct StorageService {
    registry: Arc<Registry>,
    host_shm_dir: String,
}

impl StorageService {
    pub fn new(registry: Arc<Registry>, host_shm_dir: String) -> Self {
        Self {
            registry,
            host_shm_dir,
        }
    }

    /// Runs blocking registry work off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Registry) -> Result<T, RegistryError> + Send + 'static,
    ) -> Result<T, Status> {
        let registry = Arc::clone(&self.registry);
        tokio::task::spawn_blocking(move || work(&registry))
            .await
            .map_err(|e| Status::internal(format!("internal error: {e}")))?
            .map_err(to_status)
    }
}

/// Longest status message sent. gRPC carries it in a header, percent-encoded
/// (up to 3 bytes per byte), and clients refuse headers past 16 KiB: a longer
/// message would reach the client as a transport error instead of ours.
pub const MAX_STATUS_MESSAGE_BYTES: usize = 4096;

/// Maps a registry error to the gRPC status a client can act on.
pub fn to_status(e: RegistryError) -> Status {
    let message = sllm_format::elide(&e.to_string(), MAX_STATUS_MESSAGE_BYTES).into_owned();
    metrics::counter!("sllm_errors_total", "kind" => "request").increment(1);
    let status = status_of(e, message);
    // The operator sees what a client was told (a model asked for that is
    // not there is routine, and only at debug).
    if status.code() == tonic::Code::NotFound {
        tracing::debug!(code = ?status.code(), "request failed: {}", status.message());
    } else {
        tracing::info!(code = ?status.code(), "request failed: {}", status.message());
    }
    status
}

fn status_of(e: RegistryError, message: String) -> Status {
    match e {
        RegistryError::BadModelId(_)
        | RegistryError::Escapes { .. }
        | RegistryError::InvalidRequest(_)
        | RegistryError::InvalidCopy { .. }
        | RegistryError::Device(DeviceError::InvalidHandle { .. }) => {
            Status::invalid_argument(message)
        }
        RegistryError::NotFound { .. }
        | RegistryError::NotADirectory { .. }
        | RegistryError::UnknownModel { .. }
        | RegistryError::UnknownDevice { .. }
        | RegistryError::ReplicaUnknown { .. } => Status::not_found(message),
        RegistryError::ModelChanged { .. }
        | RegistryError::OnDisk {
            source: OnDiskError::KeptChanging { .. },
            ..
        } => Status::aborted(message),
        RegistryError::OnDisk { .. } => Status::data_loss(message),
        RegistryError::TooMuchWork { .. } => Status::resource_exhausted(message),
        RegistryError::NoThread(_) => Status::resource_exhausted(message),
        RegistryError::Unreadable { ref source, .. } if out_of_descriptors(source) => {
            Status::resource_exhausted(message)
        }
        RegistryError::Unreadable { .. } => Status::internal(message),
        RegistryError::NotRegistered { .. } | RegistryError::ReplicaExists { .. } => {
            Status::failed_precondition(message)
        }
        RegistryError::PoolTooSmall { .. }
        | RegistryError::PoolBusy { .. }
        | RegistryError::StreamBusy { .. }
        | RegistryError::TooManyReplicas(_) => Status::resource_exhausted(message),
        RegistryError::ConfirmTimeout { .. } => Status::deadline_exceeded(message),
        RegistryError::ShuttingDown => Status::unavailable(message),
        // Bytes on disk that are not what the model says they are.
        RegistryError::ReplicaFailed { ref reason, .. }
            if matches!(
                reason.read_error(),
                Some(IoError::Checksum { .. } | IoError::Truncated { .. })
            ) =>
        {
            Status::data_loss(message)
        }
        // Re-saved under the load: load it again.
        RegistryError::ReplicaFailed { ref reason, .. }
            if matches!(reason.read_error(), Some(IoError::Changed { .. })) =>
        {
            Status::aborted(message)
        }
        RegistryError::ReplicaFailed { .. }
        | RegistryError::Load { .. }
        | RegistryError::Device(_) => Status::internal(message),
    }
}

/// EMFILE / ENFILE: the daemon (or the machine) ran out of file descriptors.
fn out_of_descriptors(e: &std::io::Error) -> bool {
    let errno = e.raw_os_error();
    errno == Some(rustix::io::Errno::MFILE.raw_os_error())
        || errno == Some(rustix::io::Errno::NFILE.raw_os_error())
}

fn require_model_path(model_path: &str) -> Result<(), Status> {
    if model_path.is_empty() {
        return Err(Status::invalid_argument(
            "model_path is empty; pass the model id, e.g. org/name",
        ));
    }
    Ok(())
}

#[tonic::async_trait]
impl Storage for StorageService {
    async fn load_model_async(
        &self,
        request: Request<LoadModelRequest>,
    ) -> Result<Response<LoadModelResponse>, Status> {
        // Who sent it, for backends that write into client-named files.
        let peer = request.extensions().get::<crate::peer::Peer>().cloned();
        let req = request.into_inner();
        require_model_path(&req.model_path)?;
        let model = req.model_path.clone();
        match DeviceType::try_from(req.target_device_type) {
            Ok(DeviceType::Cpu) => self.blocking(move |r| r.load_to_host(&model)).await?,
            Ok(DeviceType::Gpu) => {
                let chunks: HashMap<String, Vec<RequestedCopy>> = req
                    .chunks
                    .into_iter()
                    .map(|(uuid, list)| {
                        let copies = list
                            .chunks
                            .into_iter()
                            .map(|c| RequestedCopy {
                                src_offset: c.src_offset,
                                size: c.size,
                                dst_offset: c.dst_offset,
                                handle_idx: c.handle_idx,
                            })
                            .collect();
                        (uuid, copies)
                    })
                    .collect();
                let handles: HashMap<String, Vec<Vec<u8>>> = req
                    .handles
                    .into_iter()
                    .map(|(uuid, list)| {
                        (
                            uuid,
                            list.handles
                                .into_iter()
                                .map(|h| h.cuda_ipc_handle)
                                .collect(),
                        )
                    })
                    .collect();
                let replica = req.replica_uuid;
                self.blocking(move |r| {
                    let client = peer.map_or_else(
                        || {
                            crate::device::ClientIdentity::Unknown(
                                "the request came without connection details".into(),
                            )
                        },
                        |p| p.identity(),
                    );
                    r.load_to_devices(&model, &replica, chunks, handles, &client)
                })
                .await?
            }
            _ => {
                return Err(Status::unimplemented(format!(
                    "target_device_type {} is not supported; use DEVICE_TYPE_CPU or DEVICE_TYPE_GPU",
                    req.target_device_type
                )));
            }
        }
        Ok(Response::new(LoadModelResponse {
            model_path: req.model_path,
        }))
    }

    async fn confirm_model(
        &self,
        request: Request<ConfirmModelRequest>,
    ) -> Result<Response<ConfirmModelResponse>, Status> {
        let req = request.into_inner();
        require_model_path(&req.model_path)?;
        if req.target_device_type != DeviceType::Gpu as i32 {
            return Err(Status::unimplemented(
                "ConfirmModel waits for GPU replicas only; use DEVICE_TYPE_GPU",
            ));
        }
        self.registry
            .confirm(&req.model_path, &req.replica_uuid)
            .await
            .map_err(to_status)?;
        Ok(Response::new(ConfirmModelResponse {
            model_path: req.model_path,
            code: 0,
        }))
    }

    async fn unload_model(
        &self,
        request: Request<UnloadModelRequest>,
    ) -> Result<Response<UnloadModelResponse>, Status> {
        let req = request.into_inner();
        require_model_path(&req.model_path)?;
        if req.target_device_type != DeviceType::Cpu as i32 {
            return Err(Status::unimplemented(
                "UnloadModel frees host memory only; use DEVICE_TYPE_CPU",
            ));
        }
        let model = req.model_path.clone();
        self.blocking(move |r| r.unload(&model)).await?;
        Ok(Response::new(UnloadModelResponse {
            model_path: req.model_path,
            code: 0,
        }))
    }

    async fn clear_mem(
        &self,
        _request: Request<ClearMemRequest>,
    ) -> Result<Response<ClearMemResponse>, Status> {
        self.blocking(|r| {
            r.clear();
            Ok(())
        })
        .await?;
        Ok(Response::new(ClearMemResponse {}))
    }

    async fn register_model(
        &self,
        request: Request<RegisterModelRequest>,
    ) -> Result<Response<RegisterModelResponse>, Status> {
        let req = request.into_inner();
        require_model_path(&req.model_path)?;
        let model = req.model_path.clone();
        let size = self.blocking(move |r| r.register(&model)).await?;
        Ok(Response::new(RegisterModelResponse {
            model_path: req.model_path,
            model_size: size as i64,
        }))
    }

    async fn get_server_config(
        &self,
        _request: Request<GetServerConfigRequest>,
    ) -> Result<Response<GetServerConfigResponse>, Status> {
        let r = &self.registry;
        let backend = r.backend();
        Ok(Response::new(GetServerConfigResponse {
            mem_pool_size: r.pool().total_bytes() as i64,
            chunk_size: r.pool().chunk_bytes() as i64,
            device_backend: backend.kind().as_str().into(),
            device_uuids: backend.devices().iter().map(|d| d.uuid.clone()).collect(),
            io_engine: r.engine_name().into(),
            host_shm_dir: if backend.kind() == BackendKind::Host {
                self.host_shm_dir.clone()
            } else {
                String::new()
            },
            version: env!("CARGO_PKG_VERSION").into(),
            storage_path: r.storage_root().display().to_string(),
        }))
    }

    async fn get_model_status(
        &self,
        request: Request<GetModelStatusRequest>,
    ) -> Result<Response<GetModelStatusResponse>, Status> {
        let req = request.into_inner();
        require_model_path(&req.model_path)?;
        let model = req.model_path.clone();
        let st = self.blocking(move |r| r.status(&model)).await?;
        let (host_state, error) = match st.state {
            HostState::NotLoaded => (sllm_proto::HostState::NotLoaded, String::new()),
            HostState::Loading => (sllm_proto::HostState::Loading, String::new()),
            HostState::Loaded => (sllm_proto::HostState::Loaded, String::new()),
            HostState::Failed(e) => (sllm_proto::HostState::Failed, e),
        };
        Ok(Response::new(GetModelStatusResponse {
            model_path: req.model_path,
            model_size: st.size as i64,
            host_state: host_state as i32,
            chunks_landed: st.chunks_landed as i64,
            chunks_total: st.chunks_total as i64,
            host_load_seconds: st.load_seconds.unwrap_or(0.0),
            error,
            replicas_copying: st.replicas_copying as i32,
            resident_bytes: st.resident_bytes as i64,
            streamed: st.streamed,
        }))
    }
}
