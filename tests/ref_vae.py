"""Reference Wan VAEs built with diffusers, shared by the VAE tests and later pipeline tests.

The tiny VAEs keep every state-dict key name of the real checkpoints (194 keys for the Wan2.1 VAE, 196
for the Wan2.2 VAE): only widths are shrunk; depths, ``dim_mult``, ``z_dim`` and the latent statistics
are the real ones (research report §3).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLWan

WAN22_LATENTS_MEAN = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
]  # fmt: skip
WAN22_LATENTS_STD = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
]  # fmt: skip

TINY_VAE_CONFIGS: dict[str, dict] = {
    "2.1": dict(
        base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
        temperal_downsample=[False, True, True],
    ),
    "2.2": dict(
        base_dim=10, decoder_base_dim=16, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
        temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
        patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16,
        latents_mean=WAN22_LATENTS_MEAN, latents_std=WAN22_LATENTS_STD,
    ),
}  # fmt: skip


def build_tiny_vae(path: str | Path, version: str, *, seed: int = 0) -> AutoencoderKLWan:
    """Save a seeded tiny ``AutoencoderKLWan`` ("2.1" or "2.2") to ``path`` and return it (float32, eval).

    The RMS gammas are initialised to ones; they are randomised around one so a transposed or misnamed
    gamma changes the output.
    """
    torch.manual_seed(seed)
    model = AutoencoderKLWan(**TINY_VAE_CONFIGS[version]).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".gamma"):
                param.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return model
