"""Loading into memory the caller already owns, without a second copy of
the model: the core of the vLLM plugin and of `load_dict`.

Two ways bytes reach a destination tensor:
- **direct**: the daemon copies straight into it. Only for CUDA memory that
  the legacy IPC API can share (`cuda_driver.share`), when the stored and
  destination dtypes are equal and the destination is contiguous. No extra
  GPU memory.
- **staged**: the daemon copies into a staging buffer; the client copies on
  the device into the destination (casting dtypes if needed), or hands a
  device-side copy of each tensor to a consumer such as vLLM's
  `load_weights` (which fuses and shards, and may keep what it is given).
  The buffer is bounded (`window_bytes`) and reused window after window; it
  is split in two halves so the daemon fills one while the other is
  consumed. With the host backend the staging buffer is a shared-memory file
  the daemon writes into, mapped here as CPU tensors.

Every window is one replica (LoadModelAsync(GPU) + ConfirmModel); callers
wrap a whole load in `host.load_consistently`, so a model re-saved between
windows is loaded again, never mixed.
"""

import mmap
import os
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from . import cuda_driver
from .client import CopyChunk, ServerConfig, StoreClient, storage_path_for
from .dtypes import torch_dtype
from .errors import SllmStoreError
from .host import new_buffer_path, remove_orphan_buffers

GIB = 1 << 30
# Staging offsets are aligned as ServerlessLLM aligns packed tensors.
ALIGN = 256
# The daemon's default --max-handles-per-device (Limits::max_handles_per_device).
MAX_HANDLES_PER_REQUEST = 64


def default_window_bytes(model_bytes: int) -> int:
    """The staging budget: 5% of the weights or 1 GiB, whichever is larger,
    and never more than the model."""
    return max(1, min(model_bytes, max(model_bytes // 20, GIB)))


@dataclass
class LoadReport:
    """What a load did: bytes copied straight into place, bytes staged,
    the staging memory it held at most (on top of the destinations), and
    the number of replicas (requests) it took."""

    direct_bytes: int = 0
    staged_bytes: int = 0
    staging_bytes: int = 0
    requests: int = 0
    seconds: float = 0.0
    not_shareable: List[str] = field(default_factory=list)

    def summary(self) -> str:
        mib = 1 << 20
        text = (
            f"{(self.direct_bytes + self.staged_bytes) / mib:.1f} MiB in {self.seconds:.2f} s: "
            f"{self.direct_bytes / mib:.1f} MiB straight into place, {self.staged_bytes / mib:.1f} MiB staged "
            f"through {self.staging_bytes / mib:.1f} MiB, {self.requests} request(s)"
        )
        if self.not_shareable:
            text += f"; staged because not shareable: {self.not_shareable[0]}"
        return text


@dataclass
class Piece:
    """`size` bytes at `src_offset` of the model; `key` is the caller's."""

    key: object
    src_offset: int
    size: int


# --- staging buffers ------------------------------------------------------


class _CudaStaging:
    def __init__(self, device_index: int, size: int):
        self._buf = cuda_driver.DeviceBuffer(device_index, size)
        self.handle, self.tensor = self._buf.handle, self._buf.tensor

    def sync(self):
        import torch

        torch.cuda.synchronize(self._buf.device)

    def close(self):
        self.tensor = None
        self._buf.close()


class _HostStaging:
    """A shared-memory file the host backend writes into (its path is the
    handle), mapped here as a CPU uint8 tensor."""

    def __init__(self, shm_dir: str, size: int):
        import torch

        if not os.path.isdir(shm_dir):
            raise SllmStoreError(
                f"the daemon keeps host-backend buffers in {shm_dir}, which this machine lacks: the host "
                "backend needs the daemon on this machine (does SLLM_STORE_ADDR name another host?)"
            )
        # Named for this process, so that a later load removes it if this
        # process is killed before it can.
        remove_orphan_buffers(shm_dir)
        self.path = new_buffer_path(shm_dir)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, max(size, 1))
            self._map = mmap.mmap(fd, max(size, 1))
        except BaseException:
            os.unlink(self.path)
            raise
        finally:
            os.close(fd)
        self.handle = self.path.encode()
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)

    def sync(self):
        pass

    def close(self):
        # The mapping is not closed here: torch.frombuffer does not pin it,
        # so closing it under a view someone kept would unmap memory that
        # view reads. It goes when its last view does.
        self.tensor, self._map = None, None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _staging(client_config, device, size: int):
    if client_config.device_backend == "host":
        return _HostStaging(client_config.host_shm_dir, size)
    return _CudaStaging(device, size)


# --- windows --------------------------------------------------------------


def _windows(pieces: Sequence[Piece], half: int, split: bool) -> List[List[Tuple[Piece, int]]]:
    """Pieces in model order, packed into windows of at most `half` bytes
    ((piece, offset in the window)). With `split`, keys are (key, start)
    and a piece larger than a window is cut into window-sized pieces whose
    starts say where each lies in the original."""
    windows, current, cursor = [], [], 0
    for p in sorted(pieces, key=lambda p: p.src_offset):
        parts = [p]
        if split and p.size > half:
            key, first = p.key
            parts = [
                Piece((key, first + start), p.src_offset + start, min(half, p.size - start))
                for start in range(0, p.size, half)
            ]
        for part in parts:
            at = -(-cursor // ALIGN) * ALIGN
            if current and at + part.size > half:
                windows.append(current)
                current, at = [], 0
            current.append((part, at))
            cursor = at + part.size
    if current:
        windows.append(current)
    return windows


def stream(
    client: StoreClient,
    config: ServerConfig,
    model_path: str,
    device_uuid: str,
    device,
    pieces: Sequence[Piece],
    window_bytes: int,
    split: bool = False,
    report: Optional[LoadReport] = None,
) -> Iterator[Tuple[Piece, "object"]]:
    """Yields (piece, uint8 tensor of its bytes) for every piece, through a
    staging buffer of about `window_bytes` on `device` (a CUDA ordinal, or
    anything for the host backend). A yielded view is valid until the
    generator is resumed past the end of its window: consumers copy out (or
    use) it before asking for more. Without `split`, a window is at least
    as large as the largest piece. `config` is the daemon's, as the
    caller asked for it once per load."""
    report = report if report is not None else LoadReport()
    pieces = [p for p in pieces if p.size > 0]
    if not pieces:
        return
    span = sum(p.size + ALIGN for p in pieces)
    largest = max(p.size for p in pieces)
    if span <= window_bytes:
        half, halves = span, 1  # all in one window
    elif split or largest <= window_bytes // 2:
        half, halves = window_bytes // 2, 2  # one half fills while the other is consumed
    else:
        half, halves = max(window_bytes, largest), 1  # a tensor too large to double-buffer
    half = max(-(-half // ALIGN) * ALIGN, ALIGN)  # each half starts aligned for every dtype
    windows = _windows(pieces, half, split)
    halves = min(halves, len(windows))
    staging = _staging(config, device, half * halves)
    report.staging_bytes = max(report.staging_bytes, half * halves)
    pending = None  # the replica in flight

    def issue(k: int) -> str:
        base = (k % halves) * half
        copies = [CopyChunk(p.src_offset, p.size, base + at) for p, at in windows[k]]
        replica = str(uuidlib.uuid4())
        client.load_to_devices(model_path, replica, {device_uuid: copies}, {device_uuid: [staging.handle]})
        report.requests += 1
        return replica

    try:
        client.load_to_host(model_path)
        pending = issue(0)
        for k, window in enumerate(windows):
            client.confirm(model_path, pending)
            pending = None
            if halves == 2 and k + 1 < len(windows):
                # The other half's last window was consumed and synchronized.
                pending = issue(k + 1)
            base = (k % halves) * half
            for piece, at in window:
                report.staged_bytes += piece.size
                yield piece, staging.tensor[base + at: base + at + piece.size]
            staging.sync()
            if halves == 1 and k + 1 < len(windows):
                pending = issue(k + 1)
    finally:
        if pending is not None:
            # Never free memory the daemon may still be writing into: wait
            # for the copy in flight (callers close this generator while
            # their client is open).
            try:
                client.confirm(model_path, pending)
            except Exception:  # noqa: BLE001 (the load already failed; say why, not this)
                pass
        staging.close()


# --- direct copies --------------------------------------------------------


@dataclass
class Region:
    """`size` bytes at `src_offset` of the model, to land at `dst`, a
    contiguous uint8 tensor of exactly `size` bytes."""

    key: object
    src_offset: int
    size: int
    dst: "object"


def _device_index(tensor) -> Optional[int]:
    return tensor.device.index if tensor.device.type == "cuda" else None


def fill(
    client: StoreClient,
    config: ServerConfig,
    model_path: str,
    regions: Sequence[Region],
    window_bytes: int,
    report: Optional[LoadReport] = None,
) -> LoadReport:
    """Lands every region: straight into place where the destination's
    memory can be shared with the daemon, staged through at most
    `window_bytes` per device otherwise."""
    import torch

    report = report if report is not None else LoadReport()
    started = time.perf_counter()
    direct: Dict[int, List[Tuple[Region, int, bytes]]] = {}  # device -> (region, offset in base, handle)
    staged: Dict[object, List[Region]] = {}
    for r in regions:
        if r.size == 0:
            continue
        index = _device_index(r.dst)
        if config.device_backend == "cuda" and index is not None:
            try:
                base, handle = cuda_driver.share(r.dst.data_ptr(), index)
                direct.setdefault(index, []).append((r, r.dst.data_ptr() - base, handle))
                continue
            except cuda_driver.NotShareable as e:
                if not report.not_shareable:
                    report.not_shareable.append(f"{r.key}: {e}")
        staged.setdefault(index, []).append(r)
    if direct:
        torch.cuda.synchronize()  # nothing of ours still writes the destinations
        _fill_direct(client, model_path, direct, report)
    for index, rs in staged.items():
        uuid = cuda_driver.device_uuid(index) if config.device_backend == "cuda" else config.device_uuids[0]
        pieces = [Piece((i, 0), r.src_offset, r.size) for i, r in enumerate(rs)]
        views = stream(client, config, model_path, uuid, index, pieces, window_bytes, split=True, report=report)
        try:
            for piece, view in views:
                i, start = piece.key
                rs[i].dst[start: start + piece.size].copy_(view)
        finally:
            views.close()
    report.seconds += time.perf_counter() - started
    return report


def _fill_direct(client: StoreClient, model_path: str, direct, report: LoadReport) -> None:
    uuids = {index: cuda_driver.device_uuid(index) for index in direct}
    batches = direct_batches(
        {uuids[i]: [(CopyChunk(r.src_offset, r.size, offset), handle) for r, offset, handle in items]
         for i, items in direct.items()}
    )
    client.load_to_host(model_path)
    for copies, handles in batches:
        client.load_replica(model_path, copies, handles)
        report.requests += 1
    report.direct_bytes += sum(r.size for items in direct.values() for r, _o, _h in items)


def direct_batches(
    by_device: Dict[str, List[Tuple[CopyChunk, bytes]]], max_handles: int = MAX_HANDLES_PER_REQUEST
) -> List[Tuple[Dict[str, List[CopyChunk]], Dict[str, List[bytes]]]]:
    """Requests for copies straight into shared allocations: per device,
    each allocation's handle sent once per request (copies name it by
    handle_idx), and at most `max_handles` allocations per device in one
    request, taken in the order of their first byte in the model. `by_device`: device UUID -> [(copy with the offset in its
    allocation, the allocation's handle)]."""
    batches: List[Tuple[Dict[str, List[CopyChunk]], Dict[str, List[bytes]]]] = []
    for uuid, items in by_device.items():
        by_handle: Dict[bytes, List[CopyChunk]] = {}
        for copy, handle in items:
            by_handle.setdefault(handle, []).append(copy)
        # Allocations in the order of their bytes in the model, so that one
        # request after another copies the next stretch: a model streamed
        # through the daemon's pool is then read once.
        order = sorted(by_handle, key=lambda h: min(c.src_offset for c in by_handle[h]))
        for b, start in enumerate(range(0, len(order), max_handles)):
            group = order[start:start + max_handles]
            while len(batches) <= b:
                batches.append(({}, {}))
            copies, handles = batches[b]
            handles[uuid] = group
            copies[uuid] = [
                CopyChunk(c.src_offset, c.size, c.dst_offset, slot) for slot, h in enumerate(group) for c in by_handle[h]
            ]
    return batches


# --- into named tensors and modules ---------------------------------------


def flat_bytes(tensor):
    """A contiguous tensor's bytes as a 1-D uint8 view."""
    import torch

    return tensor.detach().reshape(-1).view(torch.uint8)


def stored_tensor(view, entry):
    """The stored tensor (index entry: offset, size, shape, stride, dtype)
    over a uint8 view of its bytes."""
    _offset, _size, shape, stride, dtype = entry
    return view.view(torch_dtype(dtype)).as_strided(tuple(shape), tuple(stride))


def load_into(
    client: StoreClient,
    model_path: str,
    index: Dict[str, list],
    targets: Dict[str, "object"],
    consume: Optional[Callable[[Iterable[Tuple[str, "object"]]], None]] = None,
    window_bytes: Optional[int] = None,
    device=None,
) -> LoadReport:
    """Loads every stored tensor of `index`:
    - into `targets[name]` when it has the stored shape (straight into
      place when also the same dtype, contiguous and shareable; else staged
      and copied, casting the dtype);
    - else through `consume`, which gets an iterable of (name, tensor)
      (vLLM's `load_weights`); each tensor is a copy of its own, made on
      the device from the staging window, so a consumer may keep it.
      Without `consume`, a stored tensor with no target of its shape is an
      error.
    All targets must be on one device (one tensor-parallel rank): `device`,
    which defaults to theirs."""
    import torch

    started = time.perf_counter()
    report = LoadReport()
    model_bytes = sum(int(e[1]) for e in index.values())
    window_bytes = window_bytes or default_window_bytes(model_bytes)
    devices = {t.device for t in targets.values()} | ({torch.device(device)} if device is not None else set())
    if len(devices) > 1:
        raise SllmStoreError(f"load_into takes targets on one device; got {sorted(map(str, devices))}")
    device = next(iter(devices)) if devices else torch.device("cpu")
    config = client.server_config()
    uuid = uuid_for(client, config, device)  # the daemon serves this kind of device, and this one
    direct, copy_to, through = [], {}, []
    for name, entry in index.items():
        offset, size, shape, _stride, dtype = entry
        target = targets.get(name)
        if target is not None and tuple(target.shape) == tuple(shape):
            if _same_bytes(target, entry):
                direct.append(Region(name, int(offset), int(size), flat_bytes(target)))
            else:
                copy_to[name] = target
        elif consume is not None:
            through.append(name)
        elif target is None:
            raise SllmStoreError(f"{model_path} holds {name!r}, which the model lacks")
        else:
            raise SllmStoreError(
                f"{model_path} holds {name!r} with shape {list(shape)}, the model's is {list(target.shape)}: "
                "was it saved for another tensor-parallel size or model?"
            )
    with torch.no_grad():
        if direct:
            fill(client, config, model_path, direct, window_bytes, report)
        staged = [Piece(n, int(index[n][0]), int(index[n][1])) for n in list(copy_to) + through]
        views = (x for x in ())
        if any(p.size for p in staged):
            # What a weights loader is handed is copied out of the window, so
            # the window gives up the largest such tensor to stay in budget.
            handed = max((int(index[n][1]) for n in through), default=0)
            window = max(window_bytes - handed, 1)
            views = stream(client, config, model_path, uuid, device.index, staged, window, report=report)

        def handed_over():
            for piece in staged:
                if piece.size == 0:  # no bytes to load; stream() leaves them out
                    yield piece.key, stored_tensor(torch.empty(0, dtype=torch.uint8, device=device), index[piece.key])
            for piece, view in views:
                yield piece.key, stored_tensor(view, index[piece.key])

        def through_only():
            for name, tensor in handed_over():
                target = copy_to.get(name)
                if target is not None:
                    target.copy_(tensor)
                else:
                    # A copy of its own (on the device, at device speed):
                    # loaders may keep what they are given past the next
                    # tensor (vLLM's BERT lists them all first), and the
                    # staging window is reused.
                    yield name, tensor.clone()

        rest = through_only()
        try:
            if consume is not None:
                consume(rest)
            left = [name for name, _t in rest]
        finally:
            views.close()  # now, while the client is open: a copy may be in flight
        if left:
            raise SllmStoreError(f"the model's weight loader stopped before {left[:5]} ({len(left)} tensors)")
    report.seconds = time.perf_counter() - started
    return report


def _same_bytes(target, entry) -> bool:
    """The target holds the stored bytes as they are: same dtype, same
    size, contiguous with the stored strides."""
    _offset, size, shape, stride, dtype = entry
    return (
        str(target.dtype) == dtype
        and target.is_contiguous()
        and target.numel() * target.element_size() == int(size)
        and all(n <= 1 or a == b for n, a, b in zip(shape, target.stride(), stride))
    )


def uuid_for(client: StoreClient, config: ServerConfig, device) -> str:
    """The protocol's UUID of torch `device`, once the daemon (`config`) is
    known to serve that kind of device and that one; else what to do."""
    if config.device_backend == "host":
        if device.type != "cpu":
            raise SllmStoreError(
                f"the daemon at {client.server} serves host memory but the model is on {device}; "
                "start the daemon with --device cuda (or load with load_dict_host)"
            )
        return config.device_uuids[0]
    if device.type != "cuda":
        raise SllmStoreError(
            f"the daemon at {client.server} serves CUDA devices but the model is on {device}; "
            "start a daemon with --device host for CPU inference"
        )
    uuid = cuda_driver.device_uuid(device.index)
    if uuid not in config.device_uuids:
        raise SllmStoreError(
            f"the daemon at {client.server} does not serve GPU {uuid} (cuda:{device.index}): "
            "is it on this machine, and does it see this GPU (CUDA_VISIBLE_DEVICES)?"
        )
    return uuid


def load_into_module(
    module,
    model_path: str,
    weights_loader: Optional[Callable[[Iterable[Tuple[str, "object"]]], object]] = None,
    accept: Optional[Callable[[str, "object"], bool]] = None,
    storage_path: "str | None" = None,
    server: "str | None" = None,
    window_bytes: Optional[int] = None,
) -> Tuple[LoadReport, set]:
    """Loads `model_path` into an existing torch module, on the device its
    parameters are on (CUDA with a --device cuda daemon, CPU with a --device
    host one). A stored tensor whose name is a parameter or buffer of the
    module, with its shape, lands in it (`accept(name, tensor)` may refuse
    some); the others go through `weights_loader` (e.g. vLLM's
    `model.load_weights`), whose return value, a set of names, is merged
    into the returned set of names loaded. A model re-saved during the load
    is loaded again."""
    from .host import load_consistently

    targets = dict(module.named_buffers())
    targets.update(module.named_parameters())
    devices = {t.device for t in targets.values()}
    if len(devices) > 1:
        raise SllmStoreError(f"load_into_module takes a module on one device; it is on {sorted(map(str, devices))}")
    device = devices.pop() if devices else None
    if accept is not None:
        targets = {n: t for n, t in targets.items() if accept(n, t)}

    def once(index):
        loaded = set()

        def consume(weights):
            result = weights_loader(weights)
            if isinstance(result, (set, frozenset)):
                loaded.update(result)

        with StoreClient(server) as client:
            report = load_into(
                client, model_path, index, targets, consume if weights_loader else None, window_bytes, device
            )
        loaded.update(n for n in index if n in targets)
        return report, loaded

    return load_consistently(model_path, storage_path_for(storage_path, server), once)
