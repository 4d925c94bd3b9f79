"""The LTX-Video latent upsampler (``LTXLatentUpsamplerModel``) and the latent filters of its pipeline.

Mirrors diffusers 0.42.1 ``pipelines/ltx/modeling_latent_upsampler.py``: a 3x3(x3) conv + GroupNorm
ResNet at ``mid_channels`` around a sub-pixel upsampling conv, on VAE latents (128 channels, before
denormalisation, as ``LTXLatentUpsamplePipeline`` feeds it). Three kinds, by config:

- spatial x2 (the 0.9.7 / 0.9.8 spatial upscalers): a per-frame 2-D conv to 4x channels and a 2-D pixel
  shuffle; (B, F, H, W, C) -> (B, F, 2H, 2W, C);
- temporal x2 (the 0.9.7 temporal upscaler): a 3-D conv to 2x channels and a frame shuffle, dropping the
  first new frame; F -> 2F - 1;
- both: a 3-D conv to 8x channels and a 3-D shuffle; (F, H, W) -> (2F - 1, 2H, 2W).

``dims = 3`` (the released models) uses 3x3x3 convs with zero padding in time too and GroupNorms over all
frames; ``dims = 2`` works frame by frame (spatial only: diffusers' 2-D model cannot run the temporal
kinds). Layout is channels-last, latents (B, F, H, W, C).

Original single files: diffusers' ``scripts/convert_ltx_to_diffusers.py`` loads the Lightricks upsampler
``.safetensors`` into ``LTXLatentUpsamplerModel`` with ``load_state_dict(strict=True)`` and no renaming,
so :data:`DIFFUSERS_MAP` reads both layouts (the config is in that file's ``__metadata__["config"]``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ...components import ComponentType, load_component
from ...errors import InvalidInputError, WeightLoadError
from ...weights import (
    IDENTITY,
    Rule,
    WeightMap,
    config_from_dict,
    conv_weight,
    load_strict,
    read_config,
    safetensors_header,
)
from ..conv import conv3d

log = logging.getLogger(__name__)

GROUPS = 32  # every GroupNorm is torch.nn.GroupNorm(32, C), eps 1e-5


@dataclass(frozen=True)
class LTXLatentUpsamplerConfig:
    """diffusers' ``LTXLatentUpsamplerModel`` config (defaults are diffusers', = the spatial upscalers)."""

    in_channels: int = 128
    mid_channels: int = 512
    num_blocks_per_stage: int = 4
    dims: int = 3
    spatial_upsample: bool = True
    temporal_upsample: bool = False

    def __post_init__(self) -> None:
        if self.dims not in (2, 3):
            raise WeightLoadError(f"latent upsampler: dims must be 2 or 3, got {self.dims}")
        if not (self.spatial_upsample or self.temporal_upsample):
            raise WeightLoadError("latent upsampler: neither spatial_upsample nor temporal_upsample is set")
        if self.dims == 2 and self.temporal_upsample:
            raise WeightLoadError("latent upsampler: a 2-D (dims=2) model cannot upsample in time")
        if self.mid_channels % GROUPS:
            raise WeightLoadError(f"latent upsampler: mid_channels {self.mid_channels} is not a multiple of {GROUPS}")

    @property
    def factors(self) -> tuple[int, int, int]:
        """Upsampling factors of (frames, height, width) before the first new frame is dropped."""
        t = 2 if self.temporal_upsample else 1
        s = 2 if self.spatial_upsample else 1
        return t, s, s


class Conv3x3(nn.Module):
    """A stride-1 convolution with zero padding 1: 3x3 on each frame (PyTorch ``Conv2d``, weight
    (O, 3, 3, C)) or 3x3x3 (``Conv3d``, weight (O, 3, 3, 3, C)), computed by :func:`~..conv.conv3d`
    without an im2col buffer."""

    def __init__(self, in_channels: int, out_channels: int, dims: int):
        super().__init__()
        self.weight = mx.zeros((out_channels, *(3,) * dims, in_channels))
        self.bias = mx.zeros((out_channels,))

    def __call__(self, x: mx.array) -> mx.array:
        """x (B, F, H, W, C) -> (B, F, H, W, O)."""
        weight = self.weight
        if weight.ndim == 4:  # per frame: a 3-D kernel one frame deep
            weight = weight[:, None]
        else:
            x = mx.pad(x, [(0, 0), (1, 1), (0, 0), (0, 0), (0, 0)])
        return conv3d(x, weight, self.bias, padding=(1, 1), layout="mlx")


class PixelShuffle(nn.Module):
    """diffusers' ``PixelShuffleND`` in channels-last: channels (c, pf, ph, pw) -> (F*pf, H*ph, W*pw)."""

    def __init__(self, factors: tuple[int, int, int]):
        super().__init__()
        self.factors = factors

    def __call__(self, x: mx.array) -> mx.array:
        B, F, H, W, _ = x.shape
        pf, ph, pw = self.factors
        x = x.reshape(B, F, H, W, -1, pf, ph, pw)
        x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4)
        return x.reshape(B, F * pf, H * ph, W * pw, -1)


class ResBlock(nn.Module):
    """conv -> GroupNorm -> SiLU -> conv -> GroupNorm, then SiLU of the sum with the input."""

    def __init__(self, channels: int, dims: int):
        super().__init__()
        self.conv1 = Conv3x3(channels, channels, dims)
        self.norm1 = nn.GroupNorm(GROUPS, channels, pytorch_compatible=True)
        self.conv2 = Conv3x3(channels, channels, dims)
        self.norm2 = nn.GroupNorm(GROUPS, channels, pytorch_compatible=True)

    def __call__(self, x: mx.array) -> mx.array:
        h = nn.silu(self.norm1(self.conv1(x)))
        return nn.silu(self.norm2(self.conv2(h)) + x)


class LTXLatentUpsamplerModel(nn.Module):
    """Upsample VAE latents x2 in space, time or both (see the module docstring)."""

    def __init__(self, config: LTXLatentUpsamplerConfig):
        super().__init__()
        self.config = config
        dims, mid = config.dims, config.mid_channels
        self.initial_conv = Conv3x3(config.in_channels, mid, dims)
        self.initial_norm = nn.GroupNorm(GROUPS, mid, pytorch_compatible=True)
        self.res_blocks = [ResBlock(mid, dims) for _ in range(config.num_blocks_per_stage)]
        # diffusers' Sequential(conv, PixelShuffleND): a 2-D conv when only space is upsampled
        factors = config.factors
        upsample_dims = 3 if config.temporal_upsample else 2
        shuffled = factors[0] * factors[1] * factors[2] * mid
        self.upsampler = [Conv3x3(mid, shuffled, upsample_dims), PixelShuffle(factors)]
        self.post_upsample_res_blocks = [ResBlock(mid, dims) for _ in range(config.num_blocks_per_stage)]
        self.final_conv = Conv3x3(mid, config.in_channels, dims)

    def __call__(self, latents: mx.array) -> mx.array:
        """latents (B, F, H, W, C) -> (B, F', 2H or H, 2W or W, C) with F' = 2F - 1 when upsampling in
        time, else F; in the weights' dtype."""
        B, F, H, W, C = latents.shape
        x = latents.astype(self.initial_conv.weight.dtype)
        if self.config.dims == 2:  # every frame on its own, as a one-frame video
            x = x.reshape(B * F, 1, H, W, C)
        x = nn.silu(self.initial_norm(self.initial_conv(x)))
        for block in self.res_blocks:
            x = block(x)
        conv, shuffle = self.upsampler
        x = shuffle(conv(x))
        if self.config.temporal_upsample:
            x = x[:, 1:]
        for block in self.post_upsample_res_blocks:
            x = block(x)
        x = self.final_conv(x)
        if self.config.dims == 2:
            x = x.reshape(B, F, *x.shape[2:])
        return x


# --- the upsample pipeline's latent filters ----------------------------------------------------------------


def adain_filter_latent(latents: mx.array, reference_latents: mx.array, factor: float = 1.0) -> mx.array:
    """``LTXLatentUpsamplePipeline.adain_filter_latent``: give each sample's channels the mean and standard
    deviation (unbiased, as ``torch.std_mean``) of ``reference_latents``, then ``lerp`` from ``latents``
    towards that by ``factor``.

    Args:
        latents: (B, F, H, W, C) upsampled latents.
        reference_latents: (B, F_r, H_r, W_r, C), e.g. the latents before upsampling.
        factor: blend, 0 keeps ``latents``, 1 is fully normalised (diffusers allows -10 to 10).

    Returns:
        (B, F, H, W, C).
    """
    axes = (1, 2, 3)
    r_mean = reference_latents.mean(axis=axes, keepdims=True)
    r_std = mx.sqrt(reference_latents.var(axis=axes, keepdims=True, ddof=1))
    i_mean = latents.mean(axis=axes, keepdims=True)
    i_std = mx.sqrt(latents.var(axis=axes, keepdims=True, ddof=1))
    result = ((latents - i_mean) / i_std) * r_std + r_mean
    # torch.lerp's two-sided formula
    if abs(factor) < 0.5:
        return latents + factor * (result - latents)
    return result - (result - latents) * (1 - factor)


def tone_map_latents(latents: mx.array, compression: float) -> mx.array:
    """``LTXLatentUpsamplePipeline.tone_map_latents``: scale each value by
    ``1 - 0.8 * s * sigmoid(4 * s * (|x| - 1))`` with ``s = 0.75 * compression`` (0: identity, 1: strongest
    compression of large values). Any shape."""
    s = compression * 0.75
    return latents * (1.0 - 0.8 * s * mx.sigmoid(4.0 * s * (mx.abs(latents) - 1.0)))


# --- weights -----------------------------------------------------------------------------------------------

_CONVS = r"(initial_conv|final_conv|upsampler\.0|(res_blocks|post_upsample_res_blocks)\.\d+\.conv[12])"
DIFFUSERS_MAP = WeightMap(
    name="latent upsampler (diffusers)",
    rules=(Rule(_CONVS + r"\.weight", transform=conv_weight), IDENTITY),
)

LATENT_UPSAMPLER = ComponentType(
    "latent_upsampler",
    build=lambda config: LTXLatentUpsamplerModel(config_from_dict(LTXLatentUpsamplerConfig, config)),
    source_map=lambda model: DIFFUSERS_MAP,
)


# Tensors every upsampler file has (how a single file is told from another checkpoint's).
_REQUIRED = ("initial_conv.weight", "upsampler.0.weight", "final_conv.weight")


def upsampler_source(path: str | Path) -> Path:
    """The upsampler in ``path``: a ``latent_upsampler/`` folder (config.json + safetensors), a diffusers
    upsample-pipeline folder holding one, or an original ``ltxv-spatial-upscaler-*.safetensors`` file.

    Raises:
        InvalidInputError: nothing there, or something that is not a latent upsampler.
    """
    path = Path(path)
    if path.is_dir() and (path / "latent_upsampler").is_dir():
        path = path / "latent_upsampler"
    if path.is_dir() and (path / "config.json").is_file():
        if read_config(path).get("_class_name", "LTXLatentUpsamplerModel") == "LTXLatentUpsamplerModel":
            return path
    if path.is_file() and path.suffix == ".safetensors":
        try:
            keys = safetensors_header(path)[1].keys()
        except (OSError, WeightLoadError) as e:
            raise InvalidInputError(f"{path}: unreadable safetensors ({e})") from None
        if all(k in keys for k in _REQUIRED):
            return path
    if not path.exists():
        raise InvalidInputError(f"{path}: no such latent upsampler")
    raise InvalidInputError(f"{path} is not an LTX-Video latent upsampler (expected a latent_upsampler/ folder or "
                            "an ltxv-spatial-upscaler-*.safetensors file)")  # fmt: skip


def upsampler_config(path: str | Path) -> LTXLatentUpsamplerConfig:
    """The config of the upsampler at ``path`` (see :func:`upsampler_source`), read without its weights:
    a folder's config.json, or an original file's ``__metadata__["config"]`` (diffusers' defaults, the
    released spatial upscalers' config, where the file has none)."""
    source = upsampler_source(path)
    if source.is_dir():
        return config_from_dict(LTXLatentUpsamplerConfig, read_config(source))
    metadata = safetensors_header(source)[1].get("__metadata__") or {}
    try:
        config = json.loads(metadata.get("config", "{}"))
    except ValueError as e:
        raise WeightLoadError(f"{source}: unreadable config metadata ({e})") from None
    return config_from_dict(LTXLatentUpsamplerConfig, config)


def load_ltx_latent_upsampler(path: str | Path, dtype: mx.Dtype) -> LTXLatentUpsamplerModel:
    """Load an upsampler (see :func:`upsampler_source`): a ``latent_upsampler/`` folder (config.json plus
    safetensors, diffusers or MLX layout) or an original single ``.safetensors`` file (diffusers' names).

    Raises:
        InvalidInputError: ``path`` holds no latent upsampler.
        WeightLoadError: unreadable or unsupported config or weights; missing/unexpected/mis-shaped tensors.
    """
    source = upsampler_source(path)
    if source.is_dir():
        return load_component(LATENT_UPSAMPLER, source, dtype)
    model = LTXLatentUpsamplerModel(upsampler_config(source))
    try:
        tensors = mx.load(str(source))
    except Exception as e:  # mlx raises RuntimeError/ValueError with a C++ message
        raise WeightLoadError(f"{source}: unreadable safetensors ({e})") from None
    load_strict(model, DIFFUSERS_MAP.apply(tensors), dtype=dtype, what=source.name)
    log.info("loaded latent upsampler from %s (%s)", source, dtype)
    return model
