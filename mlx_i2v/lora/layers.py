"""The run-time LoRA layer for quantized linears.

Merging a LoRA into a quantized weight means dequantizing, adding and re-quantizing; at 4 bits the
re-quantization erases most of a typical LoRA (lora.md §3: 13-20 % of a delta of 2-5 % of the weight
survives). So a quantized linear keeps its packed weights untouched and adds the LoRA at run time:

    y = base(x) + sum_i s_i * (x @ down_i^T) @ up_i^T

with the factors in the layer's compute dtype (that of its scales: the model's dtype, float32 for the
reference's float32 time MLP); the LoRA part is exact. Memory: the factors, nothing more. The
cost per token is ``rank * (in + out)`` multiply-adds per LoRA, against ``in * out`` for the base (3.3 % at
rank 64 on TI2V-5B's widths; see ``benchmarks/lora_step_cost.py``).

A full ``.diff`` on a quantized weight (rare: LightX2V writes one only for tensors under 1M values, which
are never the quantized ones at real widths) is added the same way, exactly, as a dense residual
``s * x @ diff^T``.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class LoRALinear(nn.Module):
    """``base`` (an ``nn.QuantizedLinear``, kept as the same object; any linear works, which the benchmark
    uses to time the LoRA branch on float weights) plus low-rank and dense residuals.

    Parameters: ``base.*`` and ``loras.<i>.down`` (rank, in) / ``loras.<i>.up`` (out, rank), or
    ``loras.<i>.dense`` (out, in); the scales (strength * alpha / rank) are plain floats, not parameters.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.loras: list[dict[str, mx.array]] = []
        self._scales: list[float] = []

    @property
    def dtype(self) -> mx.Dtype:
        """The compute dtype of the layer, which its factors are kept in: that of a quantized base's scales,
        else of its weight."""
        return (self.base.scales if "scales" in self.base else self.base.weight).dtype

    def add_low_rank(self, down: mx.array, up: mx.array, scale: float) -> None:
        """Add ``scale * up @ down``; down (rank, in), up (out, rank), cast to the layer's dtype."""
        self.loras.append({"down": down.astype(self.dtype), "up": up.astype(self.dtype)})
        self._scales.append(float(scale))

    def add_dense(self, delta: mx.array, scale: float) -> None:
        """Add ``scale * delta``, a full (out, in) matrix, cast to the layer's dtype."""
        self.loras.append({"dense": delta.astype(self.dtype)})
        self._scales.append(float(scale))

    @property
    def scales(self) -> tuple[float, ...]:
        return tuple(self._scales)

    def __call__(self, x: mx.array) -> mx.array:
        """x (..., in) -> (..., out)"""
        y = self.base(x)
        for factors, scale in zip(self.loras, self._scales):
            if "dense" in factors:
                y = mx.addmm(y, x, factors["dense"].T, alpha=scale)
            else:
                y = mx.addmm(y, x @ factors["down"].T, factors["up"].T, alpha=scale)
        return y
