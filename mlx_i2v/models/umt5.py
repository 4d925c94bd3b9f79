"""UMT5 text encoder (the encoder half of google/umt5-xxl), as transformers' ``UMT5EncoderModel``.

Module and parameter names follow transformers so the checkpoint map is a plain rename-free table:
``shared``, ``encoder.block.N.layer.0.SelfAttention.{q,k,v,o,relative_attention_bias}``,
``encoder.block.N.layer.0.layer_norm``, ``encoder.block.N.layer.1.DenseReluDense.{wi_0,wi_1,wo}``,
``encoder.block.N.layer.1.layer_norm``, ``encoder.final_layer_norm``.

What differs from a textbook transformer, all taken from ``transformers/models/umt5/modeling_umt5.py``:

* every layer owns its relative position bias (T5 shares layer 0's);
* q·k is not scaled; the bias and the key padding mask are the only additive terms;
* the FFN is gated with the tanh GELU ("gelu_new");
* RMSNorm without mean subtraction, variance accumulated in float32.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..components import ComponentType, load_component
from ..errors import InvalidInputError, WeightLoadError
from ..quantize import Quantization, quantize_text_encoder
from ..weights import Rule, WeightMap, config_from_dict
from .attention import attention
from .elementwise import gelu_tanh

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UMT5Config:
    """The fields of transformers' ``UMT5Config`` the encoder uses (defaults are transformers')."""

    vocab_size: int = 250112
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 1024
    num_layers: int = 8
    num_heads: int = 6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    def __post_init__(self) -> None:
        # Every Wan text encoder is gated-gelu; other variants have different parameter names (``wi``).
        if self.feed_forward_proj != "gated-gelu":
            raise WeightLoadError(
                f"UMT5 feed_forward_proj={self.feed_forward_proj!r} is not supported (only 'gated-gelu')"
            )


def _clamp_fp16(x: mx.array) -> mx.array:
    """transformers clamps float16 hidden states after each sub-layer so infinities cannot spread."""
    if x.dtype != mx.float16:
        return x
    big = mx.finfo(mx.float16).max
    limit = mx.where(mx.any(mx.isinf(x)), big - 1000, big)
    return mx.clip(x, -limit, limit)


class UMT5LayerNorm(nn.Module):
    """T5 RMSNorm: ``weight * x / sqrt(mean(x^2) + eps)`` with float32 accumulation and no bias."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        variance = mx.mean(mx.square(x.astype(mx.float32)), axis=-1, keepdims=True)
        x = x * mx.rsqrt(variance + self.eps)
        # The reference rounds to the weight's half dtype *before* scaling by it; follow its rounding.
        if self.weight.dtype in (mx.float16, mx.bfloat16):
            x = x.astype(self.weight.dtype)
        return self.weight * x


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> mx.array:
    """Bidirectional T5 buckets for ``memory_position - query_position``: (length, length) int32.

    Half the buckets are for keys after the query; of each half, the first ``num_buckets // 4`` are
    exact offsets and the rest log-spaced up to ``max_distance`` (everything further shares the last).
    """
    positions = mx.arange(length)
    relative = positions[None, :] - positions[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).astype(mx.int32) * half
    distance = mx.abs(relative)
    max_exact = half // 2
    # float32 like the reference; log(0) for distance 0 is discarded by the `where` below.
    log_ratio = mx.log(distance.astype(mx.float32) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (half - max_exact)).astype(mx.int32)
    large = mx.minimum(large, half - 1)
    return buckets + mx.where(distance < max_exact, distance, large)


class UMT5Attention(nn.Module):
    """Self-attention with this layer's own relative position bias and no 1/sqrt(d) scaling."""

    def __init__(self, config: UMT5Config):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.d_kv
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        inner = config.num_heads * config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)

    def position_bias(self, buckets: mx.array, key_mask: mx.array) -> mx.array:
        """Additive attention bias (B, heads, L, L) from buckets (L, L) and a boolean key mask (B, L).

        Masked keys get the dtype's most negative value, as transformers' SDPA path does.
        """
        bias = self.relative_attention_bias(buckets).transpose(2, 0, 1)[None]
        return mx.where(key_mask[:, None, None, :], bias, mx.finfo(bias.dtype).min)

    def __call__(self, x: mx.array, buckets: mx.array, key_mask: mx.array) -> mx.array:
        """x: (B, L, d_model) -> (B, L, d_model)."""
        B, L, _ = x.shape

        def heads(t: mx.array) -> mx.array:
            return t.reshape(B, L, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        out = attention(q, k, v, scale=1.0, mask=self.position_bias(buckets, key_mask))
        return self.o(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class UMT5LayerSelfAttention(nn.Module):
    """Pre-norm residual self-attention: ``x + attn(norm(x))``."""

    def __init__(self, config: UMT5Config):
        super().__init__()
        self.SelfAttention = UMT5Attention(config)
        self.layer_norm = UMT5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def __call__(self, x: mx.array, buckets: mx.array, key_mask: mx.array) -> mx.array:
        return x + self.SelfAttention(self.layer_norm(x), buckets, key_mask)


class UMT5DenseGatedActDense(nn.Module):
    """``wo(gelu_tanh(wi_0(x)) * wi_1(x))``."""

    def __init__(self, config: UMT5Config):
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        h = gelu_tanh(self.wi_0(x)) * self.wi_1(x)
        # ``wo`` is float32 in float16 models (see load_umt5); the reference casts its input up to match.
        wo = self.wo
        # A quantized ``wo`` holds uint32 codes; its float dtype is that of its scales.
        dtype = wo.scales.dtype if isinstance(wo, nn.QuantizedLinear) else wo.weight.dtype
        return wo(h.astype(dtype))


class UMT5LayerFF(nn.Module):
    """Pre-norm residual FFN: ``x + ffn(norm(x))``."""

    def __init__(self, config: UMT5Config):
        super().__init__()
        self.DenseReluDense = UMT5DenseGatedActDense(config)
        self.layer_norm = UMT5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def __call__(self, x: mx.array) -> mx.array:
        return x + self.DenseReluDense(self.layer_norm(x))


class UMT5Block(nn.Module):
    """``layer`` = [self-attention, FFN], named as in transformers (decoders put cross-attention between)."""

    def __init__(self, config: UMT5Config):
        super().__init__()
        self.layer = [UMT5LayerSelfAttention(config), UMT5LayerFF(config)]

    def __call__(self, x: mx.array, buckets: mx.array, key_mask: mx.array) -> mx.array:
        x = _clamp_fp16(self.layer[0](x, buckets, key_mask))
        return _clamp_fp16(self.layer[1](x))


class UMT5Stack(nn.Module):
    """Holds the blocks and final norm under ``encoder.`` as transformers names them."""

    def __init__(self, config: UMT5Config):
        super().__init__()
        self.block = [UMT5Block(config) for _ in range(config.num_layers)]
        self.final_layer_norm = UMT5LayerNorm(config.d_model, config.layer_norm_epsilon)


class UMT5Encoder(nn.Module):
    """transformers' ``UMT5EncoderModel``: token ids -> ``last_hidden_state``."""

    def __init__(self, config: UMT5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = UMT5Stack(config)

    def __call__(self, input_ids: mx.array, attention_mask: mx.array) -> mx.array:
        """input_ids, attention_mask: (B, L) integers (mask 1 = real token, 0 = padding).

        Returns ``last_hidden_state`` (B, L, d_model) in the weights' dtype. Padded positions still get
        values (they attend to the real tokens only), exactly as in the reference.
        """
        key_mask = attention_mask > 0
        config = self.config
        buckets = relative_position_buckets(
            input_ids.shape[1], config.relative_attention_num_buckets, config.relative_attention_max_distance
        )
        x = self.shared(input_ids)
        for block in self.encoder.block:
            x = block(x, buckets, key_mask)
        return self.encoder.final_layer_norm(x)


# transformers' safetensors layout. ``encoder.embed_tokens.weight`` is tied to ``shared.weight``; files
# written by transformers may or may not repeat it, and the copy is never needed.
DIFFUSERS_MAP = WeightMap(
    name="umt5 (transformers)",
    rules=(
        Rule(r"shared\.weight"),
        Rule(r"encoder\.block\.\d+\.layer\.[01]\..+"),
        Rule(r"encoder\.final_layer_norm\.weight"),
    ),
    ignore=(r"encoder\.embed_tokens\.weight",),
)


def _keep_float32(dtype: mx.Dtype) -> tuple[str, ...]:
    # transformers' ``_keep_in_fp32_modules = ["wo"]`` applies to float16 only; the norms follow ``dtype``
    # in the reference too.
    return (r"DenseReluDense\.wo\.",) if dtype == mx.float16 else ()


TEXT_ENCODER = ComponentType(
    "text_encoder",
    build=lambda config: UMT5Encoder(config_from_dict(UMT5Config, config)),
    source_map=lambda model: DIFFUSERS_MAP,
    keep_float32=_keep_float32,
    quantize=quantize_text_encoder,
)


def load_umt5(folder: str | Path, dtype: mx.Dtype, *, quantize: Quantization | None = None) -> UMT5Encoder:
    """Build a :class:`UMT5Encoder` from a ``text_encoder/`` folder (config.json + safetensors, transformers
    or MLX layout), casting weights to ``dtype``; ``quantize`` quantizes a float checkpoint on load."""
    return load_component(TEXT_ENCODER, folder, dtype, quantize=quantize)


def encode_prompts(
    encoder: UMT5Encoder,
    input_ids: mx.array | np.ndarray,
    attention_mask: mx.array | np.ndarray,
    max_length: int = 512,
) -> mx.array:
    """Prompt embeddings as diffusers' Wan ``_get_t5_prompt_embeds`` builds them.

    input_ids, attention_mask: (B, L) with L <= ``max_length``, right-padded. The encoder runs with the
    mask; each row is then cut to its real length and zero-padded back to ``max_length``, so the
    transformer later sees exact zeros at padded positions. Returns (B, max_length, d_model).
    """
    input_ids, attention_mask = mx.array(input_ids), mx.array(attention_mask)
    L = input_ids.shape[1]
    if L > max_length:
        raise InvalidInputError(f"{L} prompt tokens do not fit max_length={max_length}")
    hidden = encoder(input_ids, attention_mask)
    lengths = mx.sum(attention_mask > 0, axis=1)
    real = mx.arange(L)[None, :] < lengths[:, None]
    hidden = mx.where(real[..., None], hidden, mx.zeros((), dtype=hidden.dtype))
    return mx.pad(hidden, [(0, 0), (0, max_length - L), (0, 0)])


# === Wan-AI original layout (``models_t5_umt5-xxl-enc-bf16.pth``) =====================================
# The Wan-AI repos ship the umt5-xxl encoder as a bf16 ``torch.save`` state dict of ``T5Encoder``
# (wan/modules/t5.py, ``shared_pos=False``: every block owns its relative position table); read it with
# :func:`mlx_i2v.pth.read_pth`. Shapes are transformers' (wan.md §4.4, verified numerically in §4.5).
# The original FFN is ``fc2(fc1(x) * gelu_tanh(gate(x)))``, so ``gate.0`` is transformers' ``wi_0`` (the
# activated branch) and ``fc1`` its ``wi_1``.
ORIGINAL_MAP = WeightMap(
    name="umt5 (Wan-AI original)",
    rules=(
        Rule(r"token_embedding\.weight", "shared.weight"),
        Rule(r"blocks\.(\d+)\.norm1\.weight", r"encoder.block.\1.layer.0.layer_norm.weight"),
        Rule(r"blocks\.(\d+)\.attn\.([qkvo])\.weight", r"encoder.block.\1.layer.0.SelfAttention.\2.weight"),
        Rule(
            r"blocks\.(\d+)\.pos_embedding\.embedding\.weight",
            r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias.weight",
        ),
        Rule(r"blocks\.(\d+)\.norm2\.weight", r"encoder.block.\1.layer.1.layer_norm.weight"),
        Rule(r"blocks\.(\d+)\.ffn\.gate\.0\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wi_0.weight"),
        Rule(r"blocks\.(\d+)\.ffn\.fc1\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wi_1.weight"),
        Rule(r"blocks\.(\d+)\.ffn\.fc2\.weight", r"encoder.block.\1.layer.1.DenseReluDense.wo.weight"),
        Rule(r"norm\.weight", "encoder.final_layer_norm.weight"),
    ),
)
# === end of the Wan-AI original layout ================================================================
