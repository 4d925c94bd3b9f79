"""The DiT FLOP count against the cost table of the project's anchors (shared/reference/anchors.md)."""

from __future__ import annotations

import pytest

from mlx_i2v.flops import DiTShape, context_flops, forward_flops, step_flops, video_tokens
from mlx_i2v.models.wan.transformer import WanTransformerConfig

TI2V_5B = dict(num_attention_heads=24, attention_head_dim=128, in_channels=48, out_channels=48, ffn_dim=14336,
               num_layers=30)  # fmt: skip
WAN_14B_T2V = dict(in_channels=16, out_channels=16)  # diffusers' defaults are the 14B widths
WAN21_I2V_14B = dict(in_channels=36, out_channels=16, image_dim=1280, added_kv_proj_dim=5120)


@pytest.mark.parametrize(
    "config, stride, height, width, frames, tokens, tflop",
    [
        (TI2V_5B, 16, 480, 832, 81, 8_190, 196),
        (TI2V_5B, 16, 704, 1280, 121, 27_280, 1_034),
        (WAN_14B_T2V, 8, 480, 832, 81, 32_760, 3_357),
        (WAN_14B_T2V, 8, 720, 1280, 81, 75_600, 13_047),
    ],
)
def test_step_cost_matches_the_anchor_table(config, stride, height, width, frames, tokens, tflop):
    shape = DiTShape.from_config(config)
    assert video_tokens(height, width, frames, spatial_stride=stride) == tokens
    assert round(step_flops(shape, tokens, cfg=True) / 1e12) == tflop


def test_guidance_doubles_and_config_kinds_agree():
    shape = DiTShape.from_config(TI2V_5B)
    assert step_flops(shape, 1056, cfg=True) == 2 * step_flops(shape, 1056, cfg=False) == forward_flops(shape, 1056, 2)
    assert DiTShape.from_config(WanTransformerConfig(**TI2V_5B)) == shape
    assert (shape.dim, shape.context_tokens, shape.patch_size) == (3072, 512, (1, 2, 2))
    assert context_flops(shape) == 2 * 512 * (4096 * 3072 + 3072 * 3072)


def test_image_tokens_of_the_i2v_models_are_counted():
    i2v = DiTShape.from_config(WAN21_I2V_14B)
    flf2v = DiTShape.from_config({**WAN21_I2V_14B, "pos_embed_seq_len": 514})
    t2v = DiTShape.from_config(WAN_14B_T2V)
    assert (t2v.context_tokens, i2v.context_tokens, flf2v.context_tokens) == (512, 512 + 257, 512 + 514)
    # 257 more context tokens: k/v projections and cross-attention grow linearly in them
    d, L, layers = 5120, 32_760, 40
    extra = layers * (2 * 257 * d * d * 2 + 2 * 2 * L * 257 * d) + 2 * L * 20 * 4 * d  # + 20 more input channels
    assert forward_flops(i2v, L) - forward_flops(t2v, L) == pytest.approx(extra)


def test_tokens_follow_the_latent_grid():
    # 41 frames of 256x384 through the Wan2.2 VAE: 11 x 16 x 24 latents, 2x2 patches
    assert video_tokens(256, 384, 41, spatial_stride=16) == 11 * 8 * 12
    assert video_tokens(480, 832, 1, spatial_stride=8) == 30 * 52
