"""Shared fixtures: tiny reference pipelines are built once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# MLX runs float32 matmuls, convolutions and attention at TF32-class precision on GPUs with matrix units
# (CUDA tensor cores, Apple M5) unless MLX_ENABLE_TF32=0 when the process starts (MLX's "Numerical
# Precision" docs; MLX's own tests pin it). The parity tests hold float32 to ~1e-4, as PyTorch's float32
# matmuls compute by default; on the CPU the setting changes nothing. Subprocesses inherit it.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

sys.path.insert(0, str(Path(__file__).parent))  # the ref_* builders


@pytest.fixture(scope="session")
def tiny_ti2v_dir(tmp_path_factory) -> Path:
    from ref_pipeline import build_tiny_ti2v

    return build_tiny_ti2v(tmp_path_factory.mktemp("wan22_ti2v_tiny"))


@pytest.fixture(scope="session")
def tiny_i2v_dirs(tmp_path_factory) -> dict[str, Path]:
    """Wan2.1-I2V-480P, Wan2.1-FLF2V-720P and Wan2.2-I2V-A14B shaped tiny pipelines, by variant key."""
    from ref_pipeline import build_tiny_i2v

    names = {"i2v": "Wan2.1-I2V-14B-480P-tiny", "flf2v": "Wan2.1-FLF2V-14B-720P-tiny", "a14b": "Wan2.2-I2V-A14B-tiny"}
    return {k: build_tiny_i2v(tmp_path_factory.mktemp("models") / name, k) for k, name in names.items()}


@pytest.fixture(scope="session")
def tiny_ltx_condition_dir(tmp_path_factory) -> Path:
    """A tiny LTX-Video 0.9.5+ checkpoint (``LTXConditionPipeline``)."""
    from ref_ltx_pipeline import build_tiny_ltx

    return build_tiny_ltx(tmp_path_factory.mktemp("ltx_condition_tiny"), "0.9.5", "LTXConditionPipeline")


@pytest.fixture(scope="session")
def photo(tmp_path_factory) -> Path:
    """An 80x120 PNG with gradients in each channel, for the command-line tests."""
    import numpy as np
    from PIL import Image

    path = tmp_path_factory.mktemp("photo") / "photo.png"
    y, x = np.mgrid[0:80, 0:120]
    Image.fromarray(np.stack([x * 2, y * 3, x + y], -1).astype(np.uint8)).save(path)
    return path
