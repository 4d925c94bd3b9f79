"""Layers shared by the model families' transformers, named as diffusers names them so weight maps stay
one to one: the GELU feed-forward, the sinusoidal timestep embedding and its MLP, the caption projection,
and the interleaved-pair RoPE rotation. Channels-last: tokens are (B, L, dim)."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .elementwise import gelu_tanh


class GELU(nn.Module):
    """diffusers' ``GELU`` module: a Linear followed by exact or tanh-approximated GELU."""

    def __init__(self, dim_in: int, dim_out: int, approximate: bool):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def __call__(self, x: mx.array) -> mx.array:
        x = self.proj(x)
        return gelu_tanh(x) if self.approximate else nn.gelu(x)


class FeedForward(nn.Module):
    """diffusers' ``FeedForward``: ``net = [GELU(dim -> inner), Dropout, Linear(inner -> dim_out)]``.

    Index 1 is the reference's inference-time no-op Dropout, kept so the names stay ``net.0`` / ``net.2``.
    """

    def __init__(self, dim: int, inner_dim: int, dim_out: int, approximate: bool):
        super().__init__()
        self.net = [GELU(dim, inner_dim, approximate), nn.Identity(), nn.Linear(inner_dim, dim_out)]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.net:
            x = layer(x)
        return x


def timestep_embedding(t: mx.array, dim: int) -> mx.array:
    """Sinusoidal embedding (N,) -> (N, dim) in float32, ``[cos, sin]`` order, frequencies
    ``exp(-ln(1e4) * i / (dim/2))`` (diffusers ``Timesteps(dim, flip_sin_to_cos=True, shift=0)``)."""
    half = dim // 2
    freqs = mx.exp(-math.log(10000) * mx.arange(half, dtype=mx.float32) / half)
    args = t.astype(mx.float32)[:, None] * freqs[None]
    return mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)


@mx.compile  # one pass instead of six (1.8x faster on the CPU), bit-identical
def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate interleaved channel pairs (x[2i], x[2i+1]) of x (B, heads, L, D) by (L, D/2) tables, in
    float32, returning x's dtype."""
    pairs = x.astype(mx.float32).reshape(*x.shape[:-1], -1, 2)
    x1, x2 = pairs[..., 0], pairs[..., 1]
    out = mx.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


class TimestepEmbedding(nn.Module):
    """Sinusoid (freq_dim) -> linear_1 -> SiLU -> linear_2 (dim); kept in float32."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(nn.silu(self.linear_1(x)))


class TextProjection(nn.Module):
    """diffusers' ``PixArtAlphaTextProjection``: linear_1 -> tanh-GELU -> linear_2."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(gelu_tanh(self.linear_1(x)))
