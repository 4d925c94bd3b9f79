"""Model resolution: local directories, Hub ids from a pre-filled cache, and the offline error."""

import json

import pytest

from mlx_i2v.errors import ModelNotFoundError
from mlx_i2v.hub import resolve_model
from mlx_i2v.cache import FORMAT_VERSION


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


def test_hub_model_is_converted_once_into_the_cache(tiny_ti2v_dir, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub.constants as c
    import numpy as np

    import mlx_i2v.convert as convert
    from mlx_i2v import load_pipeline

    commit = "fedcba9876543210fedcba9876543210fedcba98"
    repo = tmp_path / "hub" / "models--Wan-AI--Tiny-TI2V-Diffusers"
    shutil.copytree(tiny_ti2v_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("MLX_I2V_CACHE", str(tmp_path / "mlx-cache"))

    kwargs = dict(height=64, width=96, num_frames=5, num_inference_steps=2, seed=1)
    first = load_pipeline("Wan-AI/Tiny-TI2V-Diffusers", dtype="float32")
    cached = tmp_path / "mlx-cache" / f"Wan-AI--Tiny-TI2V-Diffusers--{commit[:12]}--float32--float--v{FORMAT_VERSION}"
    assert (cached / "model_index.json").is_file()
    frames = first(None, "waves", **kwargs).frames

    monkeypatch.setattr(convert, "convert_model", lambda *a, **k: pytest.fail("converted twice"))
    again = load_pipeline("Wan-AI/Tiny-TI2V-Diffusers", dtype="float32")
    np.testing.assert_array_equal(again(None, "waves", **kwargs).frames, frames)
    direct = load_pipeline(tiny_ti2v_dir, dtype="float32")
    np.testing.assert_array_equal(direct(None, "waves", **kwargs).frames, frames)
