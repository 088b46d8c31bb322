"""The planner (same rules as the Rust one) and the embedded protocol."""

import os
import sys

import numpy as np
import pytest

from sllm_client import CopyChunk, SllmStoreError, plan
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


def test_staging_windows_are_bounded_aligned_and_in_model_order():
    from sllm_client.into import ALIGN, Piece, _windows

    pieces = [Piece(("t", 0), 10_000, 5000), Piece(("u", 0), 0, 300), Piece(("v", 0), 20_000, 1)]
    windows = _windows(pieces, 2048, split=True)
    flat = [(p, at) for w in windows for p, at in w]
    # Every byte once, in model order, cut where a piece is larger than a window.
    assert [(p.key, p.src_offset, p.size) for p, _ in flat] == [
        (("u", 0), 0, 300), (("t", 0), 10_000, 2048), (("t", 2048), 12_048, 2048), (("t", 4096), 14_096, 904),
        (("v", 0), 20_000, 1),
    ]
    for w in windows:
        assert all(at % ALIGN == 0 and at + p.size <= 2048 for p, at in w)
    whole = _windows([Piece("big", 0, 5000), Piece("small", 6000, 10)], 4096, split=False)
    assert [[(p.key, at) for p, at in w] for w in whole] == [[("big", 0)], [("small", 0)]]


def test_direct_copies_send_each_allocation_once_and_at_most_64_per_request():
    from sllm_client.into import direct_batches

    items = [(CopyChunk(i * 10, 10, 0), bytes([i % 100]) * 64) for i in range(150)]
    items.append((CopyChunk(5000, 10, 64), bytes([0]) * 64))  # a second tensor in allocation 0
    batches = direct_batches({"gpu-a": items, "gpu-b": items[:3]})
    assert [len(h["gpu-a"]) for _c, h in batches] == [64, 36]
    assert len(batches[0][1]["gpu-b"]) == 3
    sent = {}
    for copies, handles in batches:
        for uuid, cs in copies.items():
            for c in cs:
                sent.setdefault(uuid, []).append((c.src_offset, handles[uuid][c.handle_idx], c.dst_offset))
    assert sorted(sent["gpu-a"]) == sorted((c.src_offset, h, c.dst_offset) for c, h in items)
    assert len(sent["gpu-b"]) == 3


def test_direct_batches_follow_the_model_so_a_streamed_model_is_read_once():
    from sllm_client.into import direct_batches

    # Allocations met in reverse order of their bytes in the model.
    items = [(CopyChunk((99 - i) * 10, 10, 0), i.to_bytes(2, "little") * 32) for i in range(100)]
    batches = direct_batches({"gpu": items}, max_handles=10)
    firsts = [min(c.src_offset for c in copies["gpu"]) for copies, _h in batches]
    lasts = [max(c.src_offset for c in copies["gpu"]) for copies, _h in batches]
    assert firsts == sorted(firsts)
    assert all(last < nxt for last, nxt in zip(lasts, firsts[1:]))


def test_without_a_cuda_driver_the_error_says_what_to_use():
    import ctypes

    from sllm_client import cuda_driver

    try:
        ctypes.CDLL("libcuda.so.1")
        pytest.skip("this machine has a CUDA driver")
    except OSError:
        pass
    with pytest.raises(SllmStoreError, match=r"libcuda.so.1\) cannot be loaded.*use load_dict_host"):
        cuda_driver.device_uuid(0)


def test_the_python_planner_makes_the_golden_plans():
    """The same vectors as client/tests/golden_plan.rs (tests/planner/golden.json)."""
    import json

    root = os.path.join(os.path.dirname(__file__), "..", "..", "..")
    with open(os.path.join(root, "tests", "planner", "golden.json")) as f:
        golden = json.load(f)
    assert len(golden["cases"]) >= 10
    for case in golden["cases"]:
        index = golden["indices"][case["index"]]
        if "error" in case:
            with pytest.raises(SllmStoreError) as e:
                plan(index, case["device_map"], case["layout"])
            assert str(e.value) == case["error"]
            continue
        p = plan(index, case["device_map"], case["layout"])
        got = [{"device": b.device, "size": b.size, "copies": [[c.src_offset, c.size, c.dst_offset] for c in b.copies]}
               for b in p.buffers]
        assert got == case["buffers"], case
        assert {n: [t.device, t.offset] for n, t in p.tensors.items()} == case["tensors"], case
