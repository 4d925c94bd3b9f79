"""``model_info``: what a model directory holds, read from its configs and safetensors headers."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import mlx.core as mx

from mlx_i2v.errors import InvalidInputError
from mlx_i2v.variants import VARIANTS, detect_variant
from mlx_i2v.weights import read_config, read_safetensors

from .api import WEIGHT_KINDS, components
from .plan import defaults_dict
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
    """Describe a local MLX or diffusers model directory.

    Returns:
        ``{"path", "layout", "variant", "dtype", "quantization", "source", "components", "parameters",
        "bytes_on_disk", "defaults", "loras"}`` (``loras``: those baked in by ``convert --lora``); ``components`` maps each component to its ``bytes`` on disk and,
        for those with weights, ``parameters``, ``dtype`` and ``quantization``. Only headers are read.

    Raises:
        ModelNotFoundError: not a model directory.
        InvalidInputError: an original-layout directory (convert it first).
        WeightLoadError: unreadable configs or weights.
    """
    source = local_source(model)
    folder, layout = source.path, source.layout
    if layout == "original":
        raise InvalidInputError(f"{folder} is in the Wan-AI original layout; convert it first with `mlx-i2v convert`")
    index = read_index(folder) or {}
    parts: dict[str, dict[str, Any]] = {}
    for name in components(index):
        part: dict[str, Any] = {"bytes": folder_bytes(folder / name)}
        if name in WEIGHT_KINDS:
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
        variant, dtype = meta["variant"], meta["dtype"]
        quantization, source, defaults = meta["quantization"], meta["source"], meta["defaults"]
        loras = meta.get("loras", [])
        if variant not in VARIANTS:
            raise InvalidInputError(f"{folder}: unknown variant {variant!r} (written by a newer mlx-i2v?)")
    else:
        found = detect_variant(folder, source.label)
        variant, dtype, defaults = found.name, parts["transformer"]["dtype"], defaults_dict(found)
        quantization, source, loras = None, None, []
    return {
        "path": str(folder),
        "layout": layout,
        "variant": variant,
        "dtype": dtype,
        "quantization": quantization,
        "source": source,
        "components": parts,
        "parameters": sum(p.get("parameters", 0) for p in parts.values()),
        "bytes_on_disk": folder_bytes(folder),
        "defaults": defaults,
        "loras": loras,
    }
