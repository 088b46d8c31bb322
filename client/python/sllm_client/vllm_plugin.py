"""The vLLM plugin: registers the `serverless_llm` load format through
vLLM's `register_model_loader` (entry point `vllm.general_plugins`), so
`vllm serve <storage>/<org/name> --load-format serverless_llm` works on an
unpatched vLLM.

Two layouts are served:
- `<model>/rank_<r>/tensor_index.json` (ServerlessLLM's vLLM saver): vLLM
  parameter names, assigned to the model's parameters;
- `<model>/tensor_index.json` (`sllm-store save`): checkpoint names, fed to
  the model's `load_weights`.
The layout and name logic has no vLLM dependency and is unit-tested; the
loader itself has not been run against a real vLLM yet (see the README)."""

import logging
import os
from typing import Tuple

from .client import resolve_storage_path
from .errors import SllmStoreError

LOAD_FORMAT = "serverless_llm"
logger = logging.getLogger(__name__)


def model_id_for(model_dir: str, storage_path: "str | None" = None) -> str:
    """The daemon's model id for a directory vLLM was pointed at."""
    root = os.path.realpath(resolve_storage_path(storage_path))
    real = os.path.realpath(model_dir)
    if os.path.commonpath([root, real]) != root or real == root:
        raise SllmStoreError(
            f"{model_dir} is not inside the storage path {root}: serve <storage-path>/<org/name>, "
            "and set STORAGE_PATH to the daemon's --storage-path"
        )
    return os.path.relpath(real, root)


def detect_layout(model_dir: str, rank: int) -> Tuple[str, str]:
    """("rank", "rank_<r>") for ServerlessLLM's vLLM layout, ("root", "") for
    `sllm-store save`'s; an error naming what is missing otherwise."""
    rank_dir = os.path.join(model_dir, f"rank_{rank}")
    if os.path.isfile(os.path.join(rank_dir, "tensor_index.json")):
        return "rank", f"rank_{rank}"
    if os.path.isdir(os.path.join(model_dir, "rank_0")):
        raise SllmStoreError(f"{rank_dir}/tensor_index.json is missing: was the model saved for this tensor-parallel size?")
    if os.path.isfile(os.path.join(model_dir, "tensor_index.json")):
        return "root", ""
    raise SllmStoreError(
        f"{model_dir} holds no tensor_index.json: convert it with `sllm-store save --model <org/name>`"
    )


def register():
    """Entry point: called by vLLM in every process it starts."""
    try:
        from vllm.model_executor.model_loader import register_model_loader
        from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    except ImportError as e:
        logger.warning("sllm-store: this vLLM has no register_model_loader (%s); --load-format %s is unavailable", e, LOAD_FORMAT)
        return

    @register_model_loader(LOAD_FORMAT)
    class ServerlessLLMLoader(BaseModelLoader):
        def download_model(self, model_config) -> None:
            detect_layout(model_config.model, 0)

        def load_weights(self, model, model_config) -> None:
            import torch
            from vllm.distributed import get_tensor_model_parallel_rank

            from .torch import load_dict

            rank = get_tensor_model_parallel_rank()
            kind, sub = detect_layout(model_config.model, rank)
            model_id = model_id_for(model_config.model)
            device = torch.cuda.current_device()
            if kind == "rank":
                tensors = load_dict(f"{model_id}/{sub}", {"": device})
                params = dict(model.named_parameters())
                unknown = [n for n in tensors if n not in params]
                if unknown:
                    raise SllmStoreError(f"{model_id}/{sub} holds tensors this model lacks: {unknown[:5]}")
                with torch.no_grad():
                    for name, tensor in tensors.items():
                        params[name].data.copy_(tensor)
            else:
                model.load_weights(load_dict(model_id, {"": device}).items())
