"""Applying resolved LoRAs to a loaded transformer, and taking them off again.

* A float parameter (every one of an unquantized model; biases, norms, modulation tables, the patch
  embedding, ``proj_out`` of a quantized one) gets the sum of its deltas merged in once, at load:
  ``P = (P + sum_i s_i * delta_i)`` computed in float32 and cast back to P's dtype. No cost per step.
* A quantized linear's weight is never touched: the linear is wrapped in a
  :class:`~mlx_i2v.lora.layers.LoRALinear` holding the factors.

Taking them off (:func:`remove_loras`) puts the original quantized modules back and restores the merged
parameters from the checkpoint they were loaded from (a caller-supplied ``restore``, which re-reads just
those tensors, memory-mapped, and casts them as loading did), so the base comes back bit for bit without a
second copy of the model in memory. Which parameters were merged is recorded on the model.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Mapping, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .formats import FullDelta, LowRank
from .layers import LoRALinear
from .resolve import Resolved

log = logging.getLogger(__name__)

MERGED_ATTRIBUTE = "_lora_merged"  # the model's merged parameter names (a set, not a parameter)

Restore = Callable[[Iterable[str]], Mapping[str, mx.array]]


def merged_parameters(model: nn.Module) -> set[str]:
    """Names of the parameters LoRAs were merged into (empty if none)."""
    return set(getattr(model, MERGED_ATTRIBUTE, ()))


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA-wrapped quantized linears, by module path."""
    return {path: m for path, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_loras(model: nn.Module, items: Sequence[tuple[Resolved, float]]) -> None:
    """Apply each resolved LoRA at its strength to ``model`` (already loaded and, if so, quantized).

    Args:
        model: the transformer the LoRAs were resolved against.
        items: (resolved LoRA, strength) pairs; several may touch the same parameter (their deltas add).
    """
    modules = dict(model.named_modules())
    wrapped = lora_layers(model)
    sums: dict[str, mx.array] = {}
    for resolved, strength in items:
        for d in resolved.deltas:
            owner_path, _, name = d.target.rpartition(".")
            owner = modules.get(owner_path)
            if name == "weight" and isinstance(owner, (nn.QuantizedLinear, LoRALinear)):
                if owner_path not in wrapped:
                    wrapped[owner_path] = LoRALinear(owner)
                layer = wrapped[owner_path]
                if isinstance(d, LowRank):
                    layer.add_low_rank(d.down, d.up, strength * d.scale)
                else:
                    layer.add_dense(d.tensor, strength)
                continue
            if isinstance(d, LowRank):
                delta = (strength * d.scale) * (d.up.astype(mx.float32) @ d.down.astype(mx.float32))
            else:
                assert isinstance(d, FullDelta)
                delta = strength * d.tensor.astype(mx.float32)
            sums[d.target] = delta if d.target not in sums else sums[d.target] + delta
    _merge(model, sums, modules)
    new_layers = {p: m for p, m in wrapped.items() if modules.get(p) is not m}
    if new_layers:
        model.update_modules(tree_unflatten(list(new_layers.items())), strict=False)
    for layer in wrapped.values():
        mx.eval(layer.loras)
    setattr(model, MERGED_ATTRIBUTE, merged_parameters(model) | set(sums))
    log.info("LoRAs: merged into %d parameters, %d quantized linears with run-time factors", len(sums), len(wrapped))


def _merge(model: nn.Module, sums: Mapping[str, mx.array], modules: Mapping[str, nn.Module]) -> None:
    """``P = (P.f32 + delta).astype(P.dtype)``, one parameter at a time (one float32 delta alive at once)."""
    params = dict(tree_flatten(model.parameters()))
    for target, delta in sums.items():
        owner_path, _, name = target.rpartition(".")
        where = f"{owner_path}.base.{name}" if isinstance(modules.get(owner_path), LoRALinear) else target
        current = params[where]
        new = (current.astype(mx.float32) + delta).astype(current.dtype)
        mx.eval(new)
        model.update(tree_unflatten([(where, new)]), strict=False)


def remove_loras(model: nn.Module, restore: Restore) -> None:
    """Undo :func:`apply_loras` (every LoRA applied so far): unwrap the quantized linears (the original
    module objects come back) and restore the merged parameters through ``restore`` (names -> base
    values, cast as loaded)."""
    layers = lora_layers(model)
    if layers:
        model.update_modules(tree_unflatten([(p, m.base) for p, m in layers.items()]), strict=False)
    names = sorted(merged_parameters(model))
    if names:
        base = restore(names)
        model.update(tree_unflatten([(n, base[n]) for n in names]), strict=False)
        mx.eval(model.parameters())
    setattr(model, MERGED_ATTRIBUTE, set())
    if layers or names:
        log.info("LoRAs removed: %d parameters restored, %d quantized linears unwrapped", len(names), len(layers))
