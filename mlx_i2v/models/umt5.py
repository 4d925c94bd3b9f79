"""T5-family text encoders: UMT5 (google/umt5-xxl, the Wan pipelines) and T5 v1.1 (google/t5-v1_1-xxl,
the LTX-Video pipelines), as transformers' ``UMT5EncoderModel`` and ``T5EncoderModel``.

Module and parameter names follow transformers so the checkpoint map is a plain rename-free table:
``shared``, ``encoder.block.N.layer.0.SelfAttention.{q,k,v,o,relative_attention_bias}``,
``encoder.block.N.layer.0.layer_norm``, ``encoder.block.N.layer.1.DenseReluDense.{wi_0,wi_1,wo}``,
``encoder.block.N.layer.1.layer_norm``, ``encoder.final_layer_norm``.

What differs from a textbook transformer, all taken from ``transformers/models/{umt5,t5}/modeling_*.py``:

* relative position bias: every UMT5 layer owns one; T5 has it in layer 0 only, and every layer adds
  layer 0's (``T5Block(has_relative_attention_bias=bool(i == 0))``). Nothing else differs between the two
  encoders, so :class:`T5Encoder` is :class:`UMT5Encoder` with that one switch;
* q·k is not scaled; the bias and the key padding mask are the only additive terms;
* the FFN is gated with the tanh GELU ("gelu_new"; T5 v1.1's "gated-gelu");
* RMSNorm without mean subtraction, variance accumulated in float32.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

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
    """The fields of transformers' ``UMT5Config`` the encoder uses (defaults are transformers').

    transformers' ``T5Config`` has the same fields; a T5 ``config.json`` is read into this class too.
    """

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
    """Self-attention with an additive relative position bias and no 1/sqrt(d) scaling.

    ``has_relative_attention_bias``: whether this layer owns a bias table (every UMT5 layer; T5's layer 0).
    """

    def __init__(self, config: UMT5Config, has_relative_attention_bias: bool = True):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.d_kv
        inner = config.num_heads * config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        self.has_relative_attention_bias = has_relative_attention_bias
        if has_relative_attention_bias:
            buckets, heads = config.relative_attention_num_buckets, config.num_heads
            self.relative_attention_bias = nn.Embedding(buckets, heads)

    def position_bias(self, buckets: mx.array, key_mask: mx.array) -> mx.array:
        """Additive attention bias (B, heads, L, L) from buckets (L, L) and a boolean key mask (B, L).

        Masked keys get the dtype's most negative value, as transformers' SDPA path does.
        """
        bias = self.relative_attention_bias(buckets).transpose(2, 0, 1)[None]
        return mx.where(key_mask[:, None, None, :], bias, mx.finfo(bias.dtype).min)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        """x: (B, L, d_model), bias: (B, heads, L, L) from :meth:`position_bias` -> (B, L, d_model)."""
        B, L, _ = x.shape

        def heads(t: mx.array) -> mx.array:
            return t.reshape(B, L, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        out = attention(q, k, v, scale=1.0, mask=bias)
        return self.o(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class UMT5LayerSelfAttention(nn.Module):
    """Pre-norm residual self-attention: ``x + attn(norm(x))``."""

    def __init__(self, config: UMT5Config, has_relative_attention_bias: bool = True):
        super().__init__()
        self.SelfAttention = UMT5Attention(config, has_relative_attention_bias)
        self.layer_norm = UMT5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        return x + self.SelfAttention(self.layer_norm(x), bias)


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

    def __init__(self, config: UMT5Config, has_relative_attention_bias: bool = True):
        super().__init__()
        self.layer = [UMT5LayerSelfAttention(config, has_relative_attention_bias), UMT5LayerFF(config)]

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        x = _clamp_fp16(self.layer[0](x, bias))
        return _clamp_fp16(self.layer[1](x))


class UMT5Stack(nn.Module):
    """Holds the blocks and final norm under ``encoder.`` as transformers names them."""

    def __init__(self, config: UMT5Config, bias_in_every_layer: bool):
        super().__init__()
        self.block = [UMT5Block(config, bias_in_every_layer or i == 0) for i in range(config.num_layers)]
        self.final_layer_norm = UMT5LayerNorm(config.d_model, config.layer_norm_epsilon)


class UMT5Encoder(nn.Module):
    """transformers' ``UMT5EncoderModel``: token ids -> ``last_hidden_state``."""

    # Whether every layer owns a relative position bias (UMT5) or all reuse layer 0's (T5).
    bias_in_every_layer = True

    def __init__(self, config: UMT5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = UMT5Stack(config, self.bias_in_every_layer)

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
        bias = None
        for block in self.encoder.block:
            attention_layer = block.layer[0].SelfAttention
            if attention_layer.has_relative_attention_bias:  # otherwise reuse the last one (T5: layer 0's)
                bias = attention_layer.position_bias(buckets, key_mask)
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)


class T5Encoder(UMT5Encoder):
    """transformers' ``T5EncoderModel`` (T5 v1.1): layer 0's relative position bias serves every layer."""

    bias_in_every_layer = False


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


def _builder(encoder: type[UMT5Encoder], model_type: str) -> Callable[[Mapping[str, Any]], UMT5Encoder]:
    """config.json -> ``encoder``, refusing a config.json of the other family (a UMT5 checkpoint read as T5
    would otherwise fail only later, on its per-layer bias tables, or not at all with one layer)."""

    def build(config: Mapping[str, Any]) -> UMT5Encoder:
        found = config.get("model_type", model_type)
        if found != model_type:
            raise WeightLoadError(
                f"text_encoder: config.json has model_type {found!r}, expected {model_type!r} "
                f"({encoder.__name__})"
            )
        return encoder(config_from_dict(UMT5Config, config))

    return build


TEXT_ENCODER = ComponentType(
    "text_encoder",
    build=_builder(UMT5Encoder, "umt5"),
    source_map=lambda model: DIFFUSERS_MAP,
    keep_float32=_keep_float32,
    quantize=quantize_text_encoder,
)

# The LTX-Video repos' ``text_encoder/`` is transformers' ``T5EncoderModel`` of google/t5-v1_1-xxl: the
# same tensor names (only block 0 holds ``relative_attention_bias``), the same fp32 ``wo`` island.
T5_MAP = WeightMap(name="t5 (transformers)", rules=DIFFUSERS_MAP.rules, ignore=DIFFUSERS_MAP.ignore)

T5_TEXT_ENCODER = ComponentType(
    "text_encoder",
    build=_builder(T5Encoder, "t5"),
    source_map=lambda model: T5_MAP,
    keep_float32=_keep_float32,
    quantize=quantize_text_encoder,
)


def load_umt5(folder: str | Path, dtype: mx.Dtype, *, quantize: Quantization | None = None) -> UMT5Encoder:
    """Build a :class:`UMT5Encoder` from a ``text_encoder/`` folder (config.json + safetensors, transformers
    or MLX layout), casting weights to ``dtype``; ``quantize`` quantizes a float checkpoint on load."""
    return load_component(TEXT_ENCODER, folder, dtype, quantize=quantize)


def load_t5(folder: str | Path, dtype: mx.Dtype, *, quantize: Quantization | None = None) -> T5Encoder:
    """Build a :class:`T5Encoder` from a T5 ``text_encoder/`` folder (LTX-Video), as :func:`load_umt5`."""
    return load_component(T5_TEXT_ENCODER, folder, dtype, quantize=quantize)


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

    The encoder runs on the longest prompt's tokens only: with the padding masked out of every key, a real
    token's output depends on the real tokens alone (T5's position bias is a function of the distance
    between two tokens, not of the sequence length), and the padded rows are zeroed anyway. The reference
    encodes all 512 positions; a prompt of 20 tokens costs ~25x fewer FLOPs this way, with the same rows.
    """
    input_ids, attention_mask = mx.array(input_ids), mx.array(attention_mask)
    L = input_ids.shape[1]
    if L > max_length:
        raise InvalidInputError(f"{L} prompt tokens do not fit max_length={max_length}")
    # One past the last real token of any row (the same as the longest length when right-padded).
    L = max(1, int(mx.max((attention_mask > 0) * mx.arange(1, L + 1)).item()))
    input_ids, attention_mask = input_ids[:, :L], attention_mask[:, :L]
    hidden = encoder(input_ids, attention_mask)
    lengths = mx.sum(attention_mask > 0, axis=1)
    real = mx.arange(L)[None, :] < lengths[:, None]
    hidden = mx.where(real[..., None], hidden, mx.zeros((), dtype=hidden.dtype))
    return mx.pad(hidden, [(0, 0), (0, max_length - L), (0, 0)])


@dataclass(frozen=True)
class MaskedPromptEncoding:
    """How an LTX pipeline's ``_get_t5_prompt_embeds`` encodes prompts (diffusers ``pipelines/ltx/``).

    Attributes:
        max_length: tokens per prompt (the pipeline's ``max_sequence_length`` default).
        mask_encoder: whether the encoder itself sees the padding mask. Either way the mask is returned
            for the transformer's cross-attention, and padded positions keep their encoder outputs.
    """

    max_length: int
    mask_encoder: bool


# ``LTXPipeline``, ``LTXImageToVideoPipeline`` (and ``LTXI2VLongMultiPromptPipeline``) call
# ``text_encoder(input_ids)`` without a mask; ``LTXConditionPipeline`` passes it. No LTX pipeline cleans
# its prompts (use :class:`~mlx_i2v.models.tokenizer.T5Tokenizer`, not Wan's ``UMT5Tokenizer``).
LTX_PROMPTS = MaskedPromptEncoding(max_length=128, mask_encoder=False)
LTX_CONDITION_PROMPTS = MaskedPromptEncoding(max_length=256, mask_encoder=True)


def encode_masked_prompts(
    encoder: UMT5Encoder,
    input_ids: mx.array | np.ndarray,
    attention_mask: mx.array | np.ndarray,
    *,
    mask_encoder: bool,
) -> tuple[mx.array, mx.array]:
    """Prompt embeddings and their mask as diffusers' LTX ``_get_t5_prompt_embeds`` returns them.

    input_ids, attention_mask: (B, L) right-padded, from the tokenizer at ``max_length`` L. The encoder
    runs with ``attention_mask`` if ``mask_encoder`` else with every token visible (padding included).
    Returns ``(embeds (B, L, d_model) in the encoder's dtype, mask (B, L) bool)``; padded positions are
    not zeroed (the LTX transformer masks them in cross-attention).
    """
    input_ids, attention_mask = mx.array(input_ids), mx.array(attention_mask)
    mask = attention_mask > 0
    hidden = encoder(input_ids, mask if mask_encoder else mx.ones_like(mask))
    return hidden, mask


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
