"""load_dict and load_model on a real GPU: torch allocates, shares the
memory by CUDA IPC handle, the daemon (--device cuda) copies into it, and
every tensor must equal its source. Skipped where torch or CUDA is missing
(CI has neither; bench/gpu/check.sh runs these on a GPU machine)."""

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import sllm_client  # noqa: E402
from conftest import ALL, Daemon, random_tensors, save_model  # noqa: E402
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


def test_second_load_is_served_from_the_pool_and_equal(tmp_path, storage, gpu_daemon):
    tensors = random_tensors(3, [(f"w{i}", "torch.bfloat16", (512, 300 + i)) for i in range(8)])
    save_model(tmp_path, storage, "org/twice", tensors)
    first = sllm_client.load_dict("org/twice", storage_path=str(storage), server=gpu_daemon.addr)
    second = sllm_client.load_dict("org/twice", storage_path=str(storage), server=gpu_daemon.addr)
    for name in tensors:
        assert torch.equal(first[name], second[name]), name
        assert first[name].data_ptr() != second[name].data_ptr(), name


def test_host_daemon_is_refused_with_a_clear_error(tmp_path, storage, daemon):
    save_model(tmp_path, storage, "org/h", random_tensors(1, [("w", "torch.float32", (4,))]))
    with pytest.raises(SllmStoreError, match="--device cuda"):
        sllm_client.load_dict("org/h", storage_path=str(storage), server=daemon.addr)


def test_load_model_matches_from_pretrained(tmp_path, storage, gpu_daemon):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(config).to(torch.float32)
    src = tmp_path / "tiny-llama"
    reference.save_pretrained(src, safe_serialization=True)
    import subprocess

    from conftest import binary

    subprocess.run([binary(), "save", "--model", "org/tiny-llama", "--local-model-path", str(src),
                    "--storage-path", str(storage)], check=True, capture_output=True)
    model = sllm_client.load_model("org/tiny-llama", torch_dtype=torch.float32, storage_path=str(storage),
                                   server=gpu_daemon.addr)
    reference = reference.cuda().eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 256, (2, 17), device="cuda")
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
