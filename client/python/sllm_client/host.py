"""load_dict_host: a model through the daemon's host backend into numpy
arrays, for machines without a GPU and for tests. The "device memory" is a
shared-memory file the daemon writes into (its path is the handle).

A killed process cannot remove its buffers, and a tmpfs file holds its
memory until someone does. So a buffer's name carries its process
(`sllm-buffer-<pid>-<start time>-<uuid>`, as the Rust client names them), and
making one first removes this user's buffers whose process is gone."""

import json
import os
import uuid as uuidlib
from typing import Callable, Dict, TypeVar

import numpy as np

from .client import StoreClient, resolve_storage_path, storage_path_for
from .dtypes import numpy_dtype
from .errors import SllmStoreError
from .plan import plan

T = TypeVar("T")


def read_index(model_path: str, storage_path: "str | None" = None) -> Dict[str, list]:
    """The model's tensor_index.json."""
    return _read_index_stamped(model_path, storage_path)[0]


def _index_path(model_path: str, storage_path: "str | None") -> str:
    return os.path.join(resolve_storage_path(storage_path), model_path, "tensor_index.json")


def _stamp(st: os.stat_result) -> tuple:
    """What tells one version of a file from another (a re-save makes a new inode)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _read_index_stamped(model_path: str, storage_path: "str | None"):
    path = _index_path(model_path, storage_path)
    try:
        with open(path, "rb") as f:
            stamp = _stamp(os.fstat(f.fileno()))
            return json.loads(f.read()), stamp
    except FileNotFoundError:
        raise SllmStoreError(
            f"{path} not found: convert the model with `sllm-store save --model {model_path}` or pass "
            "storage_path (or set STORAGE_PATH) to where the daemon keeps models"
        ) from None


def load_consistently(model_path: str, storage_path: "str | None", load_once: Callable[[dict], T]) -> T:
    """Runs `load_once(index)` and returns its result if the model's index is
    the same file after the load as before it. The daemon serves the files
    on disk when it is asked, so an unchanged index means the bytes loaded
    match the index the tensors are built from. A model re-saved meanwhile
    (`sllm-store save --force`) is loaded once more, whether the first load
    failed or not (a failure may be the re-save's doing), then refused."""
    for _attempt in range(2):
        index, before = _read_index_stamped(model_path, storage_path)
        try:
            result = load_once(index)
        except SllmStoreError:
            if _current_stamp(model_path, storage_path) == before:
                raise
            continue
        if _current_stamp(model_path, storage_path) == before:
            return result
        # Let go of the stale tensors (GPU memory) before loading again.
        del result
    raise SllmStoreError(
        f"{model_path} changed on disk during two loads in a row (a `sllm-store save --force` "
        "running?); wait for it to finish, then load again"
    )


def _current_stamp(model_path: str, storage_path: "str | None"):
    try:
        return _stamp(os.stat(_index_path(model_path, storage_path)))
    except FileNotFoundError:
        return None


def load_dict_host(
    model_path: str,
    storage_path: "str | None" = None,
    server: "str | None" = None,
    layout: str = "mirrored",
) -> Dict[str, np.ndarray]:
    """Loads every tensor of `model_path` through the daemon's host backend."""
    return load_consistently(
        model_path,
        storage_path_for(storage_path, server),
        lambda index: _load_dict_host(model_path, index, server, layout),
    )


_BUFFER_PREFIX = "sllm-buffer-"


def _start_time(pid: int) -> "int | None":
    """When process `pid` started (/proc/<pid>/stat's 22nd field): with the
    pid, it names one process even after pids wrap."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        # The command name, in parentheses, may hold spaces: count after it.
        return int(stat[stat.rindex(")") + 1 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def remove_orphan_buffers(directory: str) -> None:
    """Removes the buffers in `directory` that this user owns and whose process
    is gone (or whose pid now names another process)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    uid = os.geteuid()
    for name in names:
        parts = name[len(_BUFFER_PREFIX) :].split("-", 2) if name.startswith(_BUFFER_PREFIX) else []
        if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
            continue
        path = os.path.join(directory, name)
        try:
            if os.stat(path).st_uid == uid and _start_time(int(parts[0])) != int(parts[1]):
                os.unlink(path)
        except OSError:
            pass


def new_buffer_path(directory: str) -> str:
    """A path in `directory` for a new buffer of this process."""
    pid = os.getpid()
    return os.path.join(directory, f"{_BUFFER_PREFIX}{pid}-{_start_time(pid) or 0}-{uuidlib.uuid4()}")


def _load_dict_host(model_path: str, index: dict, server: "str | None", layout: str) -> Dict[str, np.ndarray]:
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
        remove_orphan_buffers(config.host_shm_dir)
        try:
            for b in p.buffers:
                path = new_buffer_path(config.host_shm_dir)
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
