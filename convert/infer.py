"""Diffusers-style configs for Wan-AI original-layout checkpoints, read off their tensors' shapes.

The original repos carry little configuration: the DiT's ``WanModel`` config.json names the widths WanModel
takes as arguments but not those it hard-codes (text width 4096, CLIP width 1280, patch size, the I2V
image branch, FLF2V's position table), a ComfyUI repack has no config at all, and the ``.pth`` files
(VAE, UMT5, CLIP) are bare state dicts. Every width is therefore taken from a tensor's shape; the few
values no shape determines are the constants of the released architectures, named where they are used:

* transformer: heads from config.json's ``num_heads``, else ``dim // 128`` (every Wan DiT has 128-wide
  heads); ``eps`` from config.json, else 1e-6; the RoPE length 1024 and RMS q/k norms WanModel hard-codes;
* VAE: ``dim_mult`` (1, 2, 4, 4), two residual blocks per stage, temporal downsampling in stages 2 and 3
  and no attention stages, as both released VAEs (and the ORIGINAL maps, which assume that depth); the
  latent statistics and strides of each version;
* UMT5: relative-attention max distance 128, eps 1e-6, gated tanh-GELU feed-forward (umt5-xxl);
* CLIP: the head count, which no shape shows: 16 for width 1280 (ViT-H/14, ``wan/modules/clip.py``),
  otherwise ``width // 64`` (64-wide heads, as every open_clip ViT); exact GELU and eps 1e-5.

Each function takes ``{original name: array}`` (only shapes are read, so lazily loaded arrays cost
nothing) and raises :class:`~mlx_i2v.errors.WeightLoadError` naming the tensor it needs and lacks.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any, Mapping

import mlx.core as mx

from mlx_i2v.errors import WeightLoadError
from mlx_i2v.models.wan.vae import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD

log = logging.getLogger(__name__)

Tensors = Mapping[str, mx.array]

# Wan2.2 VAE latent statistics (48 channels), as diffusers' convert_wan_to_diffusers.py writes them into
# the Wan2.2-TI2V-5B-Diffusers vae/config.json (wan.md §1.2); the .pth does not carry them.
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip

WAN_HEAD_DIM = 128
VIT_H_WIDTH, VIT_H_HEADS = 1280, 16
CLIP_HEAD_DIM = 64

# What both released VAEs share (diffusers' AutoencoderKLWan defaults, vae22_diffusers_config).
_VAE_ARCHITECTURE = {
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
}
# What differs between them.
_VAE_VERSIONS: dict[str, dict[str, Any]] = {
    "2.1": {
        "is_residual": False,
        "patch_size": None,
        "scale_factor_temporal": 4,
        "scale_factor_spatial": 8,
        "latents_mean": list(WAN21_LATENTS_MEAN),
        "latents_std": list(WAN21_LATENTS_STD),
    },
    "2.2": {
        "is_residual": True,
        "patch_size": 2,
        "scale_factor_temporal": 4,
        "scale_factor_spatial": 16,
        "latents_mean": list(WAN22_LATENTS_MEAN),
        "latents_std": list(WAN22_LATENTS_STD),
    },
}
VAE_VERSIONS = tuple(_VAE_VERSIONS)


def tensor_shape(tensors: Tensors, key: str, what: str, ndim: int | None = None) -> tuple[int, ...]:
    """The shape of ``tensors[key]``; a missing tensor or another number of dimensions than ``ndim`` is a
    :class:`WeightLoadError` naming ``what`` and the key."""
    if key not in tensors:
        raise WeightLoadError(f"{what}: missing tensor {key}")
    shape = tuple(tensors[key].shape)
    if ndim is not None and len(shape) != ndim:
        raise WeightLoadError(f"{what}: {key} has shape {shape}, expected {ndim} dimensions")
    return shape


def layer_count(tensors: Tensors, pattern: str, what: str) -> int:
    """Number of layers: 1 + the largest index captured by ``pattern`` (a full-match regex)."""
    indices = {int(m[1]) for k in tensors if (m := re.fullmatch(pattern, k))}
    if not indices:
        raise WeightLoadError(f"{what}: no tensors match {pattern}")
    return max(indices) + 1


def split_heads(width: int, heads: int, what: str) -> int:
    """``heads``, checked to divide ``width`` (a :class:`WeightLoadError` naming ``what`` otherwise)."""
    if heads < 1 or width % heads:
        raise WeightLoadError(f"{what}: width {width} cannot be split into {heads} heads")
    return heads


# --- transformer -------------------------------------------------------------------------------------------

# WanModel config.json field -> the diffusers field it must agree with.
_WAN_CONFIG_FIELDS = {
    "dim": "inner_dim",
    "in_dim": "in_channels",
    "out_dim": "out_channels",
    "ffn_dim": "ffn_dim",
    "freq_dim": "freq_dim",
    "num_layers": "num_layers",
}


def transformer_config(tensors: Tensors, wan_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """``WanTransformer3DModel`` config.json of a ``WanModel`` checkpoint (ComfyUI prefix stripped).

    Args:
        tensors: original names -> arrays, e.g. ``patch_embedding.weight`` (dim, in, pt, ph, pw),
            ``head.head.weight`` (out * pt * ph * pw, dim), ``text_embedding.0.weight`` (dim, text_dim).
        wan_config: the repo's WanModel config.json, or None (a ComfyUI file without one).

    Raises:
        WeightLoadError: a needed tensor is missing, or config.json disagrees with the tensors.
    """
    what = "transformer"
    dim, in_channels, *patch = tensor_shape(tensors, "patch_embedding.weight", what, ndim=5)
    patch_volume = math.prod(patch)
    out_features = tensor_shape(tensors, "head.head.weight", what, ndim=2)[0]
    if out_features % patch_volume:
        raise WeightLoadError(f"{what}: head.head.weight has {out_features} outputs, not a multiple of {patch_volume}")
    if wan_config is not None and "num_heads" in wan_config:
        heads = wan_config["num_heads"]
    else:
        heads = dim // WAN_HEAD_DIM
        log.warning("transformer: no num_heads in config.json; assuming Wan's 128-wide heads (%d heads)", heads)
    heads = split_heads(dim, heads, what)
    config: dict[str, Any] = {
        "_class_name": "WanTransformer3DModel",
        "patch_size": list(patch),
        "num_attention_heads": heads,
        "attention_head_dim": dim // heads,
        "in_channels": in_channels,
        "out_channels": out_features // patch_volume,
        "text_dim": tensor_shape(tensors, "text_embedding.0.weight", what, ndim=2)[1],
        "freq_dim": tensor_shape(tensors, "time_embedding.0.weight", what, ndim=2)[1],
        "ffn_dim": tensor_shape(tensors, "blocks.0.ffn.0.weight", what, ndim=2)[0],
        "num_layers": layer_count(tensors, r"blocks\.(\d+)\..+", what),
        "cross_attn_norm": "blocks.0.norm3.weight" in tensors,
        "qk_norm": "rms_norm_across_heads",
        "eps": (wan_config or {}).get("eps", 1e-6),
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": 1024,
        "pos_embed_seq_len": None,
    }
    if "img_emb.proj.0.weight" in tensors:  # Wan2.1 I2V / FLF2V: MLPProj over CLIP tokens
        config["image_dim"] = tensor_shape(tensors, "img_emb.proj.0.weight", what, ndim=1)[0]
        config["added_kv_proj_dim"] = tensor_shape(tensors, "blocks.0.cross_attn.k_img.weight", what, ndim=2)[1]
    if "img_emb.emb_pos" in tensors:  # FLF2V: (1, 2 * 257, 1280)
        config["pos_embed_seq_len"] = tensor_shape(tensors, "img_emb.emb_pos", what, ndim=3)[1]
    inferred = {**config, "inner_dim": dim}
    for field, ours in _WAN_CONFIG_FIELDS.items():
        if wan_config is not None and field in wan_config and wan_config[field] != inferred[ours]:
            raise WeightLoadError(
                f"{what}: config.json says {field}={wan_config[field]} but the weights have {inferred[ours]}"
            )
    return config


# --- VAE ---------------------------------------------------------------------------------------------------


def vae_config(tensors: Tensors, version: str) -> dict[str, Any]:
    """``AutoencoderKLWan`` config.json of ``Wan2.1_VAE.pth`` (``version`` "2.1") or ``Wan2.2_VAE.pth``
    ("2.2"): widths from ``encoder.conv1.weight`` (base, in, 3, 3, 3), ``conv2.weight`` (z, z, 1, 1, 1),
    ``decoder.conv1.weight`` (decoder_base * 4, z, 3, 3, 3) and ``decoder.head.2.weight`` (out, ...)."""
    what = f"Wan{version} VAE"
    base_dim, in_channels = tensor_shape(tensors, "encoder.conv1.weight", what, ndim=5)[:2]
    decoder_width = tensor_shape(tensors, "decoder.conv1.weight", what, ndim=5)[0]
    top = _VAE_ARCHITECTURE["dim_mult"][-1]
    if decoder_width % top:
        raise WeightLoadError(f"{what}: decoder.conv1.weight has {decoder_width} outputs, not a multiple of {top}")
    decoder_base_dim = decoder_width // top
    return {
        "_class_name": "AutoencoderKLWan",
        **_VAE_ARCHITECTURE,
        **_VAE_VERSIONS[version],
        "base_dim": base_dim,
        # diffusers leaves it unset when the decoder is as wide as the encoder (the Wan2.1 VAE)
        "decoder_base_dim": None if decoder_base_dim == base_dim else decoder_base_dim,
        "z_dim": tensor_shape(tensors, "conv2.weight", what, ndim=5)[0],
        "in_channels": in_channels,
        "out_channels": tensor_shape(tensors, "decoder.head.2.weight", what, ndim=5)[0],
    }


# --- UMT5 --------------------------------------------------------------------------------------------------


def umt5_config(tensors: Tensors) -> dict[str, Any]:
    """transformers ``UMT5Config`` of ``models_t5_umt5-xxl-enc-bf16.pth``: ``token_embedding.weight``
    (vocab, d_model), ``blocks.0.attn.q.weight`` (heads * d_kv, d_model), ``blocks.0.pos_embedding.
    embedding.weight`` (buckets, heads), ``blocks.0.ffn.fc1.weight`` (d_ff, d_model)."""
    what = "umt5"
    vocab_size, d_model = tensor_shape(tensors, "token_embedding.weight", what, ndim=2)
    inner = tensor_shape(tensors, "blocks.0.attn.q.weight", what, ndim=2)[0]
    buckets, heads = tensor_shape(tensors, "blocks.0.pos_embedding.embedding.weight", what, ndim=2)
    return {
        "architectures": ["UMT5EncoderModel"],
        "model_type": "umt5",
        "vocab_size": vocab_size,
        "d_model": d_model,
        "d_kv": inner // split_heads(inner, heads, what),
        "d_ff": tensor_shape(tensors, "blocks.0.ffn.fc1.weight", what, ndim=2)[0],
        "num_layers": layer_count(tensors, r"blocks\.(\d+)\..+", what),
        "num_heads": heads,
        "relative_attention_num_buckets": buckets,
        "relative_attention_max_distance": 128,
        "layer_norm_epsilon": 1e-6,
        "feed_forward_proj": "gated-gelu",
        "dense_act_fn": "gelu_new",
        "is_gated_act": True,
    }


# --- CLIP --------------------------------------------------------------------------------------------------


def clip_heads(width: int) -> int:
    """CLIP attention heads for a tower ``width`` wide (see the module docstring)."""
    return VIT_H_HEADS if width == VIT_H_WIDTH else width // CLIP_HEAD_DIM


def clip_config(tensors: Tensors) -> dict[str, Any]:
    """transformers ``CLIPVisionConfig`` of the visual tower in ``models_clip_open-clip-xlm-roberta-large-
    vit-huge-14.pth``: ``visual.patch_embedding.weight`` (width, 3, p, p), ``visual.pos_embedding``
    (1, 1 + (image/p)^2, width), ``visual.transformer.0.mlp.0.weight`` (mlp, width). The projection
    ``visual.head`` is never used, so its width is not recorded."""
    what = "image_encoder"
    width, channels, patch, _ = tensor_shape(tensors, "visual.patch_embedding.weight", what, ndim=4)
    positions = tensor_shape(tensors, "visual.pos_embedding", what, ndim=3)[1]
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise WeightLoadError(f"{what}: visual.pos_embedding has {positions} positions, not 1 + a square")
    return {
        "architectures": ["CLIPVisionModelWithProjection"],
        "model_type": "clip_vision_model",
        "hidden_size": width,
        "intermediate_size": tensor_shape(tensors, "visual.transformer.0.mlp.0.weight", what, ndim=2)[0],
        "num_attention_heads": split_heads(width, clip_heads(width), what),
        "num_hidden_layers": layer_count(tensors, r"visual\.transformer\.(\d+)\..+", what),
        "num_channels": channels,
        "image_size": grid * patch,
        "patch_size": patch,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
    }
