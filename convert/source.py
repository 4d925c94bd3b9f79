"""What a conversion source is: a diffusers directory (Wan or LTX-Video), a Wan-AI original-layout
directory, a Lightricks single-file LTX-Video checkpoint, an MLX directory written by the converter, or a
Hugging Face Hub id of the first two.

The layout is told from the files:

* a ``.safetensors`` file: a Lightricks ``ltxv-*.safetensors`` ("single-file", see
  :mod:`mlx_i2v.convert.ltx`);
* ``model_index.json`` with an ``_mlx_i2v`` entry: converted already ("mlx");
* ``model_index.json`` without it: a diffusers pipeline ("diffusers");
* a ``WanModel`` ``config.json``, a ``Wan2.x_VAE.pth`` or a ``high_noise_model/`` folder: the Wan-AI original
  layout ("original", see :mod:`mlx_i2v.convert.original`).

A Hub id is fetched with :func:`mlx_i2v.hub.resolve_model`, whose patterns cover both layouts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mlx_i2v.errors import InvalidInputError, ModelNotFoundError
from mlx_i2v.hub import is_hub_id, resolve_model

Layout = Literal["diffusers", "original", "mlx", "single-file"]

# The model_index.json entry that marks (and describes) a converted directory.
MLX_KEY = "_mlx_i2v"
FORMAT_VERSION = 1

# --- the Wan-AI original layout (wan.md §4.0) ----------------------------------------------------------------

VAE_FILES = {"2.1": "Wan2.1_VAE.pth", "2.2": "Wan2.2_VAE.pth"}
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"  # Wan2.1 I2V / FLF2V only
TOKENIZER_DIR = "google/umt5-xxl"
# Wan2.2-I2V-A14B's two experts -> the diffusers components (convert_wan_to_diffusers.py: high noise first)
EXPERTS = {"high_noise_model": "transformer", "low_noise_model": "transformer_2"}


@dataclass(frozen=True)
class Source:
    """A local model directory, its layout and the name the user gave it (a Hub id or a path)."""

    path: Path
    layout: Layout
    name: str
    label: str  # what the Wan2.1-I2V 480P/720P name rule reads, see :func:`resolve_source`


def read_index(folder: Path) -> dict[str, Any] | None:
    """The directory's ``model_index.json``, or None if it has none.

    Raises:
        InvalidInputError: the file exists but is not a JSON object.
    """
    path = folder / "model_index.json"
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InvalidInputError(f"unreadable {path}: {e}") from None
    if not isinstance(index, dict):
        raise InvalidInputError(f"{path} is not a JSON object")
    return index


def is_original_layout(folder: Path) -> bool:
    """A ``WanModel`` config.json, a Wan VAE ``.pth`` or an A14B expert folder."""
    config = folder / "config.json"
    if config.is_file():
        try:
            if json.loads(config.read_text(encoding="utf-8")).get("_class_name") == "WanModel":
                return True
        except (OSError, ValueError, AttributeError):
            pass  # not a WanModel config; the other signs may still apply
    return any((folder / f).is_file() for f in VAE_FILES.values()) or any((folder / e).is_dir() for e in EXPERTS)


def detect_layout(folder: Path) -> Layout:
    """Tell the layout of a local directory or file (see the module docstring).

    Raises:
        ModelNotFoundError: neither a directory nor a ``.safetensors`` file, or none of the layouts.
    """
    if folder.is_file() and folder.suffix == ".safetensors":
        return "single-file"
    if not folder.is_dir():
        raise ModelNotFoundError(f"{folder} is neither a model directory nor a single-file .safetensors checkpoint")
    index = read_index(folder)
    if index is not None:
        return "mlx" if MLX_KEY in index else "diffusers"
    if is_original_layout(folder):
        return "original"
    raise ModelNotFoundError(
        f"{folder} is not a model directory: no model_index.json (diffusers), no WanModel config.json, "
        "Wan2.x_VAE.pth or high_noise_model/ (Wan-AI original layout)"
    )


def resolve_source(source: str | Path) -> Source:
    """A local directory as it is, or a Hub id downloaded (see :func:`mlx_i2v.hub.resolve_model`).

    Raises:
        ModelNotFoundError: no such directory or repository, or the Hub is unreachable and the repo is not
            cached.
    """
    name = str(source)
    if is_hub_id(name):
        path = resolve_model(name)
        return Source(path, detect_layout(path), name, label=name)
    return local_source(source)


def local_source(source: str | Path) -> Source:
    """A local directory or single-file checkpoint (never a download).

    Raises:
        ModelNotFoundError: no such directory or file, or not a model.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"model directory not found: {path}")
    return Source(path, detect_layout(path), str(source), label=_label(path))


def _label(path: Path) -> str:
    """The name a local directory goes by for :func:`~mlx_i2v.families.wan.variants.detect_variant`'s 480P/720P rule:
    its own name or, for a Hub cache snapshot (``models--Org--Name/snapshots/<commit>``), the repository
    folder's; never the whole path, whose other parts have nothing to say about the model."""
    path = path.resolve()
    return path.parent.parent.name if path.parent.name == "snapshots" else path.name
