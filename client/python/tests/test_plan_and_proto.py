"""The planner (same rules as the Rust one) and the embedded protocol."""

import os
import sys

import numpy as np
import pytest

from sllm_client import SllmStoreError, plan
from sllm_client._proto import messages


def idx(entries):
    return {n: [o, s, [s], [1], "torch.uint8"] for n, o, s in entries}


def test_mirrored_single_device_is_one_copy():
    p = plan(idx([("a", 0, 100), ("b", 4096, 10), ("tied", 0, 100), ("empty", 8192, 0), ("c", 8192, 5000)]), {"": "d0"})
    (b,) = p.buffers
    assert (b.size, [(c.src_offset, c.size, c.dst_offset) for c in b.copies]) == (13192, [(0, 13192, 0)])
    assert p.tensors["b"].offset == 4096 and p.tensors["tied"].offset == 0


def test_packed_places_back_to_back_and_shares_storage():
    p = plan(idx([("a", 0, 100), ("tied", 0, 100), ("b", 4096, 10), ("c", 8192, 300)]), {"": "d0"}, "packed")
    (b,) = p.buffers
    assert [(c.src_offset, c.size, c.dst_offset) for c in b.copies] == [(0, 100, 0), (4096, 10, 256), (8192, 300, 512)]
    assert b.size == 812 and p.tensors["tied"].offset == 0


def test_longest_prefix_and_unmapped():
    p = plan(idx([("layers.0.w", 0, 10), ("layers.1.w", 4096, 10), ("head", 8192, 10)]), {"": "d0", "layers.1": "d1"})
    assert p.tensors["layers.1.w"].device == "d1" and p.tensors["head"].device == "d0"
    with pytest.raises(SllmStoreError, match="matches no prefix"):
        plan(idx([("head", 0, 10)]), {"layers": "d0"})


@pytest.mark.parametrize("layout", ["mirrored", "packed"])
def test_random_plans_place_every_byte(layout):
    rng = np.random.default_rng(5)
    for _ in range(30):
        entries, offset = [], 0
        for i in range(int(rng.integers(1, 12))):
            size = int(rng.integers(0, 9000))
            entries.append((f"t{i}", offset, size))
            offset = -(-(offset + size) // 4096) * 4096
        device_map = {n: f"d{int(rng.integers(0, 3))}" for n, _, _ in entries}
        p = plan(idx(entries), device_map, layout)
        memory = {b.device: np.full(b.size, -1, dtype=np.int64) for b in p.buffers}
        for b in p.buffers:
            for c in b.copies:
                memory[b.device][c.dst_offset:c.dst_offset + c.size] = np.arange(c.src_offset, c.src_offset + c.size)
        for name, o, s in entries:
            place = p.tensors[name]
            got = memory[place.device][place.offset:place.offset + s]
            assert (got == np.arange(o, o + s)).all(), name


def test_wire_bytes_match_the_rust_side():
    m = messages["RegisterModelResponse"](model_path="a", model_size=300)
    assert m.SerializeToString() == bytes([0x0A, 1, ord("a"), 0x10, 0xAC, 0x02])


def test_embedded_descriptor_matches_proto():
    pytest.importorskip("grpc_tools", reason="grpcio-tools regenerates the descriptor")
    from google.protobuf import descriptor_pb2

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
    import gen_proto
    from sllm_client._descriptor import SERIALIZED_FILE_DESCRIPTOR

    fresh = descriptor_pb2.FileDescriptorProto.FromString(gen_proto.serialized_descriptor())
    embedded = descriptor_pb2.FileDescriptorProto.FromString(SERIALIZED_FILE_DESCRIPTOR)
    assert fresh == embedded, "proto/storage.proto changed: run python3 client/python/tools/gen_proto.py"
