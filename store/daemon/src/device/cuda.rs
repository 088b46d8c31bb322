//! The CUDA backend: copies pool chunks into GPU memory that another process
//! allocated and shared through CUDA IPC handles. Driver API through cudarc,
//! with `libcuda` loaded at run time, so the binary builds and runs where
//! there is no CUDA at all; [`CudaBackend::probe`] says why it is
//! unavailable instead of panicking.
//!
//! One of the three rooms allowed `unsafe`. The invariants:
//! - a device pointer comes from `cuIpcOpenMemHandle` for this request and is
//!   closed (after the stream is synchronized) when the target is dropped;
//! - every copy is bounds-checked against the allocation's extent from
//!   `cuMemGetAddressRange` before it is queued;
//! - a queued copy reads host memory asynchronously, so the target keeps the
//!   source chunk alive until the stream has been synchronized;
//! - the driver state (contexts, the pool's registration) lives in an `Arc`
//!   that every target holds, so it is torn down only after the last copy
//!   has been synchronized; the pool's mapping is kept alive until it is
//!   unregistered.

#![allow(
    unsafe_code,
    reason = "the CUDA backend: driver calls and IPC-mapped device memory; every block says why it is sound"
)]

use sllm_proto::BackendKind;
use std::ffi::{CStr, c_void};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys as cu;

use super::{ClientIdentity, DeviceBackend, DeviceError, DeviceInfo, DeviceTarget};
use crate::pool::{HostPool, SharedChunk};

/// The pool is registered with the driver in pieces of this size.
const REGISTER_PIECE_BYTES: usize = 1 << 30;
/// Bytes in a CUDA IPC memory handle.
pub const IPC_HANDLE_BYTES: usize = 64;

fn check(op: &str, result: cu::CUresult) -> Result<(), String> {
    if result == cu::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(format!("{op} failed: {result:?}"))
    }
}

/// A primary context, shareable between threads.
#[derive(Clone, Copy)]
struct Context(cu::CUcontext);

// SAFETY: a CUDA context is a driver handle that may be made current on
// any thread; the driver API is thread-safe.
unsafe impl Send for Context {}
// SAFETY: as above.
unsafe impl Sync for Context {}

impl Context {
    fn make_current(self) -> Result<(), String> {
        // SAFETY: the context was retained in `probe` and is released only
        // when `CudaInner` drops, which every target keeps alive.
        check("cuCtxSetCurrent", unsafe { cu::cuCtxSetCurrent(self.0) })
    }
}

/// GPUs seen through the CUDA driver.
pub struct CudaBackend {
    inner: Arc<CudaInner>,
}

/// The driver state, shared with every open target.
struct CudaInner {
    devices: Vec<DeviceInfo>,
    handles: Vec<cu::CUdevice>,
    contexts: Vec<Context>,
    /// Registered pieces of the pool, and the pool (kept mapped until they
    /// are unregistered).
    registered: Mutex<(Vec<usize>, Option<HostPool>)>,
}

impl CudaBackend {
    /// Finds the driver and the devices, and holds each device's primary
    /// context; an error says why CUDA cannot be used.
    pub fn probe() -> Result<Self, DeviceError> {
        guarded(Self::probe_devices)
    }

    /// The devices the driver sees, without creating a context on any: safe
    /// to call beside a running inference process (the doctor does), also
    /// on GPUs in exclusive-process mode.
    pub fn list_devices() -> Result<Vec<DeviceInfo>, DeviceError> {
        guarded(|| Ok(enumerate()?.into_iter().map(|(_, info)| info).collect()))
    }

    fn probe_devices() -> Result<Self, DeviceError> {
        let mut backend = CudaInner {
            devices: Vec::new(),
            handles: Vec::new(),
            contexts: Vec::new(),
            registered: Mutex::new((Vec::new(), None)),
        };
        for (dev, info) in enumerate()? {
            let mut ctx = std::ptr::null_mut();
            // SAFETY: a plain driver call with a valid out-pointer to a local,
            // on a device handle the driver gave.
            check("cuDevicePrimaryCtxRetain", unsafe {
                cu::cuDevicePrimaryCtxRetain(&mut ctx, dev)
            })
            .map_err(unavailable)?;
            backend.handles.push(dev);
            backend.contexts.push(Context(ctx));
            backend.devices.push(info);
        }
        Ok(Self {
            inner: Arc::new(backend),
        })
    }
}

fn unavailable(e: String) -> DeviceError {
    DeviceError::Unavailable(format!("CUDA: {e}"))
}

/// Runs `f` if the driver library is present, turning the panic cudarc
/// raises when a driver lacks an entry point it binds into an error: nothing
/// may panic for lack of CUDA.
fn guarded<T>(
    f: impl FnOnce() -> Result<T, DeviceError> + std::panic::UnwindSafe,
) -> Result<T, DeviceError> {
    // SAFETY: only tries to dlopen the driver library's usual names.
    if !unsafe { cu::is_culib_present() } {
        return Err(DeviceError::Unavailable(
            "no CUDA driver library (libcuda.so.1) on this machine".into(),
        ));
    }
    std::panic::catch_unwind(f).unwrap_or_else(|_| {
        Err(DeviceError::Unavailable(
            "the CUDA driver lacks an entry point this build needs; update the NVIDIA driver"
                .into(),
        ))
    })
}

/// Initializes the driver and describes every device it sees (no contexts).
fn enumerate() -> Result<Vec<(cu::CUdevice, DeviceInfo)>, DeviceError> {
    // SAFETY: plain driver calls with valid out-pointers to locals.
    unsafe {
        check("cuInit", cu::cuInit(0)).map_err(unavailable)?;
        let mut count = 0;
        check("cuDeviceGetCount", cu::cuDeviceGetCount(&mut count)).map_err(unavailable)?;
        if count <= 0 {
            return Err(unavailable(
                "the driver sees no device (check CUDA_VISIBLE_DEVICES)".into(),
            ));
        }
        let mut out = Vec::with_capacity(count as usize);
        for ordinal in 0..count {
            let mut dev = 0;
            check("cuDeviceGet", cu::cuDeviceGet(&mut dev, ordinal)).map_err(unavailable)?;
            let mut name = [0 as std::ffi::c_char; 256];
            check(
                "cuDeviceGetName",
                cu::cuDeviceGetName(name.as_mut_ptr(), name.len() as i32, dev),
            )
            .map_err(unavailable)?;
            let mut uuid = cu::CUuuid { bytes: [0; 16] };
            check("cuDeviceGetUuid_v2", cu::cuDeviceGetUuid_v2(&mut uuid, dev))
                .map_err(unavailable)?;
            out.push((
                dev,
                DeviceInfo {
                    uuid: sllm_proto::device_uuid_string(&uuid.bytes.map(|b| b as u8)),
                    // SAFETY: cuDeviceGetName wrote a NUL-terminated name
                    // into the zeroed buffer, which it cannot overrun.
                    name: CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned(),
                    index: ordinal as usize,
                },
            ));
        }
        Ok(out)
    }
}

impl DeviceBackend for CudaBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cuda
    }

    fn devices(&self) -> &[DeviceInfo] {
        &self.inner.devices
    }

    fn register_host_memory(&self, pool: &HostPool) -> Result<(), DeviceError> {
        let inner = &self.inner;
        let fail =
            |e: String| DeviceError::Unavailable(format!("cannot page-lock the pool for DMA: {e}"));
        inner
            .contexts
            .first()
            .ok_or_else(|| fail("no device".into()))?
            .make_current()
            .map_err(fail)?;
        let (base, len) = pool.region();
        // Whole chunks per piece: a chunk never straddles two registrations.
        let chunk = pool.chunk_bytes();
        let piece_bytes = (REGISTER_PIECE_BYTES / chunk).max(1) * chunk;
        let mut registered = crate::lock(&inner.registered);
        let mut offset = 0;
        while offset < len {
            let piece = piece_bytes.min(len - offset);
            // SAFETY: the piece lies inside the pool's live mapping, which
            // the driver state keeps alive (the pool clone below) until its
            // Drop unregisters it; PORTABLE pins it for every context.
            let result = unsafe {
                cu::cuMemHostRegister_v2(
                    base.add(offset).cast::<c_void>(),
                    piece,
                    cu::CU_MEMHOSTREGISTER_PORTABLE,
                )
            };
            if let Err(e) = check("cuMemHostRegister", result) {
                unregister(&mut registered.0);
                return Err(fail(e));
            }
            registered.0.push(base as usize + offset);
            offset += piece;
        }
        registered.1 = Some(pool.clone());
        Ok(())
    }

    /// The client is not consulted: a CUDA IPC handle is a capability, and
    /// only a process that could read the allocation could have exported it.
    fn open_target(
        &self,
        device: &DeviceInfo,
        handles: &[Vec<u8>],
        _client: &ClientIdentity,
    ) -> Result<Box<dyn DeviceTarget>, DeviceError> {
        let ctx = *self
            .inner
            .contexts
            .get(device.index)
            .ok_or_else(|| DeviceError::Copy {
                device: device.uuid.clone(),
                reason: "no context for this device".into(),
            })?;
        let copy_err = |reason: String| DeviceError::Copy {
            device: device.uuid.clone(),
            reason,
        };
        ctx.make_current().map_err(copy_err)?;
        let mut target = CudaTarget {
            device: device.uuid.clone(),
            ctx,
            stream: std::ptr::null_mut(),
            ptrs: Vec::with_capacity(handles.len()),
            sizes: Vec::with_capacity(handles.len()),
            keep: Vec::new(),
            _driver: Arc::clone(&self.inner),
        };
        for (index, bytes) in handles.iter().enumerate() {
            let invalid = |reason: String| DeviceError::InvalidHandle {
                device: device.uuid.clone(),
                index,
                reason,
            };
            let raw: [u8; IPC_HANDLE_BYTES] = bytes.as_slice().try_into().map_err(|_| {
                invalid(format!(
                    "a CUDA IPC handle is {IPC_HANDLE_BYTES} bytes, got {} (a host-backend path sent to a CUDA daemon?)",
                    bytes.len()
                ))
            })?;
            let handle = cu::CUipcMemHandle {
                reserved: raw.map(|b| b as std::ffi::c_char),
            };
            let mut ptr: cu::CUdeviceptr = 0;
            // SAFETY: `handle` is a by-value copy of 64 client bytes; the
            // driver validates them and fails cleanly on garbage or on a
            // handle from another device. The pointer is closed in Drop.
            let opened = unsafe {
                cu::cuIpcOpenMemHandle_v2(
                    &mut ptr,
                    handle,
                    cu::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
                )
            };
            check("cuIpcOpenMemHandle", opened)
                .map_err(|e| invalid(format!("not a usable IPC handle for this device: {e}")))?;
            target.ptrs.push(ptr);
            let (mut base, mut size) = (0, 0usize);
            // SAFETY: `ptr` was just opened in this context; out-pointers
            // are locals.
            let range = unsafe { cu::cuMemGetAddressRange_v2(&mut base, &mut size, ptr) };
            check("cuMemGetAddressRange", range).map_err(invalid)?;
            target.sizes.push((base + size as u64).saturating_sub(ptr));
        }
        // SAFETY: the context is current; the stream is destroyed in Drop.
        let created = unsafe {
            cu::cuStreamCreate(
                &mut target.stream,
                cu::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
            )
        };
        check("cuStreamCreate", created).map_err(copy_err)?;
        Ok(Box::new(target))
    }
}

fn unregister(pieces: &mut Vec<usize>) {
    for piece in pieces.drain(..) {
        // SAFETY: each address was registered by us and not yet unregistered.
        let _ = unsafe { cu::cuMemHostUnregister(piece as *mut c_void) };
    }
}

impl Drop for CudaInner {
    /// Runs after the last target is gone: no copy is in flight.
    fn drop(&mut self) {
        if let Ok(mut registered) = self.registered.lock() {
            if self
                .contexts
                .first()
                .is_some_and(|c| c.make_current().is_ok())
            {
                unregister(&mut registered.0);
            }
            registered.1 = None;
        }
        for &dev in &self.handles {
            // SAFETY: retained once per device in probe, released once here.
            let _ = unsafe { cu::cuDevicePrimaryCtxRelease_v2(dev) };
        }
    }
}

/// The GPU buffers of one request on one device.
struct CudaTarget {
    device: String,
    ctx: Context,
    stream: cu::CUstream,
    ptrs: Vec<cu::CUdeviceptr>,
    sizes: Vec<u64>,
    /// Chunks read by queued copies: alive until the stream is synchronized.
    keep: Vec<SharedChunk>,
    /// Keeps the contexts and the pool's registration alive; dropped last.
    _driver: Arc<CudaInner>,
}

// SAFETY: the stream and device pointers are driver handles usable from any
// thread on which the target's context is current; every method makes it
// current first.
unsafe impl Send for CudaTarget {}

impl DeviceTarget for CudaTarget {
    fn device(&self) -> &str {
        &self.device
    }

    fn buffer_sizes(&self) -> &[u64] {
        &self.sizes
    }

    fn copy_checked(
        &mut self,
        chunk: &SharedChunk,
        src: std::ops::Range<usize>,
        handle_idx: usize,
        dst_offset: u64,
    ) -> Result<(), DeviceError> {
        self.ctx.make_current().map_err(|e| self.copy_error(e))?;
        let src = &chunk.bytes()[src];
        let ptr = self.ptrs[handle_idx];
        // SAFETY: the destination range lies inside the IPC allocation
        // (`copy` checked it against the extent from cuMemGetAddressRange);
        // the source is a frozen pool chunk, kept alive in `keep` until the
        // stream is synchronized, and page-locked when the pool was
        // registered.
        let queued = unsafe {
            cu::cuMemcpyHtoDAsync_v2(
                ptr + dst_offset,
                src.as_ptr().cast::<c_void>(),
                src.len(),
                self.stream,
            )
        };
        check("cuMemcpyHtoDAsync", queued).map_err(|e| self.copy_error(e))?;
        if !self.keep.last().is_some_and(|k| Arc::ptr_eq(k, chunk)) {
            self.keep.push(Arc::clone(chunk));
        }
        Ok(())
    }

    fn synchronize(&mut self) -> Result<(), DeviceError> {
        self.ctx.make_current().map_err(|e| self.copy_error(e))?;
        // SAFETY: the stream is live until Drop.
        let done = unsafe { cu::cuStreamSynchronize(self.stream) };
        check("cuStreamSynchronize", done).map_err(|e| self.copy_error(e))?;
        self.keep.clear();
        Ok(())
    }
}

impl Drop for CudaTarget {
    fn drop(&mut self) {
        if self.ctx.make_current().is_err() {
            // Without the context nothing can be waited for safely: keep the
            // chunks (leaked) rather than free memory a copy may still read.
            std::mem::forget(std::mem::take(&mut self.keep));
            return;
        }
        if !self.stream.is_null() {
            // SAFETY: the stream is live; waiting makes every queued copy
            // finish before its source chunk and destination are released.
            unsafe {
                let _ = cu::cuStreamSynchronize(self.stream);
                let _ = cu::cuStreamDestroy_v2(self.stream);
            }
        }
        self.keep.clear();
        for &ptr in &self.ptrs {
            // SAFETY: opened in open_target, closed exactly once here.
            let _ = unsafe { cu::cuIpcCloseMemHandle(ptr) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probing_without_cuda_is_an_error_not_a_panic() {
        match CudaBackend::probe() {
            Ok(backend) => assert!(!backend.devices().is_empty()),
            Err(e) => assert!(
                e.to_string().contains("CUDA") || e.to_string().contains("libcuda"),
                "{e}"
            ),
        }
    }
}
