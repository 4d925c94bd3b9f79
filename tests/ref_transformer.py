"""Reference Wan transformers built with diffusers, shared by the transformer tests and later pipeline tests.

The tiny variants keep every state-dict key name of the real checkpoints restricted to ``blocks.0-1``
(wan.md §3): real channel plumbing (36/16 for I2V, 48/48 for TI2V), ``added_kv_proj_dim == inner_dim``
and ``image_dim`` equal to the tiny CLIP width (24, 17 tokens per image).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

TINY_COMMON = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    text_dim=48,
    freq_dim=256,
    ffn_dim=64,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)

TINY_IMAGE_TOKENS = 17  # the tiny CLIP: CLS + 4x4 patches

TINY_VARIANTS = {
    "ti2v": dict(in_channels=48, out_channels=48),  # Wan2.2-TI2V-5B
    "i2v": dict(in_channels=36, out_channels=16, image_dim=24, added_kv_proj_dim=32),  # Wan2.1-I2V
    # Wan2.1-FLF2V: I2V plus a learned position table over both images' tokens
    "flf2v": dict(
        in_channels=36,
        out_channels=16,
        image_dim=24,
        added_kv_proj_dim=32,
        pos_embed_seq_len=2 * TINY_IMAGE_TOKENS,
    ),
    "a14b": dict(in_channels=36, out_channels=16),  # Wan2.2-I2V-A14B (each expert)
}

# Wan2.2-TI2V-5B widths with a single block, to test at realistic scale.
TI2V_5B_1LAYER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=24,
    attention_head_dim=128,
    in_channels=48,
    out_channels=48,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=14336,
    num_layers=1,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)


@torch.no_grad()
def _perturb_default_init(model: WanTransformer3DModel, generator: torch.Generator) -> None:
    """diffusers initialises norms to 1/0 and ``pos_embed`` to 0, which would hide a mis-wired norm or
    position table; add seeded noise to those (and the modulation tables) only, so linear layers keep
    their default, width-appropriate scale."""
    for name, p in model.named_parameters():
        if "norm" in name or "pos_embed" in name or "scale_shift_table" in name:
            p.add_(0.1 * torch.randn(p.shape, generator=generator))


def build_transformer(
    path: str | Path | None, config: dict, *, seed: int = 0, max_shard_size: str = "10GB"
) -> WanTransformer3DModel:
    """Save a seeded, randomly initialised ``WanTransformer3DModel`` to ``path`` (unless None) and return it
    (float32, eval mode)."""
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**config).eval()
    _perturb_default_init(model, torch.Generator().manual_seed(seed + 1))
    if path is not None:
        model.save_pretrained(path, max_shard_size=max_shard_size)
    return model


def build_tiny_transformer(path: str | Path, variant: str, *, seed: int = 0) -> WanTransformer3DModel:
    """A tiny transformer of ``variant`` ("ti2v", "i2v", "flf2v" or "a14b"), saved to ``path``."""
    return build_transformer(path, {**TINY_COMMON, **TINY_VARIANTS[variant]}, seed=seed)


@torch.no_grad()
def reference_forward(
    model: WanTransformer3DModel,
    hidden_states: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    encoder_hidden_states_image: torch.Tensor | None = None,
) -> torch.Tensor:
    """diffusers forward on channels-first latents (B, C, F, H, W) -> (B, C_out, F, H, W)."""
    return model(
        hidden_states=hidden_states,
        timestep=timestep,
        encoder_hidden_states=encoder_hidden_states,
        encoder_hidden_states_image=encoder_hidden_states_image,
        return_dict=False,
    )[0]
