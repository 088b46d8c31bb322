"""The vLLM plugin's logic that needs no vLLM: layouts and model ids."""

import os

import pytest

from sllm_client import SllmStoreError
from sllm_client.vllm_plugin import detect_layout, model_id_for, register


def test_layouts(tmp_path):
    root = tmp_path / "models" / "org" / "m"
    (root / "rank_0").mkdir(parents=True)
    (root / "rank_0" / "tensor_index.json").write_text("{}")
    assert detect_layout(str(root), 0) == ("rank", "rank_0")
    with pytest.raises(SllmStoreError, match="rank_1/tensor_index.json is missing"):
        detect_layout(str(root), 1)
    flat = tmp_path / "models" / "org" / "flat"
    flat.mkdir()
    (flat / "tensor_index.json").write_text("{}")
    assert detect_layout(str(flat), 3) == ("root", "")
    with pytest.raises(SllmStoreError, match="sllm-store save"):
        detect_layout(str(tmp_path), 0)


def test_model_ids(tmp_path, monkeypatch):
    storage = tmp_path / "models"
    (storage / "org" / "m").mkdir(parents=True)
    assert model_id_for(str(storage / "org" / "m"), str(storage)) == os.path.join("org", "m")
    monkeypatch.setenv("STORAGE_PATH", str(storage))
    assert model_id_for(str(storage / "org" / "m")) == os.path.join("org", "m")
    with pytest.raises(SllmStoreError, match="not inside the storage path"):
        model_id_for(str(tmp_path), str(storage))
    with pytest.raises(SllmStoreError, match="not inside the storage path"):
        model_id_for(str(storage), str(storage))


def test_register_without_vllm_only_warns(caplog):
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    register()
    assert "register_model_loader" in caplog.text
