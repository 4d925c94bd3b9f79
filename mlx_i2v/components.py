"""Loading one component folder, whatever form it is in.

A folder holds a ``config.json`` and safetensors in one of two layouts:

* the **source** layout of the diffusers/transformers checkpoints (PyTorch names and channels-first
  convolutions), mapped through the component's declarative weight map on every load;
* the **MLX** layout written by ``mlx-i2v convert``: our parameter names, channels-last, optionally
  quantized. Its safetensors carry the metadata ``{"format": "mlx"}``, and a quantized one has a
  ``"quantization"`` entry in its config.json.

Each model module declares a :class:`ComponentType` beside its weight maps; :func:`load_component` is the
single loader behind them all.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import WeightLoadError
from .quantize import Quantization, prepare_for_quantized_load, stored_quantization
from .weights import WeightMap, cast_loaded, load_strict, read_config, read_safetensors, safetensors_header

log = logging.getLogger(__name__)

MLX_FORMAT = {"format": "mlx"}


@dataclass(frozen=True)
class ComponentType:
    """How to build, map and load one kind of component.

    Attributes:
        name: what errors and logs call it ("transformer", "vae", ...).
        build: config.json dict -> a freshly initialised model.
        source_map: the model -> the weight map of the diffusers/transformers layout.
        keep_float32: compute dtype -> parameter-name regexes that stay float32 (the reference's fp32 islands).
        stored_dtype: compute dtype -> the dtype ``mlx-i2v convert`` writes the weights in (loading casts
            them to the dtype asked for).
        quantize: quantizes a loaded model in place to (bits, group size); None if never quantized.
        skip_stored: the model -> full-match regexes of MLX-layout tensors it deliberately leaves out
            (a model built as one half of a checkpoint); never read. The source map has its own ignores.
    """

    name: str
    build: Callable[[Mapping[str, Any]], nn.Module]
    source_map: Callable[[nn.Module], WeightMap]
    keep_float32: Callable[[mx.Dtype], tuple[str, ...]] = lambda dtype: ()
    stored_dtype: Callable[[mx.Dtype], mx.Dtype] = lambda dtype: dtype
    quantize: Callable[[nn.Module, int, int], Any] | None = None
    skip_stored: Callable[[nn.Module], tuple[str, ...]] = lambda model: ()


def is_mlx_layout(folder: str | Path) -> bool:
    """True if the folder's safetensors were written by the converter (MLX names and layout)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return False
    try:  # the header only: a shard can be gigabytes, and read_safetensors reads it anyway
        metadata = safetensors_header(files[0])[1].get("__metadata__") or {}
    except (OSError, WeightLoadError):  # unreadable: let read_safetensors report it by name
        return False
    return metadata.get("format") == MLX_FORMAT["format"]


def evaluate_one_by_one(model: nn.Module) -> None:
    """Evaluate a freshly loaded model's parameters one at a time. Each lazy parameter may stand for a
    read tensor and a layout copy of it (the LTX VAE's tap-major kernels); evaluated together, MLX holds
    many such pairs at once (1.5x the weights for the LTX 0.9.5 VAE), one by one only the largest."""
    for _, value in tree_flatten(model.parameters()):
        mx.eval(value)


def load_component(
    kind: ComponentType,
    folder: str | Path,
    dtype: mx.Dtype,
    *,
    quantize: Quantization | None = None,
    part: Callable[[nn.Module], nn.Module] | None = None,
) -> nn.Module:
    """Load ``folder`` as a ``kind`` component in ``dtype`` (the float32 islands excepted).

    ``quantize`` quantizes a float checkpoint after loading; on a checkpoint already quantized it must
    match the stored bits (it cannot be re-quantized) and nothing more is done. ``part`` keeps a part of
    the model (``model -> part``): every tensor is still checked by name and shape, but only the part's
    are read from disk.

    Raises:
        WeightLoadError: unreadable config or weights; missing, unexpected or mis-shaped tensors.
        InvalidInputError: ``quantize`` disagrees with the checkpoint's stored quantization.
    """
    folder = Path(folder)
    what = folder.name
    config = read_config(folder)
    model = kind.build(config)
    tensors = read_safetensors(folder, what=what)
    requested = quantize.bits if quantize is not None and kind.quantize is not None else None
    stored = stored_quantization(config, what=what, requested_bits=requested)
    if is_mlx_layout(folder):
        if stored is not None:
            prepare_for_quantized_load(model, stored, saved=tensors.keys())
        skip = [re.compile(p) for p in kind.skip_stored(model)]
        weights = {k: v for k, v in tensors.items() if not any(p.fullmatch(k) for p in skip)}
    elif stored is not None:
        raise WeightLoadError(f"{what}: config.json says quantized but the weights are not in MLX layout")
    else:
        weights = kind.source_map(model).apply(tensors)
    del tensors
    load_strict(model, weights, dtype=dtype, keep_float32=kind.keep_float32(dtype), what=what, evaluate=False)
    del weights
    if part is not None:
        model = part(model)
    evaluate_one_by_one(model)
    if stored is None and requested is not None:
        kind.quantize(model, quantize.bits, quantize.group_size)
    log.info("loaded %s from %s (%s%s)", kind.name, folder, dtype, f", {stored.bits}-bit" if stored else "")
    return model


def load_parameters(
    kind: ComponentType, folder: str | Path, dtype: mx.Dtype, names: Iterable[str]
) -> dict[str, mx.array]:
    """Read only the parameters ``names`` (MLX names) of a component folder, mapped and cast exactly as
    :func:`load_component` loads them, so they are bit-identical to a fresh load.

    Safetensors are memory-mapped and mapping is lazy, so only these tensors are read: this is how
    parameters a LoRA merge changed are restored without keeping a second copy of the model.

    Raises:
        WeightLoadError: unreadable weights, or a name the checkpoint does not have.
    """
    folder = Path(folder)
    tensors = read_safetensors(folder, what=folder.name)
    weights = tensors if is_mlx_layout(folder) else kind.source_map(kind.build(read_config(folder))).apply(tensors)
    names = list(names)
    missing = [n for n in names if n not in weights]
    if missing:
        raise WeightLoadError(f"{folder.name}: the checkpoint has no {', '.join(sorted(missing)[:6])}")
    keep = [re.compile(p) for p in kind.keep_float32(dtype)]
    out = {n: cast_loaded(n, weights[n], dtype, keep) for n in names}
    mx.eval(out)
    return out
