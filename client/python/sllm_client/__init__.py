"""Pure-Python client of the sllm-store daemon (ServerlessLLM-compatible).

- load_dict(model_path, device_map={"": 0}) -> dict of torch CUDA tensors
- load_dict_host(model_path) -> dict of numpy arrays (host backend, no GPU)
- StoreClient: the gRPC calls, typed
Server address: argument, else $SLLM_STORE_ADDR, else 127.0.0.1:8073.
Storage path: argument, else $STORAGE_PATH, else ~/models.
"""

from .client import CopyChunk, ServerConfig, StoreClient
from .errors import SllmStoreError
from .host import load_dict_host, read_index
from .plan import LoadPlan, plan
from .torch import load_dict

__all__ = [
    "CopyChunk",
    "LoadPlan",
    "ServerConfig",
    "SllmStoreError",
    "StoreClient",
    "load_dict",
    "load_dict_host",
    "plan",
    "read_index",
]
