"""Torch dtype names as the index writes them, and their numpy twins."""

import numpy as np

from .errors import SllmStoreError

_NUMPY = {
    "torch.float16": "float16",
    "torch.float32": "float32",
    "torch.float64": "float64",
    "torch.int8": "int8",
    "torch.int16": "int16",
    "torch.int32": "int32",
    "torch.int64": "int64",
    "torch.uint8": "uint8",
    "torch.bool": "bool",
}
_ML_DTYPES = {
    "torch.bfloat16": "bfloat16",
    "torch.float8_e4m3fn": "float8_e4m3fn",
    "torch.float8_e5m2": "float8_e5m2",
}


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype for a torch dtype name (bf16/fp8 through ml_dtypes)."""
    if name in _NUMPY:
        return np.dtype(_NUMPY[name])
    if name in _ML_DTYPES:
        try:
            import ml_dtypes
        except ImportError:
            raise SllmStoreError(f"{name} needs the ml_dtypes package: pip install ml_dtypes") from None
        return np.dtype(getattr(ml_dtypes, _ML_DTYPES[name]))
    raise SllmStoreError(f"unknown dtype {name!r} in the tensor index")


def torch_dtype(name: str):
    """The torch dtype for a torch dtype name."""
    import torch

    attr = name.removeprefix("torch.")
    dtype = getattr(torch, attr, None)
    if not isinstance(dtype, torch.dtype):
        raise SllmStoreError(f"this torch has no dtype {name!r}")
    return dtype
