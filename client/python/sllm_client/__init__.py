"""Pure-Python client of the sllm-store daemon (ServerlessLLM-compatible).

- load_dict(model_path, device_map={"": 0}) -> dict of torch CUDA tensors
- load_model(model_path) -> a transformers model, as from_pretrained
- load_into_module(module, model_path) -> loads into an existing module's
  parameters (CUDA or CPU), without a second copy of the weights
- load_dict_host(model_path) -> dict of numpy arrays (host backend, no GPU)
- the vLLM plugin: `--load-format serverless_llm` (vllm_plugin.py)
- StoreClient: the gRPC calls, typed
Server address: argument, else $SLLM_STORE_ADDR, else 127.0.0.1:8073.
Storage path: argument, else $STORAGE_PATH, else the daemon's own (when it runs on
this host), else ~/models.
"""

from .client import CopyChunk, ServerConfig, StoreClient
from .errors import SllmStoreError
from .host import load_dict_host, read_index
from .into import LoadReport, load_into_module
from .plan import LoadPlan, plan
from .torch import load_dict
from .transformers import load_model

__all__ = [
    "CopyChunk",
    "LoadPlan",
    "LoadReport",
    "ServerConfig",
    "SllmStoreError",
    "StoreClient",
    "load_dict",
    "load_dict_host",
    "load_into_module",
    "load_model",
    "plan",
    "read_index",
]
