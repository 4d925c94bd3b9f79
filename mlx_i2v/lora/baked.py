"""LoRAs baked into a converted quantized model: their factors saved beside the quantized weights.

``mlx-i2v convert --quantize N --lora FILE`` cannot merge a LoRA into 4-bit weights without losing most
of it, so the quantized linears' factors are written to ``<component>/loras/factors.safetensors`` (names
``<module>.<i>.down`` / ``.up`` / ``.dense``, the scales in the file's metadata) and loaded back as the same
:class:`~mlx_i2v.lora.layers.LoRALinear` wrappers; float parameters were merged before saving. Loading the
result therefore equals loading the base and the LoRA at run time, bit for bit. The folder is outside
the component's own ``*.safetensors`` glob, so the weights themselves load as any converted model's.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import WeightLoadError
from .apply import lora_layers
from .layers import LoRALinear

FACTORS = Path("loras") / "factors.safetensors"
FORMAT = "mlx-i2v-lora-factors"


def split_state(model: nn.Module) -> tuple[dict[str, mx.array], dict[str, mx.array], dict[str, float]]:
    """``model``'s parameters as the unwrapped model names them, plus its LoRA layers' factors and scales
    (keyed ``<module>.<i>``); the model is left as it is."""
    layers = lora_layers(model)
    state: dict[str, mx.array] = {}
    factors: dict[str, mx.array] = {}
    for name, value in tree_flatten(model.parameters()):
        owner = next((p for p in layers if name.startswith(p + ".")), None)
        if owner is None:
            state[name] = value
            continue
        rest = name[len(owner) + 1 :]
        if rest.startswith("base."):
            state[f"{owner}.{rest[len('base.'):]}"] = value
        else:
            factors[f"{owner}.{rest[len('loras.'):]}"] = value
    scales = {f"{p}.{i}": s for p, layer in layers.items() for i, s in enumerate(layer.scales)}
    return state, factors, scales


def save_factors(folder: Path, factors: dict[str, mx.array], scales: dict[str, float]) -> Path:
    """Write the factors of :func:`split_state` under ``folder``; returns the file."""
    path = folder / FACTORS
    path.parent.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path), factors, metadata={"format": FORMAT, "scales": json.dumps(scales)})
    return path


def apply_factors(model: nn.Module, folder: Path) -> bool:
    """Wrap ``model``'s quantized linears with the factors saved in ``folder`` (if it has any); returns
    whether it had.

    Raises:
        WeightLoadError: an unreadable factors file, or factors for a layer that is not quantized.
    """
    path = folder / FACTORS
    if not path.is_file():
        return False
    try:
        tensors, metadata = mx.load(str(path), return_metadata=True)
        scales = json.loads(metadata["scales"])
    except Exception as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightLoadError(f"{folder.name}: unreadable {FACTORS}: {detail}") from None
    modules = dict(model.named_modules())
    layers = lora_layers(model)
    for entry in sorted(scales, key=_order):
        owner, _, _ = entry.rpartition(".")
        if owner not in layers:
            if not isinstance(modules.get(owner), nn.QuantizedLinear):
                raise WeightLoadError(f"{folder.name}: {FACTORS} has factors for {owner}, not a quantized linear")
            layers[owner] = LoRALinear(modules[owner])
        factor = {k: tensors[f"{entry}.{k}"] for k in ("down", "up", "dense") if f"{entry}.{k}" in tensors}
        if "dense" in factor:
            layers[owner].add_dense(factor["dense"], scales[entry])
        else:
            layers[owner].add_low_rank(factor["down"], factor["up"], scales[entry])
    model.update_modules(tree_unflatten([(p, m) for p, m in layers.items() if modules.get(p) is not m]), strict=False)
    mx.eval([layer.loras for layer in layers.values()])
    return True


def _order(entry: str) -> tuple[str, int]:
    owner, _, i = entry.rpartition(".")
    return owner, int(i)
