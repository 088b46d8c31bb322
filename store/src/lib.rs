//! The ServerlessLLM-compatible model store: the offline converter from
//! safetensors and the Hugging Face cache, and (issue #4) the daemon.
//!
//! The format itself lives in the `sllm-format` crate, re-exported here as
//! `format` (with `units`, `durable` and `progress`). The `sllm-store` binary
//! is glue over this library; see `docs/ARCHITECTURE.md` for the map of
//! modules and what each may touch.

pub use sllm_format as format;
pub use sllm_format::{durable, progress, units};

pub mod config;
pub mod daemon;
pub mod device;
pub mod doctor;
pub mod import;
pub mod io;
pub mod listener;
pub mod peer;
pub mod placement;
pub mod pool;
pub mod registry;
pub mod save;
pub mod server;
pub mod staging;
pub mod synth;

/// Locks `m`, ignoring poisoning: every update under the daemon's locks
/// leaves its data consistent, and one panicked thread must not wedge the
/// daemon.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
