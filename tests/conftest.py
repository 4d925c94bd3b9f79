"""Shared fixtures: tiny reference pipelines are built once per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the ref_* builders


@pytest.fixture(scope="session")
def tiny_ti2v_dir(tmp_path_factory) -> Path:
    from ref_pipeline import build_tiny_ti2v

    return build_tiny_ti2v(tmp_path_factory.mktemp("wan22_ti2v_tiny"))
