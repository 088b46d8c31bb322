"""The PCIe link's ceiling, measured the way the daemon copies: one large
host-to-device copy from pinned (page-locked) memory, and from ordinary
pageable memory for comparison; also device-to-host. Prints one JSON line.

    python3 bench/gpu/h2d.py [size_mib] [repeats]
"""

import json
import sys
import time

import torch


def rate(src, dst, repeats):
    dst.copy_(src, non_blocking=True)  # warm-up: first-touch, context, TLB
    torch.cuda.synchronize()
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        best = max(best, src.numel() / (time.perf_counter() - t) / 2**30)
    return round(best, 2)


def main():
    size = int(sys.argv[1]) << 20 if len(sys.argv) > 1 else 1 << 30
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    gpu = torch.empty(size, dtype=torch.uint8, device="cuda")
    pinned = torch.empty(size, dtype=torch.uint8).pin_memory()
    pageable = torch.empty(size, dtype=torch.uint8)
    pageable.fill_(1)
    out = {
        "gpu": torch.cuda.get_device_name(0),
        "size_bytes": size,
        "repeats": repeats,
        "h2d_pinned_gib_s": rate(pinned, gpu, repeats),
        "h2d_pageable_gib_s": rate(pageable, gpu, repeats),
        "d2h_pinned_gib_s": rate(gpu, pinned, repeats),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
