//! The store daemon (`sllm-store start`): the pinned host pool, the io
//! engines that read partitions into it, the device backends that copy out
//! of it, the registry of models and replicas, and the ServerlessLLM gRPC
//! service over them. See `docs/ARCHITECTURE.md` for the flow of a load and
//! what each module may touch.
//!
//! It depends on the format (`sllm-format`) and the protocol (`sllm-proto`)
//! only: not on the client, the converter or the doctor.

pub mod auth;
pub mod daemon;
pub mod device;
pub mod io;
pub mod listener;
pub mod peer;
pub mod pool;
pub mod registry;
pub mod server;

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// Locks `m`, ignoring poisoning: every update under the daemon's locks
/// leaves its data consistent, and one panicked thread must not wedge the
/// daemon.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Waits on `cv` (for at most `timeout`, if given), ignoring poisoning as
/// [`lock`] does.
pub(crate) fn wait<'a, T>(
    cv: &Condvar,
    guard: MutexGuard<'a, T>,
    timeout: Option<Duration>,
) -> MutexGuard<'a, T> {
    match timeout {
        Some(t) => {
            cv.wait_timeout(guard, t)
                .unwrap_or_else(PoisonError::into_inner)
                .0
        }
        None => cv.wait(guard).unwrap_or_else(PoisonError::into_inner),
    }
}
