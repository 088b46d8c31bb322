//! A typed async client of `storage.Storage`.

use std::collections::HashMap;
use std::time::Duration;

use sllm_proto::storage_client::StorageClient;
use sllm_proto::{
    BackendKind, ClearMemRequest, ConfirmModelRequest, DeviceType, GetModelStatusRequest,
    GetModelStatusResponse, GetServerConfigRequest, LoadModelRequest, MemCopyChunk,
    MemCopyChunkList, MemCopyHandle, MemCopyHandleList, RegisterModelRequest, UnloadModelRequest,
};
use tonic::Status;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};

/// Default daemon address, as ServerlessLLM's client dials it.
pub const DEFAULT_ADDR: &str = "127.0.0.1:8073";
const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// A call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the store daemon at {addr}: {reason}; start it with `sllm-store start` or pass --server"
    )]
    Connect { addr: String, reason: String },
    #[error("{op} failed: {message} ({})", code_in_words(*code))]
    Rpc {
        /// What the call was doing, in words (e.g. "copying the model to
        /// the devices" for LoadModelAsync to devices).
        op: &'static str,
        code: tonic::Code,
        message: String,
    },
    #[error("invalid server address {0:?}: use host:port or unix:<path>")]
    BadAddress(String),
    #[error("the store token ($SLLM_STORE_TOKEN or $SLLM_STORE_TOKEN_FILE): {0}")]
    Token(String),
    #[error(
        "the daemon serves a device backend this client does not know ({0:?}); use a client of the daemon's version"
    )]
    UnknownBackend(String),
}

impl ClientError {
    /// The gRPC code, for RPC failures.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// A gRPC code as words: `NotFound` is "not found".
fn code_in_words(code: tonic::Code) -> String {
    let name = format!("{code:?}");
    let mut words = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            words.push(' ');
        }
        words.push(c.to_ascii_lowercase());
    }
    words
}

fn rpc(op: &'static str) -> impl FnOnce(tonic::Status) -> ClientError {
    move |s| ClientError::Rpc {
        op,
        code: s.code(),
        message: s.message().to_owned(),
    }
}

/// The daemon's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    pub mem_pool_size: u64,
    pub chunk_size: u64,
    pub device_backend: BackendKind,
    pub device_uuids: Vec<String>,
    pub io_engine: String,
    pub host_shm_dir: String,
    pub version: String,
    /// The daemon's storage path (empty from daemons that do not say).
    pub storage_path: String,
}

/// A connection to the daemon. Cheap to clone.
#[derive(Clone, Debug)]
pub struct StoreClient {
    inner: StorageClient<InterceptedService<Channel, AuthHeader>>,
    channel: Channel,
}

/// Adds `authorization: Bearer <token>` to every storage call when the
/// environment names a token ($SLLM_STORE_TOKEN, or the file
/// $SLLM_STORE_TOKEN_FILE names).
#[derive(Clone, Debug)]
struct AuthHeader(Option<tonic::metadata::AsciiMetadataValue>);

impl Interceptor for AuthHeader {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        Ok(request)
    }
}

impl StoreClient {
    /// Connects to `addr`: `host:port`, `http://host:port`, or `unix:<path>`.
    pub async fn connect(addr: &str) -> Result<Self, ClientError> {
        let connect_err = |e: tonic::transport::Error| ClientError::Connect {
            addr: addr.to_owned(),
            reason: sllm_format::error_text::error_text(&e),
        };
        let channel = if let Some(path) = addr.strip_prefix("unix:") {
            let path = path.to_owned();
            // The URI is required but unused: the connector dials the socket.
            Endpoint::try_from("http://[::]:50051")
                .map_err(connect_err)?
                .connect_timeout(Duration::from_secs(5))
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                    }
                }))
                .await
                .map_err(connect_err)?
        } else {
            let uri = if addr.contains("://") {
                addr.to_owned()
            } else {
                format!("http://{addr}")
            };
            Endpoint::from_shared(uri)
                .map_err(|_| ClientError::BadAddress(addr.to_owned()))?
                .connect_timeout(Duration::from_secs(5))
                .connect()
                .await
                .map_err(connect_err)?
        };
        let inner = StorageClient::with_interceptor(channel.clone(), AuthHeader(token_from_env()?))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Self { inner, channel })
    }

    /// Indexes the model; returns its size in bytes.
    pub async fn register(&mut self, model: &str) -> Result<u64, ClientError> {
        let r = self
            .inner
            .register_model(RegisterModelRequest {
                model_path: model.into(),
            })
            .await
            .map_err(rpc("registering the model"))?;
        Ok(r.into_inner().model_size as u64)
    }

    /// Starts loading the model into the daemon's host pool; returns at once.
    pub async fn load_to_host(&mut self, model: &str) -> Result<(), ClientError> {
        self.inner
            .load_model_async(LoadModelRequest {
                model_path: model.into(),
                target_device_type: DeviceType::Cpu as i32,
                ..Default::default()
            })
            .await
            .map_err(rpc("loading the model into the daemon's pool"))?;
        Ok(())
    }

    /// Starts copying into device buffers; `copies` and `handles` are keyed
    /// by device UUID. Returns at once; [`confirm`](Self::confirm) waits.
    pub async fn load_to_devices(
        &mut self,
        model: &str,
        replica_uuid: &str,
        copies: HashMap<String, Vec<MemCopyChunk>>,
        handles: HashMap<String, Vec<Vec<u8>>>,
    ) -> Result<(), ClientError> {
        self.inner
            .load_model_async(LoadModelRequest {
                model_path: model.into(),
                replica_uuid: replica_uuid.into(),
                chunks: copies
                    .into_iter()
                    .map(|(uuid, chunks)| (uuid, MemCopyChunkList { chunks }))
                    .collect(),
                handles: handles
                    .into_iter()
                    .map(|(uuid, list)| {
                        let handles = list
                            .into_iter()
                            .map(|h| MemCopyHandle { cuda_ipc_handle: h })
                            .collect();
                        (uuid, MemCopyHandleList { handles })
                    })
                    .collect(),
                target_device_type: DeviceType::Gpu as i32,
            })
            .await
            .map_err(rpc("copying the model to the devices"))?;
        Ok(())
    }

    /// Waits until the replica's copies are complete.
    pub async fn confirm(&mut self, model: &str, replica_uuid: &str) -> Result<(), ClientError> {
        self.inner
            .confirm_model(ConfirmModelRequest {
                model_path: model.into(),
                replica_uuid: replica_uuid.into(),
                target_device_type: DeviceType::Gpu as i32,
            })
            .await
            .map_err(rpc("waiting for the copies"))?;
        Ok(())
    }

    /// Frees the model's host pool memory.
    pub async fn unload(&mut self, model: &str) -> Result<(), ClientError> {
        self.inner
            .unload_model(UnloadModelRequest {
                model_path: model.into(),
                target_device_type: DeviceType::Cpu as i32,
                ..Default::default()
            })
            .await
            .map_err(rpc("unloading the model"))?;
        Ok(())
    }

    /// Frees every model's host pool memory.
    pub async fn clear(&mut self) -> Result<(), ClientError> {
        self.inner
            .clear_mem(ClearMemRequest {})
            .await
            .map_err(rpc("clearing the pool"))?;
        Ok(())
    }

    /// Whether the daemon's standard gRPC health service reports
    /// `storage.Storage` as serving (it stops doing so while shutting down).
    pub async fn serving(&self) -> Result<bool, ClientError> {
        use tonic_health::pb::health_check_response::ServingStatus;
        let r = tonic_health::pb::health_client::HealthClient::new(self.channel.clone())
            .check(tonic_health::pb::HealthCheckRequest {
                service: "storage.Storage".into(),
            })
            .await
            .map_err(rpc("the health check"))?
            .into_inner();
        Ok(r.status == ServingStatus::Serving as i32)
    }

    /// The daemon's settings.
    pub async fn server_config(&mut self) -> Result<ServerConfig, ClientError> {
        let r = self
            .inner
            .get_server_config(GetServerConfigRequest {})
            .await
            .map_err(rpc("asking the daemon for its settings"))?
            .into_inner();
        Ok(ServerConfig {
            mem_pool_size: r.mem_pool_size as u64,
            chunk_size: r.chunk_size as u64,
            device_backend: BackendKind::from_wire(&r.device_backend)
                .ok_or(ClientError::UnknownBackend(r.device_backend))?,
            device_uuids: r.device_uuids,
            io_engine: r.io_engine,
            host_shm_dir: r.host_shm_dir,
            version: r.version,
            storage_path: r.storage_path,
        })
    }

    /// Where the model stands in the daemon's host memory.
    pub async fn model_status(
        &mut self,
        model: &str,
    ) -> Result<GetModelStatusResponse, ClientError> {
        Ok(self
            .inner
            .get_model_status(GetModelStatusRequest {
                model_path: model.into(),
            })
            .await
            .map_err(rpc("asking for the model's status"))?
            .into_inner())
    }
}

/// The token the environment names: $SLLM_STORE_TOKEN, else the first line
/// of the file $SLLM_STORE_TOKEN_FILE names; none when neither is set.
fn token_from_env() -> Result<Option<tonic::metadata::AsciiMetadataValue>, ClientError> {
    let token = match std::env::var("SLLM_STORE_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
    {
        Some(token) => token,
        None => match std::env::var_os("SLLM_STORE_TOKEN_FILE").filter(|p| !p.is_empty()) {
            None => return Ok(None),
            Some(path) => std::fs::read_to_string(&path)
                .map_err(|e| ClientError::Token(format!("cannot read {}: {e}", path.display())))?
                .lines()
                .next()
                .unwrap_or("")
                .to_owned(),
        },
    };
    format!("Bearer {}", token.trim())
        .parse()
        .map(Some)
        .map_err(|_| {
            ClientError::Token(
                "the token holds characters gRPC metadata cannot carry; use printable ASCII".into(),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_call_says_what_it_was_doing_and_its_code_in_words() {
        let e = rpc("copying the model to the devices")(tonic::Status::invalid_argument(
            "copy 0 is out of range",
        ));
        assert_eq!(
            e.to_string(),
            "copying the model to the devices failed: copy 0 is out of range (invalid argument)"
        );
        assert_eq!(e.code(), Some(tonic::Code::InvalidArgument));
        assert_eq!(code_in_words(tonic::Code::DataLoss), "data loss");
        assert_eq!(code_in_words(tonic::Code::Ok), "ok");
    }
}
