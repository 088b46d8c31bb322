//! The Rust client of the store daemon (issue #4): a typed API over the
//! `storage.Storage` gRPC service, copy planning from a model's tensor index,
//! and device memory for the host and CUDA backends.
//!
//! It holds nothing yet beyond re-exporting the generated protocol types; the
//! daemon it talks to lands together with it.

pub use sllm_proto as proto;
