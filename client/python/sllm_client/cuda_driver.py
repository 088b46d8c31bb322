"""The CUDA driver (libcuda.so.1) through ctypes: what the client needs to
share GPU memory with the daemon without depending on torch's private IPC
format (torch 2.11 prefixes its handle with two bytes of its own; other
versions may change it again).

- `share(ptr, device)`: the allocation a pointer lives in, its base, and the
  64-byte `cudaIpcMemHandle_t` of that base (`cuIpcGetMemHandle`); or
  `NotShareable` with the reason. Memory mapped with the VMM API (torch's
  `expandable_segments:True`, vLLM's sleep-mode allocator, cudaMallocAsync
  pools) cannot be shared this way: callers load such memory through a
  `DeviceBuffer` and copy on the device.
- `DeviceBuffer`: `cuMemAlloc` memory, always shareable, seen by torch as a
  uint8 tensor (`__cuda_array_interface__`); freed by `close()`.
- `device_uuid(device)`: the protocol's UUID of a CUDA device ordinal.

Every call runs in the device's primary context (the one torch's runtime
uses), pushed and popped around it, so the caller's thread state is left as
it was.
"""

import contextlib
import ctypes
import threading
from typing import Tuple

from .errors import SllmStoreError

IPC_HANDLE_BYTES = 64
_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE = 10
_ERROR_INVALID_VALUE = 1

_lock = threading.Lock()
_lib = None


class NotShareable(Exception):
    """This memory cannot be exported with a legacy CUDA IPC handle."""


class CudaDriverError(SllmStoreError):
    """A CUDA driver call failed."""


def _driver():
    global _lib
    with _lock:
        if _lib is None:
            try:
                lib = ctypes.CDLL("libcuda.so.1")
            except OSError as e:
                raise SllmStoreError(
                    f"the CUDA driver (libcuda.so.1) cannot be loaded: {e}; on a machine without a GPU "
                    "use load_dict_host and a daemon started with --device host"
                ) from None
            _check(lib, "cuInit", lib.cuInit(ctypes.c_uint(0)))
            _lib = lib
        return _lib


def _error_text(lib, code: int) -> str:
    name, text = ctypes.c_char_p(), ctypes.c_char_p()
    lib.cuGetErrorName(code, ctypes.byref(name))
    lib.cuGetErrorString(code, ctypes.byref(text))
    return f"{(name.value or b'CUDA error').decode()} ({code}): {(text.value or b'').decode()}"


def _check(lib, call: str, code: int) -> None:
    if code != 0:
        raise CudaDriverError(f"{call} failed: {_error_text(lib, code)}")


@contextlib.contextmanager
def _on_device(device: int):
    """The device's primary context, current for the duration."""
    lib = _driver()
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    _check(lib, "cuDeviceGet", lib.cuDeviceGet(ctypes.byref(dev), ctypes.c_int(device)))
    _check(lib, "cuDevicePrimaryCtxRetain", lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev))
    try:
        _check(lib, "cuCtxPushCurrent", lib.cuCtxPushCurrent_v2(ctx))
        try:
            yield lib
        finally:
            popped = ctypes.c_void_p()
            lib.cuCtxPopCurrent_v2(ctypes.byref(popped))
    finally:
        lib.cuDevicePrimaryCtxRelease_v2(dev)


def device_uuid(device: int) -> str:
    """The protocol's UUID of CUDA device `device` (lower-case 8-4-4-4-12),
    as the daemon reports it."""
    lib = _driver()
    dev = ctypes.c_int()
    _check(lib, "cuDeviceGet", lib.cuDeviceGet(ctypes.byref(dev), ctypes.c_int(device)))
    raw = (ctypes.c_ubyte * 16)()
    get = getattr(lib, "cuDeviceGetUuid_v2", None) or lib.cuDeviceGetUuid
    _check(lib, "cuDeviceGetUuid", get(raw, dev))
    h = bytes(raw).hex()
    return f"{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def share(ptr: int, device: int) -> Tuple[int, bytes]:
    """(base, handle): the base of the allocation holding `ptr` and its IPC
    handle; the daemon copies to `ptr - base` in it. Raises NotShareable
    for memory the legacy IPC API cannot export."""
    with _on_device(device) as lib:
        capable = ctypes.c_uint64(0)
        code = lib.cuPointerGetAttribute(
            ctypes.byref(capable),
            ctypes.c_int(_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE),
            ctypes.c_uint64(ptr),
        )
        # Drivers older than CUDA 11.3 do not know the attribute; then
        # cuIpcGetMemHandle itself is the test.
        if code == 0 and capable.value == 0:
            raise NotShareable(
                "the memory was not allocated with cudaMalloc (a VMM mapping: torch's "
                "expandable_segments, vLLM's sleep mode, or a cudaMallocAsync pool)"
            )
        if code not in (0, _ERROR_INVALID_VALUE):
            _check(lib, "cuPointerGetAttribute", code)
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        _check(
            lib,
            "cuMemGetAddressRange",
            lib.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr)),
        )
        handle = (ctypes.c_ubyte * IPC_HANDLE_BYTES)()
        code = lib.cuIpcGetMemHandle(handle, base)
        if code != 0:
            raise NotShareable(f"cuIpcGetMemHandle refused it: {_error_text(lib, code)}")
        return base.value, bytes(handle)


class _CudaArray:
    """What torch.as_tensor needs to view device memory it does not own."""

    def __init__(self, ptr: int, size: int):
        self.__cuda_array_interface__ = {
            "shape": (size,),
            "typestr": "|u1",
            "data": (ptr, False),
            "version": 2,
        }


class DeviceBuffer:
    """`size` bytes of cuMemAlloc memory on `device`: shareable whatever
    torch's allocator is set to. `tensor` is a uint8 view; `handle` its IPC
    handle (offset 0). Free it with close() once nothing reads it."""

    def __init__(self, device: int, size: int):
        import torch

        self.device, self.size = device, max(int(size), 1)
        ptr = ctypes.c_uint64()
        with _on_device(device) as lib:
            code = lib.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(self.size))
            if code != 0:
                raise CudaDriverError(
                    f"cannot allocate a {self.size >> 20} MiB staging buffer on cuda:{device}: "
                    f"{_error_text(lib, code)}; free GPU memory or lower the load's window_bytes"
                )
        self.ptr = ptr.value
        try:
            self.handle = share(self.ptr, device)[1]
            self.tensor = torch.as_tensor(_CudaArray(self.ptr, self.size), device=f"cuda:{device}")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.ptr:
            self.tensor = None
            with _on_device(self.device) as lib:
                lib.cuMemFree_v2(ctypes.c_uint64(self.ptr))
            self.ptr = 0
