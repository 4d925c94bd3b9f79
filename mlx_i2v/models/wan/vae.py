"""The Wan video VAE (diffusers ``AutoencoderKLWan``) for both Wan2.1 (z=16, 8x8 spatial) and Wan2.2
(z=48, residual stages, 2x2 patchify, 16x16 spatial), channels-last.

Videos are (B, T, H, W, 3) in [-1, 1]; latents are (B, 1 + (T-1)//4, H/s, W/s, z_dim). Encoding and
decoding run in causal chunks exactly like the reference, so results match diffusers numerically, and
decoding streams: :meth:`AutoencoderKLWan.decode_frames` yields frames as each latent frame is decoded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn

from ...components import ComponentType, load_component
from ...errors import WeightLoadError
from ...weights import (
    IDENTITY,
    Rule,
    WeightMap,
    config_from_dict,
    conv_weight,
    flatten,
)
from ..vae_ops import patchify, unpatchify
from .vae_blocks import (
    CausalCache,
    CausalConv3d,
    MidBlock,
    Resample,
    ResidualBlock,
    ResidualDownBlock,
    ResidualUpBlock,
    RMSNorm,
    UpBlock,
    cached_conv,
    norm_silu,
)

log = logging.getLogger(__name__)

WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclass(frozen=True)
class WanVAEConfig:
    """diffusers' ``AutoencoderKLWan`` config; the defaults are the Wan2.1 VAE. ``dropout`` is kept for
    config fidelity and unused (inference only)."""

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = field(default=WAN21_LATENTS_MEAN)
    latents_std: tuple[float, ...] = field(default=WAN21_LATENTS_STD)
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None
    scale_factor_temporal: int | None = 4
    scale_factor_spatial: int | None = 8

    def __post_init__(self) -> None:
        # diffusers builds encoder attention blocks for attn_scales but then calls them with cache
        # arguments they do not accept, so no working checkpoint can have any.
        if self.attn_scales:
            raise WeightLoadError(
                f"Wan VAE: attn_scales={list(self.attn_scales)} is not supported (diffusers cannot run it)"
            )
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise WeightLoadError(f"Wan VAE: latents_mean/latents_std need z_dim={self.z_dim} values")


class Encoder(nn.Module):
    """Video (B, T, H, W, in_channels) -> (B, 1 + (T-1)//4, H/8, W/8, 2*z_dim), one chunk at a time."""

    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        last = len(cfg.dim_mult) - 1
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], 3, padding=1)
        self.down_blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            temporal = i != last and cfg.temperal_downsample[i]
            if cfg.is_residual:
                self.down_blocks.append(
                    ResidualDownBlock(in_dim, out_dim, cfg.num_res_blocks, temporal, down=i != last)
                )
                continue
            for j in range(cfg.num_res_blocks):
                self.down_blocks.append(ResidualBlock(in_dim if j == 0 else out_dim, out_dim))
            if i != last:
                self.down_blocks.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, 3, padding=1)

    def __call__(self, x: mx.array, cache: CausalCache) -> mx.array:
        cache.begin_chunk()
        x = cached_conv(self.conv_in, x, cache)
        for block in self.down_blocks:
            x = block(x, cache)
        x = self.mid_block(x, cache)
        return cached_conv(self.conv_out, norm_silu(self.norm_out, x), cache)


class Decoder(nn.Module):
    """Latents (B, t, h, w, z_dim) -> video frames (B, T, 8h, 8w, out_channels), one chunk at a time."""

    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        base = cfg.decoder_base_dim or cfg.base_dim
        mult = cfg.dim_mult
        dims = [base * m for m in (mult[-1], *mult[::-1])]
        temporal_upsample = cfg.temperal_downsample[::-1]
        last = len(mult) - 1
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        self.up_blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            up = i != last
            temporal = up and temporal_upsample[i]
            if cfg.is_residual:
                self.up_blocks.append(ResidualUpBlock(in_dim, out_dim, cfg.num_res_blocks, temporal, up))
            else:
                # Wan2.1 upsamplers halve the width, so every stage after the first starts at half.
                mode = ("upsample3d" if temporal else "upsample2d") if up else None
                in_dim = in_dim // 2 if i > 0 else in_dim
                self.up_blocks.append(UpBlock(in_dim, out_dim, cfg.num_res_blocks, mode))
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, 3, padding=1)

    def __call__(self, x: mx.array, cache: CausalCache, first_chunk: bool) -> mx.array:
        cache.begin_chunk()
        x = cached_conv(self.conv_in, x, cache)
        x = self.mid_block(x, cache)
        for block in self.up_blocks:
            x = block(x, cache, first_chunk)
        return cached_conv(self.conv_out, norm_silu(self.norm_out, x), cache)


class AutoencoderKLWan(nn.Module):
    """Wan2.1 / Wan2.2 video VAE; parameter names follow diffusers' state dict."""

    def __init__(self, config: WanVAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder(config)

    def encode(self, video: mx.array) -> tuple[mx.array, mx.array]:
        """Encode a video in the reference's frame chunks [0], [1:5], [5:9], ...

        Args:
            video: (B, T, H, W, 3) in [-1, 1]; frames past the last full chunk (T not 1 mod 4) are
                ignored, as in diffusers. H and W must be multiples of ``scale_factor_spatial``.

        Returns:
            ``(mean, logvar)``, each (B, 1 + (T-1)//4, H/s, W/s, z_dim); logvar is clamped to [-30, 20].
            Condition latents use ``mean`` (the posterior mode).
        """
        video = video.astype(self.quant_conv.weight.dtype)
        p = self.config.patch_size
        if p is not None:
            video = patchify(video, p)
        cache = CausalCache()
        chunks = []
        for i in range(1 + (video.shape[1] - 1) // 4):
            frames = video[:, :1] if i == 0 else video[:, 1 + 4 * (i - 1) : 1 + 4 * i]
            chunks.append(self.quant_conv(self.encoder(frames, cache)))
            mx.eval(chunks[-1], cache.arrays())
        mean, logvar = mx.split(mx.concatenate(chunks, axis=1), 2, axis=-1)
        return mean, mx.clip(logvar, -30.0, 20.0)

    def decode_frames(self, z: mx.array) -> Iterator[mx.array]:
        """Decode one latent frame at a time, yielding evaluated video frames as they are ready, so memory
        does not grow with the number of frames.

        Args:
            z: latents (B, T', h, w, z_dim) (not normalised: see :meth:`denormalize_latents`).

        Yields:
            (B, 1, H, W, 3) for the first latent frame, then (B, 4, H, W, 3) for each further one,
            unpatchified and clamped to [-1, 1].
        """
        z = z.astype(self.post_quant_conv.weight.dtype)
        cache = CausalCache()
        p = self.config.patch_size
        for i in range(z.shape[1]):
            # post_quant_conv is 1x1x1, so applying it per frame equals the reference's whole-tensor call.
            x = self.decoder(self.post_quant_conv(z[:, i : i + 1]), cache, first_chunk=i == 0)
            if p is not None:
                x = unpatchify(x, p)
            x = mx.clip(x, -1.0, 1.0)
            mx.eval(x, cache.arrays())
            yield x

    def keep_only(self, half: str) -> AutoencoderKLWan:
        """Drop the weights of the half not needed: ``"decoder"`` keeps decoding (the encoder is a fifth of
        the Wan2.2 VAE, 0.6 GB in float32), ``"encoder"`` keeps encoding. Returns ``self``."""
        drop = {"encoder": ("decoder", "post_quant_conv"), "decoder": ("encoder", "quant_conv")}[half]
        for name in drop:
            delattr(self, name)
        return self

    def decode(self, z: mx.array) -> mx.array:
        """Latents (B, T', h, w, z_dim) -> video (B, 4T'-3, H, W, 3) in [-1, 1]."""
        return mx.concatenate(list(self.decode_frames(z)), axis=1)

    def normalize_latents(self, z: mx.array) -> mx.array:
        """(z - latents_mean) / latents_std per channel (last axis), as the pipeline does to VAE output."""
        mean, std = self._latent_stats(z.dtype)
        return (z - mean) / std

    def denormalize_latents(self, z: mx.array) -> mx.array:
        """Inverse of :meth:`normalize_latents`: z * latents_std + latents_mean."""
        mean, std = self._latent_stats(z.dtype)
        return z * std + mean

    def _latent_stats(self, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        # Built on demand from the config: as attributes they would be taken for parameters.
        mean = mx.array(self.config.latents_mean, dtype=mx.float32).astype(dtype)
        std = mx.array(self.config.latents_std, dtype=mx.float32).astype(dtype)
        return mean, std


DIFFUSERS_MAP = WeightMap(
    name="diffusers AutoencoderKLWan",
    rules=(
        Rule(r".*\.gamma", transform=flatten),  # RMS gamma (C, 1, 1[, 1]) -> (C,)
        Rule(r".*\.weight", transform=conv_weight),  # every weight of this VAE is a conv kernel
        IDENTITY,
    ),
)


VAE = ComponentType(
    "vae",
    build=lambda config: AutoencoderKLWan(config_from_dict(WanVAEConfig, config)),
    source_map=lambda model: DIFFUSERS_MAP,
    # Converted in float32 whatever the compute dtype, so it can run in float32 (the default vae_dtype):
    # bfloat16-rounded weights alone cost 2-9 dB PSNR (benchmarks/README.md, "bfloat16 parity").
    stored_dtype=lambda dtype: mx.float32,
)


def load_wan_vae(folder: str | Path, dtype: mx.Dtype = mx.float32, half: str | None = None) -> AutoencoderKLWan:
    """Load a ``vae/`` folder (``config.json`` + safetensors, diffusers or MLX layout) strictly into
    :class:`AutoencoderKLWan`, casting weights to ``dtype``. The VAE is never quantized. ``half``
    ("encoder" or "decoder", see :meth:`AutoencoderKLWan.keep_only`) reads only that half's weights."""
    return load_component(VAE, folder, dtype, part=None if half is None else lambda vae: vae.keep_only(half))


# === Wan-AI original layout (``Wan2.1_VAE.pth`` / ``Wan2.2_VAE.pth``) =================================
# The Wan-AI repos ship the VAE as a plain ``torch.save`` state dict of ``WanVAE_`` (wan/modules/vae.py,
# vae2_2.py); read it with :func:`mlx_i2v.pth.read_pth`. Names differ from diffusers' only in module paths
# (wan.md §4.2, §4.3); tensors are re-laid out as in DIFFUSERS_MAP: RMS gammas flattened, every weight a
# conv kernel moved channels-last, biases as they are.


def _module_rules(source: str, target: str) -> tuple[Rule, ...]:
    """Rules moving one module's ``gamma`` / ``weight`` / ``bias`` from ``source`` (a key regex without
    the leaf) to ``target`` (an ``re`` template without the leaf)."""
    return (
        Rule(rf"{source}\.gamma", f"{target}.gamma", flatten),
        Rule(rf"{source}\.weight", f"{target}.weight", conv_weight),
        Rule(rf"{source}\.bias", f"{target}.bias"),
    )


# The original ResidualBlock's ``residual`` is Sequential(RMS_norm, SiLU, CausalConv3d, RMS_norm, SiLU,
# Dropout, CausalConv3d): only indices 0, 2, 3 and 6 hold tensors. ``shortcut`` is the 1x1x1 conv.
_RESNET_MEMBERS = (
    (r"residual\.0", "norm1"),
    (r"residual\.2", "conv1"),
    (r"residual\.3", "norm2"),
    (r"residual\.6", "conv2"),
    (r"shortcut", "conv_shortcut"),
)


def _resnet_rules(source: str, target: str) -> tuple[Rule, ...]:
    """Rules for a whole residual block at ``source`` -> ``target`` (both without the member name)."""
    return tuple(
        rule
        for member, ours in _RESNET_MEMBERS
        for rule in _module_rules(rf"{source}\.{member}", f"{target}.{ours}")
    )


# Parts both versions share: the stems, the middle (resnet, attention, resnet), the heads, the 1x1x1
# quant convs. ``middle.1`` is the attention block, whose ``norm``/``to_qkv``/``proj`` keep their names.
_SHARED_RULES = (
    *_module_rules(r"(encoder|decoder)\.conv1", r"\1.conv_in"),
    *_resnet_rules(r"(encoder|decoder)\.middle\.0", r"\1.mid_block.resnets.0"),
    *_module_rules(r"(encoder|decoder)\.middle\.1\.(norm|to_qkv|proj)", r"\1.mid_block.attentions.0.\2"),
    *_resnet_rules(r"(encoder|decoder)\.middle\.2", r"\1.mid_block.resnets.1"),
    *_module_rules(r"(encoder|decoder)\.head\.0", r"\1.norm_out"),
    *_module_rules(r"(encoder|decoder)\.head\.2", r"\1.conv_out"),
    *_module_rules(r"conv1", "quant_conv"),
    *_module_rules(r"conv2", "post_quant_conv"),
)

# Wan2.1: the encoder's flat ``downsamples`` Sequential is our flat ``down_blocks`` list index for index
# (resnets and resamples interleaved). The decoder's flat ``upsamples`` (15 entries) is regrouped into 4
# stages of 3 resnets + 1 upsampler (none after the last): entry 4*s + j is stage s's resnet j (j < 3) or
# its upsampler (j = 3). That arithmetic is fixed by the released architecture (num_res_blocks=2,
# 4 stages), as in diffusers' converters; other depths leave keys unclaimed and fail loudly.
_WAN21_STAGES, _WAN21_RESNETS = 4, 3
ORIGINAL_MAP_21 = WeightMap(
    name="Wan2.1 VAE (Wan-AI original)",
    rules=(
        *_SHARED_RULES,
        *_resnet_rules(r"encoder\.downsamples\.(\d+)", r"encoder.down_blocks.\1"),
        *_module_rules(r"encoder\.downsamples\.(\d+)\.(resample\.1|time_conv)", r"encoder.down_blocks.\1.\2"),
        *(
            rule
            for s in range(_WAN21_STAGES)
            for j in range(_WAN21_RESNETS)
            for rule in _resnet_rules(
                rf"decoder\.upsamples\.{(_WAN21_RESNETS + 1) * s + j}", f"decoder.up_blocks.{s}.resnets.{j}"
            )
        ),
        *(
            rule
            for s in range(_WAN21_STAGES - 1)
            for rule in _module_rules(
                rf"decoder\.upsamples\.{(_WAN21_RESNETS + 1) * s + _WAN21_RESNETS}\.(resample\.1|time_conv)",
                rf"decoder.up_blocks.{s}.upsamplers.0.\1",
            )
        ),
    ),
)

# Wan2.2: stages are nested (``downsamples.i.downsamples.j`` / ``upsamples.i.upsamples.j``), the same
# grouping as ours; each stage's trailing entry is its resampler (j = num_res_blocks in the encoder,
# num_res_blocks + 1 in the decoder), told apart from the resnets by its members. The AvgDown3D/DupUp3D
# shortcuts have no tensors.
ORIGINAL_MAP_22 = WeightMap(
    name="Wan2.2 VAE (Wan-AI original)",
    rules=(
        *_SHARED_RULES,
        *_resnet_rules(
            r"encoder\.downsamples\.(\d+)\.downsamples\.(\d+)", r"encoder.down_blocks.\1.resnets.\2"
        ),
        *_module_rules(
            r"encoder\.downsamples\.(\d+)\.downsamples\.\d+\.(resample\.1|time_conv)",
            r"encoder.down_blocks.\1.downsampler.\2",
        ),
        *_resnet_rules(r"decoder\.upsamples\.(\d+)\.upsamples\.(\d+)", r"decoder.up_blocks.\1.resnets.\2"),
        *_module_rules(
            r"decoder\.upsamples\.(\d+)\.upsamples\.\d+\.(resample\.1|time_conv)",
            r"decoder.up_blocks.\1.upsampler.\2",
        ),
    ),
)
# === end of the Wan-AI original layout ================================================================
