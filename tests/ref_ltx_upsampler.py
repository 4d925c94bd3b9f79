"""Reference LTX latent upsamplers built with diffusers 0.42.1 (``LTXLatentUpsamplerModel``), tiny: 8 latent
channels, 64 mid channels (two channels per GroupNorm group), one ResBlock per stage."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.pipelines.ltx.modeling_latent_upsampler import LTXLatentUpsamplerModel

TINY = dict(in_channels=8, mid_channels=64, num_blocks_per_stage=1)

# The kinds diffusers' class can run: 3-D spatial (the released upscalers), temporal, both, and 2-D spatial.
VARIANTS = {
    "spatial": dict(),
    "temporal": dict(spatial_upsample=False, temporal_upsample=True),
    "spatiotemporal": dict(temporal_upsample=True),
    "spatial_2d": dict(dims=2),
}


@torch.no_grad()
def build_upsampler(path: str | Path, variant: str, *, seed: int = 0) -> LTXLatentUpsamplerModel:
    """A seeded random tiny upsampler of ``variant`` saved to ``path`` (float32, eval mode); the GroupNorm
    affines get noise so a mis-wired one shows."""
    torch.manual_seed(seed)
    model = LTXLatentUpsamplerModel(**TINY, **VARIANTS[variant]).eval()
    for name, p in model.named_parameters():
        if "norm" in name:
            p.add_(0.1 * torch.randn(p.shape))
    model.save_pretrained(path)
    return model
