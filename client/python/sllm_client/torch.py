"""load_dict: a stored model into CUDA memory through the daemon, as
ServerlessLLM's `sllm_store.torch.load_dict` does: GPU memory allocated by
torch, shared with the daemon by CUDA IPC handle, tensors built over it with
the index's shape, stride and dtype.

Needs torch with CUDA and a daemon started with --device cuda on this
machine. (Not yet run on a GPU: see the README.)
"""

from typing import Dict, Union

from .client import CopyChunk, StoreClient
from .dtypes import torch_dtype
from .errors import SllmStoreError
from .host import load_consistently
from .plan import plan


def device_uuid(index: int) -> str:
    """The protocol's UUID of CUDA device `index` (lower-case 8-4-4-4-12)."""
    import torch

    text = str(torch.cuda.get_device_properties(index).uuid).lower()
    return text.removeprefix("gpu-")


def load_dict(
    model_path: str,
    device_map: Dict[str, Union[int, str]] = None,
    storage_path: "str | None" = None,
    server: "str | None" = None,
    layout: str = "mirrored",
):
    """Loads every tensor of `model_path` onto the GPUs of `device_map`
    (tensor-name prefix -> CUDA device index; {"": 0} puts all on cuda:0)."""
    import torch

    if not torch.cuda.is_available():
        raise SllmStoreError("load_dict needs CUDA; on a machine without a GPU use load_dict_host")
    device_map = {"": 0} if device_map is None else device_map
    return load_consistently(
        model_path, storage_path, lambda index: _load_dict(model_path, index, device_map, server, layout)
    )


def _load_dict(model_path: str, index: dict, device_map, server: "str | None", layout: str):
    import torch

    indices = {prefix: int(str(d).removeprefix("cuda:")) for prefix, d in device_map.items()}
    uuids = {i: device_uuid(i) for i in set(indices.values())}
    with StoreClient(server) as client:
        config = client.server_config()
        if config.device_backend != "cuda":
            raise SllmStoreError(
                f"the daemon at {client.server} serves {config.device_backend} devices; "
                "start it with --device cuda, or use load_dict_host"
            )
        missing = [u for u in uuids.values() if u not in config.device_uuids]
        if missing:
            raise SllmStoreError(f"the daemon does not serve GPUs {missing}: is it on this machine?")
        client.load_to_host(model_path)
        p = plan(index, {prefix: uuids[i] for prefix, i in indices.items()}, layout)
        by_uuid = {u: i for i, u in uuids.items()}
        buffers, copies, handles = {}, {}, {}
        for b in p.buffers:
            buf = torch.empty(max(b.size, 1), dtype=torch.uint8, device=f"cuda:{by_uuid[b.device]}")
            # The IPC handle names the whole cudaMalloc block the caching
            # allocator carved this buffer from; copies land at its offset.
            _dev, handle, _size, offset, *_ = buf.untyped_storage()._share_cuda_()
            buffers[b.device] = buf
            handles[b.device] = [bytes(handle)]
            copies[b.device] = [CopyChunk(c.src_offset, c.size, c.dst_offset + offset) for c in b.copies]
        torch.cuda.synchronize()
        client.load_replica(model_path, copies, handles)
    out = {}
    for name, (_offset, size, shape, stride, dtype) in index.items():
        place = p.tensors[name]
        dt = torch_dtype(dtype)
        buf = buffers[place.device]
        if size == 0:
            out[name] = torch.empty(shape, dtype=dt, device=buf.device)
        else:
            out[name] = buf[place.offset:place.offset + size].view(dt).as_strided(shape, stride)
    return out
