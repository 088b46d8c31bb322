"""load_dict, load_model and load_into_module on a real GPU: torch
allocates, the CUDA driver exports the memory by IPC handle, the daemon
(--device cuda) copies into it, and every tensor must equal its source.
bench/gpu/check.sh runs this file twice: with torch's default allocator,
and with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, whose memory
cannot be exported and is loaded through a staging buffer. Skipped where
torch or CUDA is missing (CI has neither). Figures (peak memory) go to
$OUT/cuda-figures.jsonl when OUT is set."""

import json
import os

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import sllm_client  # noqa: E402
from conftest import ALL, Daemon, binary, random_tensors, save_model  # noqa: E402
from sllm_client.errors import SllmStoreError  # noqa: E402


@pytest.fixture
def gpu_daemon(storage):
    d = Daemon(storage, device="cuda")
    yield d
    d.stop()


def raw_bytes(t):
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("layout", ["mirrored", "packed"])
def test_every_dtype_lands_on_the_gpu(tmp_path, storage, gpu_daemon, layout):
    specs = ALL + [(f"big.{i}", "torch.float16", (1023, 517 + i)) for i in range(6)]
    tensors = random_tensors(7, specs)
    save_model(tmp_path, storage, "org/all", tensors)
    loaded = sllm_client.load_dict("org/all", {"": 0}, storage_path=str(storage), server=gpu_daemon.addr,
                                   layout=layout)
    assert set(loaded) == set(tensors)
    for name, (dtype, shape, raw) in tensors.items():
        t = loaded[name]
        assert t.is_cuda and t.device.index == 0, name
        assert str(t.dtype) == dtype, name
        assert tuple(t.shape) == shape, name
        assert raw_bytes(t) == raw, name


def expandable() -> bool:
    return "expandable_segments:true" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "").replace(" ", "").lower()


def record(**figures):
    figures["allocator"] = "expandable_segments" if expandable() else "default"
    print(json.dumps(figures))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "cuda-figures.jsonl"), "a") as f:
            f.write(json.dumps(figures) + "\n")


def test_the_allocator_setting_decides_the_path():
    from sllm_client import cuda_driver

    t = torch.empty(8 << 20, dtype=torch.uint8, device="cuda")
    if expandable():
        with pytest.raises(cuda_driver.NotShareable, match="expandable_segments"):
            cuda_driver.share(t.data_ptr(), 0)
    else:
        base, handle = cuda_driver.share(t.data_ptr(), 0)
        assert len(handle) == cuda_driver.IPC_HANDLE_BYTES and base <= t.data_ptr()
        # torch's own handle, whatever its prefix, ends with the driver's.
        theirs = bytes(t.untyped_storage()._share_cuda_()[1])
        assert theirs.endswith(handle), (len(theirs), theirs[:4])


def test_second_load_is_served_from_the_pool_and_equal(tmp_path, storage, gpu_daemon):
    tensors = random_tensors(3, [(f"w{i}", "torch.bfloat16", (512, 300 + i)) for i in range(8)])
    save_model(tmp_path, storage, "org/twice", tensors)
    first = sllm_client.load_dict("org/twice", storage_path=str(storage), server=gpu_daemon.addr)
    second = sllm_client.load_dict("org/twice", storage_path=str(storage), server=gpu_daemon.addr)
    for name in tensors:
        # Bytes, not torch.equal: random bf16 holds NaNs, and NaN != NaN.
        assert raw_bytes(first[name]) == raw_bytes(second[name]) == tensors[name][2], name
        assert first[name].data_ptr() != second[name].data_ptr(), name


def test_host_daemon_is_refused_with_a_clear_error(tmp_path, storage, daemon):
    save_model(tmp_path, storage, "org/h", random_tensors(1, [("w", "torch.float32", (4,))]))
    with pytest.raises(SllmStoreError, match="--device cuda"):
        sllm_client.load_dict("org/h", storage_path=str(storage), server=daemon.addr)


def saved_llama(tmp_path, storage, model_id, config, dtype):
    """A seeded Llama of `config`, saved with `sllm-store save` as
    `model_id`; returns the model (on the CPU)."""
    import subprocess

    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(dtype)
    src = tmp_path / model_id.replace("/", "-")
    model.save_pretrained(src, safe_serialization=True)
    subprocess.run([binary(), "save", "--model", model_id, "--local-model-path", str(src),
                    "--storage-path", str(storage)], check=True, capture_output=True)
    return model


def test_load_model_matches_from_pretrained(tmp_path, storage, gpu_daemon):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )
    reference = saved_llama(tmp_path, storage, "org/tiny-llama", config, torch.float32)
    model = sllm_client.load_model("org/tiny-llama", torch_dtype=torch.float32, storage_path=str(storage),
                                   server=gpu_daemon.addr)
    reference = reference.cuda().eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 256, (2, 17), device="cuda")
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_load_into_an_existing_model_without_a_second_copy(tmp_path, storage, gpu_daemon):
    """The vLLM plugin's GPU core, driven with a transformers model: the
    weights land in the parameters the model already has."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
    )
    reference = saved_llama(tmp_path, storage, "org/llama", config, torch.bfloat16)
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).cuda().eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    report, loaded = sllm_client.load_into_module(model, "org/llama", storage_path=str(storage),
                                                  server=gpu_daemon.addr)
    torch.cuda.synchronize()
    torch_extra = torch.cuda.max_memory_allocated() - before
    assert loaded == {n for n, _ in model.named_parameters()}
    ids = torch.randint(0, 32000, (2, 33), device="cuda")
    with torch.no_grad():
        got = model(ids).logits
        want = reference.cuda().eval()(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    budget = max(weights // 20, 1 << 30)
    record(test="load_into_module", weights_bytes=weights, direct_bytes=report.direct_bytes,
           staged_bytes=report.staged_bytes, staging_bytes=report.staging_bytes, torch_extra_bytes=torch_extra,
           requests=report.requests, seconds=round(report.seconds, 4), budget_bytes=budget)
    # Peak extra GPU memory: the staging window (cuMemAlloc, outside torch's
    # count) plus whatever torch allocated during the load.
    assert report.staging_bytes + torch_extra <= budget
    if expandable():
        assert report.direct_bytes == 0 and report.not_shareable
    else:
        assert report.staged_bytes == 0 and report.direct_bytes == weights
