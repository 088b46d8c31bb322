"""load_model: ServerlessLLM's headline API. Builds the model from its
config.json without allocating weights, then binds the tensors loaded by
load_dict (tied weights re-tied), so `from_pretrained` users swap one call.
Needs torch with CUDA and transformers. On a GPU it runs in bench/gpu/check.sh."""

import os

from .client import resolve_storage_path
from .errors import SllmStoreError
from .torch import load_dict


def load_model(model_path, device_map="auto", torch_dtype=None, storage_path=None, server=None):
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = os.path.join(resolve_storage_path(storage_path), model_path)
    config = AutoConfig.from_pretrained(directory)
    if device_map in ("auto", None):
        device_map = {"": 0}
    elif isinstance(device_map, (int, str)):
        device_map = {"": device_map}
    try:
        from accelerate import init_empty_weights

        empty = init_empty_weights(include_buffers=False)
    except ImportError:  # plain CPU construction: slower, same result
        import contextlib

        empty = contextlib.nullcontext()
    with empty:
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch_dtype or getattr(config, "torch_dtype", None))
    state = load_dict(model_path, device_map, storage_path=storage_path, server=server)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still_missing = [k for k in missing if _param(model, k) is None or _param(model, k).is_meta]
    if still_missing or unexpected:
        raise SllmStoreError(
            f"{model_path} does not match its config: missing {still_missing[:5]}, unexpected {list(unexpected)[:5]}"
        )
    first = next(iter(state.values()), None)
    if first is not None:
        model.to(first.device)  # non-persistent buffers (e.g. rotary tables) follow the weights
    return model.eval()


def _param(model, name):
    try:
        return model.get_parameter(name)
    except AttributeError:
        return None
