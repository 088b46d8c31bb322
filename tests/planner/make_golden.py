"""Writes golden.json: copy plans that the Rust planner (client/src/plan.rs)
and the Python planner (client/python/sllm_client/plan.py) must both
produce, checked by client/tests/golden_plan.rs and
client/python/tests/test_plan_and_proto.py. Run it only when the planning
rules change on purpose, then review the diff:

    PYTHONPATH=client/python python3 tests/planner/make_golden.py > tests/planner/golden.json
"""

import json

from sllm_client import SllmStoreError, plan

KIB = 1 << 10


def entry(offset, size, shape=None, dtype="torch.uint8"):
    shape = shape if shape is not None else [size]
    stride, acc = [], 1
    for n in reversed(shape):
        stride.insert(0, acc)
        acc *= n
    return [offset, size, shape, stride, dtype]


INDICES = {
    # Neighbours within 64 KiB merge across the padding; a wider gap splits.
    "gaps": {
        "a": entry(0, 1000), "b": entry(4 * KIB, 5000), "c": entry(200 * KIB, 10),
        "empty": entry(0, 0, [0, 3]), "d": entry(264 * KIB, 4096),
    },
    # Tied weights: two names, one record (same offset), placed once.
    "tied": {
        "embed": entry(0, 8192, [64, 64], "torch.float16"), "lm_head": entry(0, 8192, [64, 64], "torch.float16"),
        "norm": entry(8192, 256, [64], "torch.float32"),
    },
    # Out of offset order in the index (the index's order is the packed order).
    "unordered": {"z": entry(8 * KIB, 300), "y": entry(0, 7), "x": entry(4 * KIB, 513)},
    # Two devices by prefix; the longest prefix wins.
    "sharded": {
        "model.layers.0.w": entry(0, 4096), "model.layers.1.w": entry(4096, 4096),
        "model.layers.10.w": entry(8192, 4096), "model.norm": entry(12288, 64), "lm_head": entry(16384, 4096),
    },
}
CASES = [
    ("gaps", {"": "gpu-a"}), ("tied", {"": "gpu-a"}), ("unordered", {"": "gpu-a"}),
    ("sharded", {"": "gpu-a", "model.layers.1": "gpu-b", "model.layers.10": "gpu-c"}),
    ("sharded", {"model.": "gpu-a"}),  # lm_head matches no prefix
]


def main():
    out = []
    for index_name, device_map in CASES:
        for layout in ("mirrored", "packed"):
            case = {"index": index_name, "device_map": device_map, "layout": layout}
            try:
                p = plan(INDICES[index_name], device_map, layout)
            except SllmStoreError as e:
                case["error"] = str(e)
            else:
                case["buffers"] = [
                    {"device": b.device, "size": b.size, "copies": [[c.src_offset, c.size, c.dst_offset] for c in b.copies]}
                    for b in p.buffers
                ]
                case["tensors"] = {n: [t.device, t.offset] for n, t in sorted(p.tensors.items())}
            out.append(case)
    print(json.dumps({"indices": INDICES, "cases": out}, indent=1))


if __name__ == "__main__":
    main()
