"""Reference LTX-Video VAEs built with diffusers' ``AutoencoderKLLTXVideo`` (0.42.1) for the MLX tests.

The tiny VAEs keep the real block structure of each generation (diffusers'
``scripts/convert_ltx_to_diffusers.py::get_vae_config``: four encoder stages, four (0.9.0) or three
(0.9.1, 0.9.5) decoder stages, the same downsample types, upsample factors, noise flags and timestep
conditioning), so every state-dict key pattern of the real checkpoints occurs; widths, depths and the
latent width are shrunk.

Also here: the single-file (Lightricks ``ltxv-*.safetensors``) layout, built by inverting diffusers' own
rename tables, so the tests can run diffusers' ``convert_ltx_vae_checkpoint_to_diffusers`` on it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLLTXVideo

LTX095 = "LTXVideo095DownBlock3D"

TINY_LTX_VAE_CONFIGS: dict[str, dict] = {
    "0.9.0": dict(
        latent_channels=16, block_out_channels=(8, 16, 32, 32), decoder_block_out_channels=(8, 16, 32, 32),
        layers_per_block=(1, 1, 2, 1, 1), decoder_layers_per_block=(1, 1, 2, 1, 1),
    ),
    "0.9.1": dict(
        latent_channels=16, block_out_channels=(8, 16, 32, 32), decoder_block_out_channels=(16, 32, 64),
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 2, 1, 2),
        decoder_spatio_temporal_scaling=(True, True, True), decoder_inject_noise=(True, True, True, False),
        upsample_residual=(True, True, True), upsample_factor=(2, 2, 2), timestep_conditioning=True,
    ),
    "0.9.5": dict(
        latent_channels=16, block_out_channels=(8, 16, 32, 64, 128), down_block_types=(LTX095,) * 4,
        decoder_block_out_channels=(16, 32, 64), layers_per_block=(1, 2, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 2, 1),
        spatio_temporal_scaling=(True, True, True, True), decoder_spatio_temporal_scaling=(True, True, True),
        decoder_inject_noise=(False, False, False, False),
        downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
        upsample_residual=(True, True, True), upsample_factor=(2, 2, 2), timestep_conditioning=True,
        spatial_compression_ratio=32, temporal_compression_ratio=8,
    ),
}  # fmt: skip


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter and buffer a value that shows if it is misnamed or mis-laid out: noise scales,
    LayerNorms and latent statistics are otherwise constants (zeros or ones)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("timestep_scale_multiplier"):
                continue
            if "per_channel_scale" in name or name.endswith("latents_std") or "norm3.weight" in name:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith((".bias", "latents_mean")) or "scale_shift_table" in name:
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)


def build_tiny_ltx_vae(path: str | Path | None, version: str, *, seed: int = 0, **overrides) -> AutoencoderKLLTXVideo:
    """A seeded tiny ``AutoencoderKLLTXVideo`` of ``version`` ("0.9.0", "0.9.1", "0.9.5"), float32 and in
    eval mode, saved with ``save_pretrained`` to ``path`` (unless None)."""
    torch.manual_seed(seed)
    model = AutoencoderKLLTXVideo(**{**TINY_LTX_VAE_CONFIGS[version], **overrides}).eval()
    randomize_(model, seed)
    if path is not None:
        model.save_pretrained(path)
    return model


# --- the single-file layout -------------------------------------------------------------------------------

# diffusers 0.42.1 ``convert_ltx_vae_checkpoint_to_diffusers`` (loaders/single_file_utils.py): its rename
# tables, copied to invert them (the originals are local to that function).
_COMMON = {
    "up_blocks.0": "mid_block", "up_blocks.1": "up_blocks.0", "up_blocks.2": "up_blocks.1.upsamplers.0",
    "up_blocks.3": "up_blocks.1", "up_blocks.4": "up_blocks.2.conv_in", "up_blocks.5": "up_blocks.2.upsamplers.0",
    "up_blocks.6": "up_blocks.2", "up_blocks.7": "up_blocks.3.conv_in", "up_blocks.8": "up_blocks.3.upsamplers.0",
    "up_blocks.9": "up_blocks.3",
    "down_blocks.0": "down_blocks.0", "down_blocks.1": "down_blocks.0.downsamplers.0",
    "down_blocks.2": "down_blocks.0.conv_out", "down_blocks.3": "down_blocks.1",
    "down_blocks.4": "down_blocks.1.downsamplers.0", "down_blocks.5": "down_blocks.1.conv_out",
    "down_blocks.6": "down_blocks.2", "down_blocks.7": "down_blocks.2.downsamplers.0", "down_blocks.8": "down_blocks.3",
    "down_blocks.9": "mid_block",
}  # fmt: skip
_DECODER_091 = {
    "up_blocks.0": "mid_block", "up_blocks.1": "up_blocks.0.upsamplers.0", "up_blocks.2": "up_blocks.0",
    "up_blocks.3": "up_blocks.1.upsamplers.0", "up_blocks.4": "up_blocks.1", "up_blocks.5": "up_blocks.2.upsamplers.0",
    "up_blocks.6": "up_blocks.2", "up_blocks.7": "up_blocks.3.upsamplers.0", "up_blocks.8": "up_blocks.3",
}  # fmt: skip
_ENCODER_095 = {
    "down_blocks.0": "down_blocks.0", "down_blocks.1": "down_blocks.0.downsamplers.0", "down_blocks.2": "down_blocks.1",
    "down_blocks.3": "down_blocks.1.downsamplers.0", "down_blocks.4": "down_blocks.2",
    "down_blocks.5": "down_blocks.2.downsamplers.0", "down_blocks.6": "down_blocks.3",
    "down_blocks.7": "down_blocks.3.downsamplers.0", "down_blocks.8": "mid_block",
}  # fmt: skip
BLOCK_RENAMES = {
    "0.9.0": _COMMON,
    "0.9.1": {**_COMMON, **_DECODER_091},
    "0.9.5": {**_COMMON, **_DECODER_091, **_ENCODER_095},
}

# The buffers the original PerChannelStatistics module also stores (the tests add them to the file).
EXTRA_STATISTICS = ("channel", "mean-of-stds", "mean-of-stds_over_std-of-means")


def _block_key(key: str, renames: dict[str, str]) -> str:
    """The original flat-list key of a diffusers key: its longest diffusers module prefix replaced by the
    original entry renamed to it. Where two entries are (a table's stale last entry after an update), the
    lower index is the real one: the 0.9.1+ decoders and the 0.9.5 encoder have one entry fewer."""
    half, body = key.split(".", 1)
    kind = "up_blocks" if half == "decoder" else "down_blocks"
    inverse: dict[str, str] = {}
    for source, target in renames.items():  # ascending indices, so setdefault keeps the lower one
        if source.startswith(kind):
            inverse.setdefault(target, source)
    best = max((p for p in inverse if body == p or body.startswith(p + ".")), key=len, default=None)
    return key if best is None else f"{half}.{inverse[best]}{body[len(best):]}"


def to_single_file(state: dict[str, torch.Tensor], version: str) -> dict[str, torch.Tensor]:
    """A diffusers state dict in the Lightricks single-file layout (``vae.`` prefix, flat block lists,
    ``res_blocks``, plain shortcut convs, nested ``norm3.norm``, ``last_*`` decoder head, and the
    ``per_channel_statistics`` buffers including the three diffusers ignores)."""
    out = {}
    for key, value in state.items():
        if key == "latents_mean":
            new = "per_channel_statistics.mean-of-means"
        elif key == "latents_std":
            new = "per_channel_statistics.std-of-means"
        else:
            new = _block_key(key, BLOCK_RENAMES[version])
            new = new.replace(".resnets.", ".res_blocks.").replace("conv_shortcut.conv.", "conv_shortcut.")
            new = new.replace("norm3.", "norm3.norm.")
            if version != "0.9.0":
                new = new.replace("decoder.time_embedder.", "decoder.last_time_embedder.")
                new = new.replace("decoder.scale_shift_table", "decoder.last_scale_shift_table")
        out["vae." + new] = value.clone()
    channels = state["latents_mean"].shape[0]
    for name in EXTRA_STATISTICS:
        out[f"vae.per_channel_statistics.{name}"] = torch.rand(channels)
    return out
