"""The vLLM plugin: registers the `serverless_llm` load format through
vLLM's `register_model_loader` (entry point `vllm.general_plugins`), so
`vllm serve <storage>/<org/name> --load-format serverless_llm` works on an
unpatched vLLM.

Two layouts are served:
- `<model>/rank_<r>/tensor_index.json` (ServerlessLLM's vLLM saver): vLLM
  parameter names, loaded straight into the model's parameters;
- `<model>/tensor_index.json` (`sllm-store save`): checkpoint names. Those
  vLLM would copy 1:1 with its default loader land straight in their
  parameters; the rest (fused qkv/gate_up, sharded, padded) is fed to the
  model's `load_weights` from a bounded staging window (`into.py`).
On vLLM's CUDA platform the daemon must run with --device cuda; on its CPU
platform, with --device host. The model directory must be under the
daemon's storage path, given to vLLM's processes as STORAGE_PATH.
Tested inside vLLM's CPU build (tests/vllm); the CUDA path's core is
driven with a transformers model by bench/gpu/check.sh."""

import logging
import os
from typing import Tuple

from .client import storage_path_for
from .errors import SllmStoreError
from .into import load_into_module

LOAD_FORMAT = "serverless_llm"
logger = logging.getLogger(__name__)


def model_id_for(model_dir: str, storage_path: "str | None" = None) -> str:
    """The daemon's model id for a directory vLLM was pointed at, under the
    storage path ($STORAGE_PATH, else the daemon's own when it runs here)."""
    root = os.path.realpath(storage_path_for(storage_path))
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


def _direct_accept(weight_loader_default):
    """Which parameters of the root layout (checkpoint names) may be filled
    without the model's `load_weights`: those it would fill with vLLM's
    default loader anyway, a plain copy of the same shape. Sharded, fused,
    padded and quantized parameters have loaders of their own."""

    def accept(_name, param) -> bool:
        return getattr(param, "weight_loader", weight_loader_default) is weight_loader_default

    return accept


def load_weights_into(model, model_dir: str, rank: int, quantized: bool = False, window_bytes=None):
    """The plugin's core, outside vLLM's classes: loads the stored model
    that vLLM was pointed at (`model_dir`) into `model` for
    tensor-parallel rank `rank`. Returns the LoadReport."""
    kind, sub = detect_layout(model_dir, rank)
    # Asked of the daemon once, for the model's id and for the load.
    root = storage_path_for(None)
    model_id = model_id_for(model_dir, root)
    # Like vLLM's default loader: parameters left unset are an error for an
    # unquantized model, when we can tell (the rank layout names them all;
    # a model's load_weights says what it loaded by returning a set).
    tracked = True
    if kind == "rank":
        report, loaded = load_into_module(
            model, f"{model_id}/{sub}", storage_path=root, window_bytes=window_bytes
        )
        what = f"{model_id}/{sub}"
    else:
        from vllm.model_executor.model_loader.weight_utils import default_weight_loader

        def weights_loader(weights):
            nonlocal tracked
            result = model.load_weights(weights)
            tracked = isinstance(result, (set, frozenset))
            return result

        report, loaded = load_into_module(
            model, model_id, weights_loader=weights_loader, accept=_direct_accept(default_weight_loader),
            storage_path=root, window_bytes=window_bytes,
        )
        what = model_id
    params = {name for name, _p in model.named_parameters()}
    missing = sorted(params - loaded)
    if missing and tracked and not quantized:
        raise SllmStoreError(
            f"{what} left {len(missing)} parameter(s) of the model unset, e.g. {missing[:5]}: "
            "is it the model vLLM was asked to serve (and, for rank_<r>/, saved for this tensor-parallel size)?"
        )
    logger.info("sllm-store: loaded %s (rank %d): %s", what, rank, report.summary())
    return report


def register():
    """Entry point: called by vLLM in every process it starts."""
    global logger
    try:
        from vllm.model_executor.model_loader import register_model_loader
        from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    except ImportError as e:
        logger.warning("sllm-store: this vLLM has no register_model_loader (%s); --load-format %s is unavailable", e, LOAD_FORMAT)
        return
    try:  # vLLM prints the records of its own loggers only
        from vllm.logger import init_logger

        logger = init_logger("vllm.sllm_store")
    except ImportError:
        pass

    @register_model_loader(LOAD_FORMAT)
    class ServerlessLLMLoader(BaseModelLoader):
        def download_model(self, model_config) -> None:
            detect_layout(model_config.model, 0)

        def load_weights(self, model, model_config) -> None:
            from vllm.distributed import get_tensor_model_parallel_rank

            load_weights_into(
                model, model_config.model, get_tensor_model_parallel_rank(),
                quantized=model_config.quantization is not None,
            )
