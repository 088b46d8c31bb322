//! The ServerlessLLM store's gRPC service (`storage.Storage`), generated from
//! `proto/storage.proto`.
//!
//! The proto is wire-compatible with ServerlessLLM 0.8: the official Python
//! client and the vLLM `serverless_llm` loader speak it unchanged. Everything
//! the daemon and the Rust client exchange goes through these types.

/// Generated messages, the `storage_client` and the `storage_server` modules.
pub mod storage {
    tonic::include_proto!("storage");
}

pub use storage::*;

/// The kind of device memory a daemon copies into, as
/// `GetServerConfigResponse.device_backend` names it on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// Shared-memory files standing in for device memory (tests, CI, CPU
    /// inference); the handle is the file's path.
    Host,
    /// CUDA device memory; the handle is a 64-byte `cudaIpcMemHandle_t`.
    Cuda,
}

impl BackendKind {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::Cuda => "cuda",
        }
    }

    /// From the wire name. An empty name is CUDA: ServerlessLLM's daemon,
    /// CUDA-only, does not fill the field. None for a name this build does
    /// not know.
    pub fn from_wire(name: &str) -> Option<Self> {
        match name {
            "host" => Some(Self::Host),
            "cuda" | "" => Some(Self::Cuda),
            _ => None,
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A device UUID as the protocol writes it (the keys of
/// `LoadModelRequest.chunks` and `.handles`): lower-case hex, 8-4-4-4-12, no
/// `GPU-` prefix, as ServerlessLLM and Python's `uuid.UUID` print the 16
/// bytes of a CUDA device UUID.
pub fn device_uuid_string(bytes: &[u8; 16]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

#[cfg(test)]
mod tests {
    //! The bytes on the wire are what ServerlessLLM's generated code sends:
    //! field numbers and types are checked by encoding known messages.
    use super::*;
    use prost::Message;

    #[test]
    fn device_uuids_print_as_serverlessllm_prints_them() {
        let bytes = [
            0x5a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f, 0x60, 0x71, 0x82, 0x93, 0xa4, 0xb5, 0xc6, 0xd7,
            0xe8, 0xf9,
        ];
        assert_eq!(
            device_uuid_string(&bytes),
            "5a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9"
        );
    }

    #[test]
    fn backend_kinds_round_trip_and_an_unset_one_is_cuda() {
        for kind in [BackendKind::Host, BackendKind::Cuda] {
            assert_eq!(BackendKind::from_wire(kind.as_str()), Some(kind));
        }
        assert_eq!(BackendKind::from_wire(""), Some(BackendKind::Cuda));
        assert_eq!(BackendKind::from_wire("rocm"), None);
    }

    #[test]
    fn register_response_wire_bytes() {
        let msg = RegisterModelResponse {
            model_path: "a".into(),
            model_size: 300,
        };
        // field 1 (len) "a", field 2 (varint) 300
        assert_eq!(msg.encode_to_vec(), [0x0a, 1, b'a', 0x10, 0xac, 0x02]);
    }

    #[test]
    fn load_request_wire_bytes() {
        let chunk = MemCopyChunk {
            src_offset: 1,
            size: 2,
            dst_offset: 3,
            handle_idx: 4,
        };
        assert_eq!(chunk.encode_to_vec(), [0x08, 1, 0x10, 2, 0x18, 3, 0x20, 4]);
        let req = LoadModelRequest {
            model_path: "m".into(),
            replica_uuid: "r".into(),
            chunks: [(
                "d".to_owned(),
                MemCopyChunkList {
                    chunks: vec![chunk],
                },
            )]
            .into(),
            handles: [(
                "d".to_owned(),
                MemCopyHandleList {
                    handles: vec![MemCopyHandle {
                        cuda_ipc_handle: vec![7; 64],
                    }],
                },
            )]
            .into(),
            target_device_type: DeviceType::Gpu as i32,
        };
        let bytes = req.encode_to_vec();
        assert_eq!(&bytes[..6], [0x0a, 1, b'm', 0x12, 1, b'r']);
        assert_eq!(
            &bytes[bytes.len() - 2..],
            [0x28, 2],
            "field 5 is the device type"
        );
        assert_eq!(LoadModelRequest::decode(&bytes[..]).unwrap(), req);
        assert_eq!(DeviceType::Cpu as i32, 1);
        let confirm = ConfirmModelRequest {
            model_path: String::new(),
            replica_uuid: String::new(),
            target_device_type: DeviceType::Gpu as i32,
        };
        assert_eq!(confirm.encode_to_vec(), [0x18, 2]);
    }
}
