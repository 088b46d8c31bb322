//! The Rust client of the sllm-store daemon.
//!
//! - [`StoreClient`]: a typed async API over `storage.Storage` (TCP or a unix
//!   socket), with errors that say what to do;
//! - [`plan`]: turns a model's tensor index and a device map into per-device
//!   buffers and copy lists: the mirrored layout (one buffer per device laid
//!   out like the file, so a model is a few large coalesced copies and
//!   tensors keep the writer's alignment) by default, or ServerlessLLM's
//!   packed layout;
//! - [`shm::ShmBuffer`]: device memory for the daemon's host backend (a
//!   shared-memory file whose path is the handle);
//! - [`load`]: one load as an inference engine does it, and the
//!   [`load::LoadReport`] that `sllm-store load --json` prints;
//! - [`cuda::CudaBuffer`]: GPU memory shared with the daemon through a CUDA
//!   IPC handle (the client half of the CUDA room; `libcuda` is loaded at run
//!   time, so the crate builds and runs without CUDA).

pub mod client;
pub mod cuda;
pub mod load;
pub mod plan;
pub mod shm;

pub use client::{ClientError, ServerConfig, StoreClient};
pub use sllm_proto as proto;
