"""load_dict_host: a model through the daemon's host backend into numpy
arrays, for machines without a GPU and for tests. The "device memory" is a
shared-memory file the daemon writes into (its path is the handle)."""

import json
import os
import uuid as uuidlib
from typing import Dict

import numpy as np

from .client import StoreClient, resolve_storage_path
from .dtypes import numpy_dtype
from .errors import SllmStoreError
from .plan import plan


def read_index(model_path: str, storage_path: "str | None" = None) -> Dict[str, list]:
    path = os.path.join(resolve_storage_path(storage_path), model_path, "tensor_index.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise SllmStoreError(
            f"{path} not found: convert the model with `sllm-store save --model {model_path}` or pass "
            "storage_path (or set STORAGE_PATH) to where the daemon keeps models"
        ) from None


def load_dict_host(
    model_path: str,
    storage_path: "str | None" = None,
    server: "str | None" = None,
    layout: str = "mirrored",
) -> Dict[str, np.ndarray]:
    """Loads every tensor of `model_path` through the daemon's host backend."""
    index = read_index(model_path, storage_path)
    with StoreClient(server) as client:
        config = client.server_config()
        if config.device_backend != "host":
            raise SllmStoreError(
                f"the daemon at {client.server} serves {config.device_backend} devices; "
                "use load_dict() for GPUs, or start a daemon with --device host"
            )
        client.load_to_host(model_path)
        p = plan(index, {"": config.device_uuids[0]}, layout)
        buffers = {}  # device -> (path, fd)
        try:
            for b in p.buffers:
                path = os.path.join(config.host_shm_dir, f"sllm-buffer-{uuidlib.uuid4()}")
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                buffers[b.device] = (path, fd)
                # Allocate now, as cudaMalloc would: the daemon's copies only copy.
                os.posix_fallocate(fd, 0, max(b.size, 1))
            handles = {d: [path.encode()] for d, (path, _fd) in buffers.items()}
            client.load_replica(model_path, p.copies_by_device(), handles)
            return {name: _tensor(entry, p.tensors[name], buffers) for name, entry in index.items()}
        finally:
            for path, fd in buffers.values():
                os.close(fd)
                os.unlink(path)


def _tensor(entry, place, buffers) -> np.ndarray:
    """One tensor from the buffer, with the index's shape, stride and dtype."""
    _offset, size, shape, stride, dtype = entry
    dt = numpy_dtype(dtype)
    if size == 0:
        return np.zeros(tuple(shape), dtype=dt)
    raw = os.pread(buffers[place.device][1], size, place.offset)
    if len(raw) != size:
        raise SllmStoreError(f"the daemon's buffer is shorter than the plan ({len(raw)} < {size} bytes)")
    # The ndarray constructor takes custom dtypes (bf16, fp8) with strides,
    # which np.lib.stride_tricks.as_strided cannot describe.
    view = np.ndarray(tuple(shape), dtype=dt, buffer=raw, strides=tuple(s * dt.itemsize for s in stride))
    return np.array(view, copy=True)
