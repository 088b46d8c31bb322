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
