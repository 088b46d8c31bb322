"""Loading into tensors the caller owns (into.py), through the host
backend: what the vLLM plugin does on vLLM's CPU platform, and the staged
half of what it does on a GPU. Needs torch (the real-vLLM tier's venv has
it; the fast tier skips these)."""

import pytest

torch = pytest.importorskip("torch")

from conftest import ALL, Daemon, random_tensors, save_model  # noqa: E402
from sllm_client import SllmStoreError, StoreClient, load_into_module, read_index  # noqa: E402
from sllm_client.dtypes import torch_dtype  # noqa: E402
from sllm_client.into import load_into  # noqa: E402


class Named(torch.nn.Module):
    """Parameters under arbitrary (dotted) names, zero-filled."""

    def __init__(self, specs, dtype=None):
        super().__init__()
        self.names = {}
        for i, (name, (dt, shape, _raw)) in enumerate(specs.items()):
            t = torch.zeros(shape, dtype=dtype or torch_dtype(dt))
            self.register_parameter(f"p{i}", torch.nn.Parameter(t, requires_grad=False))
            self.names[f"p{i}"] = name

    def named_parameters(self, *args, **kwargs):
        for key, p in super().named_parameters(*args, **kwargs):
            yield self.names[key], p


def raw(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


SPECS = ALL + [(f"big.{i}", "torch.float16", (1023, 517 + i)) for i in range(6)]


@pytest.mark.parametrize("window", [None, 1 << 20, 300 << 10])
def test_every_dtype_lands_in_the_module(tmp_path, storage, daemon, window):
    tensors = random_tensors(11, SPECS)
    save_model(tmp_path, storage, "org/all", tensors)
    module = Named(tensors)
    report, loaded = load_into_module(module, "org/all", storage_path=str(storage), server=daemon.addr,
                                      window_bytes=window)
    assert loaded == set(tensors)
    params = dict(module.named_parameters())
    for name, (_dt, _shape, want) in tensors.items():
        assert raw(params[name]) == want, name
    total = sum(len(t[2]) for t in tensors.values())
    assert report.staged_bytes == total and report.direct_bytes == 0
    if window:
        # Bounded: the staging window, never the model.
        assert report.staging_bytes <= window
        assert report.requests > 1


def test_a_model_larger_than_the_pool_streams_once_through_the_windows(tmp_path, storage):
    # 32 MiB checksum blocks in 4 MiB chunks need a ring of ten; 48 MiB keeps two.
    daemon = Daemon(storage, pool="48MiB", chunk="4MiB")
    try:
        tensors = random_tensors(8, [(f"w{i}", "torch.float16", (1024, 6 * 1024 + i)) for i in range(6)])
        save_model(tmp_path, storage, "org/big", tensors, partition_size="32MiB")
        module = Named(tensors)
        report, loaded = load_into_module(module, "org/big", storage_path=str(storage), server=daemon.addr,
                                          window_bytes=8 << 20)
        assert loaded == set(tensors) and report.requests > 4
        params = dict(module.named_parameters())
        for name, (_dt, _shape, want) in tensors.items():
            assert raw(params[name]) == want, name
        # One window after another reads the model from disk once.
        log = "".join(daemon.lines)
        assert log.count("streaming through the pool") == 1, log[-3000:]
    finally:
        daemon.stop()


def test_a_different_dtype_is_cast_like_copy_(tmp_path, storage, daemon):
    tensors = random_tensors(2, [("w", "torch.float16", (64, 33)), ("b", "torch.float16", (33,))])
    # Finite values, so the cast compares exactly.
    tensors = {n: (dt, s, torch.randn(s).half().numpy().tobytes()) for n, (dt, s, _r) in tensors.items()}
    save_model(tmp_path, storage, "org/cast", tensors)
    module = Named(tensors, dtype=torch.float32)
    load_into_module(module, "org/cast", storage_path=str(storage), server=daemon.addr)
    params = dict(module.named_parameters())
    for name, (_dt, shape, want) in tensors.items():
        expect = torch.frombuffer(bytearray(want), dtype=torch.float16).reshape(shape).float()
        assert torch.equal(params[name], expect), name


def test_tensors_without_a_target_go_to_the_weights_loader_and_may_be_kept(tmp_path, storage, daemon):
    tensors = random_tensors(5, [(f"t{i}", "torch.float32", (257, 129)) for i in range(12)])
    save_model(tmp_path, storage, "org/loader", tensors)
    kept = {}

    def weights_loader(weights):
        # Like vLLM's BERT: list them all first, use them after.
        for name, t in list(weights):
            kept[name] = t
        return set(kept)

    module = Named({n: t for n, t in tensors.items() if n in ("t0", "t1")})
    report, loaded = load_into_module(module, "org/loader", weights_loader=weights_loader,
                                      storage_path=str(storage), server=daemon.addr, window_bytes=400 << 10)
    assert loaded == set(tensors)
    assert set(kept) == set(tensors) - {"t0", "t1"}
    for name, t in kept.items():
        assert raw(t) == tensors[name][2], name
    assert report.requests > 2 and report.staging_bytes <= 400 << 10


def test_a_loader_that_stops_early_is_an_error(tmp_path, storage, daemon):
    tensors = random_tensors(6, [(f"t{i}", "torch.float32", (8,)) for i in range(4)])
    save_model(tmp_path, storage, "org/stop", tensors)

    def takes_one(weights):
        next(iter(weights))

    with pytest.raises(SllmStoreError, match="weight loader stopped before"):
        load_into_module(Named({}), "org/stop", weights_loader=takes_one, storage_path=str(storage),
                         server=daemon.addr)


def test_mismatches_are_named(tmp_path, storage, daemon):
    tensors = random_tensors(7, [("a", "torch.float32", (4, 4)), ("b", "torch.float32", (4,))])
    save_model(tmp_path, storage, "org/mm", tensors)
    wrong = {"a": ("torch.float32", (4, 5), b""), "b": tensors["b"]}
    with pytest.raises(SllmStoreError, match=r"holds 'a' with shape \[4, 4\], the model's is \[4, 5\]"):
        load_into_module(Named(wrong), "org/mm", storage_path=str(storage), server=daemon.addr)
    with pytest.raises(SllmStoreError, match="holds 'a', which the model lacks"):
        load_into_module(Named({"b": tensors["b"]}), "org/mm", storage_path=str(storage), server=daemon.addr)
    index = read_index("org/mm", str(storage))
    with StoreClient(daemon.addr) as client:
        with pytest.raises(SllmStoreError, match="targets on one device"):
            load_into(client, "org/mm", index, {"a": torch.zeros(4, 4), "b": torch.zeros(4, device="meta")})


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_failing_weights_loader_fails_the_load_and_leaves_nothing(tmp_path, storage):
    shm = tmp_path / "shm"
    shm.mkdir()
    daemon = Daemon(storage, "--host-shm-dir", str(shm))
    try:
        tensors = random_tensors(8, [(f"t{i}", "torch.float32", (100, 50)) for i in range(16)])  # two halves
        save_model(tmp_path, storage, "org/boom", tensors)

        def boom(weights):
            next(iter(weights))
            raise ValueError("the loader failed")

        with pytest.raises(ValueError, match="the loader failed"):
            load_into_module(Named({}), "org/boom", weights_loader=boom, storage_path=str(storage),
                             server=daemon.addr, window_bytes=300 << 10)
        assert list(shm.iterdir()) == []
        # The daemon is fine, and so is the next load.
        kept = {}
        load_into_module(Named({}), "org/boom", weights_loader=lambda ws: kept.update(ws),
                         storage_path=str(storage), server=daemon.addr, window_bytes=300 << 10)
        assert {n: raw(t) for n, t in kept.items()} == {n: t[2] for n, t in tensors.items()}
    finally:
        daemon.stop()


def test_load_dict_without_cuda_points_to_the_host_backend(tmp_path, storage, daemon):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    import sllm_client

    with pytest.raises(SllmStoreError, match="load_dict needs CUDA; on a machine without a GPU use load_dict_host"):
        sllm_client.load_dict("org/any", storage_path=str(storage), server=daemon.addr)
