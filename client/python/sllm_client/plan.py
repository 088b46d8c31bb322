"""Copy planning, with the same rules as the Rust client (client/src/plan.rs).

- "mirrored" (default): one buffer per device laid out like the file, from the
  device's first tensor to its last tensor's end; neighbouring records are
  merged into one copy across the writer's padding, so a model on one device
  is a single copy and tensors keep the writer's (4 KiB) alignment.
- "packed": ServerlessLLM's layout, tensors back to back in index order,
  each aligned to 256 bytes.
Tensors that share storage (same offset) are copied and placed once.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from .client import CopyChunk
from .errors import SllmStoreError

MERGE_GAP_BYTES = 64 << 10
PACKED_ALIGN_BYTES = 256


@dataclass
class Placement:
    device: str
    offset: int


@dataclass
class DeviceBuffer:
    device: str
    size: int
    copies: List[CopyChunk] = field(default_factory=list)


@dataclass
class LoadPlan:
    buffers: List[DeviceBuffer]
    tensors: Dict[str, Placement]

    def copies_by_device(self) -> Dict[str, List[CopyChunk]]:
        return {b.device: b.copies for b in self.buffers if b.copies}


def device_of(name: str, device_map: Dict[str, str]) -> str:
    """Longest matching prefix wins; "" matches every tensor."""
    best = None
    for prefix, device in device_map.items():
        if name.startswith(prefix) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, device)
    if best is None:
        raise SllmStoreError(
            f"tensor {name!r} matches no prefix of the device map; add a prefix for it (\"\" matches all)"
        )
    return best[1]


def plan(index: Dict[str, list], device_map: Dict[str, str], layout: str = "mirrored") -> LoadPlan:
    """`index`: tensor_index.json as parsed; `device_map`: prefix -> device UUID."""
    if layout not in ("mirrored", "packed"):
        raise SllmStoreError(f"unknown layout {layout!r}; use 'mirrored' or 'packed'")
    by_device: Dict[str, List[Tuple[str, int, int]]] = {}
    for name, (offset, size, *_rest) in index.items():
        by_device.setdefault(device_of(name, device_map), []).append((name, int(offset), int(size)))
    buffers, placements = [], {}
    for device, tensors in by_device.items():
        build = _mirrored if layout == "mirrored" else _packed
        buffers.append(build(device, tensors, placements))
    return LoadPlan(buffers, placements)


def _mirrored(device, tensors, placements) -> DeviceBuffer:
    records = sorted((o, o + s) for _, o, s in tensors if s > 0)
    base = records[0][0] if records else 0
    end = max((r[1] for r in records), default=base)
    copies, current = [], None
    for start, stop in records:
        if current and start <= current[1] + MERGE_GAP_BYTES:
            current = (current[0], max(current[1], stop))
        else:
            if current:
                copies.append(CopyChunk(current[0], current[1] - current[0], current[0] - base))
            current = (start, stop)
    if current:
        copies.append(CopyChunk(current[0], current[1] - current[0], current[0] - base))
    for name, offset, size in tensors:
        placements[name] = Placement(device, offset - base if size > 0 else 0)
    return DeviceBuffer(device, end - base, copies)


def _packed(device, tensors, placements) -> DeviceBuffer:
    cursor, at_offset, copies = 0, {}, []
    for name, offset, size in tensors:
        placed = at_offset.get(offset)
        if placed is not None and size <= placed[1]:
            dst = placed[0]
        else:
            dst = -(-cursor // PACKED_ALIGN_BYTES) * PACKED_ALIGN_BYTES
            if size > 0:
                copies.append(CopyChunk(offset, size, dst))
            cursor = dst + size
            at_offset[offset] = (dst, size)
        placements[name] = Placement(device, dst)
    return DeviceBuffer(device, cursor, copies)
