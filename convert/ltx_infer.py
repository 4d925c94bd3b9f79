"""diffusers configs of a Lightricks single-file LTX-Video checkpoint, read off its tensors' shapes.

diffusers' ``from_single_file`` fetches the config of a released repo for the version it detects
(``infer_diffusers_model_type``); here every width and depth is taken from the tensors instead, so any
checkpoint of the released architectures converts, and the file's own ``config`` metadata (LTX's format,
``{"transformer": {...}, "vae": {...}, "scheduler": {...}}``) is used for what no shape shows and checked
against what the shapes say:

* transformer: the head count (``num_attention_heads``; without metadata, the 32 heads both released
  sizes have), ``norm_eps`` and ``activation_fn``; the rest from ``patchify_proj``, ``proj_out``,
  ``caption_projection``, the cross-attention keys and the block count;
* VAE: the generation (0.9.0, 0.9.1, 0.9.5+, by diffusers' rule, see
  :func:`~mlx_i2v.models.ltx.vae_original.original_generation`) fixes the block structure (block types,
  down/upsampling, noise injection, timestep conditioning: ``GENERATION_CONFIGS``); widths and depths come
  from the tensors, renamed to diffusers' names first (:data:`~mlx_i2v.models.ltx.vae_original.ORIGINAL_RENAMES`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Any, Mapping

import mlx.core as mx

from mlx_i2v.errors import WeightLoadError
from mlx_i2v.models.ltx.vae import GENERATION_CONFIGS, LTXVAEConfig
from mlx_i2v.models.ltx.vae_original import ORIGINAL_RENAMES

from .infer import layer_count, split_heads, tensor_shape

log = logging.getLogger(__name__)

Tensors = Mapping[str, mx.array]

RELEASED_HEADS = 32  # LTX-Video 2B (32 x 64) and 13B (32 x 128)
RGB = 3  # the VAE's image channels; its patch size follows from conv_in's input width

# LTX-format transformer config field -> the inferred diffusers field it must agree with.
_CHECKED_FIELDS = ("num_attention_heads", "attention_head_dim", "num_layers", "in_channels", "out_channels",
                   "cross_attention_dim", "caption_channels")  # fmt: skip


def transformer_config(tensors: Tensors, ltx_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """``LTXVideoTransformer3DModel`` config.json of the transformer part of a single file (prefix removed).

    Args:
        tensors: original names -> arrays: ``patchify_proj.weight`` (dim, in), ``proj_out.weight`` (out, dim),
            ``caption_projection.linear_1.weight`` (dim, caption), ``transformer_blocks.0.attn2.to_k.weight``
            (dim, cross), ...
        ltx_config: the metadata's ``"transformer"`` config, or None.

    Raises:
        WeightLoadError: a needed tensor is missing, or the metadata disagrees with the tensors.
    """
    what = "transformer"
    meta = dict(ltx_config or {})
    dim, in_channels = tensor_shape(tensors, "patchify_proj.weight", what, ndim=2)
    if "num_attention_heads" in meta:
        heads = meta["num_attention_heads"]
    else:
        heads = RELEASED_HEADS
        log.warning("transformer: no num_attention_heads in the file's metadata; assuming %d heads", heads)
    heads = split_heads(dim, heads, what)
    block = "transformer_blocks.0."
    config: dict[str, Any] = {
        "_class_name": "LTXVideoTransformer3DModel",
        "in_channels": in_channels,
        "out_channels": tensor_shape(tensors, "proj_out.weight", what, ndim=2)[0],
        "patch_size": 1,  # the LTX pipelines patchify outside the model; every release has 1x1x1
        "patch_size_t": 1,
        "num_attention_heads": heads,
        "attention_head_dim": dim // heads,
        "cross_attention_dim": tensor_shape(tensors, block + "attn2.to_k.weight", what, ndim=2)[1],
        "num_layers": layer_count(tensors, r"transformer_blocks\.(\d+)\..+", what),
        "activation_fn": meta.get("activation_fn", "gelu-approximate"),
        "qk_norm": "rms_norm_across_heads",  # LTX's "rms_norm" normalises q and k across all heads
        "norm_elementwise_affine": block + "norm1.weight" in tensors,
        "norm_eps": meta.get("norm_eps", 1e-6),
        "caption_channels": tensor_shape(tensors, "caption_projection.linear_1.weight", what, ndim=2)[1],
        "attention_bias": block + "attn1.to_q.bias" in tensors,
        "attention_out_bias": block + "attn1.to_out.0.bias" in tensors,
    }
    for field in _CHECKED_FIELDS:
        if field in meta and meta[field] != config[field]:
            raise WeightLoadError(
                f"{what}: the file's metadata says {field}={meta[field]} but the weights have {config[field]}"
            )
    return config


def _blocks(tensors: Tensors, stack: str, what: str) -> list[str]:
    """The module paths ``<stack>.0``, ``<stack>.1``, ... of a block list (diffusers names)."""
    return [f"{stack}.{i}" for i in range(layer_count(tensors, re.escape(stack) + r"\.(\d+)\..+", what))]


def _resnets(tensors: Tensors, block: str, what: str) -> tuple[int, int, int]:
    """(resnet count, input width, output width) of the resnets of ``block``, from the first one's
    ``conv1`` kernel (out, in, t, h, w)."""
    layers = layer_count(tensors, re.escape(block) + r"\.resnets\.(\d+)\..+", what)
    out_width, in_width = tensor_shape(tensors, f"{block}.resnets.0.conv1.conv.weight", what, ndim=5)[:2]
    return layers, in_width, out_width


def vae_config(tensors: Tensors, version: str) -> dict[str, Any]:
    """``AutoencoderKLLTXVideo`` config.json of the ``vae.*`` tensors of a single file of generation
    ``version`` ("0.9.0", "0.9.1" or "0.9.5").

    Widths and depths, as diffusers' encoder and decoder derive their blocks from the config: encoder
    block i's resnets run at ``block_out_channels[i]`` (0.9.5+ adds the mid block's width as the last
    entry); decoder up block i's at ``reversed(decoder_block_out_channels)[i] // upsample_factor``;
    ``layers_per_block`` are the resnet counts, the mid block's last (decoder: first, reversed).

    Raises:
        WeightLoadError: an unknown or missing tensor, named.
    """
    what = f"LTX-Video {version} VAE"
    base = LTXVAEConfig(**GENERATION_CONFIGS[version])
    renamed = ORIGINAL_RENAMES[version].apply(tensors)  # diffusers names, shapes unchanged
    down = [_resnets(renamed, block, what) for block in _blocks(renamed, "encoder.down_blocks", what)]
    up = [_resnets(renamed, block, what) for block in _blocks(renamed, "decoder.up_blocks", what)]
    mid_layers, _, mid_width = _resnets(renamed, "encoder.mid_block", what)
    decoder_mid_layers = _resnets(renamed, "decoder.mid_block", what)[0]
    patch_inputs = tensor_shape(renamed, "encoder.conv_in.conv.weight", what, ndim=5)[1]
    patch_size = math.isqrt(patch_inputs // RGB)
    if patch_size * patch_size * RGB != patch_inputs:
        raise WeightLoadError(f"{what}: encoder.conv_in takes {patch_inputs} channels, not {RGB} x a square patch")
    decoder_widths = [width * factor for (_, _, width), factor in zip(up, base.upsample_factor[::-1])]
    fields = {
        **dataclasses.asdict(base),
        "in_channels": RGB,
        "out_channels": RGB,
        "latent_channels": tensor_shape(renamed, "latents_mean", what, ndim=1)[0],
        "block_out_channels": [width for _, width, _ in down] + [mid_width] * base.is_095,
        "layers_per_block": [layers for layers, _, _ in down] + [mid_layers],
        "decoder_block_out_channels": decoder_widths[::-1],
        "decoder_layers_per_block": ([decoder_mid_layers] + [layers for layers, _, _ in up])[::-1],
        "patch_size": patch_size,
    }
    LTXVAEConfig(**fields)  # raises WeightLoadError on a structure the model cannot build
    as_json = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
    return {"_class_name": "AutoencoderKLLTXVideo", **as_json}
