//! GPU memory a client allocates and shares with the daemon through a CUDA
//! IPC handle, and reads back to verify a load. The client half of the CUDA
//! room (the daemon half is `sllm_store::device::cuda`); `unsafe` is confined
//! to the driver calls, each with its invariant.
//!
//! The daemon must be another process: CUDA refuses to open an IPC handle in
//! the process that exported it.

#![allow(
    unsafe_code,
    reason = "the client's CUDA buffers: driver calls, IPC handles, reads back; every block says why it is sound"
)]

use std::ffi::c_void;

use cudarc::driver::sys as cu;

/// A CUDA call failed, or CUDA is not there.
#[derive(Debug, thiserror::Error)]
#[error("CUDA: {0}")]
pub struct CudaError(String);

fn check(op: &str, result: cu::CUresult) -> Result<(), CudaError> {
    if result == cu::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(CudaError(format!("{op} failed: {result:?}")))
    }
}

/// The local GPU whose UUID (as the protocol writes it) is `uuid`.
pub struct CudaDevice {
    dev: cu::CUdevice,
    ctx: cu::CUcontext,
}

impl CudaDevice {
    /// Finds the device with `uuid` and makes its primary context current on
    /// this thread.
    pub fn by_uuid(uuid: &str) -> Result<Self, CudaError> {
        // SAFETY: only tries to dlopen the driver library's usual names.
        if !unsafe { cu::is_culib_present() } {
            return Err(CudaError(
                "no CUDA driver library (libcuda.so.1) on this machine".into(),
            ));
        }
        // SAFETY: plain driver calls with valid out-pointers to locals.
        unsafe {
            check("cuInit", cu::cuInit(0))?;
            let mut count = 0;
            check("cuDeviceGetCount", cu::cuDeviceGetCount(&mut count))?;
            for ordinal in 0..count {
                let mut dev = 0;
                check("cuDeviceGet", cu::cuDeviceGet(&mut dev, ordinal))?;
                let mut id = cu::CUuuid { bytes: [0; 16] };
                check("cuDeviceGetUuid_v2", cu::cuDeviceGetUuid_v2(&mut id, dev))?;
                if sllm_proto::device_uuid_string(&id.bytes.map(|b| b as u8)) == uuid {
                    let mut ctx = std::ptr::null_mut();
                    check(
                        "cuDevicePrimaryCtxRetain",
                        cu::cuDevicePrimaryCtxRetain(&mut ctx, dev),
                    )?;
                    check("cuCtxSetCurrent", cu::cuCtxSetCurrent(ctx))?;
                    return Ok(Self { dev, ctx });
                }
            }
        }
        Err(CudaError(format!(
            "no local GPU has UUID {uuid}; is the daemon on this machine?"
        )))
    }

    /// Allocates `size` bytes on this device.
    pub fn alloc(&self, size: u64) -> Result<CudaBuffer<'_>, CudaError> {
        let mut ptr = 0;
        // SAFETY: the context is current (made so in `by_uuid`, and the
        // device outlives its buffers by borrow); freed in Drop.
        unsafe {
            check("cuCtxSetCurrent", cu::cuCtxSetCurrent(self.ctx))?;
            check(
                "cuMemAlloc",
                cu::cuMemAlloc_v2(&mut ptr, size.max(1) as usize),
            )?;
        }
        Ok(CudaBuffer {
            ptr,
            size,
            device: self,
        })
    }
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        // SAFETY: retained once in `by_uuid`, released once here.
        let _ = unsafe { cu::cuDevicePrimaryCtxRelease_v2(self.dev) };
    }
}

/// One GPU allocation.
pub struct CudaBuffer<'d> {
    ptr: cu::CUdeviceptr,
    size: u64,
    device: &'d CudaDevice,
}

impl CudaBuffer<'_> {
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The 64-byte IPC handle to send the daemon.
    pub fn ipc_handle(&self) -> Result<Vec<u8>, CudaError> {
        let mut handle = cu::CUipcMemHandle { reserved: [0; 64] };
        // SAFETY: `ptr` is a live allocation of this context.
        unsafe {
            check("cuCtxSetCurrent", cu::cuCtxSetCurrent(self.device.ctx))?;
            check(
                "cuIpcGetMemHandle",
                cu::cuIpcGetMemHandle(&mut handle, self.ptr),
            )?;
        }
        Ok(handle.reserved.iter().map(|&b| b as u8).collect())
    }

    /// Copies `buf.len()` bytes at `offset` back to the host.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), CudaError> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > self.size)
        {
            return Err(CudaError(format!(
                "read of {} bytes at {offset} is past the buffer's {} bytes",
                buf.len(),
                self.size
            )));
        }
        // SAFETY: the source range lies inside the allocation (checked
        // above) and `buf` is a live host buffer of exactly that length;
        // cuMemcpyDtoH is synchronous.
        unsafe {
            check("cuCtxSetCurrent", cu::cuCtxSetCurrent(self.device.ctx))?;
            check(
                "cuMemcpyDtoH",
                cu::cuMemcpyDtoH_v2(
                    buf.as_mut_ptr().cast::<c_void>(),
                    self.ptr + offset,
                    buf.len(),
                ),
            )
        }
    }
}

impl Drop for CudaBuffer<'_> {
    fn drop(&mut self) {
        // SAFETY: allocated in `alloc`, freed once here; synchronous copies
        // only, so nothing is in flight.
        let _ = unsafe { cu::cuMemFree_v2(self.ptr) };
    }
}
