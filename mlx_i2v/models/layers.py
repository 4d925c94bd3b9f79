"""Layers shared by the model families' transformers, named as diffusers names them so weight maps stay
one to one: the GELU feed-forward (and its sub-layer run over chunks of tokens), the sinusoidal timestep
embedding and its MLP, the caption projection, diffusers' RMSNorm, and the interleaved-pair RoPE rotation.
Channels-last: tokens are (B, L, dim)."""

from __future__ import annotations

import math
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from ..memory import evaluate_on_cpu, memory_budget
from .elementwise import gelu_tanh
from .rows import rms_norm

# A feed-forward's (tokens, ffn_dim) intermediates are the largest per-token tensors of a transformer
# block: 8.4 GB in bfloat16 for Wan2.1-14B at 720p with guidance. Where they would exceed this share of
# the memory budget, the block's feed-forward sub-layer runs on chunks of tokens (:func:`by_token_chunks`).
# Unlike attention there is no smaller cap on the CPU: there a TI2V-5B-width feed-forward over 2 x 1056
# tokens took 3-5 % longer in 64-128 MB chunks than whole (benchmarks/feed_forward_chunks.py).
FEED_FORWARD_FRACTION = 1 / 16
# (tokens, ffn_dim) tensors alive at once per token: the projection and its activation.
FEED_FORWARD_COPIES = 2


class GELU(nn.Module):
    """diffusers' ``GELU`` module: a Linear followed by exact or tanh-approximated GELU."""

    def __init__(self, dim_in: int, dim_out: int, approximate: bool):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def __call__(self, x: mx.array) -> mx.array:
        x = self.proj(x)
        # Else the LayerNorm, modulation and projection queued ahead are held beside the activation's
        # (tokens, inner) tensors: a TI2V-5B feed-forward sub-layer peaked at 16.3 hidden-state copies,
        # 11.3 with this, in the same time.
        evaluate_on_cpu(x)
        return gelu_tanh(x) if self.approximate else nn.gelu(x)


class RMSNorm(nn.Module):
    """diffusers' ``RMSNorm`` (:func:`~.rows.rms_norm`): statistics in float32, result in the input dtype;
    the learned scale is present only with ``elementwise_affine`` (every q/k norm; no released LTX-Video
    checkpoint has one on its blocks' norms)."""

    def __init__(self, dim: int, eps: float, elementwise_affine: bool = False):
        super().__init__()
        self.eps = eps
        if elementwise_affine:
            self.weight = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        return rms_norm(x, self.get("weight"), self.eps)


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


def feed_forward_workspace(budget: int | None = None) -> int:
    """Bytes a feed-forward's intermediates may take: :data:`FEED_FORWARD_FRACTION` of the budget
    (default: this process's)."""
    return int((memory_budget() if budget is None else budget) * FEED_FORWARD_FRACTION)


def feed_forward_chunk(batch: int, tokens: int, ffn_dim: int, itemsize: int, workspace: int) -> int:
    """Tokens per chunk so that ``FEED_FORWARD_COPIES * batch * chunk * ffn_dim * itemsize <= workspace``
    (at least one token, at most ``tokens``)."""
    per_token = FEED_FORWARD_COPIES * batch * ffn_dim * itemsize
    return max(1, min(tokens, workspace // per_token))


def by_token_chunks(
    sublayer: Callable[..., mx.array], x: mx.array, rows: tuple[mx.array, ...], ffn_dim: int
) -> mx.array:
    """``sublayer(x, *rows)`` for a block's feed-forward sub-layer, on chunks of tokens whose intermediates
    fit :func:`feed_forward_workspace`; every token's output depends on that token alone, so the result
    equals the unchunked one.

    Args:
        sublayer: (B, l, dim) tokens and their rows -> (B, l, dim).
        x: (B, L, dim).
        rows: per-row or per-token tensors (B, T, ...) with T = 1 (shared by every token) or L (cut with
            the tokens), such as the index of each token's timestep.
        ffn_dim: the feed-forward's inner width.

    Returns:
        (B, L, dim); evaluated when chunked.
    """
    batch, tokens = x.shape[:2]
    chunk = feed_forward_chunk(batch, tokens, ffn_dim, x.dtype.size, feed_forward_workspace())
    if chunk >= tokens:
        return sublayer(x, *rows)
    outputs = []
    for start in range(0, tokens, chunk):
        part = slice(start, start + chunk)
        outputs.append(sublayer(x[:, part], *(r[:, part] if r.shape[1] > 1 else r for r in rows)))
        # Evaluated chunk by chunk, as attention's query chunks are: MLX allocates the buffers of every
        # queued operation before the first one finishes.
        mx.eval(outputs[-1])
    return mx.concatenate(outputs, axis=1)


def timestep_embedding(t: mx.array, dim: int) -> mx.array:
    """Sinusoidal embedding (N,) -> (N, dim) in float32, ``[cos, sin]`` order, frequencies
    ``exp(-ln(1e4) * i / (dim/2))`` (diffusers ``Timesteps(dim, flip_sin_to_cos=True, shift=0)``)."""
    half = dim // 2
    freqs = mx.exp(-math.log(10000) * mx.arange(half, dtype=mx.float32) / half)
    args = t.astype(mx.float32)[:, None] * freqs[None]
    return mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)


@mx.compile  # one pass over the tokens (1.8x faster than the operations one by one on the CPU), bit-identical
def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate interleaved channel pairs (x[2i], x[2i+1]) of x (B, heads, L, D) by (L, D/2) tables, in
    float32, returning x's dtype: ``(x1 cos - x2 sin, x1 sin + x2 cos)`` for each pair.

    One broadcast expression over (..., D/2, 2), with the pair axis of the tables holding (cos, sin) and
    (-sin, cos): the same results as two rotated halves stacked, which held two hidden-state copies at
    once where this writes one."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    firsts = mx.stack([cos, sin], axis=-1)
    seconds = mx.stack([-sin, cos], axis=-1)
    out = pairs[..., :1].astype(mx.float32) * firsts + pairs[..., 1:].astype(mx.float32) * seconds
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
