"""The Python peers of `sllm-bench load`, timed inside the interpreter so
its start-up and imports are not charged to them. Prints one JSON line:
{"wall_s", "cpu_s", "bytes", "how"}.

    python3 peers.py mmap-copy FILE...    buffered: mmap each file, copy it into one buffer
    python3 peers.py safetensors FILE...  safetensors' load_file to CPU (torch if present, else numpy)
"""

import json
import mmap
import os
import sys
import time


def mmap_copy(files):
    import numpy as np

    total = sum(os.path.getsize(f) for f in files)
    dst = np.ones(total, dtype=np.uint8)  # faulted in before the clock starts
    wall, cpu = time.perf_counter(), time.process_time()
    at = 0
    for f in files:
        with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as mm:
            n = len(mm)
            dst[at:at + n] = np.frombuffer(mm, dtype=np.uint8)
            at += n
    return time.perf_counter() - wall, time.process_time() - cpu, total, "mmap + memcpy (numpy)"


def safetensors_load(files):
    try:
        import torch  # noqa: F401
        from safetensors.torch import load_file

        how = "safetensors.torch.load_file"
    except ImportError:
        import ml_dtypes  # noqa: F401  (lets numpy name bfloat16 and float8)
        from safetensors.numpy import load_file

        how = "safetensors.numpy.load_file (no torch here)"
    wall, cpu = time.perf_counter(), time.process_time()
    total = 0
    for f in files:
        tensors = load_file(f)
        total += sum(t.nbytes for t in tensors.values())
        del tensors
    return time.perf_counter() - wall, time.process_time() - cpu, total, how


def main():
    mode, files = sys.argv[1], sys.argv[2:]
    run = {"mmap-copy": mmap_copy, "safetensors": safetensors_load}[mode]
    wall, cpu, total, how = run(files)
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "bytes": total, "how": how}))


if __name__ == "__main__":
    main()
