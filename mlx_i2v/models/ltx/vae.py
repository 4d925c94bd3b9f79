"""The LTX-Video VAE (diffusers ``AutoencoderKLLTXVideo`` 0.42.1) in its three generations, channels-last.

- **0.9.0**: ``LTXVideoDownBlock3D`` encoder (stride-2 convs), plain decoder (128/256/512/512).
- **0.9.1**: the same encoder; a timestep-conditioned decoder (256/512/1024, residual depth-to-space
  upsamplers that halve the width) with noise injected after its convolutions.
- **0.9.5** (also 0.9.6, 0.9.7 and 0.9.8): ``LTXVideo095DownBlock3D`` encoder (128 to 2048 wide,
  space-to-depth downsamplers) and the timestep-conditioned decoder without noise injection.

Videos are (B, F, H, W, 3) in [-1, 1] with F = 8k + 1 and H, W multiples of 32; latents are
(B, k + 1, H/32, W/32, 128). The encoder is causal, the decoder is not (see ``vae_blocks``); for large
or long videos use the tiled versions in :mod:`~mlx_i2v.models.ltx.vae_tiling`.

**Decoder noise.** A decoder with ``decoder_inject_noise`` adds fresh standard-normal noise after each
resnet convolution. diffusers draws it with ``torch.randn(shape)`` and no generator (the decoder never
passes one down), i.e. from PyTorch's global generator, one (H, W) draw per injection, in execution
order: mid block, then each up block (``conv_in``, then its resnets), ``conv1`` before ``conv2``. Here the
noise is an explicit input: a PRNG key, or any function ``(H, W) -> array`` (a test replays
``torch.randn`` after ``torch.manual_seed`` and gets diffusers' exact noise).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import mlx.core as mx
import mlx.nn as nn

from ...components import ComponentType, load_component
from ...errors import InvalidInputError, WeightLoadError
from ...weights import IDENTITY, Rule, WeightMap, config_from_dict, flatten
from ..vae_ops import patchify, unpatchify
from .vae_blocks import (
    CausalConv3d,
    DownBlock3D,
    MidBlock3d,
    NoiseSource,
    TimestepEmbedder,
    UpBlock3d,
    modulation,
    norm_silu,
)

log = logging.getLogger(__name__)

LTX095_DOWN_BLOCK = "LTXVideo095DownBlock3D"
LEGACY_DOWN_BLOCK = "LTXVideoDownBlock3D"


@dataclass(frozen=True)
class LTXVAEConfig:
    """diffusers' ``AutoencoderKLLTXVideo`` config; the defaults are diffusers' (= the 0.9.0 VAE), so a
    sparse config.json reads as diffusers reads it. :data:`GENERATION_CONFIGS` holds the three
    released configurations."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 128
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    down_block_types: tuple[str, ...] = (LEGACY_DOWN_BLOCK,) * 4
    decoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: tuple[int, ...] = (4, 3, 3, 3, 4)
    decoder_layers_per_block: tuple[int, ...] = (4, 3, 3, 3, 4)
    spatio_temporal_scaling: tuple[bool, ...] = (True, True, True, False)
    decoder_spatio_temporal_scaling: tuple[bool, ...] = (True, True, True, False)
    decoder_inject_noise: tuple[bool, ...] = (False, False, False, False, False)
    downsample_type: tuple[str, ...] = ("conv", "conv", "conv", "conv")
    upsample_residual: tuple[bool, ...] = (False, False, False, False)
    upsample_factor: tuple[int, ...] = (1, 1, 1, 1)
    timestep_conditioning: bool = False
    patch_size: int = 4
    patch_size_t: int = 1
    resnet_norm_eps: float = 1e-6
    scaling_factor: float = 1.0
    encoder_causal: bool = True
    decoder_causal: bool = False
    spatial_compression_ratio: int | None = None
    temporal_compression_ratio: int | None = None

    def __post_init__(self) -> None:
        stages = len(self.block_out_channels) - (1 if self.is_095 else 0)
        up = len(self.decoder_block_out_channels)
        lengths = {
            "layers_per_block": (len(self.layers_per_block), stages + 1),
            "decoder_layers_per_block": (len(self.decoder_layers_per_block), up + 1),
        }
        for name in ("down_block_types", "spatio_temporal_scaling", "downsample_type"):
            lengths[name] = (len(getattr(self, name)), stages)
        for name in ("decoder_spatio_temporal_scaling", "upsample_residual", "upsample_factor"):
            lengths[name] = (len(getattr(self, name)), up)
        wrong = [f"{name} ({have} < {need})" for name, (have, need) in lengths.items() if have < need]
        if wrong:
            raise WeightLoadError(f"LTX VAE: config too short for its blocks: {', '.join(wrong)}")
        # diffusers sizes the patch channels by patch_size**2 alone, so no other temporal patch can run.
        if self.patch_size_t != 1:
            raise WeightLoadError(f"LTX VAE: patch_size_t={self.patch_size_t} is not supported (diffusers needs 1)")
        for i, (c_in, c_out, _) in enumerate(decoder_stages(self)):
            # diffusers hands a width-changing conv_in the raw timestep and its noise scales have the input
            # width, so such a decoder cannot run with conditioning or noise injection.
            if c_in != c_out and (self.timestep_conditioning or self._decoder_noise(i + 1)):
                raise WeightLoadError(f"LTX VAE: decoder up block {i} changes width with conditioning or noise")

    @property
    def is_095(self) -> bool:
        """The 0.9.5+ encoder (diffusers tells it by the last down block type)."""
        return self.down_block_types[-1] == LTX095_DOWN_BLOCK

    @property
    def spatial_ratio(self) -> int:
        """Video pixels per latent pixel (32 for every released VAE)."""
        if self.spatial_compression_ratio is not None:
            return self.spatial_compression_ratio
        return self.patch_size * 2 ** sum(self.spatio_temporal_scaling)

    @property
    def temporal_ratio(self) -> int:
        """Video frames per latent frame after the first (8 for every released VAE)."""
        if self.temporal_compression_ratio is not None:
            return self.temporal_compression_ratio
        return self.patch_size_t * 2 ** sum(self.spatio_temporal_scaling)

    def _decoder_noise(self, stage: int) -> bool:
        """Noise injection of decoder stage ``stage`` (0 = mid block), from the reversed config tuple."""
        flags = self.decoder_inject_noise[::-1]
        return bool(flags[stage]) if stage < len(flags) else False


def decoder_stages(cfg: LTXVAEConfig) -> list[tuple[int, int, int]]:
    """(input width, output width, resnets) of each decoder up block, as diffusers derives them from the
    reversed ``decoder_*`` tuples and ``upsample_factor``."""
    widths = cfg.decoder_block_out_channels[::-1]
    layers = cfg.decoder_layers_per_block[::-1]
    factors = cfg.upsample_factor[::-1]
    stages, width = [], widths[0]
    for i in range(len(widths)):
        c_in, width = width // factors[i], widths[i] // factors[i]
        stages.append((c_in, width, layers[i + 1]))
    return stages


# --- the released configurations (diffusers ``scripts/convert_ltx_to_diffusers.py::get_vae_config``) ---

_LTX091_DECODER: dict[str, Any] = dict(
    decoder_block_out_channels=(256, 512, 1024),
    decoder_spatio_temporal_scaling=(True, True, True),
    upsample_residual=(True, True, True),
    upsample_factor=(2, 2, 2),
    timestep_conditioning=True,
)
GENERATION_CONFIGS: dict[str, dict[str, Any]] = {
    "0.9.0": {},
    "0.9.1": dict(
        _LTX091_DECODER, decoder_layers_per_block=(5, 6, 7, 8), decoder_inject_noise=(True, True, True, False)
    ),
    "0.9.5": dict(
        _LTX091_DECODER,
        block_out_channels=(128, 256, 512, 1024, 2048),
        down_block_types=(LTX095_DOWN_BLOCK,) * 4,
        layers_per_block=(4, 6, 6, 2, 2),
        decoder_layers_per_block=(5, 5, 5, 5),
        spatio_temporal_scaling=(True, True, True, True),
        decoder_inject_noise=(False, False, False, False),
        downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
        spatial_compression_ratio=32,
        temporal_compression_ratio=8,
    ),
}


def generation(cfg: LTXVAEConfig) -> str:
    """Which released layout a config has: "0.9.5" (0.9.5+ encoder), "0.9.1" (conditioned decoder) or
    "0.9.0"."""
    return "0.9.5" if cfg.is_095 else "0.9.1" if cfg.timestep_conditioning else "0.9.0"


# --- the model ----------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """diffusers ``LTXVideoEncoder3d``: video (B, F, H, W, 3) -> raw moments (B, t, h, w, latent + 1):
    the latent means and one shared log-variance channel."""

    def __init__(self, cfg: LTXVAEConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        eps, causal = cfg.resnet_norm_eps, cfg.encoder_causal
        widths = cfg.block_out_channels
        self.conv_in = CausalConv3d(cfg.in_channels * cfg.patch_size**2, widths[0], 3, is_causal=causal)
        stages = len(widths) - (1 if cfg.is_095 else 0)
        self.down_blocks = []
        width = widths[0]
        for i in range(stages):
            c_in = width
            width = widths[i + 1] if cfg.is_095 or i + 1 < stages else widths[i]
            legacy = cfg.down_block_types[i] == LEGACY_DOWN_BLOCK
            if not legacy and cfg.down_block_types[i] != LTX095_DOWN_BLOCK:
                raise WeightLoadError(f"LTX VAE: unknown down block type {cfg.down_block_types[i]!r}")
            self.down_blocks.append(
                DownBlock3D(
                    c_in, width, cfg.layers_per_block[i], eps, cfg.spatio_temporal_scaling[i], causal, legacy,
                    cfg.downsample_type[i],
                )
            )  # fmt: skip
        self.mid_block = MidBlock3d(width, cfg.layers_per_block[-1], eps, causal, False, False)
        self.conv_out = CausalConv3d(width, cfg.latent_channels + 1, 3, is_causal=causal)

    def __call__(self, video: mx.array) -> mx.array:
        x = self.conv_in(patchify(video, self.patch_size))
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(norm_silu(x))


class Decoder(nn.Module):
    """diffusers ``LTXVideoDecoder3d``: latents (B, t, h, w, latent) -> video (B, 8(t-1)+1, 32h, 32w, 3)."""

    def __init__(self, cfg: LTXVAEConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        eps, causal = cfg.resnet_norm_eps, cfg.decoder_causal
        conditioned = cfg.timestep_conditioning
        width = cfg.decoder_block_out_channels[-1]
        self.conv_in = CausalConv3d(cfg.latent_channels, width, 3, is_causal=causal)
        self.mid_block = MidBlock3d(
            width, cfg.decoder_layers_per_block[-1], eps, causal, cfg._decoder_noise(0), conditioned
        )
        scaling = cfg.decoder_spatio_temporal_scaling[::-1]
        residual = cfg.upsample_residual[::-1]
        factors = cfg.upsample_factor[::-1]
        self.up_blocks = []
        for i, (c_in, width, layers) in enumerate(decoder_stages(cfg)):
            self.up_blocks.append(
                UpBlock3d(
                    c_in, width, layers, eps, scaling[i], causal, cfg._decoder_noise(i + 1), conditioned,
                    residual[i], factors[i],
                )
            )  # fmt: skip
        if conditioned:
            self.timestep_scale_multiplier = mx.array(1000.0)
            self.time_embedder = TimestepEmbedder(width * 2)
            self.scale_shift_table = mx.zeros((2, width))
        self.conv_out = CausalConv3d(width, cfg.out_channels * cfg.patch_size**2, 3, is_causal=causal)

    def __call__(self, z: mx.array, t: mx.array | None, noise: NoiseSource) -> mx.array:
        """z: (B, t, h, w, latent); t: (B,) decode timesteps (conditioned decoders only)."""
        x = self.conv_in(z)
        if "timestep_scale_multiplier" in self:
            t = t.astype(x.dtype) * self.timestep_scale_multiplier
        x = self.mid_block(x, t, noise)
        for block in self.up_blocks:
            x = block(x, t, noise)
        shift = scale = None
        if "time_embedder" in self:
            shift, scale = modulation(self.time_embedder(t, x.dtype), self.scale_shift_table)
        return unpatchify(self.conv_out(norm_silu(x, scale, shift)), self.patch_size)


def noise_source(noise: mx.array | NoiseSource | None) -> NoiseSource:
    """The decoder's noise as a function ``(H, W) -> (H, W) array``.

    Args:
        noise: a function, used as it is (e.g. replaying given arrays); a PRNG key
            (``mx.random.key(seed)``), split once per draw; or None, drawing from MLX's global generator.
    """
    if callable(noise):
        return noise
    keys = [noise]

    def draw(shape: tuple[int, int]) -> mx.array:
        if keys[0] is None:
            return mx.random.normal(shape)
        keys[0], key = mx.random.split(keys[0])
        return mx.random.normal(shape, key=key)

    return draw


class AutoencoderKLLTXVideo(nn.Module):
    """LTX-Video VAE; parameter names follow diffusers' state dict (``latents_mean``/``latents_std``
    included)."""

    def __init__(self, config: LTXVAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.latents_mean = mx.zeros((config.latent_channels,))
        self.latents_std = mx.ones((config.latent_channels,))

    # --- encoding ---

    def encode(self, video: mx.array) -> tuple[mx.array, mx.array]:
        """Encode a whole video at once (untiled).

        Args:
            video: (B, F, H, W, 3) in [-1, 1], F = 8k + 1, H and W multiples of 32.

        Returns:
            ``(mean, logvar)``, each (B, k + 1, H/32, W/32, latent_channels); ``mean`` is also the
            posterior mode. The log-variance is one channel broadcast to all and clamped to [-30, 20], as
            diffusers' ``DiagonalGaussianDistribution`` sees it.
        """
        self.check_video(video.shape)
        return self.posterior(self.encoder(video.astype(self.encoder.conv_in.conv.weight.dtype)))

    def check_video(self, shape: tuple[int, ...]) -> None:
        """Raise :class:`InvalidInputError` unless ``shape`` is (B, 8k+1, H, W, in_channels) with H, W
        multiples of the spatial ratio."""
        cfg = self.config
        s, r = cfg.spatial_ratio, cfg.temporal_ratio
        if len(shape) != 5 or shape[-1] != cfg.in_channels:
            raise InvalidInputError(f"LTX VAE: expected a video (B, F, H, W, {cfg.in_channels}), got {tuple(shape)}")
        if shape[1] % r != 1 or shape[2] % s or shape[3] % s:
            raise InvalidInputError(
                f"LTX VAE: frames must be {r}k+1 and height/width multiples of {s}, "
                f"got {shape[1]}x{shape[2]}x{shape[3]}"
            )

    def posterior(self, moments: mx.array) -> tuple[mx.array, mx.array]:
        """Raw encoder output (B, t, h, w, latent + 1) -> ``(mean, logvar)`` (see :meth:`encode`)."""
        latent = self.config.latent_channels
        mean = moments[..., :latent]
        logvar = mx.clip(mx.broadcast_to(moments[..., latent:], mean.shape), -30.0, 20.0)
        return mean, logvar

    # --- decoding ---

    def decode(
        self, z: mx.array, timestep: float | mx.array | None = None, noise: mx.array | NoiseSource | None = None
    ) -> mx.array:
        """Decode latents at once (untiled).

        Args:
            z: (B, t, h, w, latent_channels), denormalised (see :meth:`denormalize_latents`).
            timestep: the decode timestep, a float or (B,) (the pipelines' ``decode_timestep``, e.g. 0.05);
                required by timestep-conditioned decoders (0.9.1+), ignored by the others as in diffusers.
            noise: the injected noise of 0.9.1 decoders (see :func:`noise_source`); unused otherwise.

        Returns:
            (B, 8(t-1)+1, 32h, 32w, out_channels), not clamped (diffusers clamps only when post-processing).
        """
        z, t = self.decoder_inputs(z, timestep)
        return self.decoder(z, t, noise_source(noise))

    def decoder_inputs(self, z: mx.array, timestep: float | mx.array | None) -> tuple[mx.array, mx.array | None]:
        """Checked latents in the compute dtype and the (B,) timestep the decoder wants (None if unused)."""
        cfg = self.config
        if z.ndim != 5 or z.shape[-1] != cfg.latent_channels:
            raise InvalidInputError(
                f"LTX VAE: expected latents (B, t, h, w, {cfg.latent_channels}), got {tuple(z.shape)}"
            )
        z = z.astype(self.decoder.conv_in.conv.weight.dtype)
        if not cfg.timestep_conditioning:
            return z, None
        if timestep is None:
            raise InvalidInputError("LTX VAE: this decoder is timestep-conditioned; pass timestep (e.g. 0.05)")
        t = mx.array(timestep, dtype=z.dtype) if not isinstance(timestep, mx.array) else timestep.astype(z.dtype)
        return z, mx.broadcast_to(t.reshape(-1), (z.shape[0],))

    # --- staging and latent statistics ---

    def keep_only(self, half: str) -> AutoencoderKLLTXVideo:
        """Drop the half not needed: ``"encoder"`` keeps encoding, ``"decoder"`` decoding (the latent
        statistics stay with either). Returns ``self``."""
        delattr(self, {"encoder": "decoder", "decoder": "encoder"}[half])
        return self

    def normalize_latents(self, z: mx.array) -> mx.array:
        """``(z - latents_mean) * scaling_factor / latents_std`` per channel (last axis), as the LTX
        pipelines' ``_normalize_latents`` applies to encoded images."""
        mean, std = self.latents_mean.astype(z.dtype), self.latents_std.astype(z.dtype)
        return (z - mean) * self.config.scaling_factor / std

    def denormalize_latents(self, z: mx.array) -> mx.array:
        """Inverse of :meth:`normalize_latents`: ``z * latents_std / scaling_factor + latents_mean``."""
        mean, std = self.latents_mean.astype(z.dtype), self.latents_std.astype(z.dtype)
        return z * std / self.config.scaling_factor + mean


def sample_posterior(mean: mx.array, logvar: mx.array, noise: mx.array) -> mx.array:
    """``mean + exp(logvar / 2) * noise``: diffusers' ``latent_dist.sample()``, which the LTX image-to-video
    pipelines use (``retrieve_latents``' default) with their generator's standard-normal ``noise``."""
    return mean + mx.exp(0.5 * logvar) * noise


# --- weight maps ----------------------------------------------------------------------------------------

DIFFUSERS_MAP = WeightMap(
    name="diffusers AutoencoderKLLTXVideo",
    rules=(
        Rule(r".*\.per_channel_scale[12]", transform=flatten),  # noise scales (C, 1, 1) -> (C,)
        # conv kernels in PyTorch's (O, C, kt, kh, kw) order as the model keeps them (TorchConv3d), biases,
        # LayerNorms, Linears, modulation tables, the multiplier, latent statistics
        IDENTITY,
    ),
)




def _other_half(half: str | None) -> tuple[str, ...]:
    """Stored-tensor regexes a half model leaves out: the other half's (diffusers and MLX names)."""
    return () if half is None else (rf"{'decoder' if half == 'encoder' else 'encoder'}\..*",)


def _component(half: str | None) -> ComponentType:
    def build(config: Mapping[str, Any]) -> AutoencoderKLLTXVideo:
        model = AutoencoderKLLTXVideo(config_from_dict(LTXVAEConfig, config))
        return model if half is None else model.keep_only(half)

    def source_map(model: nn.Module) -> WeightMap:
        return WeightMap(DIFFUSERS_MAP.name, DIFFUSERS_MAP.rules, ignore=_other_half(half))

    return ComponentType(
        "vae" if half is None else f"vae {half}",
        build,
        source_map,
        # Converted in float32 whatever the compute dtype, as the Wan VAE, so it can run in float32.
        stored_dtype=lambda dtype: mx.float32,
        skip_stored=lambda model: _other_half(half),
    )


VAE = _component(None)
VAE_ENCODER = _component("encoder")
VAE_DECODER = _component("decoder")


def load_ltx_vae(folder: str | Path, dtype: mx.Dtype = mx.float32, half: str | None = None) -> AutoencoderKLLTXVideo:
    """Load a ``vae/`` folder (``config.json`` + safetensors, diffusers or MLX layout) strictly into
    :class:`AutoencoderKLLTXVideo`, casting weights to ``dtype``. ``half`` ("encoder" or "decoder") loads
    only that half: the other half's tensors are never read. The VAE is never quantized."""
    kinds = {None: VAE, "encoder": VAE_ENCODER, "decoder": VAE_DECODER}
    if half not in kinds:
        raise InvalidInputError(f"LTX VAE: half must be 'encoder' or 'decoder', got {half!r}")
    return load_component(kinds[half], folder, dtype)
