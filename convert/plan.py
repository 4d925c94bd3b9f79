"""What a conversion writes, decided before anything is written.

A :class:`Plan` lists the weight components to convert (each with a loader that returns the model in the
target dtype, quantized if asked, and its config.json), the folders copied as they are (tokenizer,
scheduler, ...) and the JSON files written. Components are loaded one at a time when the plan runs
(:mod:`mlx_i2v.convert.writer`), so only one is ever in memory.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import mlx.core as mx
import mlx.nn as nn

from mlx_i2v.components import ComponentType
from mlx_i2v.quantize import Quantization, QuantizationConfig
from mlx_i2v.runtime import dtype_name
from mlx_i2v.variants import Variant

from .source import FORMAT_VERSION, MLX_KEY, Source

Loader = Callable[[], "tuple[nn.Module, dict[str, Any]]"]


@dataclass
class WeightJob:
    """One weight component of the output.

    Attributes:
        name: the output folder ("transformer", "vae", ...).
        kind: the component type (for logs and the float32 islands).
        numel: elements in the source checkpoint, for the size estimate (exact for safetensors,
            approximate for ``.pth`` files, see :func:`pth_numel`).
        quantization: how it is quantized, None to keep it float.
        load: returns the model (target dtype, quantized if asked) and the config.json to write.
        companions: JSON files (relative path -> content) that follow from that config.json, written
            beside it (CLIP's image processor needs the tower's resolution, which only the weights tell).
        config: the config.json, where it is known before loading (the transformers': LoRAs are checked
            against it before anything is converted).
    """

    name: str
    kind: ComponentType
    numel: int
    quantization: Quantization | None
    load: Loader
    companions: Callable[[Mapping[str, Any]], dict[str, dict[str, Any]]] | None = None
    config: Mapping[str, Any] | None = None

    def output_bytes(self, dtype: mx.Dtype) -> int:
        """Estimated bytes written for compute dtype ``dtype``: every element in the dtype the component
        is stored in, or, quantized, at ``bits`` plus a scale and a bias per group (an over-estimate:
        small layers stay float)."""
        itemsize = self.kind.stored_dtype(dtype).size
        q = self.quantization
        if q is None:
            return self.numel * itemsize
        return math.ceil(self.numel * (q.bits / 8 + 2 * itemsize / q.group_size))


@dataclass
class Plan:
    """Everything a conversion writes into the output directory."""

    index: dict[str, Any]  # model_index.json, with the MLX_KEY entry
    weights: list[WeightJob]
    copies: dict[str, Path] = field(default_factory=dict)  # output folder -> source folder, copied as is
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # relative path -> JSON content

    def estimated_bytes(self, dtype: mx.Dtype) -> int:
        copied = sum(f.stat().st_size for folder in self.copies.values() for f in folder.rglob("*") if f.is_file())
        return sum(job.output_bytes(dtype) for job in self.weights) + copied


def numel(tensors: Mapping[str, mx.array]) -> int:
    """Total elements; reads shapes only, so lazily loaded safetensors cost nothing."""
    return sum(math.prod(v.shape) for v in tensors.values())


def pth_numel(path: Path) -> int:
    """Approximate elements of a ``.pth`` checkpoint from its size, assuming 2-byte values (the released
    UMT5 and CLIP files are bfloat16 / float16; the float32 VAE is small, and over-estimating it only
    errs on the safe side). Reading the real shapes would mean reading the file."""
    return path.stat().st_size // 2


def defaults_dict(variant: Variant) -> dict[str, Any]:
    """The variant's default generation settings as JSON has them (sizes as lists)."""
    defaults = dataclasses.asdict(variant.defaults)
    return {**defaults, "sizes": [list(size) for size in defaults["sizes"]]}


def mlx_index(
    diffusers_index: Mapping[str, Any],
    family_entries: Mapping[str, Any],
    dtype: mx.Dtype,
    quantization: QuantizationConfig | None,
    source: Mapping[str, str],
) -> dict[str, Any]:
    """model_index.json of an MLX directory: the diffusers keys (its ``_class_name`` and component
    entries, which tell the family and, for Wan, the variant) plus the MLX_KEY entry that load_pipeline
    reads, with the family's own entries (:mod:`mlx_i2v.convert.families`)."""
    return {
        **{k: v for k, v in diffusers_index.items() if k != MLX_KEY},
        MLX_KEY: {
            "format_version": FORMAT_VERSION,
            **family_entries,
            "dtype": dtype_name(dtype),
            "quantization": quantization.to_dict() if quantization is not None else None,
            "source": dict(source),
        },
    }


def source_entry(source: Source) -> dict[str, str]:
    """The ``source`` record of an MLX directory: what it was converted from."""
    return {"model": source.name, "layout": source.layout}
