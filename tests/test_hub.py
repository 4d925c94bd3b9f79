"""Model resolution: local directories, Hub ids from a pre-filled cache, and the offline error."""

import json

import pytest

from mlx_i2v.errors import ModelNotFoundError
from mlx_i2v.hub import resolve_model


def test_local_directory(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    assert resolve_model(tmp_path) == tmp_path
    with pytest.raises(ModelNotFoundError, match="no model_index.json"):
        resolve_model(tmp_path / ".." / tmp_path.name / "..")
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_model(tmp_path / "missing")


def test_hub_id_resolves_from_prefilled_cache(tmp_path, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--Wan-AI--Tiny-Diffusers"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    assert resolve_model("Wan-AI/Tiny-Diffusers") == snapshot


def test_unreachable_hub_without_cache_says_what_to_do(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("Wan-AI/Not-Cached-Diffusers")
    assert "hf download Wan-AI/Not-Cached-Diffusers" in str(err.value)
