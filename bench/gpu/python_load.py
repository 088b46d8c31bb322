"""sllm_client.load_dict against safetensors.torch.load_file(device="cuda"),
cold and warm, on one model: what a Python user of the store sees. Prints
JSON lines (one per load) and a summary line.

    python3 bench/gpu/python_load.py <checkpoint dir> <storage path> <model id> <daemon addr> [runs]

Cold: the checkpoint's files are dropped from the page cache
(posix_fadvise DONTNEED) before safetensors reads them; the model is
unloaded from the daemon's pool before load_dict (the daemon reads with
O_DIRECT, so the page cache does not serve it).
"""

import glob
import json
import os
import sys
import time

import torch
from safetensors.torch import load_file

import sllm_client


def drop_cache(paths):
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main():
    src, storage, model, addr = sys.argv[1:5]
    runs = int(sys.argv[5]) if len(sys.argv) > 5 else 2
    files = sorted(glob.glob(os.path.join(src, "*.safetensors")))
    size = sum(os.path.getsize(f) for f in files)
    rows = []
    for run in range(runs):
        for state in ("cold", "warm"):
            if state == "cold":
                drop_cache(files)

            def st():
                out = {}
                for f in files:
                    out.update(load_file(f, device="cuda"))
                return out

            tensors, st_s = timed(st)
            del tensors
            torch.cuda.empty_cache()
            if state == "cold":
                with sllm_client.StoreClient(addr) as c:
                    try:
                        c.unload(model)
                    except sllm_client.SllmStoreError:
                        pass
            tensors, sllm_s = timed(lambda: sllm_client.load_dict(model, {"": 0}, storage_path=storage, server=addr))
            del tensors
            torch.cuda.empty_cache()
            row = {"run": run, "state": state, "bytes": size, "safetensors_s": round(st_s, 4),
                   "load_dict_s": round(sllm_s, 4), "speedup": round(st_s / sllm_s, 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    best = {s: min((r for r in rows if r["state"] == s), key=lambda r: r["load_dict_s"]) for s in ("cold", "warm")}
    print(json.dumps({"summary": best, "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
