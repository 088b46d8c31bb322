"""The vLLM plugin inside a real vLLM (the CPU build): `--load-format
serverless_llm` against our daemon (host backend) gives what vLLM gives from
the source safetensors, token for token and bit for bit, in both layouts,
for a causal LM and an embedding model, offline and over HTTP; and bad input
gets an error that says what to do."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from conftest import Daemon, free_port, save
from sllm_client import SllmStoreError
from sllm_client.vllm_plugin import load_weights_into


def test_generate_from_the_store_equals_the_source(store, baseline):
    got, log = store.vllm("generate", store.storage / "org" / "tiny", "serverless_llm")
    assert got["tokens"] == baseline["tokens"]
    assert got["text"] == baseline["text"]
    # Our loader ran, inside vLLM, and said what it did.
    assert re.search(r"sllm-store: loaded org/tiny \(rank 0\): [\d.]+ MiB", log), log[-4000:]


def _rank0_layout(store):
    """ServerlessLLM's vLLM layout: vLLM's parameters by name and shape
    (fused qkv_proj and gate_up_proj, vocabulary padded to 64 rows) under
    rank_0/, the config and tokenizer beside it."""
    from safetensors.torch import load_file, save_file

    hf = load_file(os.path.join(store.llama_src, "model.safetensors"))
    layers = {int(m.group(1)) for m in (re.match(r"model\.layers\.(\d+)\.", n) for n in hf) if m}
    for i in layers:
        p = f"model.layers.{i}"
        hf[f"{p}.self_attn.qkv_proj.weight"] = torch.cat(
            [hf.pop(f"{p}.self_attn.{x}_proj.weight") for x in "qkv"])
        hf[f"{p}.mlp.gate_up_proj.weight"] = torch.cat(
            [hf.pop(f"{p}.mlp.{x}_proj.weight") for x in ("gate", "up")])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        t = hf[name]
        hf[name] = torch.cat([t, t.new_zeros((-t.shape[0] % 64, t.shape[1]))])
    src = store.work / "src-rank0"
    src.mkdir()
    save_file(hf, str(src / "model.safetensors"))
    save(src, store.storage, "org/tiny-tp1/rank_0")
    model_dir = store.storage / "org" / "tiny-tp1"
    for name in os.listdir(store.llama_src):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(store.llama_src, name), model_dir / name)
    return model_dir


def test_rank_layout_of_vllm_names_equals_the_source(store, baseline):
    model_dir = _rank0_layout(store)
    got, log = store.vllm("generate", model_dir, "serverless_llm")
    assert got["tokens"] == baseline["tokens"]
    assert "sllm-store: loaded org/tiny-tp1/rank_0 (rank 0)" in log


def test_embedding_model_through_the_pooling_runner(store):
    # The stored model keeps the sentence-transformers files vLLM reads.
    stored = store.storage / "org" / "tiny-embed"
    for name in ["modules.json", "1_Pooling/config.json", "sentence_bert_config.json", "tokenizer.json"]:
        assert (stored / name).is_file(), name
    want = store.vllm("embed", store.bert_src, "auto")[0]
    got, log = store.vllm("embed", stored, "serverless_llm")
    assert got["embeddings"] == want["embeddings"]
    assert "sllm-store: loaded org/tiny-embed" in log


def test_vllm_serve_completes_over_http(store, baseline):
    port = free_port()
    model_dir = str(store.storage / "org" / "tiny")
    cli = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_cli.py")
    proc = subprocess.Popen(
        [sys.executable, cli, "serve", model_dir, "--load-format", "serverless_llm", "--port", str(port), "--host", "127.0.0.1",
         "--dtype", "float32", "--max-model-len", "128", "--enforce-eager", "--gpu-memory-utilization", "0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=store.env(), cwd=str(store.work),
    )
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, "vllm serve exited:\n" + proc.stdout.read()[-6000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "vllm serve did not get ready in 300 s"
            time.sleep(1)
        body = json.dumps({"model": model_dir, "prompt": "the quick brown", "max_tokens": 16,
                           "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            completion = json.loads(r.read())
        assert completion["choices"][0]["text"] == baseline["text"][0]
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_a_model_not_in_the_store_stops_vllm_with_what_to_do(store):
    missing = store.storage / "org" / "missing"
    missing.mkdir(parents=True)
    for name in os.listdir(store.llama_src):  # all but the weights
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(store.llama_src, name), missing / name)
    result, log = store.vllm("generate", missing, "serverless_llm", expect_ok=False)
    assert result is None
    assert "holds no tensor_index.json: convert it with `sllm-store save" in log, log[-4000:]


# --- the plugin's core, in this process (no engine start) -----------------


class Params(torch.nn.Module):
    """A module whose parameters carry the given (dotted) names."""

    def __init__(self, shapes, dtype=torch.float32):
        super().__init__()
        self._names = {}
        for i, (name, shape) in enumerate(shapes.items()):
            self.register_parameter(f"p{i}", torch.nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False))
            self._names[f"p{i}"] = name

    def named_parameters(self, *args, **kwargs):
        for key, p in super().named_parameters(*args, **kwargs):
            yield self._names[key], p


def _rank_model(store):

    model_dir = store.storage / "org" / "tiny-tp1"
    if not model_dir.exists():
        _rank0_layout(store)
    path = store.storage / "org" / "tiny-tp1" / "rank_0" / "tensor_index.json"
    index = json.loads(path.read_text())
    return model_dir, {n: tuple(e[2]) for n, e in index.items()}


def test_a_layout_for_another_tensor_parallel_size_is_refused(store, monkeypatch):
    monkeypatch.setenv("STORAGE_PATH", str(store.storage))
    monkeypatch.setenv("SLLM_STORE_ADDR", store.daemon.addr)
    model_dir, shapes = _rank_model(store)
    with pytest.raises(SllmStoreError, match="rank_1/tensor_index.json is missing: was the model saved for this"):
        load_weights_into(Params(shapes), str(model_dir), rank=1)
    # A model of another size: the stored shapes do not fit.
    wrong = {n: (s[0] + 1,) + s[1:] if len(s) else s for n, s in shapes.items()}
    with pytest.raises(SllmStoreError, match="saved for another tensor-parallel size or model"):
        load_weights_into(Params(wrong), str(model_dir), rank=0)
    # A model with a parameter the store lacks.
    with pytest.raises(SllmStoreError, match=r"left 1 parameter\(s\) of the model unset, e.g. \['extra.weight'\]"):
        load_weights_into(Params({**shapes, "extra.weight": (3,)}), str(model_dir), rank=0)
    # The right model loads, every byte.
    right = Params(shapes)
    report = load_weights_into(right, str(model_dir), rank=0)
    assert report.staged_bytes > 0 and report.direct_bytes == 0  # CPU: through shared memory
    from safetensors.torch import load_file

    source = load_file(str(store.work / "src-rank0" / "model.safetensors"))
    params = dict(right.named_parameters())
    assert set(params) == set(source)
    for name, want in source.items():
        assert torch.equal(params[name], want), name


def test_a_daemon_elsewhere_is_named(store, monkeypatch, tmp_path):
    model_dir, shapes = _rank_model(store)
    monkeypatch.setenv("STORAGE_PATH", str(store.storage))
    monkeypatch.setenv("SLLM_STORE_ADDR", f"127.0.0.1:{free_port()}")
    with pytest.raises(SllmStoreError, match="cannot reach the store daemon at 127.0.0.1:.*SLLM_STORE_ADDR"):
        load_weights_into(Params(shapes), str(model_dir), rank=0)
    # A daemon on another host: its shared-memory directory is not here.
    shm = tmp_path / "shm"
    shm.mkdir()
    other = Daemon(store.storage, "--host-shm-dir", str(shm), pool="256MiB", chunk="1MiB")
    try:
        shm.rmdir()
        monkeypatch.setenv("SLLM_STORE_ADDR", other.addr)
        with pytest.raises(SllmStoreError, match="which this machine lacks: the host backend needs the daemon on"):
            load_weights_into(Params(shapes), str(model_dir), rank=0)
    finally:
        other.stop()
    # vLLM pointed at a directory outside the daemon's storage path.
    monkeypatch.setenv("STORAGE_PATH", str(tmp_path))
    with pytest.raises(SllmStoreError, match="is not inside the storage path .*set STORAGE_PATH"):
        load_weights_into(Params(shapes), str(model_dir), rank=0)
