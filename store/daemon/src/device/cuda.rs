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
//!   source chunk alive until an event recorded after that chunk's last copy
//!   has completed (or the streams have been synchronized); at most
//!   [`MAX_CHUNKS_IN_FLIGHT`] chunks are held so, and the copy thread waits
//!   for the oldest beyond that, which is what hands a streamed load's chunks
//!   back to the pool while the load goes on;
//! - the driver state (contexts, the pool's registration) lives in an `Arc`
//!   that every target holds, so it is torn down only after the last copy
//!   has been synchronized; the pool's mapping is kept alive until it is
//!   unregistered.

#![allow(
    unsafe_code,
    reason = "the CUDA backend: driver calls and IPC-mapped device memory; every block says why it is sound"
)]

use sllm_proto::BackendKind;
use std::collections::VecDeque;
use std::ffi::{CStr, c_void};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys as cu;

use super::{ClientIdentity, DeviceBackend, DeviceError, DeviceInfo, DeviceTarget};
use crate::pool::{HostPool, SharedChunk};

/// The pool is registered with the driver in pieces of this size.
const REGISTER_PIECE_BYTES: usize = 1 << 30;
/// Bytes in a CUDA IPC memory handle.
pub const IPC_HANDLE_BYTES: usize = 64;
/// Chunks one target holds while their copies run; the copy thread waits
/// for the oldest beyond that.
pub const MAX_CHUNKS_IN_FLIGHT: usize = 16;
/// Most copy streams per target (`--copy-streams`).
pub const MAX_COPY_STREAMS: usize = 8;
/// Threads that page-lock the pool's pieces at start-up, at most.
const REGISTER_THREADS: usize = 16;

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
    /// Streams each target spreads its chunks over, round robin.
    copy_streams: usize,
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
            copy_streams: 1,
        })
    }

    /// Spreads each request's chunks over `n` streams (1 to
    /// [`MAX_COPY_STREAMS`]) instead of one.
    pub fn with_copy_streams(mut self, n: usize) -> Self {
        self.copy_streams = n.clamp(1, MAX_COPY_STREAMS);
        self
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

    /// Page-locks the pool in pieces of whole chunks, on several threads at
    /// once: pinning walks and faults every page, and one thread does that
    /// at a few GiB/s.
    fn register_host_memory(&self, pool: &HostPool) -> Result<(), DeviceError> {
        let inner = &self.inner;
        let fail =
            |e: String| DeviceError::Unavailable(format!("cannot page-lock the pool for DMA: {e}"));
        let ctx = *inner
            .contexts
            .first()
            .ok_or_else(|| fail("no device".into()))?;
        let (base, len) = pool.region();
        let base = base as usize;
        // Whole chunks per piece: a chunk never straddles two registrations.
        let chunk = pool.chunk_bytes();
        let piece_bytes = (REGISTER_PIECE_BYTES / chunk).max(1) * chunk;
        let pieces: Vec<(usize, usize)> = (0..len)
            .step_by(piece_bytes)
            .map(|offset| (base + offset, piece_bytes.min(len - offset)))
            .collect();
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(REGISTER_THREADS)
            .min(pieces.len())
            .max(1);
        let next = std::sync::atomic::AtomicUsize::new(0);
        let done = Mutex::new((Vec::with_capacity(pieces.len()), None::<String>));
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    if let Err(e) = ctx.make_current() {
                        crate::lock(&done).1.get_or_insert(e);
                        return;
                    }
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&(addr, bytes)) = pieces.get(i) else {
                            return;
                        };
                        if crate::lock(&done).1.is_some() {
                            return;
                        }
                        // SAFETY: the piece lies inside the pool's live
                        // mapping, which the driver state keeps alive (the
                        // pool clone below) until its Drop unregisters it;
                        // PORTABLE pins it for every context.
                        let result = unsafe {
                            cu::cuMemHostRegister_v2(
                                addr as *mut c_void,
                                bytes,
                                cu::CU_MEMHOSTREGISTER_PORTABLE,
                            )
                        };
                        let mut done = crate::lock(&done);
                        match check("cuMemHostRegister", result) {
                            Ok(()) => done.0.push(addr),
                            Err(e) => {
                                done.1.get_or_insert(e);
                            }
                        }
                    }
                });
            }
        });
        let (mut pinned, error) = done.into_inner().unwrap_or_else(|p| p.into_inner());
        let current = ctx.make_current();
        if let Some(e) = error.or(current.err()) {
            unregister(&mut pinned);
            return Err(fail(e));
        }
        let mut registered = crate::lock(&inner.registered);
        registered.0 = pinned;
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
            streams: Vec::with_capacity(self.copy_streams),
            ptrs: Vec::with_capacity(handles.len()),
            sizes: Vec::with_capacity(handles.len()),
            current: None,
            in_flight: VecDeque::new(),
            spare_events: Vec::new(),
            chunks_started: 0,
            timing: None,
            device_seconds: None,
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
        for _ in 0..self.copy_streams {
            let mut stream = std::ptr::null_mut();
            // SAFETY: the context is current; the stream is destroyed in Drop.
            let created = unsafe {
                cu::cuStreamCreate(
                    &mut stream,
                    cu::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
                )
            };
            check("cuStreamCreate", created).map_err(copy_err)?;
            target.streams.push(stream);
        }
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
        {
            let mut registered = crate::lock(&self.registered);
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
    /// Chunk `k` of the request is copied on stream `k % streams.len()`.
    streams: Vec<cu::CUstream>,
    ptrs: Vec<cu::CUdeviceptr>,
    sizes: Vec<u64>,
    /// The chunk whose copies are being queued, and its stream.
    current: Option<(SharedChunk, usize)>,
    /// Chunks whose copies are all queued, oldest first, each with an event
    /// recorded on its stream after its last copy: alive until it completes.
    in_flight: VecDeque<(cu::CUevent, SharedChunk)>,
    spare_events: Vec<cu::CUevent>,
    chunks_started: usize,
    /// Events timing the copies on the device: one recorded before the
    /// first copy, one per stream after the last.
    timing: Option<(cu::CUevent, Vec<cu::CUevent>)>,
    device_seconds: Option<f64>,
    /// Keeps the contexts and the pool's registration alive; dropped last.
    _driver: Arc<CudaInner>,
}

// SAFETY: the streams, events and device pointers are driver handles usable
// from any thread on which the target's context is current; every method
// makes it current first.
unsafe impl Send for CudaTarget {}

impl CudaTarget {
    fn event(&mut self, timed: bool) -> Result<cu::CUevent, String> {
        if !timed && let Some(event) = self.spare_events.pop() {
            return Ok(event);
        }
        let flags = if timed {
            cu::CUevent_flags::CU_EVENT_DEFAULT
        } else {
            cu::CUevent_flags::CU_EVENT_DISABLE_TIMING
        };
        let mut event = std::ptr::null_mut();
        // SAFETY: a plain driver call with an out-pointer to a local; the
        // event is destroyed in Drop (through `spare_events`, `in_flight` or
        // `timing`).
        check("cuEventCreate", unsafe {
            cu::cuEventCreate(&mut event, flags as u32)
        })?;
        Ok(event)
    }

    /// Records the event the device's time for the copies is counted from.
    fn start_timing(&mut self) -> Result<(), String> {
        // Each event is owned by `timing` at once, so Drop destroys it
        // whatever fails next.
        let start = self.event(true)?;
        self.timing = Some((start, Vec::with_capacity(self.streams.len())));
        for _ in 0..self.streams.len() {
            let end = self.event(true)?;
            if let Some((_, ends)) = self.timing.as_mut() {
                ends.push(end);
            }
        }
        // SAFETY: the event and stream 0 are live until Drop.
        check("cuEventRecord", unsafe {
            cu::cuEventRecord(start, self.streams[0])
        })
    }

    /// Records an event after the current chunk's copies; the chunk is held
    /// until that event completes.
    fn end_current(&mut self) -> Result<(), String> {
        let Some((chunk, stream)) = self.current.take() else {
            return Ok(());
        };
        let event = self.event(false)?;
        // SAFETY: the event and the stream are live until Drop.
        let recorded = unsafe { cu::cuEventRecord(event, self.streams[stream]) };
        if let Err(e) = check("cuEventRecord", recorded) {
            self.spare_events.push(event);
            // Nothing marks this chunk's copies done: hold it until the
            // streams are synchronized.
            self.in_flight.push_front((std::ptr::null_mut(), chunk));
            return Err(e);
        }
        self.in_flight.push_back((event, chunk));
        self.release_finished()
    }

    /// Lets go of chunks whose copies have completed, and waits for the
    /// oldest while more than [`MAX_CHUNKS_IN_FLIGHT`] are held.
    fn release_finished(&mut self) -> Result<(), String> {
        while let Some(&(event, _)) = self.in_flight.front() {
            if event.is_null() {
                break;
            }
            let state = if self.in_flight.len() > MAX_CHUNKS_IN_FLIGHT {
                // SAFETY: the event is live and was recorded.
                unsafe { cu::cuEventSynchronize(event) }
            } else {
                // SAFETY: as above.
                unsafe { cu::cuEventQuery(event) }
            };
            match state {
                cu::CUresult::CUDA_SUCCESS => {
                    self.in_flight.pop_front();
                    self.spare_events.push(event);
                }
                cu::CUresult::CUDA_ERROR_NOT_READY => break,
                other => return check("cuEventSynchronize", other),
            }
        }
        Ok(())
    }

    /// Waits for every stream; records the device's own time for the
    /// copies, and lets go of every chunk.
    fn sync_all(&mut self) -> Result<(), String> {
        if let Some((_, ends)) = &self.timing {
            for (&stream, &end) in self.streams.iter().zip(ends) {
                // SAFETY: the event and the stream are live until Drop.
                check("cuEventRecord", unsafe { cu::cuEventRecord(end, stream) })?;
            }
        }
        for &stream in &self.streams {
            // SAFETY: the stream is live until Drop.
            check("cuStreamSynchronize", unsafe {
                cu::cuStreamSynchronize(stream)
            })?;
        }
        for (event, _) in self.in_flight.drain(..) {
            if !event.is_null() {
                self.spare_events.push(event);
            }
        }
        if let Some((start, ends)) = &self.timing {
            let mut longest = 0f32;
            for &end in ends {
                let mut ms = 0f32;
                // SAFETY: both events were recorded and have completed (the
                // streams were synchronized); the out-pointer is a local.
                check("cuEventElapsedTime", unsafe {
                    cu::cuEventElapsedTime(&mut ms, *start, end)
                })?;
                longest = longest.max(ms);
            }
            self.device_seconds = Some(f64::from(longest) / 1e3);
        }
        Ok(())
    }
}

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
        if self.timing.is_none() {
            self.start_timing().map_err(|e| self.copy_error(e))?;
        }
        if !self
            .current
            .as_ref()
            .is_some_and(|(c, _)| Arc::ptr_eq(c, chunk))
        {
            self.end_current().map_err(|e| self.copy_error(e))?;
            let stream = self.chunks_started % self.streams.len();
            self.chunks_started += 1;
            self.current = Some((Arc::clone(chunk), stream));
        }
        let stream = self.current.as_ref().map_or(0, |(_, s)| *s);
        let src = &chunk.bytes()[src];
        let ptr = self.ptrs[handle_idx];
        // SAFETY: the destination range lies inside the IPC allocation
        // (`copy` checked it against the extent from cuMemGetAddressRange);
        // the source is a frozen pool chunk, held in `current` and then
        // `in_flight` until an event after this copy has completed, and
        // page-locked when the pool was registered.
        let queued = unsafe {
            cu::cuMemcpyHtoDAsync_v2(
                ptr + dst_offset,
                src.as_ptr().cast::<c_void>(),
                src.len(),
                self.streams[stream],
            )
        };
        check("cuMemcpyHtoDAsync", queued).map_err(|e| self.copy_error(e))
    }

    fn end_chunk(&mut self) -> Result<(), DeviceError> {
        self.ctx.make_current().map_err(|e| self.copy_error(e))?;
        self.end_current().map_err(|e| self.copy_error(e))
    }

    fn synchronize(&mut self) -> Result<(), DeviceError> {
        self.ctx.make_current().map_err(|e| self.copy_error(e))?;
        self.end_current().map_err(|e| self.copy_error(e))?;
        self.sync_all().map_err(|e| self.copy_error(e))
    }

    fn device_seconds(&self) -> Option<f64> {
        self.device_seconds
    }
}

impl Drop for CudaTarget {
    fn drop(&mut self) {
        if self.ctx.make_current().is_err() {
            // Without the context nothing can be waited for safely: keep the
            // chunks (leaked) rather than free memory a copy may still read.
            std::mem::forget(self.current.take());
            std::mem::forget(std::mem::take(&mut self.in_flight));
            return;
        }
        for &stream in &self.streams {
            // SAFETY: the stream is live; waiting makes every queued copy
            // finish before its source chunk and destination are released.
            unsafe {
                let _ = cu::cuStreamSynchronize(stream);
                let _ = cu::cuStreamDestroy_v2(stream);
            }
        }
        self.current = None;
        let events = self
            .in_flight
            .drain(..)
            .map(|(event, _)| event)
            .chain(self.spare_events.drain(..))
            .chain(
                self.timing
                    .take()
                    .into_iter()
                    .flat_map(|(s, e)| std::iter::once(s).chain(e)),
            );
        for event in events.filter(|e| !e.is_null()) {
            // SAFETY: created by this target, destroyed once here, after
            // the streams it was recorded on were synchronized.
            let _ = unsafe { cu::cuEventDestroy_v2(event) };
        }
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
