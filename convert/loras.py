"""``convert --lora``: LoRAs baked into the converted transformer(s).

Into a float output they are merged (the merged weights are the new base). Into a quantized output the
float parameters are merged and the quantized linears keep the LoRA factors beside their weights
(``<component>/loras/factors.safetensors``, :mod:`mlx_i2v.lora.baked`): merging into 4-bit weights would
erase most of a LoRA. Either way loading the result equals loading the source with the same LoRAs at run
time. ``model_index.json`` records them (``_mlx_i2v.loras``: name, sha256, strength, expert, policy and
``baked``: "merged" or "factors").
"""

from __future__ import annotations

from typing import Any, Sequence

import mlx.core as mx

from mlx_i2v.lora.manager import COMPONENTS, TransformerLoras
from mlx_i2v.lora.spec import as_loras

from .plan import Plan
from .source import MLX_KEY


def bake_loras(plan: Plan, loras: Sequence[Any] | None, dtype: mx.Dtype) -> None:
    """Check every LoRA against the plan's transformer configs now, and make the transformer jobs apply
    them after loading (and quantizing).

    Raises:
        InvalidInputError: a bad LoRA (see :meth:`~mlx_i2v.lora.manager.TransformerLoras.validate`).
    """
    specs = as_loras(loras)
    if not specs:
        return
    jobs = sorted((j for j in plan.weights if j.name in COMPONENTS), key=lambda j: COMPONENTS.index(j.name))
    state = TransformerLoras([j.config for j in jobs], dtype)
    state.set(specs, {})
    for index, job in enumerate(jobs):
        job.load = _with_loras(job.load, state, index)
    baked = "factors" if jobs[0].quantization is not None else "merged"
    plan.index[MLX_KEY]["loras"] = [{**record, "baked": baked} for record in state.records()]


def _with_loras(load, state: TransformerLoras, index: int):
    def loaded():
        model, config = load()
        return state.apply(index, model), config

    return loaded
