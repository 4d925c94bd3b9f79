"""FLOP count of the Wan and LTX-Video transformers (DiTs), for achieved-TFLOP/s figures and for planning.

One multiply-add is 2 FLOP. A forward pass over ``L`` video tokens and ``C`` context tokens (512 text
tokens, plus 257 CLIP tokens per photo for Wan2.1-I2V/FLF2V) costs, per block of width ``d`` and FFN
width ``f``:

- self-attention projections q, k, v, out: ``4 * 2 L d^2``; attention scores and values: ``2 * 2 L^2 d``;
- cross-attention q and out on the video tokens: ``2 * 2 L d^2``; k and v on the context: ``2 * 2 C d^2``;
  scores and values: ``2 * 2 L C d``;
- the FFN: ``2 * 2 L d f``;

plus the patch embedding and the output head once per pass. These are the reference's FLOP (its 512 text
tokens), in which achieved-TFLOP/s figures are stated; on the CPU mlx-i2v runs fewer, as it folds the
padding after the longest prompt into one key (``WanTransformer3DModel.step_context``). Left out, because
they do not grow with the clip: the text/image context projection (run once per generation,
:func:`context_flops`), the time MLP (once per distinct timestep, not per token) and the norms,
modulations and RoPE (elementwise).

At 832x480x81 this gives 196 TFLOP per TI2V-5B step with classifier-free guidance (two passes), the
figure the project's anchors use (see ``tests/test_flops.py`` for all four).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Mapping

TEXT_TOKENS = 512  # Wan pads every prompt to 512 tokens and the DiT attends to all of them
CLIP_TOKENS = 257  # ViT-H/14 at 224 px: CLS + 16x16 patches, per photo


@dataclass(frozen=True)
class DiTShape:
    """The dimensions of a Wan transformer that its cost depends on."""

    dim: int
    num_layers: int
    ffn_dim: int
    in_channels: int
    out_channels: int
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 4096
    context_tokens: int = TEXT_TOKENS  # text tokens plus CLIP image tokens, as the cross-attention sees them

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> DiTShape:
        """From a diffusers ``WanTransformer3DModel`` config (a ``config.json`` dict) or mlx-i2v's
        ``WanTransformerConfig``; fields missing from a dict take diffusers' defaults (the 14B models)."""
        if is_dataclass(config):
            config = {f.name: getattr(config, f.name) for f in fields(config)}
        get = config.get
        image_tokens = 0
        if get("added_kv_proj_dim") is not None:  # the I2V image branch: one or two photos' CLIP tokens
            image_tokens = get("pos_embed_seq_len") or CLIP_TOKENS
        in_channels = get("in_channels", 16)
        return cls(
            dim=get("num_attention_heads", 40) * get("attention_head_dim", 128),
            num_layers=get("num_layers", 40),
            ffn_dim=get("ffn_dim", 13824),
            in_channels=in_channels,
            out_channels=get("out_channels") or in_channels,
            patch_size=tuple(get("patch_size", (1, 2, 2))),
            text_dim=get("text_dim", 4096),
            context_tokens=TEXT_TOKENS + image_tokens,
        )


def video_tokens(
    height: int, width: int, frames: int, *, spatial_stride: int, temporal_stride: int = 4,
    patch_size: tuple[int, int, int] = (1, 2, 2),
) -> int:  # fmt: skip
    """DiT tokens of a clip: the VAE's latent grid (1 + (frames-1)/temporal_stride frames of
    height/spatial_stride x width/spatial_stride; spatial_stride is 8 for the Wan2.1 VAE, 16 for the Wan2.2
    VAE) divided by the patch. 832x480x81 is 8,190 tokens for TI2V-5B and 32,760 for the 14B models."""
    latent = ((frames - 1) // temporal_stride + 1, height // spatial_stride, width // spatial_stride)
    return math.prod(n // p for n, p in zip(latent, patch_size))


def forward_flops(shape: DiTShape, tokens: int, batch: int = 1) -> float:
    """FLOP of one transformer forward pass over ``batch`` clips of ``tokens`` video tokens each."""
    d, L, C = shape.dim, tokens, shape.context_tokens
    patch = math.prod(shape.patch_size)
    block = (
        2 * L * d * d * 4  # self-attention q, k, v, out
        + 2 * 2 * L * L * d  # self-attention scores and weighted values
        + 2 * L * d * d * 2  # cross-attention q and out
        + 2 * C * d * d * 2  # cross-attention k and v on the context
        + 2 * 2 * L * C * d  # cross-attention scores and weighted values
        + 2 * L * d * shape.ffn_dim * 2  # FFN up and down
    )
    embed_and_head = 2 * L * shape.in_channels * patch * d + 2 * L * d * shape.out_channels * patch
    return float(batch * (shape.num_layers * block + embed_and_head))


def step_flops(shape: DiTShape, tokens: int, *, cfg: bool) -> float:
    """FLOP of one denoising step: one forward pass, or two with classifier-free guidance."""
    return forward_flops(shape, tokens, batch=2 if cfg else 1)


def context_flops(shape: DiTShape, batch: int = 1, text_tokens: int = TEXT_TOKENS) -> float:
    """FLOP of projecting the text context to the model width (once per generation): the two-layer
    text MLP over ``text_tokens`` tokens (Wan's 512). The CLIP image embedding is smaller still and left
    out."""
    return float(batch * 2 * text_tokens * (shape.text_dim * shape.dim + shape.dim * shape.dim))


# --- LTX-Video ------------------------------------------------------------------------------------------
# The LTX blocks cost what Wan's do (self-attention, cross-attention to the projected caption, a 4x FFN);
# the patch embedding is a Linear over packed tokens (in_channels already counts the patch), and the
# caption is 128 T5 tokens in LTXPipeline / LTXImageToVideoPipeline, 256 in LTXConditionPipeline.
LTX_TEXT_TOKENS = 128
LTX_SPATIAL_STRIDE, LTX_TEMPORAL_STRIDE = 32, 8


def ltx_shape(config: Mapping[str, Any] | Any, context_tokens: int = LTX_TEXT_TOKENS) -> DiTShape:
    """The cost dimensions of an LTX-Video transformer, from a diffusers ``LTXVideoTransformer3DModel``
    config dict or an ``LTXTransformerConfig``; missing keys take diffusers' defaults (2B). Use with
    :func:`forward_flops` / :func:`step_flops`, and :func:`context_flops` with ``text_tokens=context_tokens``.
    """
    if is_dataclass(config):
        config = {f.name: getattr(config, f.name) for f in fields(config)}
    get = config.get
    dim = get("num_attention_heads", 32) * get("attention_head_dim", 64)
    in_channels = get("in_channels", 128)
    return DiTShape(
        dim=dim,
        num_layers=get("num_layers", 28),
        ffn_dim=4 * dim,
        in_channels=in_channels,
        out_channels=get("out_channels") or in_channels,
        patch_size=(1, 1, 1),
        text_dim=get("caption_channels", 4096),
        context_tokens=context_tokens,
    )


def ltx_video_tokens(height: int, width: int, frames: int, patch_size: int = 1, patch_size_t: int = 1) -> int:
    """LTX transformer tokens of a clip: the 32x32x8 VAE's latent grid over the patch (768x512x97: 4,992)."""
    return video_tokens(
        height, width, frames, spatial_stride=LTX_SPATIAL_STRIDE, temporal_stride=LTX_TEMPORAL_STRIDE,
        patch_size=(patch_size_t, patch_size, patch_size),
    )  # fmt: skip
