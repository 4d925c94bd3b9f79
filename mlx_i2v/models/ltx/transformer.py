"""The LTX-Video 0.9.x diffusion transformer (``LTXVideoTransformer3DModel``): 2B and 13B.

Mirrors diffusers 0.42.1 ``models/transformers/transformer_ltx.py``; module and parameter names follow it,
so the diffusers checkpoint maps one to one, and :data:`ORIGINAL_MAP` reads the Lightricks single-file
layout (``ltxv-*.safetensors``, see :mod:`.single_file`).

**Layout.** The model works on tokens, as diffusers' does: ``hidden_states`` is (B, L, in_channels), the
VAE latents (B, F, H, W, C) packed by :func:`pack_latents` into one token per (pt, p, p) patch (every
released checkpoint has patch 1x1x1, so a token is one latent position and in_channels = C = 128), in
(f, h, w) row-major order. Context tokens are (B, L_ctx, caption_channels) T5 states with a (B, L_ctx)
padding mask.

**Positions.** A 3-D RoPE over *fractional* coordinates rotates the full-width q and k (before the head
split): each token's (frame, row, column) is divided by (20, 2048, 2048) after scaling the latent grid by
``rope_interpolation_scale = (8 / frame_rate, 32, 32)`` (so the frame rate is part of the positions), or
comes as explicit pixel-space ``video_coords`` (``LTXConditionPipeline``, whose extra conditioning tokens
sit at other frame indices; :func:`pixel_coords` builds them).

**Precision.** diffusers declares no ``_keep_in_fp32_modules`` for this model: the time MLP, the
modulation arithmetic and the caption projection run in the compute dtype. It upcasts in three places,
kept here: the RoPE tables and their application are float32, and the RMS norms (blocks and q/k) and the
output LayerNorm compute their statistics in float32.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ...components import ComponentType, load_component
from ...errors import WeightLoadError
from ...memory import evaluate_on_cpu
from ...quantize import Quantization, quantize_transformer
from ...weights import IDENTITY, Rule, WeightMap, config_from_dict
from ..attention import attention
from ..elementwise import on_two_streams
from ..layers import (
    FeedForward,
    RMSNorm,
    TextProjection,
    TimestepEmbedding,
    apply_rope,
    by_token_chunks,
    timestep_embedding,
)
from ..rows import layer_norm

log = logging.getLogger(__name__)

# ``LTXVideoRotaryPosEmbed``'s fixed normalisers (diffusers builds it with these for every checkpoint):
# fractional position = coordinate / base, for (frames, height, width).
ROPE_BASE = (20.0, 2048.0, 2048.0)
ROPE_THETA = 10000.0
# diffusers' conversion of the 0/1 text mask to an additive bias: (1 - mask) * -10000.
MASK_BIAS = -10000.0
TIME_FREQ_DIM = 256  # PixArtAlphaCombinedTimestepSizeEmbeddings' sinusoid width
ACTIVATIONS = {"gelu-approximate": True, "gelu": False}  # activation_fn -> tanh approximation


@dataclass(frozen=True)
class LTXTransformerConfig:
    """diffusers' ``LTXVideoTransformer3DModel`` config; the defaults are diffusers' (= LTX-Video 2B), so a
    sparse config.json reads the same. 13B (0.9.7/0.9.8): 32 heads x 128, cross_attention_dim 4096, 48
    layers."""

    in_channels: int = 128
    out_channels: int | None = 128
    patch_size: int = 1
    patch_size_t: int = 1
    num_attention_heads: int = 32
    attention_head_dim: int = 64
    cross_attention_dim: int = 2048
    num_layers: int = 28
    activation_fn: str = "gelu-approximate"
    qk_norm: str = "rms_norm_across_heads"
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    caption_channels: int = 4096
    attention_bias: bool = True
    attention_out_bias: bool = True

    def __post_init__(self) -> None:
        if not self.out_channels:  # diffusers: ``out_channels = out_channels or in_channels``
            object.__setattr__(self, "out_channels", self.in_channels)
        if self.qk_norm != "rms_norm_across_heads":  # diffusers' LTXAttention raises the same
            raise WeightLoadError(f"transformer: unsupported qk_norm {self.qk_norm!r} (only rms_norm_across_heads)")
        if self.activation_fn not in ACTIVATIONS:
            raise WeightLoadError(f"transformer: unsupported activation_fn {self.activation_fn!r}")

    @property
    def inner_dim(self) -> int:
        """Model width: heads * head_dim (2048 for 2B, 4096 for 13B)."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def ffn_dim(self) -> int:
        """Feed-forward width: diffusers' ``FeedForward`` default ``mult=4``."""
        return 4 * self.inner_dim


# --- token layout ----------------------------------------------------------------------------------------


def pack_latents(latents: mx.array, patch_size: int = 1, patch_size_t: int = 1) -> mx.array:
    """Latents (B, F, H, W, C) -> tokens (B, F/pt * H/p * W/p, C * pt * p * p), as diffusers'
    ``LTXPipeline._pack_latents`` (tokens in (f, h, w) order, features in (C, pt, p, p) order)."""
    B, F, H, W, C = latents.shape
    x = latents.reshape(B, F // patch_size_t, patch_size_t, H // patch_size, patch_size, W // patch_size, patch_size, C)
    x = x.transpose(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(B, -1, C * patch_size_t * patch_size * patch_size)


def unpack_latents(
    tokens: mx.array, grid: tuple[int, int, int], patch_size: int = 1, patch_size_t: int = 1
) -> mx.array:
    """Inverse of :func:`pack_latents`: tokens (B, F'*H'*W', C*pt*p*p) on the (F', H', W') token grid ->
    latents (B, F'*pt, H'*p, W'*p, C) (diffusers' ``_unpack_latents``, channels-last)."""
    B = tokens.shape[0]
    f, h, w = grid
    x = tokens.reshape(B, f, h, w, -1, patch_size_t, patch_size, patch_size)
    x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(B, f * patch_size_t, h * patch_size, w * patch_size, -1)


def pixel_coords(
    num_frames: int,
    height: int,
    width: int,
    *,
    frame_rate: float,
    frame_index: int = 0,
    spatial_scale: int = 32,
    temporal_scale: int = 8,
    patch_size: int = 1,
    patch_size_t: int = 1,
) -> np.ndarray:
    """Pixel-space coordinates of a latent grid's tokens, as ``LTXConditionPipeline`` passes them.

    The latent grid is (num_frames, height, width) (before patching). Latent frame k sits at pixel frame
    ``max(0, k * temporal_scale + 1 - temporal_scale) + frame_index`` (the causal VAE's first latent frame
    is one pixel frame), rows and columns at ``spatial_scale`` times their index (``_prepare_video_ids``
    then ``_scale_video_ids``), and the frame coordinate is then divided by the frame rate in float32, as
    the pipeline does (``video_coords[:, 0] * (1.0 / frame_rate)``).

    Returns:
        (L, 3) float32, (frame, row, column) per token in (f, h, w) order.
    """
    f, h, w = np.meshgrid(
        np.arange(0, num_frames, patch_size_t),
        np.arange(0, height, patch_size),
        np.arange(0, width, patch_size),
        indexing="ij",
    )
    frames = np.maximum(f * temporal_scale + 1 - temporal_scale, 0) + frame_index
    coords = np.stack([frames, h * spatial_scale, w * spatial_scale], axis=-1).reshape(-1, 3).astype(np.float32)
    coords[:, 0] *= np.float32(1.0 / frame_rate)
    return coords


# --- rotary positions ------------------------------------------------------------------------------------


class RopeTables(NamedTuple):
    """cos and sin per token and rotated channel pair, each (B or 1, L, inner_dim / 2) float32."""

    cos: mx.array
    sin: mx.array


def rope_frequencies(dim: int, theta: float = ROPE_THETA) -> np.ndarray:
    """The dim // 6 angular frequencies per axis, ``theta ** linspace(0, 1) * pi / 2``, float32.

    The exponents follow the element formula of ``torch.linspace``'s scalar kernel (start + i * step for
    the first half, end - (n - 1 - i) * step for the rest, in float32; the vectorised CPU kernel rounds a
    few entries one ulp differently), and the powers are rounded from float64.
    """
    n = dim // 6
    if n == 1:
        exponents = np.zeros(1, np.float32)
    else:
        step = np.float32(1.0) / np.float32(n - 1)
        i = np.arange(n)
        first = np.float32(0.0) + step * i.astype(np.float32)
        last = np.float32(1.0) - step * (n - 1 - i).astype(np.float32)
        exponents = np.where(i < n // 2, first, last).astype(np.float32)
    freqs = (np.float64(theta) ** exponents.astype(np.float64)).astype(np.float32)
    return (freqs * np.float32(math.pi)) / np.float32(2.0)


class LTXRotaryPosEmbed:
    """diffusers' ``LTXVideoRotaryPosEmbed``: for fractional positions p in each of 3 axes, channel pair
    (3i + axis) of the full model width rotates by ``freq_i * (2p - 1)``; the ``dim % 6`` leftover
    channels come first and are not rotated.

    Tables are computed on the host: the angles in float32 with the reference's operation order (so they
    round identically), their cos/sin in float64 and rounded. The table of a latent grid is cached, since
    every step of a generation uses the same one; tables from explicit coordinates are not (pass them as
    ``rope=``).
    """

    def __init__(self, dim: int, patch_size: int = 1, patch_size_t: int = 1, theta: float = ROPE_THETA):
        self.dim = dim
        self.patch_size = patch_size
        self.patch_size_t = patch_size_t
        self.freqs = rope_frequencies(dim, theta)
        self._cache: dict[tuple, RopeTables] = {}

    def grid_positions(
        self, grid: tuple[int, int, int], rope_interpolation_scale: Sequence[float] | None
    ) -> np.ndarray:
        """Fractional (f, h, w) positions (L, 3) of a token grid, as ``_prepare_video_coords`` computes
        them in float32: ``index * scale * patch / base`` per axis, or the bare indices without a scale."""
        axes = [np.arange(n, dtype=np.float32) for n in grid]
        if rope_interpolation_scale is not None:
            patches = (self.patch_size_t, self.patch_size, self.patch_size)
            axes = [
                a * np.float32(s) * np.float32(p) / np.float32(base)
                for a, s, p, base in zip(axes, rope_interpolation_scale, patches, ROPE_BASE)
            ]
        f, h, w = np.meshgrid(*axes, indexing="ij")
        return np.stack([f, h, w], axis=-1).reshape(-1, 3)

    @staticmethod
    def coords_positions(coords: np.ndarray) -> np.ndarray:
        """Explicit pixel-space coordinates (..., L, 3) -> fractional positions (coordinate / base)."""
        return coords.astype(np.float32) / np.asarray(ROPE_BASE, np.float32)

    def tables(self, positions: np.ndarray) -> RopeTables:
        """Fractional positions (L, 3) or (B, L, 3) -> :class:`RopeTables` ((1 or B), L, dim/2).

        An axis holds few distinct positions (one per frame, row or column), so each one's angles and
        their cos/sin are computed once and gathered, straight into the interleaved table.
        """
        if positions.ndim == 2:
            positions = positions[None]
        B, L, _ = positions.shape
        pad = (self.dim % 6) // 2  # leading channel pairs left unrotated (cos 1, sin 0)
        cos = np.ones((B, L, pad + 3 * len(self.freqs)), np.float32)
        sin = np.zeros_like(cos)
        for axis in range(3):
            values, index = np.unique(positions[..., axis], return_inverse=True)
            angles = (self.freqs * (values[:, None] * np.float32(2.0) - np.float32(1.0))).astype(np.float64)
            index = index.reshape(B, L)
            # pair pad + 3i + axis rotates by frequency i of this axis
            cos[..., pad + axis :: 3] = np.cos(angles).astype(np.float32)[index]
            sin[..., pad + axis :: 3] = np.sin(angles).astype(np.float32)[index]
        return RopeTables(mx.array(cos), mx.array(sin))

    def __call__(
        self,
        grid: tuple[int, int, int] | None = None,
        rope_interpolation_scale: Sequence[float] | None = None,
        video_coords: np.ndarray | mx.array | None = None,
    ) -> RopeTables:
        """Tables for a (F', H', W') token grid (cached), or for explicit ``video_coords`` (L, 3) or
        (B, L, 3) in pixel space (:func:`pixel_coords`)."""
        if video_coords is not None:
            coords = np.asarray(video_coords.astype(mx.float32) if isinstance(video_coords, mx.array) else video_coords)
            if coords.ndim not in (2, 3) or coords.shape[-1] != 3:
                raise ValueError(f"video_coords must be (L, 3) or (B, L, 3), got {coords.shape}")
            return self.tables(self.coords_positions(coords))
        scale = None if rope_interpolation_scale is None else tuple(float(s) for s in rope_interpolation_scale)
        key = (tuple(grid), scale)
        if key not in self._cache:
            self._cache[key] = self.tables(self.grid_positions(tuple(grid), scale))
        return self._cache[key]


# --- building blocks -------------------------------------------------------------------------------------


class TextContext(NamedTuple):
    """The caption as every block's cross-attention sees it, fixed for a whole generation.

    Attributes:
        states: (B, L_ctx, dim) projected captions (:meth:`LTXVideoTransformer3DModel.embed_context`).
        bias: (B, 1, 1, L_ctx) additive padding mask in the compute dtype, or None (attend to all).
        kv: every block's cross-attention keys and values (B, heads, L_ctx, head_dim), or None to project
            ``states`` in each block (:meth:`LTXVideoTransformer3DModel.cross_attention_cache`).
    """

    states: mx.array
    bias: mx.array | None = None
    kv: list[tuple[mx.array, mx.array]] | None = None


class LTXAttention(nn.Module):
    """diffusers' ``LTXAttention``: q/k RMSNorm (eps 1e-5) across all heads, RoPE on the full-width q and k
    (self-attention only), optional additive key bias (cross-attention padding mask)."""

    def __init__(self, config: LTXTransformerConfig, kv_dim: int):
        super().__init__()
        dim, bias = config.inner_dim, config.attention_bias
        self.heads = config.num_attention_heads
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(kv_dim, dim, bias=bias)
        self.to_v = nn.Linear(kv_dim, dim, bias=bias)
        self.to_out = [nn.Linear(dim, dim, bias=config.attention_out_bias)]  # to_out.1 is a no-op Dropout
        self.norm_q = RMSNorm(dim, 1e-5, elementwise_affine=True)
        self.norm_k = RMSNorm(dim, 1e-5, elementwise_affine=True)

    def _heads(self, x: mx.array) -> mx.array:
        """(B, L, heads*D) -> (B, heads, L, D)"""
        B, L, _ = x.shape
        return x.reshape(B, L, self.heads, -1).transpose(0, 2, 1, 3)

    def project_kv(self, source: mx.array) -> tuple[mx.array, mx.array]:
        """Keys and values (B, heads, L_src, D) of a cross-attention ``source`` (B, L_src, kv_dim)."""
        return self._heads(self.norm_k(self.to_k(source))), self._heads(self.to_v(source))

    def _self_attention_qkv(
        self, x: mx.array, rope: RopeTables | None
    ) -> tuple[mx.array, tuple[mx.array, mx.array]]:
        """Queries and (keys, values) of x (B, L, dim) attending to itself, each (B, heads, L, D), the
        queries and keys normed and rotated. As in Wan's self-attention, on the CPU the projections are
        evaluated first and the q and k norms and rotations run at once on two streams
        (:func:`~..elementwise.on_two_streams`)."""
        q_proj, k_proj, v = self.to_q(x), self.to_k(x), self.to_v(x)
        evaluate_on_cpu(q_proj, k_proj, v)

        def rotated(norm: RMSNorm, projected: mx.array) -> mx.array:
            normed = norm(projected)
            return self._heads(normed if rope is None else apply_rope(normed, *rope))

        q, k = on_two_streams(lambda: rotated(self.norm_q, q_proj), lambda: rotated(self.norm_k, k_proj))
        return q, (k, self._heads(v))

    def __call__(
        self,
        x: mx.array,
        context: mx.array | None = None,
        *,
        kv: tuple[mx.array, mx.array] | None = None,
        rope: RopeTables | None = None,
        bias: mx.array | None = None,
    ) -> mx.array:
        """x (B, L, dim) attends to itself, to ``context`` (B, L_ctx, kv_dim) or to its precomputed ``kv``;
        rope: tables for x's tokens (self-attention); bias: broadcastable to (B, heads, L, L_ctx)."""
        if kv is None and context is None:
            q, kv = self._self_attention_qkv(x, rope)
        else:
            q = self._heads(self.norm_q(self.to_q(x)))
            kv = self.project_kv(context) if kv is None else kv
        out = attention(q, *kv, mask=bias)
        B, _, L, _ = out.shape
        return self.to_out[0](out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class Modulation(NamedTuple):
    """A block's view of the timestep: the (U, n, dim) projection of the U distinct timesteps and the (B, T)
    index of each row's (T = 1) or token's (T = L) timestep into them."""

    proj: mx.array
    index: mx.array

    def rows(self, table: mx.array, *which: int) -> list[mx.array]:
        """Rows ``which`` (default: all n) of ``table`` (n, dim) + projection, as arrays (B, T, dim) in the
        projection's dtype. Gathered where they are used: with per-token timesteps each is a copy of the
        hidden state."""
        mod = table.astype(self.proj.dtype)[None] + self.proj
        return [mod[:, i][self.index] for i in (which or range(mod.shape[1]))]


class LTXTransformerBlock(nn.Module):
    """adaLN-single modulated self-attention (RoPE), unmodulated and un-normalised cross-attention, and a
    modulated GELU feed-forward; modulation rows of ``scale_shift_table + temb``: shift, scale, gate
    (self-attention), shift, scale, gate (feed-forward)."""

    def __init__(self, config: LTXTransformerConfig):
        super().__init__()
        dim = config.inner_dim
        self.norm1 = RMSNorm(dim, config.norm_eps, config.norm_elementwise_affine)
        self.attn1 = LTXAttention(config, dim)
        self.norm2 = RMSNorm(dim, config.norm_eps, config.norm_elementwise_affine)
        self.attn2 = LTXAttention(config, config.cross_attention_dim)
        self.ff = FeedForward(dim, config.ffn_dim, dim, approximate=ACTIVATIONS[config.activation_fn])
        self.ffn_dim = config.ffn_dim
        self.scale_shift_table = mx.zeros((6, dim))

    def __call__(
        self,
        x: mx.array,
        context: TextContext,
        kv: tuple[mx.array, mx.array] | None,
        modulation: Modulation,
        rope: RopeTables,
    ) -> mx.array:
        """x (B, L, dim) -> (B, L, dim); ``kv`` this block's cached cross-attention keys/values or None."""
        shift, scale = modulation.rows(self.scale_shift_table, 0, 1)
        h = self.norm1(x) * (1 + scale) + shift
        x = x + self.attn1(h, rope=rope) * modulation.rows(self.scale_shift_table, 2)[0]
        x = x + self.attn2(x, context.states, kv=kv, bias=context.bias)
        return by_token_chunks(
            lambda x, index: self._feed_forward(x, modulation._replace(index=index)),
            x,
            (modulation.index,),
            self.ffn_dim,
        )

    def _feed_forward(self, x: mx.array, modulation: Modulation) -> mx.array:
        """The modulated feed-forward sub-layer with its residual: x (B, l, dim), the modulation's index
        (B, 1 or l)."""
        shift, scale, gate = modulation.rows(self.scale_shift_table, 3, 4, 5)
        return x + self.ff(self.norm2(x) * (1 + scale) + shift) * gate


class CombinedTimestepEmbedding(nn.Module):
    """``PixArtAlphaCombinedTimestepSizeEmbeddings`` without size conditions: 256-wide sinusoid (cos, sin)
    -> ``timestep_embedder`` MLP, in the compute dtype."""

    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(TIME_FREQ_DIM, dim)

    def __call__(self, t: mx.array, dtype: mx.Dtype) -> mx.array:
        return self.timestep_embedder(timestep_embedding(t, TIME_FREQ_DIM).astype(dtype))


class AdaLayerNormSingle(nn.Module):
    """diffusers' ``AdaLayerNormSingle``: t (U,) -> (6*dim projection (U, 6, dim), embedding (U, dim))."""

    def __init__(self, dim: int):
        super().__init__()
        self.emb = CombinedTimestepEmbedding(dim)
        self.linear = nn.Linear(dim, 6 * dim)

    def __call__(self, t: mx.array, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        embedded = self.emb(t, dtype)
        return self.linear(nn.silu(embedded)).reshape(t.shape[0], 6, -1), embedded


def distinct_timesteps(timestep: mx.array | np.ndarray, batch: int, num_tokens: int) -> tuple[mx.array, mx.array]:
    """Distinct timesteps (U,) float32 and the (B, T) index of each sample's (T = 1) or token's (T = L)
    timestep into them.

    Per-token timesteps take a few values (0 or ``t * (1 - strength)`` on conditioning tokens, t
    elsewhere), so the time MLP and its 6*dim projection run once per value, not once per token as in
    diffusers (which flattens (B, L) timesteps into B*L rows: the same numbers, computed L times).
    """
    if isinstance(timestep, mx.array):
        timestep = timestep.astype(mx.float32)  # numpy has no bfloat16
    t = np.asarray(timestep, dtype=np.float32)
    if t.shape not in ((batch,), (batch, 1), (batch, num_tokens)):
        raise ValueError(f"timestep must be ({batch},), ({batch}, 1) or ({batch}, {num_tokens}), got {t.shape}")
    t = t.reshape(batch, -1)
    values, index = np.unique(t, return_inverse=True)
    return mx.array(values), mx.array(index.reshape(t.shape).astype(np.int32))


class LTXPassTokens(NamedTuple):
    """One pass's embedded input (the :class:`~mlx_i2v.seams.PassTokens` of LTX's seams).

    Attributes:
        x: (B, L, dim) tokens.
        grid: (L,); the token grid is the caller's (:class:`~mlx_i2v.families.ltx.variants.LTXForward`).
        time_index: (B, 1) or (B, L) index of each row's / token's timestep.
        rope: the tokens' positions.
        gather_kv: always None (no sequence parallelism on LTX-Video).
        time_proj: (U, 6, dim) modulation projections of the U distinct timesteps.
        embedded: (U, dim) their embeddings (the output norm's modulation).
    """

    x: mx.array
    grid: tuple[int, ...]
    time_index: mx.array
    rope: RopeTables
    gather_kv: None
    time_proj: mx.array
    embedded: mx.array

    def take_rows(self, picked: mx.array) -> LTXPassTokens:
        """The rows ``picked`` of the batch."""
        rope = self.rope if self.rope.cos.shape[0] == 1 else RopeTables(self.rope.cos[picked], self.rope.sin[picked])
        return self._replace(x=self.x[picked], time_index=self.time_index[picked], rope=rope)


# --- the model -------------------------------------------------------------------------------------------


class LTXVideoTransformer3DModel(nn.Module):
    """LTX-Video DiT predicting the flow velocity of packed latent tokens.

    Per generation, compute the step-invariant parts once: :meth:`embed_context` (or
    :meth:`cross_attention_cache`) for the caption and :meth:`rope_tables` for the positions, and pass them
    as ``context=`` and ``rope=`` at every step. The compute dtype is the dtype the weights were loaded in
    (:func:`load_ltx_transformer`).
    """

    def __init__(self, config: LTXTransformerConfig):
        super().__init__()
        self.config = config
        dim = config.inner_dim
        self.rope = LTXRotaryPosEmbed(dim, config.patch_size, config.patch_size_t)
        self.proj_in = nn.Linear(config.in_channels, dim)
        self.scale_shift_table = mx.zeros((2, dim))
        self.time_embed = AdaLayerNormSingle(dim)
        self.caption_projection = TextProjection(config.caption_channels, dim)
        self.transformer_blocks = [LTXTransformerBlock(config) for _ in range(config.num_layers)]
        self.proj_out = nn.Linear(dim, config.out_channels)

    @property
    def dtype(self) -> mx.Dtype:
        """The compute dtype (that of ``proj_in``, which is never quantized)."""
        return self.proj_in.weight.dtype

    def embed_context(
        self, encoder_hidden_states: mx.array, encoder_attention_mask: mx.array | None = None
    ) -> TextContext:
        """Project the caption once per generation.

        Args:
            encoder_hidden_states: (B, L_ctx, caption_channels) T5 states.
            encoder_attention_mask: (B, L_ctx), 1 (or True) for real tokens and 0 for padding; None attends
                to every token. Converted as diffusers does: bias = (1 - mask) * -10000 in the compute
                dtype, added to the cross-attention scores.

        Returns:
            :class:`TextContext` with (B, L_ctx, dim) states.
        """
        B, L_ctx, _ = encoder_hidden_states.shape
        bias = None
        if encoder_attention_mask is not None:
            shape = tuple(encoder_attention_mask.shape)
            if shape != (B, L_ctx):
                raise ValueError(f"encoder_attention_mask must be ({B}, {L_ctx}), got {shape}")
            bias = ((1 - encoder_attention_mask.astype(self.dtype)) * MASK_BIAS)[:, None, None, :]
        states = self.caption_projection(encoder_hidden_states.astype(self.dtype))
        return TextContext(states, bias)

    def cross_attention_cache(self, context: TextContext) -> TextContext:
        """``context`` with every block's cross-attention keys and values precomputed.

        They do not change between denoising steps; costs 2 * num_layers * B * L_ctx * dim values (2B with
        guidance and 128 tokens: 117 MB in float32; 13B, 256 tokens: 403 MB in bfloat16).
        """
        kv = [block.attn2.project_kv(context.states) for block in self.transformer_blocks]
        return context._replace(kv=kv)

    def step_context(
        self, encoder_hidden_states: mx.array, encoder_attention_mask: mx.array | None = None
    ) -> TextContext:
        """What the blocks take from the caption at every denoising step, computed once per generation:
        :meth:`embed_context` (same arguments), then :meth:`cross_attention_cache`."""
        return self.cross_attention_cache(self.embed_context(encoder_hidden_states, encoder_attention_mask))

    def rope_tables(
        self,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        rope_interpolation_scale: Sequence[float] | None = None,
        video_coords: np.ndarray | mx.array | None = None,
    ) -> RopeTables:
        """RoPE tables for a (num_frames, height, width) token grid with ``rope_interpolation_scale``
        (``(8 / frame_rate, 32, 32)`` in the LTX pipelines; None uses raw indices, as diffusers does), or for
        explicit pixel-space ``video_coords`` (L, 3) or (B, L, 3) (see :func:`pixel_coords`)."""
        if video_coords is not None:
            if num_frames is not None or height is not None or width is not None:
                raise ValueError("pass either video_coords or num_frames/height/width, not both")
            return self.rope(video_coords=video_coords)
        if num_frames is None or height is None or width is None:
            raise ValueError("pass num_frames, height and width (the token grid) or video_coords")
        return self.rope((num_frames, height, width), rope_interpolation_scale)

    def __call__(
        self,
        hidden_states: mx.array,
        timestep: mx.array | np.ndarray,
        encoder_hidden_states: mx.array | None = None,
        encoder_attention_mask: mx.array | None = None,
        *,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        rope_interpolation_scale: Sequence[float] | None = None,
        video_coords: np.ndarray | mx.array | None = None,
        context: TextContext | None = None,
        rope: RopeTables | None = None,
    ) -> mx.array:
        """Predict the velocity of every token.

        Args:
            hidden_states: (B, L, in_channels) packed latent tokens (:func:`pack_latents`).
            timestep: (B,) or (B, 1) one timestep per sample, or (B, L) one per token (conditioning tokens
                carry a smaller one); the pipelines pass sigma * 1000.
            encoder_hidden_states, encoder_attention_mask: see :meth:`embed_context`; omit both when
                passing ``context``.
            num_frames, height, width, rope_interpolation_scale, video_coords: the positions, see
                :meth:`rope_tables`; omit when passing ``rope``.

        Returns:
            (B, L, out_channels) in the compute dtype.
        """
        if (context is None) == (encoder_hidden_states is None):
            raise ValueError("pass exactly one of encoder_hidden_states and context")
        if context is None:
            context = self.embed_context(encoder_hidden_states, encoder_attention_mask)
        elif encoder_attention_mask is not None:
            raise ValueError("encoder_attention_mask is already part of context")
        if rope is None:
            rope = self.rope_tables(num_frames, height, width, rope_interpolation_scale, video_coords)
        tokens = self.embed(hidden_states, timestep, rope)
        return self.project_out(self.run_blocks(tokens.x, tokens, context), tokens)

    # --- the seams of a pass (step caching: mlx_i2v.seams.SeamedTransformer, through LTXForward) ---

    def embed(self, hidden_states: mx.array, timestep: mx.array | np.ndarray, rope: RopeTables) -> LTXPassTokens:
        """Packed tokens (B, L, in_channels), timesteps (B,), (B, 1) or (B, L) and their positions -> the
        blocks' input (:class:`LTXPassTokens`)."""
        B, L, _ = hidden_states.shape
        if rope.cos.shape[1] != L or rope.cos.shape[0] not in (1, B):
            raise ValueError(f"positions for {tuple(rope.cos.shape[:2])} tokens, hidden_states has ({B}, {L})")
        t_values, t_index = distinct_timesteps(timestep, B, L)
        time_proj, embedded = self.time_embed(t_values, self.dtype)
        x = self.proj_in(hidden_states.astype(self.dtype))
        return LTXPassTokens(x, (L,), t_index, rope, None, time_proj, embedded)

    def run_blocks(
        self, x: mx.array, tokens: LTXPassTokens, context: TextContext, blocks: slice = slice(None)
    ) -> mx.array:
        """The transformer ``blocks`` on x (B, L, dim)."""
        modulation = Modulation(tokens.time_proj, tokens.time_index)
        kvs = context.kv or [None] * len(self.transformer_blocks)
        for block, kv in list(zip(self.transformer_blocks, kvs))[blocks]:
            x = block(x, context, kv, modulation, tokens.rope)
        return x

    def project_out(self, x: mx.array, tokens: LTXPassTokens) -> mx.array:
        """The timestep-modulated output norm and projection: (B, L, dim) -> (B, L, out_channels)."""
        shift, scale = Modulation(tokens.embedded[:, None], tokens.time_index).rows(self.scale_shift_table)
        x = layer_norm(x, None, None, 1e-6) * (1 + scale) + shift
        return self.proj_out(x)


# --- weights ---------------------------------------------------------------------------------------------

# Parameter names are diffusers' own.
DIFFUSERS_MAP = WeightMap(name="transformer (diffusers)", rules=(IDENTITY,))

# The Lightricks/LTX-Video single-file layout (``ltx_video/models/transformers/transformer3d.py``), once
# :func:`.single_file.split_single_file` has removed the ``model.diffusion_model.`` prefix. diffusers'
# ``convert_ltx_transformer_checkpoint_to_diffusers`` renames patchify_proj -> proj_in, adaln_single ->
# time_embed, q_norm / k_norm -> norm_q / norm_k and keeps everything else; every name is listed here so a
# tensor of any other model (or a diffusers-named one) is refused by name.
_BLOCK = r"transformer_blocks\.(\d+)\."
ORIGINAL_MAP = WeightMap(
    name="transformer (LTX-Video single file)",
    rules=(
        Rule(r"patchify_proj\.(weight|bias)", r"proj_in.\1"),
        Rule(r"adaln_single\.(emb\.timestep_embedder\.linear_[12]|linear)\.(weight|bias)", r"time_embed.\1.\2"),
        Rule(r"caption_projection\.linear_[12]\.(weight|bias)"),
        Rule(r"(scale_shift_table|proj_out\.(weight|bias))"),
        Rule(_BLOCK + r"(attn[12])\.([qk])_norm\.weight", r"transformer_blocks.\1.\2.norm_\3.weight"),
        Rule(_BLOCK + r"attn[12]\.(to_[qkv]|to_out\.0)\.(weight|bias)"),
        Rule(_BLOCK + r"ff\.net\.(0\.proj|2)\.(weight|bias)"),
        Rule(_BLOCK + r"(scale_shift_table|norm[12]\.weight)"),
    ),
)


TRANSFORMER = ComponentType(
    "transformer",
    build=lambda config: LTXVideoTransformer3DModel(config_from_dict(LTXTransformerConfig, config)),
    source_map=lambda model: DIFFUSERS_MAP,
    quantize=quantize_transformer,
)


def load_ltx_transformer(
    folder: str | Path, dtype: mx.Dtype, *, quantize: Quantization | None = None
) -> LTXVideoTransformer3DModel:
    """Load a ``transformer/`` folder (config.json plus single or sharded safetensors, diffusers or converted
    MLX layout) in ``dtype``; ``quantize`` quantizes a float checkpoint on load (:mod:`mlx_i2v.quantize`).

    Raises:
        WeightLoadError: unreadable or unsupported config or checkpoint, or missing/unexpected/mis-shaped
            tensors (named).
    """
    return load_component(TRANSFORMER, folder, dtype, quantize=quantize)
