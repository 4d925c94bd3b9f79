"""LTX-Video's upsample-and-refine recipe (``upscale=``), as diffusers' LTX docs run the 0.9.7/0.9.8
distilled models (ltx.md §1.3):

1. the base pass generates the clip at ``downscale`` (2/3) of the size asked for, each side rounded down
   to the VAE's 32 (``LTXConditionPipeline(..., output_type="latent")``);
2. the latent upsampler doubles the latents' height and width, then AdaIN gives them the statistics of
   the latents before upsampling and an optional tone map compresses large values
   (``LTXLatentUpsamplePipeline(latents=..., adain_factor=1.0, tone_map_compression_ratio=...)``; 0.6 is
   the recommendation for 0.9.8);
3. the refine pass runs at twice the base size from the upsampled latents noised to the first kept step
   of its own schedule (``LTXConditionPipeline(latents=..., denoise_strength=0.999, timesteps=[1000, 909,
   725, 421, 0])``: 4 of 5 steps), conditioned on the same photo(s) refitted to that size;
4. the decode at that size, and the frames resized (bicubic) to the size asked for.

The refine pass is a :class:`~mlx_i2v.request.Request` of its own, run by the pipeline's one denoising
loop; this module holds the recipe, the sizes and the upsample stage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np
from PIL import Image

from ...conditioning import ConditionState, channels_last_normal
from ...errors import InvalidInputError
from ...models.conv import compute_dtype
from ...models.ltx.latent_upsampler import (
    LTXLatentUpsamplerConfig,
    LTXLatentUpsamplerModel,
    adain_filter_latent,
    load_ltx_latent_upsampler,
    tone_map_latents,
    upsampler_config,
)
from ...planner import Stage, largest_conv_workspace, module_weight_bytes
from ...resident import Resident

if TYPE_CHECKING:
    from ...request import Request

log = logging.getLogger(__name__)

# The refine pass of diffusers' distilled recipe: 4 of these 5 timesteps run (denoise_strength 0.999).
REFINE_TIMESTEPS = (1000.0, 909.0, 725.0, 421.0, 0.0)
# Activation peak of the upsampler: this many of its largest tensor (mid channels at the 2x size: the
# upsampling conv's output, its pixel-shuffled copy, a residual block's intermediates), the largest conv's
# workspace and a fixed part. Against MLX 0.32 CPU peaks of the real-size model (mid 512, 4 blocks) on base
# latent grids (3, 8, 11), (16, 10, 14) and (13, 16, 24): 147, 326 and 557 MB measured, 159, 439 and 719
# MB planned (on the safe side).
UPSAMPLE_COPIES = 6
UPSAMPLE_FIXED = 50 * 10**6


@dataclass(frozen=True)
class Upscale:
    """The recipe (defaults: diffusers' LTX docs).

    Attributes:
        upsampler: a ``latent_upsampler/`` folder (or a diffusers upsample-pipeline folder holding one), an
            original ``ltxv-spatial-upscaler-*.safetensors`` file, or a loaded model (spatial x2 only).
        adain_factor: how far the upsampled latents take the base latents' per-channel statistics (0: not
            at all, 1: fully; diffusers allows -10 to 10).
        tone_map_compression_ratio: 0 (off) to 1; 0.6 for the 0.9.8 upscaler.
        timesteps: the refine pass's schedule, from 1000 down.
        denoise_strength: the part of it run: the last ``int(len(timesteps) * denoise_strength)`` entries.
        downscale: the base pass's size as a fraction of the size asked for.
    """

    upsampler: str | Path | LTXLatentUpsamplerModel
    adain_factor: float = 1.0
    tone_map_compression_ratio: float = 0.0
    timesteps: tuple[float, ...] = REFINE_TIMESTEPS
    denoise_strength: float = 0.999
    downscale: float = 2 / 3

    def config(self) -> LTXLatentUpsamplerConfig:
        """The upsampler's config, read without its weights."""
        if isinstance(self.upsampler, LTXLatentUpsamplerModel):
            return self.upsampler.config
        return upsampler_config(self.upsampler)

    def name(self) -> str:
        """As metadata records it: the file or folder name."""
        if isinstance(self.upsampler, LTXLatentUpsamplerModel):
            return "LTXLatentUpsamplerModel"
        return Path(self.upsampler).name


def as_upscale(value: Any, latent_channels: int) -> tuple[Upscale, LTXLatentUpsamplerConfig]:
    """``upscale=`` (a path, a loaded upsampler or an :class:`Upscale`) as a checked recipe and its
    upsampler's config, reading no weights.

    Raises:
        InvalidInputError: not an upsampler, not a spatial x2 one for these latents, or a setting out of range.
    """
    recipe = value if isinstance(value, Upscale) else Upscale(value)
    if not isinstance(recipe.upsampler, (str, Path, LTXLatentUpsamplerModel)):
        kind = type(recipe.upsampler).__name__
        raise InvalidInputError(f"upscale must be a latent upsampler path or model, got {kind}")
    config = recipe.config()
    if config.temporal_upsample or not config.spatial_upsample:
        raise InvalidInputError(f"upscale: {recipe.name()} upsamples in time; the refine recipe needs a spatial x2 "
                                "upsampler (ltxv-spatial-upscaler)")  # fmt: skip
    if config.in_channels != latent_channels:
        raise InvalidInputError(f"upscale: {recipe.name()} takes {config.in_channels}-channel latents, this model's "
                                f"VAE makes {latent_channels}")  # fmt: skip
    for name, value, low, high in (("adain_factor", recipe.adain_factor, -10.0, 10.0),
                                   ("tone_map_compression_ratio", recipe.tone_map_compression_ratio, 0.0, 1.0),
                                   ("denoise_strength", recipe.denoise_strength, 0.0, 1.0),
                                   ("downscale", recipe.downscale, 0.0, 1.0)):  # fmt: skip
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
            raise InvalidInputError(f"upscale {name} must lie in [{low:g}, {high:g}], got {value!r}")
    if recipe.downscale == 0:
        raise InvalidInputError("upscale downscale must be more than 0")
    try:
        steps = np.asarray(recipe.timesteps, dtype=np.float64)
    except (TypeError, ValueError):
        steps = np.zeros((0, 0))
    if steps.ndim != 1 or len(steps) < 1 or not np.all(np.isfinite(steps)) or np.any(np.diff(steps) > 0):
        raise InvalidInputError(f"upscale timesteps must be a decreasing list, got {recipe.timesteps!r}")
    return recipe, config


def base_size(height: int, width: int, downscale: float, multiple: int) -> tuple[int, int]:
    """The base pass's (height, width): ``int(side * downscale)`` rounded down to ``multiple`` (diffusers'
    docs: ``round_to_nearest_resolution_acceptable_by_vae``).

    Raises:
        InvalidInputError: a side would be less than ``multiple``.
    """
    h, w = int(height * downscale), int(width * downscale)
    h, w = h - h % multiple, w - w % multiple
    if h < multiple or w < multiple:
        smallest = int(multiple / downscale)
        while int(smallest * downscale) < multiple:
            smallest += 1
        raise InvalidInputError(f"{width}x{height} is too small to upscale: the base pass at {downscale:.3g} of it "
                                f"needs sides of at least {smallest}")  # fmt: skip
    return h, w


@dataclass(frozen=True)
class LatentStatistics:
    """The VAE's per-channel latent statistics (C,), which the upsampler works without."""

    mean: mx.array
    std: mx.array
    scaling_factor: float

    @classmethod
    def of(cls, vae) -> LatentStatistics:
        return cls(vae.latents_mean.astype(mx.float32), vae.latents_std.astype(mx.float32),
                   vae.config.scaling_factor)  # fmt: skip

    def denormalize(self, z: mx.array) -> mx.array:
        return z * self.std / self.scaling_factor + self.mean

    def normalize(self, z: mx.array) -> mx.array:
        return (z - self.mean) * self.scaling_factor / self.std


def upsample_latents(model: LTXLatentUpsamplerModel, latents: mx.array, statistics: LatentStatistics,
                     adain_factor: float = 0.0, tone_map_compression_ratio: float = 0.0) -> mx.array:  # fmt: skip
    """``LTXLatentUpsamplePipeline(latents=..., output_type="latent")``: normalised latents (1, T, h, w, C)
    -> normalised (1, T, 2h, 2w, C), float32: denormalised, upsampled, AdaIN-filtered towards the
    denormalised input (``adain_factor`` > 0), tone-mapped (ratio > 0), normalised again."""
    z = statistics.denormalize(latents.astype(mx.float32))
    dtype = model.initial_conv.weight.dtype
    z = z.astype(dtype)
    up = model(z)
    if adain_factor > 0.0:
        up = adain_filter_latent(up, z, adain_factor)
    if tone_map_compression_ratio > 0.0:
        up = tone_map_latents(up, tone_map_compression_ratio)
    return statistics.normalize(up.astype(mx.float32))


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Frames (F, H, W, 3) float32 -> (F, height, width, 3) by Pillow's bicubic filter (what the recipe's
    ``frame.resize((w, h))`` uses), per channel in float so nothing is quantised; unchanged if the size is."""
    if frames.shape[1:3] == (height, width):
        return frames
    out = np.empty((len(frames), height, width, 3), np.float32)
    for i, frame in enumerate(frames):
        for c in range(3):
            channel = Image.fromarray(np.ascontiguousarray(frame[..., c], dtype=np.float32), mode="F")
            out[i, ..., c] = np.asarray(channel.resize((width, height), Image.Resampling.BICUBIC))
    return np.clip(out, 0.0, 1.0)


def refine_noise(shape: tuple[int, ...], seed: int) -> mx.array:
    """The noise the upsampled latents (1, T, h, w, C) are mixed with: drawn from the generation's seed in
    diffusers' (1, C, T, h, w) order, as the base pass's noise is (the recipe reseeds its generator for
    the refine call)."""
    return channels_last_normal(shape, mx.random.key(seed))


@dataclass
class UpscalePass:
    """A request's upscale: the recipe, its upsampler (loaded for the upsample stage only), the refine
    pass as a request at twice the base size, and the size of the returned frames. ``state`` (the refine
    pass's conditioning) and ``statistics`` are filled when the inputs are encoded."""

    recipe: Upscale
    config: LTXLatentUpsamplerConfig
    upsampler: Resident[LTXLatentUpsamplerModel]
    refine: Request
    height: int
    width: int
    state: ConditionState | None = None
    statistics: LatentStatistics | None = None

    @classmethod
    def build(cls, recipe: Upscale, config: LTXLatentUpsamplerConfig, refine: Request, height: int, width: int,
              dtype: mx.Dtype) -> UpscalePass:  # fmt: skip
        given = recipe.upsampler
        if isinstance(given, LTXLatentUpsamplerModel):
            upsampler = Resident("latent upsampler", lambda: given, keep=True)
        else:
            upsampler = Resident("latent upsampler", lambda: load_ltx_latent_upsampler(given, dtype))
        return cls(recipe, config, upsampler, refine, height, width)

    def encode(self, vae, conditioning, latent_shape: tuple[int, ...]) -> None:
        """With the VAE encoder loaded: its latent statistics, and the refine pass's conditioning on its
        keyframes (the photos at the refine size) for latents of ``latent_shape``."""
        self.statistics = LatentStatistics.of(vae)
        r = self.refine
        if r.keyframes is not None:
            self.state = conditioning.prepare(vae, r.keyframes, r.settings.num_frames, latent_shape, r.motion,
                                              seed=r.settings.seed)  # fmt: skip
            mx.eval(self.state.latent)

    def upsample(self, latents: mx.array) -> mx.array:
        """The upsample stage: the base pass's latents (1, T, h, w, C) -> (1, T, 2h, 2w, C)."""
        r = self.recipe
        up = upsample_latents(self.upsampler.get(), latents, self.statistics, r.adain_factor,
                              r.tone_map_compression_ratio)  # fmt: skip
        mx.eval(up)
        self.upsampler.release()
        return up

    def finish(self, frames: np.ndarray) -> np.ndarray:
        """The refine pass's decoded frames at the size asked for."""
        return resize_frames(frames, self.height, self.width)

    def stage(self, transformer_weights: int, grid: tuple[int, int, int], dtype: mx.Dtype, budget: int) -> Stage:
        """The upsample stage of the plan: the upsampler beside the transformer (kept for the refine
        pass), on base latents of ``grid`` (T, h, w)."""
        c = self.config
        weights = module_weight_bytes(LTXLatentUpsamplerModel(c), dtype)
        t, h, w = grid
        mid = c.mid_channels
        largest = t * 2 * h * 2 * w * mid * dtype.size
        workspace = largest_conv_workspace(
            [(t, h, w, mid, 4 * mid), (t, 2 * h, 2 * w, mid, mid)], compute_dtype(dtype).size, budget
        )
        return Stage("upsample", transformer_weights + weights, UPSAMPLE_COPIES * largest + workspace + UPSAMPLE_FIXED)

    def describe(self, base: tuple[int, int]) -> dict[str, Any]:
        """The metadata entry (sizes as width x height)."""
        r, s = self.recipe, self.refine.settings
        return {
            "upsampler": r.name(), "adain_factor": r.adain_factor,
            "tone_map_compression_ratio": r.tone_map_compression_ratio, "timesteps": list(r.timesteps),
            "denoise_strength": r.denoise_strength, "steps_run": s.num_inference_steps - self.refine.start,
            "base_size": [base[1], base[0]], "refine_size": [s.width, s.height],
        }  # fmt: skip
