"""Fixtures: the real sllm-store binary (SLLM_STORE_BIN, else target/debug),
a daemon on loopback (host backend unless a test asks for cuda), and models
made by `save`."""

import json
import os
import subprocess

import numpy as np
import pytest
from store_process import Daemon, binary  # noqa: F401 (tests import them from here)

ST_DTYPES = {
    "torch.float16": "F16", "torch.bfloat16": "BF16", "torch.float32": "F32", "torch.float64": "F64",
    "torch.int8": "I8", "torch.int16": "I16", "torch.int32": "I32", "torch.int64": "I64",
    "torch.uint8": "U8", "torch.bool": "BOOL", "torch.float8_e4m3fn": "F8_E4M3", "torch.float8_e5m2": "F8_E5M2",
}
ITEM = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I8": 1, "I16": 2, "I32": 4, "I64": 8, "U8": 1, "BOOL": 1,
        "F8_E4M3": 1, "F8_E5M2": 1}


# One tensor of every dtype the format knows, with odd, empty and scalar shapes.
ALL = [
    ("f16.odd", "torch.float16", (3, 5, 7)),
    ("bf16", "torch.bfloat16", (4, 33)),
    ("f32.scalar", "torch.float32", ()),
    ("f64", "torch.float64", (9,)),
    ("i8", "torch.int8", (1, 1, 13)),
    ("i16", "torch.int16", (2, 3)),
    ("i32", "torch.int32", (5000,)),
    ("i64.empty", "torch.int64", (0, 4)),
    ("u8", "torch.uint8", (4097,)),
    ("bool", "torch.bool", (1,)),
    ("f8_e4m3", "torch.float8_e4m3fn", (16, 3)),
    ("f8_e5m2", "torch.float8_e5m2", (2, 2, 2, 2, 2)),
]


def write_safetensors(path, tensors):
    """tensors: {name: (torch dtype name, shape, raw bytes)}; a plain writer of the format."""
    header, data, offset = {}, bytearray(), 0
    for name, (dtype, shape, raw) in tensors.items():
        st = ST_DTYPES[dtype]
        assert len(raw) == int(np.prod(shape, dtype=np.int64)) * ITEM[st]
        header[name] = {"dtype": st, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        data += raw
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + bytes(data))


def random_tensors(seed, specs):
    """specs: [(name, dtype, shape)] -> {name: (dtype, shape, bytes)}."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, dtype, shape in specs:
        n = int(np.prod(shape, dtype=np.int64)) * ITEM[ST_DTYPES[dtype]]
        raw = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        if dtype == "torch.bool":
            raw = bytes(b & 1 for b in raw)
        out[name] = (dtype, tuple(shape), raw)
    return out


@pytest.fixture
def storage(tmp_path):
    path = tmp_path / "models"
    path.mkdir()
    return path


def save_model(tmp_path, storage, model, tensors, partition_size="1MiB", extra=None, force=False, tag=""):
    """`sllm-store save` of `tensors` as `model` (`force`: replace it; `tag`
    names the source directory of a second save of one model)."""
    src = tmp_path / ("src-" + model.replace("/", "-") + tag)
    src.mkdir()
    write_safetensors(src / "model.safetensors", tensors)
    for name, text in (extra or {}).items():
        (src / name).write_text(text)
    subprocess.run(
        [binary(), "save", "--model", model, "--local-model-path", str(src), "--storage-path", str(storage),
         "--partition-size", partition_size] + (["--force"] if force else []),
        check=True, capture_output=True, env={**os.environ, "RUST_LOG": "warn"},
    )


@pytest.fixture
def daemon(storage):
    d = Daemon(storage)
    yield d
    d.stop()
