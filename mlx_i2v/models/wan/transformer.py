"""The Wan diffusion transformer (``WanTransformer3DModel``): Wan2.1 I2V / FLF2V, Wan2.2 I2V-A14B, TI2V-5B.

Mirrors diffusers 0.42.1 ``models/transformers/transformer_wan.py``; module and parameter names follow
it, so the diffusers checkpoint maps one to one (only the patch-embedding convolution is re-laid out).
The reference's float32 islands are kept: the sinusoidal time embedding and time MLP, every modulation
table and the arithmetic that applies it, the block LayerNorms, and the RoPE rotation.

Layout is channels-last: latents are (B, F, H, W, C); tokens are ordered (f, h, w) row-major over the
patch grid, as the reference's ``flatten(2).transpose(1, 2)`` orders them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ...components import ComponentType, load_component
from ...errors import WeightLoadError
from ...memory import evaluate_on_cpu
from ...quantize import Quantization, quantize_transformer
from ...seams import GatherKV
from ...weights import (
    IDENTITY,
    Rule,
    WeightMap,
    config_from_dict,
    conv_weight,
)
from ..attention import adds_mask_in_float32, attention
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

# The reference's hard-coded text length: with an image K/V branch, the last 512 context tokens are text
# and everything before them is image (diffusers ``WanAttnProcessor``; the original Wan code has the same).
TEXT_CONTEXT_LENGTH = 512


@dataclass(frozen=True)
class WanTransformerConfig:
    """diffusers' ``WanTransformer3DModel`` config; defaults are diffusers' so a sparse config.json reads
    the same. ``qk_norm`` is recorded but, as in diffusers, q/k always get an RMSNorm across all heads."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int | None = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None

    def __post_init__(self) -> None:
        # diffusers: ``out_channels = out_channels or in_channels``
        if not self.out_channels:
            object.__setattr__(self, "out_channels", self.in_channels)

    @property
    def inner_dim(self) -> int:
        """Model width: heads * head_dim (3072 for TI2V-5B, 5120 for the 14B models)."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def patch_volume(self) -> int:
        """Latent positions per token: pt * ph * pw."""
        return math.prod(self.patch_size)


# --- building blocks ----------------------------------------------------------------------------------


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (weights are kept float32 too; :func:`~..rows.layer_norm`), returning
    the input's dtype."""

    def __call__(self, x: mx.array) -> mx.array:
        return layer_norm(x.astype(mx.float32), self.get("weight"), self.get("bias"), self.eps).astype(x.dtype)


class WanRotaryPosEmbed:
    """3-axis rotary tables: the head dim splits into t = d - 4*(d//6) and h = w = 2*(d//6) channels
    (44/42/42 for d = 128), each with 1-D RoPE (theta 1e4) over its axis of the patch grid.

    The per-axis tables are built in float64 and rounded to float32 as diffusers does; the per-grid
    tables are cached, since every denoising step uses the same grid.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        h_dim = w_dim = 2 * (head_dim // 6)
        t_dim = head_dim - h_dim - w_dim
        self.max_seq_len = max_seq_len
        positions = np.arange(max_seq_len, dtype=np.float64)
        self.axes: list[tuple[np.ndarray, np.ndarray]] = []
        for dim in (t_dim, h_dim, w_dim):
            inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
            angles = np.outer(positions, inv_freq)  # (max_seq_len, dim/2)
            self.axes.append((np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)))
        self._cache: dict[tuple[int, int, int], tuple[mx.array, mx.array]] = {}

    def __call__(self, grid: tuple[int, int, int]) -> tuple[mx.array, mx.array]:
        """cos, sin for a (F', H', W') token grid, each (F'*H'*W', head_dim/2) float32, one entry per
        rotated (even, odd) channel pair."""
        if grid not in self._cache:
            if max(grid) > self.max_seq_len:
                raise ValueError(f"token grid {grid} exceeds rope_max_seq_len={self.max_seq_len}")
            cos_parts, sin_parts = [], []
            for axis, (n, (cos, sin)) in enumerate(zip(grid, self.axes)):
                shape = [1, 1, 1, -1]
                shape[axis] = n
                cos_parts.append(np.broadcast_to(cos[:n].reshape(shape), (*grid, cos.shape[1])))
                sin_parts.append(np.broadcast_to(sin[:n].reshape(shape), (*grid, sin.shape[1])))
            L = math.prod(grid)
            self._cache[grid] = (
                mx.array(np.concatenate(cos_parts, axis=-1).reshape(L, -1)),
                mx.array(np.concatenate(sin_parts, axis=-1).reshape(L, -1)),
            )
        return self._cache[grid]


class CrossKV(NamedTuple):
    """Projected keys and values (B, heads, L, D) of a context, and of its image tokens (Wan2.1 I2V);
    ``bias`` (L,) float32 is added to the text keys' scores (see :meth:`WanTransformer3DModel.step_context`)."""

    k: mx.array
    v: mx.array
    image: tuple[mx.array, mx.array] | None = None
    bias: mx.array | None = None

    def take_rows(self, picked: mx.array) -> CrossKV:
        """The rows ``picked`` of the batch (a step cache's computing branches)."""
        image = None if self.image is None else tuple(a[picked] for a in self.image)
        return CrossKV(self.k[picked], self.v[picked], image, self.bias)


class WanAttention(nn.Module):
    """Self- or cross-attention with q/k RMSNorm across all heads (before the head split), optional RoPE,
    and, for Wan2.1 I2V/FLF2V cross-attention, a second K/V branch over the image tokens whose result is
    added to the text attention before ``to_out``."""

    def __init__(self, dim: int, heads: int, eps: float, added_kv_proj_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = [nn.Linear(dim, dim)]  # the reference's to_out.1 is a no-op Dropout
        self.norm_q = RMSNorm(dim, eps, elementwise_affine=True)
        self.norm_k = RMSNorm(dim, eps, elementwise_affine=True)
        self.has_image_kv = added_kv_proj_dim is not None
        if self.has_image_kv:
            self.add_k_proj = nn.Linear(added_kv_proj_dim, dim)
            self.add_v_proj = nn.Linear(added_kv_proj_dim, dim)
            self.norm_added_k = RMSNorm(dim, eps, elementwise_affine=True)

    def _heads(self, x: mx.array) -> mx.array:
        """(B, L, heads*D) -> (B, heads, L, D)"""
        B, L, _ = x.shape
        return x.reshape(B, L, self.heads, -1).transpose(0, 2, 1, 3)

    def project_kv(
        self, context: mx.array, text_tokens: int = TEXT_CONTEXT_LENGTH, bias: mx.array | None = None
    ) -> CrossKV:
        """Keys and values of a cross-attention context (B, L_ctx, dim), each (B, heads, L, D).

        The context is the same at every denoising step, so the pipeline computes these once per
        generation (:meth:`WanTransformer3DModel.cross_attention_cache`). With an image branch the last
        ``text_tokens`` tokens are text; ``bias`` (text_tokens,) float32 is added to the text keys' scores
        (:meth:`WanTransformer3DModel.step_context`).
        """
        image = None
        if self.has_image_kv:
            # Copied literally from diffusers: mis-routes tokens unless the text part is exactly 512 long.
            image_context_length = context.shape[1] - text_tokens
            context_img = context[:, :image_context_length]
            context = context[:, image_context_length:]
            # No image tokens (a 512-token text-only context): the reference's SDPA over zero keys adds zeros.
            if context_img.shape[1] > 0:
                image = (
                    self._heads(self.norm_added_k(self.add_k_proj(context_img))),
                    self._heads(self.add_v_proj(context_img)),
                )
        k, v = self._heads(self.norm_k(self.to_k(context))), self._heads(self.to_v(context))
        return CrossKV(k, v, image, bias)

    def _self_attention_qkv(
        self, x: mx.array, rope: tuple[mx.array, mx.array] | None
    ) -> tuple[mx.array, mx.array, mx.array]:
        """Queries, keys (normed and rotated) and values of x (B, L, dim) attending to itself, each
        (B, heads, L, D). On the CPU the three projections are evaluated first and the q and k norms and
        rotations, element-wise work of one thread each there, then run at once on two streams
        (:func:`~..elementwise.on_two_streams`): the TI2V-5B self-attention sub-layer at 2 x 1056 tokens
        took 1052-1070 ms against 1069-1093 ms (three runs each, alternately; 2-core EPYC), bit-identical."""
        q_proj, k_proj, v = self.to_q(x), self.to_k(x), self.to_v(x)
        evaluate_on_cpu(q_proj, k_proj, v)

        def rotated(norm: RMSNorm, projected: mx.array) -> mx.array:
            heads = self._heads(norm(projected))
            return heads if rope is None else apply_rope(heads, *rope)

        q, k = on_two_streams(lambda: rotated(self.norm_q, q_proj), lambda: rotated(self.norm_k, k_proj))
        return q, k, self._heads(v)

    def __call__(
        self,
        x: mx.array,
        context: mx.array | None = None,
        rope: tuple[mx.array, mx.array] | None = None,
        kv: CrossKV | None = None,
        gather_kv: GatherKV | None = None,
    ) -> mx.array:
        """x (B, L, dim); context (B, L_ctx, dim), or its precomputed ``kv``, or neither for
        self-attention; rope: cos, sin (L, D/2), for self-attention; ``gather_kv``: when x is one shard of
        the sequence, turns this shard's rotated keys and values into the whole sequence's."""
        if kv is None and context is None:
            q, k, v = self._self_attention_qkv(x, rope)
            kv = CrossKV(k, v)
        else:
            kv = self.project_kv(context) if kv is None else kv
            q, k, v = self._heads(self.norm_q(self.to_q(x))), kv.k, kv.v
        if gather_kv is not None:
            k, v = gather_kv(k, v)

        out = attention(q, k, v, mask=kv.bias)
        if kv.image is not None:
            out = out + attention(q, *kv.image)

        B, _, L, _ = out.shape
        return self.to_out[0](out.transpose(0, 2, 1, 3).reshape(B, L, -1))


def trailing_zero_rows(states: mx.array) -> int:
    """How many rows at the end of (B, L, D) ``states`` are zero in every sample."""
    used = np.flatnonzero(np.array(mx.any(states != 0, axis=(0, 2))))
    return states.shape[1] - (int(used[-1]) + 1 if used.size else 0)


def modulation(table: mx.array, proj: mx.array) -> mx.array:
    """Per-timestep modulation: (1, n, dim) float32 learned table + (U, n, dim) projection of the U distinct
    timesteps -> (U, n, dim) float32; :func:`modulation_rows` spreads it over rows or tokens."""
    return table + proj.astype(mx.float32)


def modulation_rows(mod: mx.array, index: mx.array, *which: int) -> list[mx.array]:
    """Rows ``which`` of per-timestep modulation ``mod`` (U, n, dim) for each row or token: index (B, T) int
    says which distinct timestep each uses (T = 1 or the token count). Returns float32 arrays (B, T, dim).

    Gathered where they are used: with per-token timesteps (TI2V) each is a float32 copy of the hidden
    state, so a block does not hold all six through its sub-layers, and the feed-forward's are gathered
    per chunk of tokens."""
    return [mod[:, i][index] for i in which]


# The reference's float32 islands around the blocks' sub-layers, each compiled into one element-wise pass.


@mx.compile
def modulate(normed: mx.array, scale: mx.array, shift: mx.array) -> mx.array:
    """``normed * (1 + scale) + shift``: adaptive-LayerNorm modulation of float32 normalised tokens
    (B, L, dim) by (B, T, dim) float32 rows (T = 1 or L), returned in float32."""
    return normed * (1 + scale) + shift


@mx.compile
def gated_residual(x: mx.array, out: mx.array, gate: mx.array) -> mx.array:
    """``x + out * gate`` in float32, returned in x's dtype: a sub-layer's output (B, L, dim) added to the
    residual stream through its (B, T, dim) float32 gate."""
    return (x.astype(mx.float32) + out.astype(mx.float32) * gate).astype(x.dtype)


class WanTransformerBlock(nn.Module):
    """adaLN-modulated self-attention (with RoPE), cross-attention, and tanh-GELU feed-forward.

    Modulation rows of ``scale_shift_table + time_proj``: shift, scale, gate (self-attention), then
    c_shift, c_scale, c_gate (feed-forward); cross-attention is unmodulated.
    """

    def __init__(self, config: WanTransformerConfig):
        super().__init__()
        dim, eps = config.inner_dim, config.eps
        self.norm1 = FP32LayerNorm(dim, eps=eps, affine=False)
        self.attn1 = WanAttention(dim, config.num_attention_heads, eps)
        self.attn2 = WanAttention(dim, config.num_attention_heads, eps, config.added_kv_proj_dim)
        self.norm2 = FP32LayerNorm(dim, eps=eps, affine=True) if config.cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(dim, config.ffn_dim, dim, approximate=True)
        self.ffn_dim = config.ffn_dim
        self.norm3 = FP32LayerNorm(dim, eps=eps, affine=False)
        self.scale_shift_table = mx.zeros((1, 6, dim))

    def __call__(
        self,
        x: mx.array,
        context: mx.array | CrossKV,
        time_proj: mx.array,
        time_index: mx.array,
        rope: tuple[mx.array, mx.array],
        gather_kv: GatherKV | None = None,
    ) -> mx.array:
        """x (B, L, dim); context (B, L_ctx, dim) or its cross-attention K/V; time_proj (U, 6, dim);
        time_index (B, T); gather_kv: see :class:`WanAttention` (self-attention over a token shard)."""
        mod = modulation(self.scale_shift_table, time_proj)
        f32 = mx.float32

        h = modulate(self.norm1(x.astype(f32)), *modulation_rows(mod, time_index, 1, 0)).astype(x.dtype)
        out = self.attn1(h, rope=rope, gather_kv=gather_kv)
        x = gated_residual(x, out, *modulation_rows(mod, time_index, 2))
        # On the CPU each sub-layer's output is evaluated before the next is queued: else the chain of
        # operations behind it is held beside the next one's (memory.evaluate_on_cpu).
        evaluate_on_cpu(x)

        h = self.norm2(x.astype(f32)).astype(x.dtype)
        if isinstance(context, CrossKV):
            x = x + self.attn2(h, kv=context)
        else:
            x = x + self.attn2(h, context)
        evaluate_on_cpu(x)

        return self.feed_forward(x, time_index, mod)

    def feed_forward(self, x: mx.array, time_index: mx.array, mod: mx.array) -> mx.array:
        """The modulated feed-forward sub-layer with its residual, on chunks of tokens
        (:func:`~..layers.by_token_chunks`): x (B, L, dim), time_index (B, T), mod (U, 6, dim) ->
        (B, L, dim). Its modulation rows are gathered per chunk, from a cut of the index: with per-token
        timesteps, whole rows would be three float32 copies of the hidden state."""
        return by_token_chunks(lambda x, index: self._feed_forward_chunk(x, index, mod), x, (time_index,), self.ffn_dim)

    def _feed_forward_chunk(self, x: mx.array, index: mx.array, mod: mx.array) -> mx.array:
        """:meth:`feed_forward` on one chunk: x (B, l, dim), index (B, 1 or l)."""
        shift, scale, gate = modulation_rows(mod, index, 3, 4, 5)
        h = modulate(self.norm3(x.astype(mx.float32)), scale, shift).astype(x.dtype)
        return gated_residual(x, self.ffn(h), gate)


# --- conditioning -------------------------------------------------------------------------------------


class WanImageEmbedding(nn.Module):
    """CLIP tokens -> model width: [+ FLF2V pos_embed] -> LayerNorm -> Linear, exact GELU, Linear ->
    LayerNorm (both LayerNorms float32)."""

    def __init__(self, image_dim: int, dim: int, pos_embed_seq_len: int | None):
        super().__init__()
        self.norm1 = FP32LayerNorm(image_dim)
        self.ff = FeedForward(image_dim, image_dim, dim, approximate=False)
        self.norm2 = FP32LayerNorm(dim)
        if pos_embed_seq_len is not None:
            self.pos_embed = mx.zeros((1, pos_embed_seq_len, image_dim))

    def __call__(self, x: mx.array) -> mx.array:
        """x (N, L_img, image_dim) -> (N, L_img, dim); with pos_embed (FLF2V) consecutive pairs of
        images (first frame, last frame) are joined: (2B, L_img, image_dim) -> (B, 2*L_img, dim)."""
        if "pos_embed" in self:
            _, L, C = x.shape
            x = x.reshape(-1, 2 * L, C) + self.pos_embed
        return self.norm2(self.ff(self.norm1(x)))


class WanTimeTextImageEmbedding(nn.Module):
    """The conditioning embedders: time MLP + its 6-way projection, text projection, image embedding."""

    def __init__(self, config: WanTransformerConfig):
        super().__init__()
        dim = config.inner_dim
        self.freq_dim = config.freq_dim
        self.time_embedder = TimestepEmbedding(config.freq_dim, dim)
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = TextProjection(config.text_dim, dim)
        if config.image_dim is not None:
            self.image_embedder = WanImageEmbedding(config.image_dim, dim, config.pos_embed_seq_len)

    def embed_time(self, t: mx.array, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        """t (U,) -> temb (U, dim) and its projection (U, 6, dim), both in ``dtype``.

        The sinusoid and MLP run in float32 and temb is then cast to the compute dtype, as the reference
        does (``.type_as(encoder_hidden_states)``), before the SiLU + ``time_proj``.
        """
        temb = self.time_embedder(timestep_embedding(t, self.freq_dim)).astype(dtype)
        return temb, self.time_proj(nn.silu(temb)).reshape(t.shape[0], 6, -1)


# --- the model ----------------------------------------------------------------------------------------


class PassTokens(NamedTuple):
    """One pass's embedded input: what every block needs besides the context (the
    :class:`~mlx_i2v.seams.PassTokens` of Wan's seams).

    Attributes:
        x: (B, L, dim) patch tokens in (f, h, w) order.
        grid: (F', H', W') token grid.
        time_index: (B, 1) or (B, L) index of each row's / token's timestep into ``temb``.
        temb: (U, dim) embeddings of the U distinct timesteps.
        time_proj: (U, 6, dim) their modulation projections.
        rope: cos, sin (L, head_dim / 2).
        gather_kv: None when x holds every token; for a shard of them (sequence parallelism), how
            self-attention gets the keys and values of the whole sequence.
    """

    x: mx.array
    grid: tuple[int, int, int]
    time_index: mx.array
    temb: mx.array
    time_proj: mx.array
    rope: tuple[mx.array, mx.array]
    gather_kv: GatherKV | None = None

    def take_rows(self, picked: mx.array) -> PassTokens:
        """The rows ``picked`` of the batch (a step cache's computing branches)."""
        return self._replace(x=self.x[picked], time_index=self.time_index[picked])


class WanTransformer3DModel(nn.Module):
    """Wan DiT predicting the flow velocity for a latent video.

    Call ``model(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image)``, or embed
    the step-invariant conditioning once with :meth:`embed_context` and pass ``context=`` every step.
    The compute dtype is the dtype the weights were loaded in (see :func:`load_wan_transformer`).
    """

    def __init__(self, config: WanTransformerConfig):
        super().__init__()
        self.config = config
        dim = config.inner_dim
        self.rope = WanRotaryPosEmbed(config.attention_head_dim, config.rope_max_seq_len)
        self.patch_embedding = nn.Conv3d(
            config.in_channels, dim, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.condition_embedder = WanTimeTextImageEmbedding(config)
        self.blocks = [WanTransformerBlock(config) for _ in range(config.num_layers)]
        self.norm_out = FP32LayerNorm(dim, eps=config.eps, affine=False)
        self.proj_out = nn.Linear(dim, config.out_channels * config.patch_volume)
        self.scale_shift_table = mx.zeros((1, 2, dim))

    @property
    def dtype(self) -> mx.Dtype:
        """The compute dtype (that of the patch embedding, which is never kept in float32)."""
        return self.patch_embedding.weight.dtype

    def embed_context(
        self, encoder_hidden_states: mx.array, encoder_hidden_states_image: mx.array | None = None
    ) -> mx.array:
        """Project the conditioning to the model width once per generation.

        Args:
            encoder_hidden_states: (B, L_text, text_dim) UMT5 states (512 tokens for the I2V/FLF2V models,
                whose cross-attention takes the last 512 context tokens as text).
            encoder_hidden_states_image: (B, L_img, image_dim) CLIP penultimate states, or for FLF2V
                (2B, L_img, image_dim) with each sample's first- and last-frame images adjacent.

        Returns:
            context (B, L_img' + L_text, dim) in the compute dtype, image tokens first.
        """
        embedder = self.condition_embedder
        context = embedder.text_embedder(encoder_hidden_states.astype(self.dtype))
        if encoder_hidden_states_image is not None:
            if "image_embedder" not in embedder:
                raise ValueError("this transformer has no image embedder (image_dim is None)")
            image = embedder.image_embedder(encoder_hidden_states_image.astype(self.dtype))
            context = mx.concatenate([image, context], axis=1)
        return context

    def cross_attention_cache(
        self, context: mx.array, text_tokens: int = TEXT_CONTEXT_LENGTH, bias: mx.array | None = None
    ) -> list[CrossKV]:
        """Every block's cross-attention keys and values for ``context`` (from :meth:`embed_context`);
        ``text_tokens`` and ``bias`` as :meth:`WanAttention.project_kv` takes them.

        They do not change between denoising steps; pass the list as ``context=`` to skip recomputing
        2 x num_layers projections of all context tokens per step. Costs 2 * num_layers * B * L_ctx * dim
        values of memory (about 0.4 GB for TI2V-5B in bfloat16 with guidance).
        """
        return [block.attn2.project_kv(context, text_tokens, bias) for block in self.blocks]

    def step_context(
        self, encoder_hidden_states: mx.array, encoder_hidden_states_image: mx.array | None = None
    ) -> list[CrossKV]:
        """What the blocks take from the conditioning at every denoising step, computed once per generation:
        :meth:`embed_context`, then :meth:`cross_attention_cache`, with the text's padding folded.

        diffusers pads each prompt's UMT5 states with zero rows up to 512 (``_get_t5_prompt_embeds``), and
        Wan's cross-attention attends to every row. The n rows after the longest prompt are zero in every
        sample, so they give n equal keys and values: they are kept as one, whose score gets log n
        (n exp(s) = exp(s + log n)). The softmax is the same to float32 rounding, with a fraction of the
        cross-attention's work (a 20-token prompt: 21 keys instead of 512). Folded only where the attention
        adds that bias in float32 (:func:`~..attention.adds_mask_in_float32`; MLX's fused GPU kernels round
        it to the compute dtype), and, with an image branch, for a text of exactly 512 rows (the reference's
        routing).

        Args:
            encoder_hidden_states, encoder_hidden_states_image: as :meth:`embed_context` takes them.

        Returns:
            one :class:`CrossKV` per block, to pass as ``context=``.
        """
        text, image = encoder_hidden_states, encoder_hidden_states_image
        repeats = trailing_zero_rows(text) if adds_mask_in_float32(self.dtype) else 0
        if repeats < 2 or (image is not None and text.shape[1] != TEXT_CONTEXT_LENGTH):
            return self.cross_attention_cache(self.embed_context(text, image))
        kept = text.shape[1] - repeats + 1
        bias = np.zeros(kept, np.float32)
        bias[-1] = math.log(repeats)  # n equal keys weigh n exp(s) = exp(s + log n)
        return self.cross_attention_cache(self.embed_context(text[:, :kept], image), kept, mx.array(bias))

    def _timestep_index(
        self, timestep: mx.array | np.ndarray, batch: int, num_tokens: int
    ) -> tuple[mx.array, mx.array]:
        """Distinct timesteps (U,) float32 and the (B, T) index of each row's (T = 1) or token's (T = L)
        timestep into them.

        Per-token timesteps (TI2V) take only a few distinct values (0 on the conditioning frame, t
        elsewhere), so the time MLP and its 6*dim projection run once per value instead of once per token.
        """
        if isinstance(timestep, mx.array):
            timestep = timestep.astype(mx.float32)  # numpy has no bfloat16
        t = np.asarray(timestep, dtype=np.float32)  # the reference casts to float32 before the sinusoid
        if t.shape not in ((batch,), (batch, 1), (batch, num_tokens)):
            raise ValueError(f"timestep must be ({batch},) or ({batch}, {num_tokens}), got {t.shape}")
        t = t.reshape(batch, -1)
        values, index = np.unique(t, return_inverse=True)
        return mx.array(values), mx.array(index.reshape(t.shape).astype(np.int32))

    def __call__(
        self,
        hidden_states: mx.array,
        timestep: mx.array | np.ndarray,
        encoder_hidden_states: mx.array | None = None,
        encoder_hidden_states_image: mx.array | None = None,
        *,
        context: mx.array | list[CrossKV] | None = None,
    ) -> mx.array:
        """Predict the velocity.

        Args:
            hidden_states: (B, F, H, W, in_channels) latents; F, H, W divisible by the patch size.
            timestep: (B,) one timestep per sample, or (B, F/pt * H/ph * W/pw) one per token in (f, h, w)
                order (TI2V / diffusers ``expand_timesteps``).
            encoder_hidden_states: (B, L_text, text_dim); omit when passing ``context``.
            encoder_hidden_states_image: (B, L_img, image_dim) or None; see :meth:`embed_context`.
            context: the output of :meth:`embed_context` (or of :meth:`cross_attention_cache`), instead of
                the two previous arguments.

        Returns:
            (B, F, H, W, out_channels) in the compute dtype.
        """
        if (context is None) == (encoder_hidden_states is None):
            raise ValueError("pass exactly one of encoder_hidden_states and context")
        if context is None:
            context = self.embed_context(encoder_hidden_states, encoder_hidden_states_image)
        elif encoder_hidden_states_image is not None:
            raise ValueError("encoder_hidden_states_image is already part of context")
        tokens = self.embed(hidden_states, timestep)
        x = self.run_blocks(tokens.x, tokens, context)
        return self.head(x, tokens)

    # A pass in three parts, so that a step cache can skip blocks and a parallel mode can split tokens:
    # ``embed`` (patch embedding, time embedding, RoPE tables) -> ``run_blocks`` -> ``head``.

    def embed(self, hidden_states: mx.array, timestep: mx.array | np.ndarray) -> PassTokens:
        """Patch-embed the latents and embed the timesteps: the input of the blocks.

        Args:
            hidden_states: (B, F, H, W, in_channels) latents, as for ``__call__``.
            timestep: (B,) or (B, tokens), as for ``__call__``.
        """
        B, F, H, W, _ = hidden_states.shape
        pt, ph, pw = self.config.patch_size
        if F % pt or H % ph or W % pw:
            raise ValueError(f"latent size {(F, H, W)} is not divisible by the patch size {(pt, ph, pw)}")
        grid = (F // pt, H // ph, W // pw)
        x = self.patch_embedding(hidden_states.astype(self.dtype))
        x = x.reshape(B, -1, x.shape[-1])
        t_values, t_index = self._timestep_index(timestep, B, x.shape[1])
        temb, time_proj = self.condition_embedder.embed_time(t_values, self.dtype)
        return PassTokens(x, grid, t_index, temb, time_proj, self.rope(grid))

    def run_blocks(
        self,
        x: mx.array,
        tokens: PassTokens,
        context: mx.array | list[CrossKV],
        blocks: slice = slice(None),
    ) -> mx.array:
        """Run ``self.blocks[blocks]`` on x (B, L, dim); context as for ``__call__`` (its per-block K/V
        list is indexed the same way)."""
        indices = range(len(self.blocks))[blocks]
        for i in indices:
            block_context = context[i] if isinstance(context, list) else context
            x = self.blocks[i](x, block_context, tokens.time_proj, tokens.time_index, tokens.rope, tokens.gather_kv)
            # On the CPU each block's output is evaluated here, once the block's own references are gone: else
            # its feed-forward's tail is evaluated with the next block's self-attention, at a higher peak
            # (benchmarks/README.md, "Each block's output evaluated").
            evaluate_on_cpu(x)
        return x

    def head(self, x: mx.array, tokens: PassTokens) -> mx.array:
        """The output norm, modulation and projection, unpatchified: (B, L, dim) -> (B, F, H, W, C_out)."""
        return self.unpatchify(self.project_out(x, tokens), tokens.grid)

    def project_out(self, x: mx.array, tokens: PassTokens) -> mx.array:
        """The output norm, modulation and projection per token: (B, L, dim) -> (B, L, pt*ph*pw*C_out)."""
        mod = modulation(self.scale_shift_table, tokens.temb[:, None])
        shift, scale = modulation_rows(mod, tokens.time_index, 0, 1)
        x = modulate(self.norm_out(x.astype(mx.float32)), scale, shift).astype(x.dtype)
        return self.proj_out(x)

    def unpatchify(self, x: mx.array, grid: tuple[int, int, int]) -> mx.array:
        """Per-token outputs (B, L, pt*ph*pw*C_out) of a (F', H', W') grid -> (B, F'*pt, H'*ph, W'*pw, C_out)."""
        # proj_out features are ordered (pt, ph, pw, C)
        B = x.shape[0]
        pt, ph, pw = self.config.patch_size
        x = x.reshape(B, *grid, pt, ph, pw, -1)
        x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
        return x.reshape(B, grid[0] * pt, grid[1] * ph, grid[2] * pw, -1)


# --- weights ------------------------------------------------------------------------------------------

DIFFUSERS_MAP = WeightMap(
    name="transformer (diffusers)",
    rules=(Rule(r"patch_embedding\.weight", transform=conv_weight), IDENTITY),
    # diffusers' ``_keys_to_ignore_on_load_unexpected``: some converted checkpoints carry an unused q norm
    ignore=(r".*\.norm_added_q\..*",),
)

# diffusers' ``_keep_in_fp32_modules`` ("rope" has no parameters), matched as whole name components.
KEEP_FLOAT32 = (r"(^|\.)(time_embedder|scale_shift_table|norm1|norm2|norm3)(\.|$)",)


TRANSFORMER = ComponentType(
    "transformer",
    build=lambda config: WanTransformer3DModel(config_from_dict(WanTransformerConfig, config)),
    source_map=lambda model: DIFFUSERS_MAP,
    keep_float32=lambda dtype: KEEP_FLOAT32,
    quantize=quantize_transformer,
)


def load_wan_transformer(
    folder: str | Path, dtype: mx.Dtype, *, quantize: Quantization | None = None
) -> WanTransformer3DModel:
    """Load a ``transformer/`` (or ``transformer_2/``) folder: config.json plus a single or sharded
    safetensors checkpoint, in diffusers or converted MLX layout. Weights are cast to ``dtype`` except the
    float32 islands; ``quantize`` quantizes a float checkpoint on load (see :mod:`mlx_i2v.quantize`).

    Raises:
        WeightLoadError: unreadable config or checkpoint, or missing/unexpected/mis-shaped tensors.
    """
    return load_component(TRANSFORMER, folder, dtype, quantize=quantize)


# === Wan-AI original layout (``WanModel``) ============================================================
# The Wan-AI repos (Wan2.1-I2V/FLF2V, Wan2.2-TI2V-5B, Wan2.2-I2V-A14B high/low_noise_model) ship the DiT
# as ``WanModel`` safetensors; names follow ``wan/modules/model.py`` (wan.md §4.1). The table maps them
# straight to our parameters; tensors keep their shapes (no transposes besides the patch conv), exactly as
# diffusers' converter keeps them.

ORIGINAL_MAP = WeightMap(
    name="transformer (Wan-AI original)",
    rules=(
        Rule(r"patch_embedding\.weight", transform=conv_weight),
        Rule(r"patch_embedding\.bias"),
        # Sequential(Linear, SiLU, Linear) / Sequential(Linear, GELU(tanh), Linear) / Sequential(SiLU, Linear)
        Rule(r"time_embedding\.0\.(weight|bias)", r"condition_embedder.time_embedder.linear_1.\1"),
        Rule(r"time_embedding\.2\.(weight|bias)", r"condition_embedder.time_embedder.linear_2.\1"),
        Rule(r"text_embedding\.0\.(weight|bias)", r"condition_embedder.text_embedder.linear_1.\1"),
        Rule(r"text_embedding\.2\.(weight|bias)", r"condition_embedder.text_embedder.linear_2.\1"),
        Rule(r"time_projection\.1\.(weight|bias)", r"condition_embedder.time_proj.\1"),
        # MLPProj (I2V/FLF2V): Sequential(LayerNorm, Linear, GELU, Linear, LayerNorm)
        Rule(r"img_emb\.proj\.0\.(weight|bias)", r"condition_embedder.image_embedder.norm1.\1"),
        Rule(r"img_emb\.proj\.1\.(weight|bias)", r"condition_embedder.image_embedder.ff.net.0.proj.\1"),
        Rule(r"img_emb\.proj\.3\.(weight|bias)", r"condition_embedder.image_embedder.ff.net.2.\1"),
        Rule(r"img_emb\.proj\.4\.(weight|bias)", r"condition_embedder.image_embedder.norm2.\1"),
        Rule(r"img_emb\.emb_pos", "condition_embedder.image_embedder.pos_embed"),  # FLF2V
        Rule(r"blocks\.(\d+)\.modulation", r"blocks.\1.scale_shift_table"),
        Rule(r"blocks\.(\d+)\.self_attn\.([qkv])\.(weight|bias)", r"blocks.\1.attn1.to_\2.\3"),
        Rule(r"blocks\.(\d+)\.self_attn\.o\.(weight|bias)", r"blocks.\1.attn1.to_out.0.\2"),
        Rule(r"blocks\.(\d+)\.self_attn\.(norm_[qk])\.weight", r"blocks.\1.attn1.\2.weight"),
        Rule(r"blocks\.(\d+)\.cross_attn\.([qkv])\.(weight|bias)", r"blocks.\1.attn2.to_\2.\3"),
        Rule(r"blocks\.(\d+)\.cross_attn\.o\.(weight|bias)", r"blocks.\1.attn2.to_out.0.\2"),
        Rule(r"blocks\.(\d+)\.cross_attn\.(norm_[qk])\.weight", r"blocks.\1.attn2.\2.weight"),
        # Wan2.1 I2V/FLF2V image K/V branch (WanI2VCrossAttention)
        Rule(r"blocks\.(\d+)\.cross_attn\.([kv])_img\.(weight|bias)", r"blocks.\1.attn2.add_\2_proj.\3"),
        Rule(r"blocks\.(\d+)\.cross_attn\.norm_k_img\.weight", r"blocks.\1.attn2.norm_added_k.weight"),
        # The naming swap (wan.md §0.9): the original applies norm1, norm3 (affine, before cross-attention),
        # norm2 (no affine, before the FFN); diffusers calls them norm1, norm2, norm3. Only the affine one
        # has tensors, so the original's parameter-free norm2 needs no rule.
        Rule(r"blocks\.(\d+)\.norm3\.(weight|bias)", r"blocks.\1.norm2.\2"),
        Rule(r"blocks\.(\d+)\.ffn\.0\.(weight|bias)", r"blocks.\1.ffn.net.0.proj.\2"),
        Rule(r"blocks\.(\d+)\.ffn\.2\.(weight|bias)", r"blocks.\1.ffn.net.2.\2"),
        Rule(r"head\.head\.(weight|bias)", r"proj_out.\1"),
        Rule(r"head\.modulation", "scale_shift_table"),
    ),
    # WanModel keeps its RoPE table ``freqs`` as an attribute, so the released files lack it; a re-save
    # that registered it as a buffer must still load (the table is recomputed here).
    ignore=(r"freqs",),
)

# ComfyUI single-file repacks of the same weights prefix every key with this (diffusers strips it too,
# ``single_file_utils.convert_wan_transformer_to_diffusers``).
COMFYUI_PREFIX = "model.diffusion_model."


def strip_prefix(tensors: Mapping[str, mx.array], prefix: str = COMFYUI_PREFIX) -> dict[str, mx.array]:
    """Drop ``prefix`` from the keys that carry it, so ``ORIGINAL_MAP.apply(strip_prefix(tensors))`` loads
    a ComfyUI repack. Keys without the prefix pass through unchanged (and so still have to be claimed by
    the map: a file bundling other components fails loudly, naming them).

    Raises:
        WeightLoadError: a key occurs both with and without the prefix.
    """
    out: dict[str, mx.array] = {}
    for key, value in tensors.items():
        name = key[len(prefix) :] if key.startswith(prefix) else key
        if name in out:
            raise WeightLoadError(f"transformer: {name} occurs both with and without the {prefix!r} prefix")
        out[name] = value
    return out
# === end of the Wan-AI original layout ================================================================
