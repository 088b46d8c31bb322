"""Fixtures of the real-vLLM tier: one daemon (host backend) on loopback
for the whole session, tiny seeded models converted with the real
`sllm-store save`, and vLLM (the CPU build, in the venv made by
tests/vllm/venv.sh) run in its own process per engine."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "client", "python", "tests"))

import models  # noqa: E402
from store_process import Daemon, binary  # noqa: E402


def save(src, storage, model_id):
    subprocess.run(
        [binary(), "save", "--model", model_id, "--local-model-path", str(src), "--storage-path", str(storage)],
        check=True, capture_output=True, env={**os.environ, "RUST_LOG": "warn"},
    )


class Store:
    """The session's storage path, daemon and models."""

    def __init__(self, work):
        self.work = work
        self.storage = work / "models"
        self.storage.mkdir()
        self.daemon = Daemon(self.storage, pool="256MiB", chunk="1MiB")
        self.llama_src = models.tiny_llama(str(work / "src-llama"))
        save(self.llama_src, self.storage, "org/tiny")
        self.bert_src = models.tiny_sentence_bert(str(work / "src-bert"))
        save(self.bert_src, self.storage, "org/tiny-embed")

    def env(self, **extra):
        return {
            **os.environ, "STORAGE_PATH": str(self.storage), "SLLM_STORE_ADDR": self.daemon.addr,
            "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", **extra,
        }

    def vllm(self, *args, expect_ok=True, timeout=600):
        """Runs run_vllm.py; returns (result dict or None, log)."""
        proc = subprocess.run([sys.executable, os.path.join(HERE, "run_vllm.py"), *map(str, args)],
                              capture_output=True, text=True, env=self.env(), timeout=timeout, cwd=str(self.work))
        log = proc.stdout + proc.stderr
        results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if expect_ok:
            assert proc.returncode == 0 and results, f"vLLM failed:\n{log[-6000:]}"
        return (json.loads(results[-1][len("RESULT "):]) if results else None), log


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    s = Store(tmp_path_factory.mktemp("vllm"))
    yield s
    s.daemon.stop()
    shutil.rmtree(s.work, ignore_errors=True)


@pytest.fixture(scope="session")
def baseline(store):
    """vLLM's own answers from the source safetensors."""
    return store.vllm("generate", store.llama_src, "auto")[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
