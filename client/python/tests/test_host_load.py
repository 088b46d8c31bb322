"""load_dict_host against the real daemon: bytes, dtypes and shapes equal the source."""

import concurrent.futures
import socket

import ml_dtypes
import pytest

import sllm_client
from conftest import ALL, Daemon, random_tensors, save_model
from sllm_client.dtypes import numpy_dtype
from sllm_client.host import _load_dict_host, load_consistently


def check(loaded, tensors):
    assert set(loaded) == set(tensors)
    for name, (dtype, shape, raw) in tensors.items():
        array = loaded[name]
        assert array.shape == shape, name
        assert array.dtype == numpy_dtype(dtype), name
        assert array.tobytes() == raw, name


@pytest.mark.parametrize("layout", ["mirrored", "packed"])
def test_every_dtype_round_trips(tmp_path, storage, daemon, layout):
    tensors = random_tensors(1, ALL)
    save_model(tmp_path, storage, "org/all", tensors)
    loaded = sllm_client.load_dict_host("org/all", storage_path=str(storage), server=daemon.addr, layout=layout)
    check(loaded, tensors)
    assert loaded["bf16"].dtype == ml_dtypes.bfloat16


def test_the_daemon_says_where_its_models_are(tmp_path, storage, daemon, monkeypatch):
    tensors = random_tensors(4, [("w", "torch.float16", (64, 33))])
    save_model(tmp_path, storage, "org/here", tensors)
    monkeypatch.delenv("STORAGE_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "elsewhere"))
    check(sllm_client.load_dict_host("org/here", server=daemon.addr), tensors)
    assert sllm_client.StoreClient(daemon.addr).server_config().storage_path == str(storage.resolve())


def test_environment_defaults_and_concurrent_clients(tmp_path, storage, daemon, monkeypatch):
    models = {f"org/m{i}": random_tensors(10 + i, [(f"w{j}", "torch.float16", (97, 31 + j)) for j in range(9)])
              for i in range(3)}
    for name, tensors in models.items():
        save_model(tmp_path, storage, name, tensors, partition_size="64KiB")
    monkeypatch.setenv("SLLM_STORE_ADDR", daemon.addr)
    monkeypatch.setenv("STORAGE_PATH", str(storage))
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        jobs = [(name, pool.submit(sllm_client.load_dict_host, name)) for name in list(models) * 2]
        for name, job in jobs:
            check(job.result(), models[name])


def test_errors_say_what_to_do(tmp_path, storage, daemon):
    with pytest.raises(sllm_client.SllmStoreError, match="sllm-store save"):
        sllm_client.load_dict_host("org/absent", storage_path=str(storage), server=daemon.addr)
    save_model(tmp_path, storage, "org/m", random_tensors(2, [("w", "torch.float32", (4,))]))
    with pytest.raises(sllm_client.SllmStoreError, match="unknown layout"):
        sllm_client.load_dict_host("org/m", storage_path=str(storage), server=daemon.addr, layout="diagonal")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(sllm_client.SllmStoreError, match="cannot reach the store daemon"):
        sllm_client.load_dict_host("org/m", storage_path=str(storage), server=f"127.0.0.1:{port}")
    with sllm_client.StoreClient(daemon.addr) as client:
        with pytest.raises(sllm_client.SllmStoreError, match=r"\(invalid argument\)"):
            client.register("../escape")
        assert client.register("org/m") > 0
        assert client.model_status("org/m")["host_state"] in ("HOST_STATE_NOT_LOADED", "HOST_STATE_LOADED")


def test_a_resaved_model_loads_its_new_bytes(tmp_path, storage, daemon):
    """The adversarial case: a model loaded (so resident in the daemon's
    pool), then replaced with other weights by `save --force`."""
    specs = [(f"w{j}", "torch.float16", (64, 33 + j)) for j in range(10)]
    old, new = random_tensors(20, specs), random_tensors(21, specs)
    save_model(tmp_path, storage, "org/c1", old)
    load = lambda: sllm_client.load_dict_host("org/c1", storage_path=str(storage), server=daemon.addr)
    check(load(), old)
    save_model(tmp_path, storage, "org/c1", new, force=True, tag="-new")
    check(load(), new)


def test_a_resave_during_a_load_is_loaded_again_or_refused(tmp_path, storage, daemon):
    specs = [(f"w{j}", "torch.float32", (128, 40 + j)) for j in range(6)]
    versions = [random_tensors(30 + v, specs) for v in range(3)]
    save_model(tmp_path, storage, "org/r", versions[0])
    resaves = iter(range(1, 3))

    def load_while_resaving(index):
        # A save --force lands between reading the index and the load.
        v = next(resaves, None)
        if v is not None:
            save_model(tmp_path, storage, "org/r", versions[v], force=True, tag=f"-{v}")
        return _load_dict_host("org/r", index, daemon.addr, "mirrored")

    with pytest.raises(sllm_client.SllmStoreError, match="changed on disk during two loads in a row"):
        load_consistently("org/r", str(storage), load_while_resaving)
    # Once the saves stop, the next attempt of a load is consistent.
    check(load_consistently("org/r", str(storage), load_while_resaving), versions[2])


def test_a_load_that_fails_because_of_a_resave_is_loaded_again(tmp_path, storage, daemon):
    small = random_tensors(40, [("w", "torch.float32", (64, 64))])
    large = random_tensors(41, [("w", "torch.float32", (64, 64)), ("v", "torch.float32", (256, 256))])
    save_model(tmp_path, storage, "org/grow", small)
    attempts = []

    def load_after_a_resave(index):
        attempts.append(len(index))
        if len(attempts) == 1:
            # The model grows after its index was read: the plan no longer
            # matches it, and the daemon refuses it or serves other bytes.
            save_model(tmp_path, storage, "org/grow", large, force=True, tag="-large")
            raise sllm_client.SllmStoreError("the first attempt failed")
        return _load_dict_host("org/grow", index, daemon.addr, "mirrored")

    check(load_consistently("org/grow", str(storage), load_after_a_resave), large)
    assert attempts == [1, 2]
    # An error with the model unchanged is the caller's to see.
    with pytest.raises(sllm_client.SllmStoreError, match="unknown layout"):
        load_consistently("org/grow", str(storage), lambda index: _load_dict_host("org/grow", index, daemon.addr, "x"))


def test_a_model_larger_than_the_pool_streams_through_it(tmp_path, storage):
    # 32 MiB checksum blocks in 4 MiB chunks need a ring of ten; 48 MiB keeps two.
    daemon = Daemon(storage, pool="48MiB", chunk="4MiB")
    try:
        tensors = random_tensors(7, [(f"w{i}", "torch.float16", (1024, 6 * 1024 + i)) for i in range(6)])
        save_model(tmp_path, storage, "org/big", tensors, partition_size="32MiB")
        for _ in range(2):  # cold, then from the kept prefix
            check(sllm_client.load_dict_host("org/big", storage_path=str(storage), server=daemon.addr), tensors)
        status = sllm_client.StoreClient(daemon.addr).model_status("org/big")
        assert status["streamed"] and 0 < status["resident_bytes"] < 48 << 20, status
    finally:
        daemon.stop()


def test_a_daemon_that_requires_a_token_gets_it_from_the_environment(tmp_path, storage, monkeypatch):
    token = tmp_path / "token"
    token.write_text("py-secret-42\n")
    token.chmod(0o600)
    daemon = Daemon(storage, "--auth-token-file", str(token))
    try:
        tensors = random_tensors(9, [("w", "torch.float32", (32, 17))])
        save_model(tmp_path, storage, "org/locked", tensors)
        monkeypatch.delenv("SLLM_STORE_TOKEN", raising=False)
        monkeypatch.delenv("SLLM_STORE_TOKEN_FILE", raising=False)
        with pytest.raises(sllm_client.SllmStoreError, match="requires a token"):
            sllm_client.load_dict_host("org/locked", storage_path=str(storage), server=daemon.addr)
        monkeypatch.setenv("SLLM_STORE_TOKEN", "wrong")
        with pytest.raises(sllm_client.SllmStoreError, match="does not match"):
            sllm_client.load_dict_host("org/locked", storage_path=str(storage), server=daemon.addr)
        monkeypatch.delenv("SLLM_STORE_TOKEN")
        monkeypatch.setenv("SLLM_STORE_TOKEN_FILE", str(token))
        check(sllm_client.load_dict_host("org/locked", storage_path=str(storage), server=daemon.addr), tensors)
    finally:
        daemon.stop()
