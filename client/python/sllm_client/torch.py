"""load_dict: a stored model into CUDA memory through the daemon, as
ServerlessLLM's `sllm_store.torch.load_dict` does: GPU memory allocated by
torch, shared with the daemon by CUDA IPC handle, tensors built over it with
the index's shape, stride and dtype.

Needs torch with CUDA and a daemon started with --device cuda on this
machine. The IPC handles come from the CUDA driver (`cuda_driver`), not
from torch's private format, so any torch from 2.1 on works.
"""

from typing import Dict, Union

from . import cuda_driver
from .client import StoreClient, storage_path_for
from .dtypes import torch_dtype
from .errors import SllmStoreError
from .host import load_consistently
from .into import Region, default_window_bytes, fill, stored_tensor, uuid_for
from .plan import plan


def device_uuid(index: int) -> str:
    """The protocol's UUID of CUDA device `index` (lower-case 8-4-4-4-12)."""
    return cuda_driver.device_uuid(index)


def load_dict(
    model_path: str,
    device_map: Dict[str, Union[int, str]] = None,
    storage_path: "str | None" = None,
    server: "str | None" = None,
    layout: str = "mirrored",
    window_bytes: "int | None" = None,
):
    """Loads every tensor of `model_path` onto the GPUs of `device_map`
    (tensor-name prefix -> CUDA device index; {"": 0} puts all on cuda:0).
    Memory torch's allocator cannot share (expandable segments) is loaded
    through a staging buffer of at most `window_bytes` per device."""
    import torch

    if not torch.cuda.is_available():
        raise SllmStoreError("load_dict needs CUDA; on a machine without a GPU use load_dict_host")
    device_map = {"": 0} if device_map is None else device_map
    return load_consistently(
        model_path,
        storage_path_for(storage_path, server),
        lambda index: _load_dict(model_path, index, device_map, server, layout, window_bytes),
    )


def _load_dict(model_path: str, index: dict, device_map, server: "str | None", layout: str, window_bytes):
    import torch

    indices = {prefix: int(str(d).removeprefix("cuda:")) for prefix, d in device_map.items()}
    with StoreClient(server) as client:
        config = client.server_config()
        # The daemon serves CUDA, and every GPU of the map: one check for all loads.
        uuids = {i: uuid_for(client, config, torch.device(f"cuda:{i}")) for i in set(indices.values())}
        p = plan(index, {prefix: uuids[i] for prefix, i in indices.items()}, layout)
        by_uuid = {u: i for i, u in uuids.items()}
        buffers, regions = {}, []
        for b in p.buffers:
            buf = torch.empty(max(b.size, 1), dtype=torch.uint8, device=f"cuda:{by_uuid[b.device]}")
            buffers[b.device] = buf
            regions += [Region(c, c.src_offset, c.size, buf[c.dst_offset: c.dst_offset + c.size]) for c in b.copies]
        model_bytes = sum(int(e[1]) for e in index.values())
        fill(client, config, model_path, regions, window_bytes or default_window_bytes(model_bytes))
    out = {}
    for name, entry in index.items():
        place = p.tensors[name]
        buf = buffers[place.device]
        size = int(entry[1])
        if size == 0:
            out[name] = torch.empty(entry[2], dtype=torch_dtype(entry[4]), device=buf.device)
        else:
            out[name] = stored_tensor(buf[place.offset:place.offset + size], entry)
    return out
