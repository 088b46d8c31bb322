//! Where replicas' bytes go: a device backend behind one trait, chosen at
//! run time.
//!
//! - [`host::HostBackend`] emulates device memory with shared-memory files
//!   the client creates (the "IPC handle" is the file's path), so the whole
//!   GPU path runs in tests and CI without a GPU.
//! - [`cuda::CudaBackend`] (cudarc, driver API, `libcuda` loaded at run
//!   time) is the real one.
//!
//! A request opens a [`DeviceTarget`] per device: the buffers behind its
//! handles, their sizes (for bounds checks before any byte moves), and
//! asynchronous copies that keep their source chunk alive until done. It
//! comes with the [`ClientIdentity`] of whoever sent it (learnt from the
//! connection by [`crate::peer`]), so a backend can refuse buffers that
//! client could not write itself.

pub mod cuda;
pub mod host;

use crate::pool::{HostPool, SharedChunk};

/// One device the daemon serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Lower-case 8-4-4-4-12 hex, no prefix (as ServerlessLLM formats them).
    pub uuid: String,
    pub name: String,
    pub index: usize,
}

pub use sllm_proto::BackendKind;

/// Which backend the daemon starts with (`--device`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    /// CUDA when a driver and a device are present, else host.
    Auto,
    Cuda,
    Host,
}

/// Who sent a request, as far as the kernel tells the daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientIdentity {
    /// Credentials the kernel vouches for: `SO_PEERCRED` on a unix socket
    /// (uid, gid and pid at connect time), or the owner of the client's
    /// socket for loopback TCP (uid only).
    Known {
        uid: u32,
        gid: Option<u32>,
        pid: Option<i32>,
    },
    /// Not learnable, and why: a peer off loopback, one in another network
    /// namespace, or a failed lookup.
    Unknown(String),
}

impl std::fmt::Display for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientIdentity::Known { uid, gid, pid } => {
                write!(f, "uid {uid}")?;
                if let Some(gid) = gid {
                    write!(f, ", gid {gid}")?;
                }
                if let Some(pid) = pid {
                    write!(f, ", pid {pid}")?;
                }
                Ok(())
            }
            ClientIdentity::Unknown(why) => write!(f, "unknown ({why})"),
        }
    }
}

/// A device operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("handle {index} for device {device} is invalid: {reason}")]
    InvalidHandle {
        device: String,
        index: usize,
        reason: String,
    },
    #[error("copy to device {device} failed: {reason}")]
    Copy { device: String, reason: String },
    #[error("{0}")]
    Unavailable(String),
}

/// Opens request targets on the devices it serves.
pub trait DeviceBackend: Send + Sync {
    /// What it copies into.
    fn kind(&self) -> BackendKind;

    /// The devices served, in index order.
    fn devices(&self) -> &[DeviceInfo];

    /// Makes the pool usable as a DMA source (page-locks it for CUDA).
    fn register_host_memory(&self, pool: &HostPool) -> Result<(), DeviceError> {
        let _ = pool;
        Ok(())
    }

    /// Opens the buffers behind `handles` on `device` for `client`.
    /// Validates every handle; nothing is copied yet.
    fn open_target(
        &self,
        device: &DeviceInfo,
        handles: &[Vec<u8>],
        client: &ClientIdentity,
    ) -> Result<Box<dyn DeviceTarget>, DeviceError>;
}

/// Part of a copy that lies within one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub chunk_offset: usize,
    pub len: usize,
    pub handle_idx: usize,
    pub dst_offset: u64,
}

/// The destination buffers of one request on one device.
pub trait DeviceTarget: Send {
    /// The device's UUID, for errors.
    fn device(&self) -> &str;

    /// Size in bytes of each buffer, by handle index, as opened.
    fn buffer_sizes(&self) -> &[u64];

    /// Size of buffer `handle_idx` now, for the bounds check of each copy:
    /// as opened, unless the backend's buffers can change size (the host
    /// backend re-reads its files, so a client that shrank one is never
    /// written past its end).
    fn current_size(&self, handle_idx: usize) -> Result<u64, DeviceError> {
        self.buffer_sizes()
            .get(handle_idx)
            .copied()
            .ok_or_else(|| self.copy_error(format!("no handle {handle_idx}")))
    }

    /// Starts copying `piece` of `chunk`: the one bounds check of every
    /// backend (the source within the chunk, the destination within the
    /// buffer), then [`copy_checked`](Self::copy_checked). The target keeps
    /// the chunk alive until the copy is complete.
    fn copy(&mut self, chunk: &SharedChunk, piece: &Piece) -> Result<(), DeviceError> {
        let Piece {
            chunk_offset,
            len,
            handle_idx,
            dst_offset,
        } = *piece;
        if chunk_offset
            .checked_add(len)
            .is_none_or(|end| end > chunk.bytes().len())
        {
            return Err(self.copy_error(format!(
                "source range {chunk_offset}+{len} is outside the chunk"
            )));
        }
        let size = self.current_size(handle_idx)?;
        if dst_offset
            .checked_add(len as u64)
            .is_none_or(|end| end > size)
        {
            return Err(self.copy_error(format!(
                "destination {dst_offset}+{len} is past the end of buffer {handle_idx} ({size} bytes)"
            )));
        }
        self.copy_checked(
            chunk,
            chunk_offset..chunk_offset + len,
            handle_idx,
            dst_offset,
        )
    }

    /// Starts copying `chunk.bytes()[src]` to buffer `handle_idx` at
    /// `dst_offset`; both ranges were checked by [`copy`](Self::copy).
    fn copy_checked(
        &mut self,
        chunk: &SharedChunk,
        src: std::ops::Range<usize>,
        handle_idx: usize,
        dst_offset: u64,
    ) -> Result<(), DeviceError>;

    /// Every copy from the current chunk has been started: a backend that
    /// copies asynchronously lets go of the chunks whose copies have
    /// completed, and may wait for the oldest so that it holds only a few
    /// (a streamed load needs them back in the pool). Copies from another
    /// chunk end the current one too; this only says so earlier.
    fn end_chunk(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }

    /// Waits until every copy started so far is complete, and lets go of
    /// every chunk.
    fn synchronize(&mut self) -> Result<(), DeviceError>;

    /// Seconds the device itself took for the copies synchronized so far,
    /// from the first starting to the last ending, where it can tell (CUDA
    /// events); for telling DMA time from the daemon's own.
    fn device_seconds(&self) -> Option<f64> {
        None
    }

    /// A copy error naming this device.
    fn copy_error(&self, reason: String) -> DeviceError {
        DeviceError::Copy {
            device: self.device().to_owned(),
            reason,
        }
    }
}
