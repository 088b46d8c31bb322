#!/usr/bin/env bash
# GPU check (shared/DESIGN.md section 6), run on a lent device machine with
# binaries built here: `cargo build --release` and carry target/release/.
#
#   bench/gpu/check.sh [size]        (default 4GiB; its steps are time-boxed to finish within 6 minutes)
#
# Starts the daemon with --device cuda, loads a synthetic model into GPU
# memory allocated by a separate client process (IPC handle), copies it back
# and compares every byte with the files; records nvidia-smi and the figures
# under $OUT (or ./gpu-check-out). Then the Python client against the same
# daemon: load_dict against safetensors.torch.load_file(device="cuda"), cold
# and warm (python_load.py). Then the PCIe ceiling (h2d.py) and the Python
# client's CUDA tests (every dtype in both layouts, load_model against
# from_pretrained, loading into an existing model's parameters with its peak
# memory), once with torch's default allocator and once with
# expandable_segments, whose memory goes through a staging buffer. Last,
# `sllm-bench load --device cuda` and `sllm-bench stream --device cuda`
# (when sllm-bench is in $SLLM_BIN), their results named after the GPU
# (load-h200-<date>.json, stream-h200-<date>.json) in $OUT.
#
# The whole script keeps to 5 min 40 s: each step past the first loads gets
# what is left of that budget, at most its own cap, and is skipped (said in
# the output) when too little is left.
set -euo pipefail
deadline=$((SECONDS + 340))
# budget CAP: seconds for the next step, or 0 when too little is left.
budget() {
    local left=$((deadline - SECONDS))
    if [ "$left" -lt 20 ]; then echo 0; elif [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}
size=${1:-4GiB}
bin=${SLLM_BIN:-target/release}
out=${OUT:-gpu-check-out}
work=$(mktemp -d)
mkdir -p "$out"
trap 'kill $daemon 2>/dev/null || true; rm -rf "$work"' EXIT

nvidia-smi --query-gpu=name,uuid,driver_version,pcie.link.gen.max,pcie.link.width.max --format=csv > "$out/nvidia-smi.csv" || true
"$bin/sllm-store" demo --size "$size" --dir "$work" > "$out/demo.txt"
"$bin/sllm-store" start --device cuda --storage-path "$work/models" --port 18073 \
    --mem-pool-size 8GiB > "$out/daemon.log" 2>&1 &
daemon=$!
for _ in $(seq 100); do grep -q "listening on" "$out/daemon.log" && break; sleep 0.2; done
grep "listening on" "$out/daemon.log"
for layout in mirrored packed; do
    for run in cold warm; do
        "$bin/sllm-store" load --model demo/llama-synthetic --server 127.0.0.1:18073 \
            --storage-path "$work/models" --device cuda --layout "$layout" --verify --json \
            | tee -a "$out/loads.jsonl"
    done
done
here="$(cd "$(dirname "$0")" && pwd)"
export PYTHONPATH="$here/../../client/python"
t=$(budget 90)
if [ "$t" -gt 0 ]; then
    timeout "$t" python3 "$here/python_load.py" "$work/checkpoint" "$work/models" demo/llama-synthetic \
        127.0.0.1:18073 2 | tee "$out/python-load.jsonl" || echo "python_load.py failed: $?"
else
    echo "python_load.py skipped: out of time"
fi
kill -TERM $daemon; wait $daemon || true
# Where the warm copies' time goes: the daemon logs, per replica, opening
# the IPC handles, waiting for chunks, issuing copies, the final sync,
# closing the handles, and the device's own time for the copies (events).
grep "copied to the devices" "$out/daemon.log" > "$out/copy-figures.log" || true
# The same warm loads with the chunks spread over several streams.
for streams in 2 4; do
    t=$(budget 40)
    [ "$t" -eq 0 ] && { echo "--copy-streams $streams skipped: out of time"; continue; }
    "$bin/sllm-store" start --device cuda --storage-path "$work/models" --port 18074 \
        --mem-pool-size 8GiB --copy-streams "$streams" > "$out/daemon-streams-$streams.log" 2>&1 &
    daemon=$!
    for _ in $(seq 100); do grep -q "listening on" "$out/daemon-streams-$streams.log" && break; sleep 0.2; done
    for run in cold warm warm; do
        timeout "$t" "$bin/sllm-store" load --model demo/llama-synthetic --server 127.0.0.1:18074 \
            --storage-path "$work/models" --device cuda --json \
            | sed "s/^{/{\"copy_streams\":$streams,\"run\":\"$run\",/" | tee -a "$out/loads-streams.jsonl" || true
    done
    kill -TERM $daemon; wait $daemon || true
    grep "copied to the devices" "$out/daemon-streams-$streams.log" | sed "s/^/streams=$streams /" >> "$out/copy-figures.log" || true
done
python3 "$here/h2d.py" 1024 5 | tee "$out/h2d.json"
export SLLM_STORE_BIN="$(realpath "$bin")/sllm-store" OUT="$(realpath "$out")"
status=0
for alloc in "" "expandable_segments:True"; do
    t=$(budget 100)
    if [ "$t" -eq 0 ]; then
        echo "== pytest with PYTORCH_CUDA_ALLOC_CONF=$alloc skipped: out of time" | tee -a "$out/pytest.log"
        status=1
        continue
    fi
    echo "== pytest, PYTORCH_CUDA_ALLOC_CONF=$alloc" | tee -a "$out/pytest.log"
    env ${alloc:+PYTORCH_CUDA_ALLOC_CONF=$alloc} timeout "$t" python3 -m pytest -q -p no:cacheprovider \
        "$here/../../client/python/tests" 2>&1 | tee -a "$out/pytest.log" || status=1
done
if [ -x "$bin/sllm-bench" ]; then
    t=$(budget 120)
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 \
        | grep -oiE 'h100|h200|a100|l40s?|b200' | tr 'A-Z' 'a-z' || true)
    if [ "$t" -gt 0 ]; then
        # No fio on the device machine: the disk's ratios are left out, and
        # say so; the device copy against the pinned H2D ceiling is measured.
        timeout "$t" "$bin/sllm-bench" load --device cuda --size "$size" --runs 2 --quick \
            --pool-startup 32GiB --dir "$work/bench" --sllm-store "$bin/sllm-store" \
            --json "$out/load-${gpu:-gpu}-$(date -u +%Y-%m-%dT%H-%M-%S).json" \
            > "$out/sllm-bench-load.txt" 2>&1 || echo "sllm-bench load failed or ran out of time: see $out/sllm-bench-load.txt"
    else
        echo "sllm-bench load skipped: out of time"
    fi
    # A model 2x and 4x the pool, streamed through it to the GPU.
    t=$(budget 90)
    if [ "$t" -gt 0 ]; then
        timeout "$t" "$bin/sllm-bench" stream --device cuda --size 2GiB --runs 1 \
            --dir "$work/bench" --sllm-store "$bin/sllm-store" \
            --json "$out/stream-${gpu:-gpu}-$(date -u +%Y-%m-%dT%H-%M-%S).json" \
            > "$out/sllm-bench-stream.txt" 2>&1 || echo "sllm-bench stream failed or ran out of time: see $out/sllm-bench-stream.txt"
    else
        echo "sllm-bench stream skipped: out of time"
    fi
fi
echo "GPU check done in $SECONDS s: $out (pytest status $status)"
exit $status
