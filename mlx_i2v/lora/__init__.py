"""LoRAs for the Wan and LTX-Video transformers: every common file style, strict accounting, exact application.

``spec`` (what the user asks for), ``architectures`` (what differs between the transformers, as data),
``names`` and ``formats`` (reading a file into canonical deltas keyed by
our parameter names), ``diffusers_policy`` (what diffusers 0.42.1 would apply), ``resolve`` (matching a file
against a transformer's shapes), ``layers`` and ``apply`` (merging into float weights, run-time factors on
quantized linears, taking them off again), ``baked`` (factors saved with a converted quantized model),
``manager`` (a pipeline's LoRAs per expert), ``info`` (``mlx-i2v info --lora``).
"""

from .formats import FullDelta, LoraFile, LowRank, read_lora
from .layers import LoRALinear
from .resolve import Resolved, resolve, transformer_shapes
from .spec import LoRA, parse_lora_argument

__all__ = [
    "LoRA",
    "LoRALinear",
    "LoraFile",
    "LowRank",
    "FullDelta",
    "Resolved",
    "parse_lora_argument",
    "read_lora",
    "resolve",
    "transformer_shapes",
]
