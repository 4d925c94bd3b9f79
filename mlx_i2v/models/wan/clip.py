"""CLIP vision tower (ViT-H/14 in Wan2.1 I2V / FLF2V), returning the penultimate hidden state.

Mirrors transformers' ``CLIPVisionModelWithProjection`` as the diffusers Wan repos ship it in
``image_encoder/``; parameter names follow transformers so the checkpoint maps one to one. The Wan
pipelines use ``hidden_states[-2]``: the output of encoder layer ``num_hidden_layers - 1`` with no
post-layernorm and no projection, so the last layer, ``post_layernorm`` and ``visual_projection`` are
neither built nor loaded.

Layout is channels-last: pixels are (B, H, W, 3), tokens (B, 1 + (H/p)*(W/p), hidden), CLS first.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import mlx.core as mx
import mlx.nn as nn

from ...components import ComponentType, load_component
from ...errors import InvalidInputError, WeightLoadError
from ...weights import (
    Rule,
    WeightMap,
    config_from_dict,
    conv_weight,
    flatten,
)
from ..attention import attention

log = logging.getLogger(__name__)


def quick_gelu(x: mx.array) -> mx.array:
    """OpenAI CLIP's sigmoid approximation of GELU (transformers ``QuickGELUActivation``)."""
    return x * mx.sigmoid(1.702 * x)


# transformers' ACT2FN names; "gelu" is the exact erf form, which the ViT-H/14 tower uses.
ACTIVATIONS: dict[str, Callable[[mx.array], mx.array]] = {"gelu": nn.gelu, "quick_gelu": quick_gelu}


@dataclass(frozen=True)
class CLIPVisionConfig:
    """transformers' ``CLIPVisionConfig``; defaults are transformers' so a sparse config.json reads the
    same. Wan2.1 I2V: hidden 1280, MLP 5120, 16 heads, 32 layers, image 224, patch 14, exact GELU."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_attention_heads: int = 12
    num_hidden_layers: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CLIPVisionConfig:
        """From ``image_encoder/config.json``: a flat ``CLIPVisionConfig`` or a full ``CLIPConfig`` whose
        vision part sits under ``vision_config``."""
        config = config_from_dict(cls, data.get("vision_config", data))
        if config.hidden_act not in ACTIVATIONS:
            raise WeightLoadError(
                f"image_encoder: unsupported hidden_act {config.hidden_act!r}; "
                f"expected one of {', '.join(ACTIVATIONS)}"
            )
        return config

    @property
    def num_positions(self) -> int:
        """CLS plus one token per patch."""
        return (self.image_size // self.patch_size) ** 2 + 1


class CLIPVisionEmbeddings(nn.Module):
    """Patchify (a stride-p convolution without bias), prepend CLS, add learned absolute positions."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = mx.zeros((config.hidden_size,))
        self.patch_embedding = nn.Conv2d(
            config.num_channels,
            config.hidden_size,
            kernel_size=config.patch_size,
            stride=config.patch_size,
            bias=False,
        )
        self.position_embedding = nn.Embedding(config.num_positions, config.hidden_size)

    def __call__(self, pixel_values: mx.array) -> mx.array:
        """(B, H, W, C) -> (B, 1 + (H/p)*(W/p), hidden)."""
        patches = self.patch_embedding(pixel_values)
        batch, dims = patches.shape[0], patches.shape[-1]
        # Row-major over (h, w): the order torch's flatten(2) gives the (B, D, h, w) conv output.
        patches = patches.reshape(batch, -1, dims)
        cls = mx.broadcast_to(self.class_embedding, (batch, 1, dims))
        return mx.concatenate([cls, patches], axis=1) + self.position_embedding.weight


class CLIPAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections and no mask."""

    def __init__(self, dims: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dims, dims)
        self.k_proj = nn.Linear(dims, dims)
        self.v_proj = nn.Linear(dims, dims)
        self.out_proj = nn.Linear(dims, dims)

    def __call__(self, x: mx.array) -> mx.array:
        """(B, L, D) -> (B, L, D)."""
        batch, length, dims = x.shape

        def heads(t: mx.array) -> mx.array:
            return t.reshape(batch, length, self.num_heads, -1).transpose(0, 2, 1, 3)

        out = attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, dims))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.activation = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        """(B, L, D) -> (B, L, D)."""
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config.hidden_size, config.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, x: mx.array) -> mx.array:
        """(B, L, D) -> (B, L, D)."""
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPVisionConfig, num_layers: int):
        super().__init__()
        self.layers = [CLIPEncoderLayer(config) for _ in range(num_layers)]

    def __call__(self, x: mx.array) -> mx.array:
        """(B, L, D) -> (B, L, D)."""
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPVisionTransformer(nn.Module):
    """Embeddings, ``pre_layrnorm`` (transformers' spelling) and all encoder layers but the last."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config, config.num_hidden_layers - 1)

    def __call__(self, pixel_values: mx.array) -> mx.array:
        """(B, H, W, C) -> (B, tokens, hidden)."""
        return self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)))


class CLIPVisionTower(nn.Module):
    """The image encoder of Wan2.1 I2V / FLF2V: pixels -> penultimate CLIP hidden states.

    Equal to transformers' ``model(pixel_values, output_hidden_states=True).hidden_states[-2]``.
    """

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.vision_model = CLIPVisionTransformer(config)

    def __call__(self, pixel_values: mx.array) -> mx.array:
        """Encode preprocessed images.

        Args:
            pixel_values: (B, H, W, C) channels-last, normalized as :class:`CLIPImageProcessor` does;
                H = W = ``config.image_size`` (there is no position-embedding interpolation).

        Returns:
            (B, 1 + (H/p)*(W/p), hidden) in the weights' dtype; for ViT-H/14 at 224: (B, 257, 1280).
        """
        c = self.config
        expected = (c.image_size, c.image_size, c.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise InvalidInputError(
                f"CLIP vision tower expects (B, {c.image_size}, {c.image_size}, {c.num_channels}) pixels, "
                f"got {tuple(pixel_values.shape)}"
            )
        # transformers casts pixels to the patch-embedding dtype before the convolution.
        dtype = self.vision_model.embeddings.patch_embedding.weight.dtype
        return self.vision_model(pixel_values.astype(dtype))


def diffusers_map(config: CLIPVisionConfig) -> WeightMap:
    """The rule table for a transformers / diffusers ``image_encoder`` checkpoint.

    Names map one to one (only the patch convolution is re-laid out channels-last). The table depends on
    the config because the unused last encoder layer must be excluded from the layer rule: rules are
    consulted before ``ignore`` patterns, so that layer has to be listed as ignored and kept out of the
    rule by a negative lookahead.
    """
    last = config.num_hidden_layers - 1
    return WeightMap(
        name="image_encoder (diffusers)",
        rules=(
            Rule(r"vision_model\.embeddings\.patch_embedding\.weight", transform=conv_weight),
            Rule(r"vision_model\.embeddings\.(class_embedding|position_embedding\.weight)"),
            Rule(r"vision_model\.pre_layrnorm\.(weight|bias)"),
            Rule(rf"vision_model\.encoder\.layers\.(?!{last}\.)\d+\..+"),
        ),
        ignore=(
            rf"vision_model\.encoder\.layers\.{last}\..+",  # only hidden_states[-2] is used
            r"vision_model\.post_layernorm\..+",
            r"visual_projection\..+",
            r"vision_model\.embeddings\.position_ids",  # an arange buffer older checkpoints saved
            r"text_model\..+",  # a full CLIPModel checkpoint also carries the text tower
            r"text_projection\..+",
            r"logit_scale",
        ),
    )


IMAGE_ENCODER = ComponentType(
    "image_encoder",
    build=lambda config: CLIPVisionTower(CLIPVisionConfig.from_dict(config)),
    source_map=lambda model: diffusers_map(model.config),
    stored_dtype=lambda dtype: mx.float32,  # runs in the VAE's dtype, float32 by default (as the VAE)
)


def load_clip_vision(folder: str | Path, dtype: mx.Dtype) -> CLIPVisionTower:
    """Load ``image_encoder/`` (config.json + safetensors, diffusers or MLX layout) strictly, casting
    weights to ``dtype``. CLIP is never quantized."""
    return load_component(IMAGE_ENCODER, folder, dtype)


# === Wan-AI original layout (``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``) =============
# The Wan-AI repos ship the whole XLM-RoBERTa CLIP (wan/modules/clip.py ``XLMRobertaCLIP``) as an fp16
# ``torch.save`` state dict; read it with :func:`mlx_i2v.pth.read_pth`, split the fused attention
# projections with :func:`split_fused_qkv`, then apply :func:`original_map` (wan.md §4.4, verified
# bit-exact in §4.5). Only the ``visual`` tower is used, up to its penultimate block.

_FUSED_QKV = re.compile(r"(.+)\.to_qkv\.(weight|bias)")


def split_fused_qkv(tensors: Mapping[str, mx.array]) -> dict[str, mx.array]:
    """Split every ``<prefix>.to_qkv.{weight,bias}`` into ``<prefix>.to_q/to_k/to_v.{weight,bias}``.

    open_clip-style attention projects q, k and v with one Linear of 3*D outputs, q first (the reference
    views its output as (B, L, 3, heads, head_dim)); ours has three. A rule maps one tensor to one, so
    this pre-pass runs before :func:`original_map`. Other tensors pass through unchanged.

    Raises:
        WeightLoadError: a fused tensor's first axis is not divisible by 3, or a split name is taken.
    """
    out: dict[str, mx.array] = {}
    for key, value in tensors.items():
        m = _FUSED_QKV.fullmatch(key)
        if m is None:
            parts = {key: value}
        elif value.shape[0] % 3:
            raise WeightLoadError(f"image_encoder: {key} {tuple(value.shape)} is not a fused q/k/v tensor")
        else:
            parts = {f"{m[1]}.to_{n}.{m[2]}": t for n, t in zip("qkv", mx.split(value, 3, axis=0))}
        for name, tensor in parts.items():
            if name in out:
                raise WeightLoadError(f"image_encoder: {name} occurs twice after splitting fused q/k/v")
            out[name] = tensor
    return out


def _drop_leading_axis(w: mx.array) -> mx.array:
    """(1, N, D) -> (N, D): the original keeps its position table batch-shaped."""
    return w.reshape(w.shape[1:])


def original_map(config: CLIPVisionConfig) -> WeightMap:
    """The rule table for the original CLIP checkpoint after :func:`split_fused_qkv`.

    Depends on the config because the unused last block of the visual tower is ignored (Wan uses
    ``use_31_block=True``, i.e. ``hidden_states[-2]``). The text tower, ``log_scale``, the visual
    ``post_norm`` and ``head`` projection are never used by I2V and are ignored.
    """
    last = config.num_hidden_layers - 1
    layer = r"visual\.transformer\.(\d+)"
    ours = r"vision_model.encoder.layers.\1"
    embeddings = "vision_model.embeddings"
    return WeightMap(
        name="image_encoder (Wan-AI original)",
        rules=(
            Rule(r"visual\.patch_embedding\.weight", f"{embeddings}.patch_embedding.weight", conv_weight),
            Rule(r"visual\.cls_embedding", f"{embeddings}.class_embedding", flatten),  # (1, 1, D)
            Rule(r"visual\.pos_embedding", f"{embeddings}.position_embedding.weight", _drop_leading_axis),
            Rule(r"visual\.pre_norm\.(weight|bias)", r"vision_model.pre_layrnorm.\1"),
            Rule(rf"{layer}\.norm1\.(weight|bias)", rf"{ours}.layer_norm1.\2"),
            Rule(rf"{layer}\.attn\.to_([qkv])\.(weight|bias)", rf"{ours}.self_attn.\2_proj.\3"),
            Rule(rf"{layer}\.attn\.proj\.(weight|bias)", rf"{ours}.self_attn.out_proj.\2"),
            Rule(rf"{layer}\.norm2\.(weight|bias)", rf"{ours}.layer_norm2.\2"),
            Rule(rf"{layer}\.mlp\.0\.(weight|bias)", rf"{ours}.mlp.fc1.\2"),  # Sequential(Linear, GELU,
            Rule(rf"{layer}\.mlp\.2\.(weight|bias)", rf"{ours}.mlp.fc2.\2"),  # Linear, Dropout)
        ),
        ignore=(
            rf"visual\.transformer\.{last}\..+",
            r"visual\.(post_norm\..+|head)",
            r"textual\..+",  # the XLM-RoBERTa text tower
            r"log_scale",
        ),
    )
# === end of the Wan-AI original layout ================================================================
