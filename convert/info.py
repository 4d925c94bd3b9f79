"""``model_info``: what a model directory holds, read from its configs and safetensors headers."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import mlx.core as mx

from mlx_i2v.errors import InvalidInputError
from mlx_i2v.families.wan.variants import VARIANTS
from mlx_i2v.weights import read_config, read_safetensors

from .api import components
from .families import FAMILIES, family_of
from .source import MLX_KEY, local_source, read_index


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under ``folder`` (symlinks followed, as in a Hub snapshot)."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def count_parameters(tensors: Mapping[str, mx.array], quantization: Mapping[str, Any] | None) -> int:
    """Parameters of the model a checkpoint holds. A quantized layer counts as the float layer it
    stands for: its packed uint32 ``weight`` holds ``32 / bits`` values per element, and its ``scales``
    and ``biases`` are not parameters of that model."""
    total = 0
    for name, value in tensors.items():
        size = math.prod(value.shape)
        if quantization is not None and value.dtype == mx.uint32:
            size = size * 32 // quantization["bits"]
        elif quantization is not None and name.endswith((".scales", ".biases")):
            packed = tensors.get(name.rsplit(".", 1)[0] + ".weight")
            if packed is not None and packed.dtype == mx.uint32:
                continue
        total += size
    return total


def main_dtype(tensors: Mapping[str, mx.array]) -> str:
    """The floating dtype that holds the most values."""
    counts: Counter[str] = Counter()
    for value in tensors.values():
        if mx.issubdtype(value.dtype, mx.floating):
            counts[_dtype_name(value.dtype)] += math.prod(value.shape)
    return counts.most_common(1)[0][0] if counts else "none"


def model_info(model: str | Path) -> dict[str, Any]:
    """Describe a local MLX or diffusers model directory (Wan or LTX-Video).

    Returns:
        ``{"path", "layout", "family", "variant", "generation", "dtype", "quantization", "source",
        "components", "parameters", "bytes_on_disk", "defaults", "loras"}``: ``variant`` and ``defaults``
        are a Wan model's (None for LTX-Video), ``generation`` an LTX-Video model's ("0.9.0", "0.9.1" or
        "0.9.5" for 0.9.5 and later; None for Wan); ``loras``: those baked in by ``convert --lora``;
        ``components`` maps each component to its ``bytes`` on disk and, for those with weights,
        ``parameters``, ``dtype`` and ``quantization``. Only headers are read.

    Raises:
        ModelNotFoundError: not a model directory.
        InvalidInputError: an original-layout directory or a single file (convert it first).
        WeightLoadError: unreadable configs or weights.
    """
    source = local_source(model)
    folder, layout = source.path, source.layout
    if layout in ("original", "single-file"):
        what = "the Wan-AI original layout" if layout == "original" else "a single-file checkpoint"
        raise InvalidInputError(f"{folder} is {what}; convert it first with `mlx-i2v convert`")
    index = read_index(folder) or {}
    family = family_of(index, folder)
    parts: dict[str, dict[str, Any]] = {}
    for name in components(index):
        part: dict[str, Any] = {"bytes": folder_bytes(folder / name)}
        if name in family.weights:
            quantization = read_config(folder / name).get("quantization")
            tensors = read_safetensors(folder / name)  # lazily: shapes and dtypes only
            part.update(
                parameters=count_parameters(tensors, quantization),
                dtype=main_dtype(tensors),
                quantization=quantization,
            )
        parts[name] = part
    if layout == "mlx":
        meta = index[MLX_KEY]
        # directories converted before LTX-Video was supported have no family entry: they are Wan's
        entries = {"family": "wan"} | {k: meta[k] for k in ("family", "variant", "defaults", "generation") if k in meta}
        dtype, quantization, source = meta["dtype"], meta["quantization"], meta["source"]
        loras = meta.get("loras", [])
        if entries["family"] not in FAMILIES or (entries["family"] == "wan" and entries.get("variant") not in VARIANTS):
            unknown = f"variant {entries.get('variant')!r}" if entries["family"] == "wan" else repr(entries["family"])
            raise InvalidInputError(f"{folder}: unknown {unknown} (written by a newer mlx-i2v?)")
    else:
        entries = family.describe(folder, index, source.label)
        dtype, quantization, source, loras = parts["transformer"]["dtype"], None, None, []
    return {
        "path": str(folder),
        "layout": layout,
        "family": entries.get("family", "wan"),
        "variant": entries.get("variant"),
        "generation": entries.get("generation"),
        "dtype": dtype,
        "quantization": quantization,
        "source": source,
        "components": parts,
        "parameters": sum(p.get("parameters", 0) for p in parts.values()),
        "bytes_on_disk": folder_bytes(folder),
        "defaults": entries.get("defaults"),
        "loras": loras,
    }
