"""LTX-Video 0.9.x as a family of the one pipeline: its variants (which pipeline semantics a checkpoint
gets), the transformer pass on channels-last latents, the sampler's schedule, the timestep-conditioned
decode, and the loader's components.

Which semantics a checkpoint gets follows its ``model_index.json`` ``_class_name`` (ltx.md §1.3):

* ``LTXPipeline`` / ``LTXImageToVideoPipeline`` (0.9.0, 0.9.1): the encoded image *is* latent frame 0,
  held at timestep 0 (the per-token ``t * (1 - mask)``); RoPE positions are the latent grid scaled by
  ``(8 / fps, 32, 32)``; sigmas ``linspace(1, 1/N, N)`` shifted by ``mu = calculate_shift(tokens, ...)``;
  prompts of 128 tokens, the encoder unmasked.
* ``LTXConditionPipeline`` (0.9.5+): see :class:`~mlx_i2v.families.ltx.conditioning.FrameConditions`; pixel-space
  ``video_coords``; timesteps ``linear_quadratic_schedule(N) * 1000``; prompts of 256 tokens, masked.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import mlx.core as mx
import numpy as np

from ...conditioning import FirstFrameLatent, Keyframes, channels_last_normal
from .conditioning import FrameConditions, extra_latent_frames
from .latent_rgb import LATENT_RGB
from ...errors import InvalidInputError
from ...family import Family, MaskedPrompts
from ...models.ltx.transformer import LTXPassTokens, RopeTables, pack_latents, pixel_coords, unpack_latents
from ...models.ltx.vae import noise_source
from ...models.ltx.vae_tiling import tiled_decode
from ...models.umt5 import LTX_CONDITION_PROMPTS, LTX_PROMPTS
from ...sampling import Samplers
from ...schedulers import FlowMatchEulerDiscreteScheduler
from ...variants import Defaults, Variant
from .schedules import calculate_shift, default_sigmas, linear_quadratic_schedule, retrieve_timesteps

# ``LTXPipeline.__call__`` defaults (512x704, 161 frames at 25 fps, 50 steps, guidance 3); the decode
# timestep and noise of the official configs (``LV/configs/ltxv-*.yaml``: 0.05 and 0.025), which only a
# timestep-conditioned VAE (0.9.1+) uses. No negative prompt (diffusers encodes "").
LTX_DEFAULTS = Defaults(
    num_inference_steps=50, guidance_scale=3.0, flow_shift=1.0, fps=25.0, num_frames=161,
    sizes=((512, 704), (704, 512)), negative_prompt="", decode_timestep=0.05, decode_noise_scale=0.025,
)  # fmt: skip

# LTXConditionPipeline adds the noise on the held image latents (its ``image_cond_noise_scale`` default).
LTX_CONDITION_DEFAULTS = replace(LTX_DEFAULTS, image_cond_noise_scale=0.15)

# What the pipeline has for Wan that LTX-Video does not have yet.
LTX_UNSUPPORTED = frozenset({"motion", "parallel", "flow_shift"})
# What the 0.9.0 / 0.9.1 pipelines (one image at latent frame 0, no denoise_strength) do not have on top of that.
LTX_IMAGE_TO_VIDEO_UNSUPPORTED = LTX_UNSUPPORTED | {"last_image", "keyframes", "extend", "loop", "restyle", "upscale"}


@dataclass(frozen=True)
class LTXForward:
    """One LTX transformer pass on channels-last latents (B, T, h, w, C): packed into tokens, positioned,
    and unpacked again.

    Positions: the latent grid scaled by ``(temporal ratio / fps, spatial ratio, spatial ratio)``
    (``LTXPipeline`` / ``LTXImageToVideoPipeline``), or, with ``pixel_coords`` set, pixel-space coordinates
    (``LTXConditionPipeline``: frame ``max(0, 8k - 7) / fps``, rows and columns times 32). Latent frames
    beyond the clip's ``latent_frames`` are keyframes' (:class:`~mlx_i2v.families.ltx.conditioning.FrameConditions`):
    ``extras`` lists, in order, how many latent frames each keyframe has and the pixel frame index it is
    placed at (diffusers' ``_scale_video_ids(..., frame_index)``)."""

    frame_rate: float
    temporal_ratio: int
    spatial_ratio: int
    pixel_coords: bool = False
    latent_frames: int = 0
    extras: tuple[tuple[int, int], ...] = ()

    # diffusers' LTX pipelines run both prompt branches in one transformer call under one cache context
    # ("cond_uncond"): a step cache decides for the batch, not per branch (mlx_i2v.stepcache.StepCache).
    decide_branches_together: ClassVar[bool] = True

    def __call__(self, model, x, timestep, context, branches, step):
        seamed = self.seamed(model)
        tokens = seamed.embed(x, timestep)
        return seamed.head(seamed.run_blocks(tokens.x, tokens, context), tokens)

    def seamed(self, model) -> PositionedLTX:
        """``model`` with this generation's positions bound: the seams of a pass (step caching)."""
        return PositionedLTX(model, self)

    def positions(self, model, frames: int, h: int, w: int) -> tuple[tuple[int, int, int], RopeTables]:
        """The token grid of (frames, h, w) latents and its RoPE tables."""
        cfg = model.config
        grid = (frames // cfg.patch_size_t, h // cfg.patch_size, w // cfg.patch_size)
        if self.pixel_coords:
            scales = dict(frame_rate=self.frame_rate, spatial_scale=self.spatial_ratio,
                          temporal_scale=self.temporal_ratio, patch_size=cfg.patch_size, patch_size_t=cfg.patch_size_t)
            coords = [pixel_coords(min(frames, self.latent_frames), h, w, **scales)]
            coords += [pixel_coords(n, h, w, frame_index=index, **scales) for n, index in self.extras]
            return grid, model.rope_tables(video_coords=np.concatenate(coords))
        scale = (self.temporal_ratio / self.frame_rate, self.spatial_ratio, self.spatial_ratio)
        return grid, model.rope_tables(*grid, rope_interpolation_scale=scale)


@dataclass(frozen=True)
class PositionedLTX:
    """The LTX transformer on channels-last latents with a generation's positions bound (a
    :class:`~mlx_i2v.seams.SeamedTransformer`): tokens packed and positioned by ``embed``, unpacked by
    ``head``."""

    model: Any
    forward: LTXForward

    def embed(self, hidden_states: mx.array, timestep: mx.array) -> LTXPassTokens:
        """Latents (B, T, h, w, C) and timesteps (B,) or (B, L) -> the blocks' input."""
        cfg = self.model.config
        _, frames, h, w, _ = hidden_states.shape
        grid, rope = self.forward.positions(self.model, frames, h, w)
        tokens = self.model.embed(pack_latents(hidden_states, cfg.patch_size, cfg.patch_size_t), timestep, rope)
        return tokens._replace(grid=grid)

    def run_blocks(self, x: mx.array, tokens: LTXPassTokens, context: Any, blocks: slice = slice(None)) -> mx.array:
        """The ``blocks`` on x (B, L, dim)."""
        return self.model.run_blocks(x, tokens, context, blocks)

    def project_out(self, x: mx.array, tokens: LTXPassTokens) -> mx.array:
        """(B, L, dim) -> (B, L, out_channels)."""
        return self.model.project_out(x, tokens)

    def unpatchify(self, x: mx.array, grid: tuple[int, ...]) -> mx.array:
        """(B, L, out_channels) -> (B, T, h, w, C)."""
        cfg = self.model.config
        return unpack_latents(x, grid, cfg.patch_size, cfg.patch_size_t)

    def head(self, x: mx.array, tokens: LTXPassTokens) -> mx.array:
        """``unpatchify(project_out(x))``."""
        return self.unpatchify(self.project_out(x, tokens), tokens.grid)


def _forward(pixel: bool):
    def forward(dims, settings, keyframes: Keyframes | None = None) -> LTXForward:
        vae = dims.vae
        frames = dims.latent_shape(settings.height, settings.width, settings.num_frames)[1]
        conditions = [] if keyframes is None else keyframes.conditions(settings.num_frames)
        extras = tuple((n, c.index) for c in conditions if (n := extra_latent_frames(c, vae.temporal_ratio)))
        return LTXForward(settings.fps, vae.temporal_ratio, vae.spatial_ratio, pixel_coords=pixel,
                          latent_frames=frames, extras=extras)  # fmt: skip

    return forward


def decode_noises(shape: tuple[int, ...], seed: int) -> tuple[mx.array, Any]:
    """The decode's random draws for latents of ``shape`` (1, T, h, w, C), from the generation's seed:
    the noise mixed into the latents (drawn in diffusers' (1, C, T, h, w) order, returned channels-last)
    and the decoder's own injected-noise source (0.9.1 decoders)."""
    mix_key, inject_key = mx.random.split(mx.random.key(seed))
    return channels_last_normal(shape, mix_key), noise_source(inject_key)


def decode_ltx(vae, latents: mx.array, settings, tiling) -> Any:
    """The LTX pipelines' decode: denormalise; for a timestep-conditioned VAE (0.9.1+), mix in noise,
    ``(1 - s) * z + s * noise`` with ``s = decode_noise_scale`` (default: the decode timestep), and decode at
    ``decode_timestep``, tiled as ``tiling`` (an :class:`~mlx_i2v.families.ltx.planner.LTXTiling`) says when
    the plan asks for it. Yields the whole clip as one chunk (1, F, H, W, 3)."""
    z = vae.denormalize_latents(latents.astype(mx.float32))
    timestep, inject = None, None
    if vae.config.timestep_conditioning:
        timestep = settings.decode_timestep
        scale = settings.decode_noise_scale if settings.decode_noise_scale is not None else timestep
        noise, inject = decode_noises(z.shape, settings.seed)
        z = (1 - scale) * z + scale * noise
    if tiling is None:
        yield vae.decode(z, timestep, inject)
    else:
        yield tiled_decode(vae, z, timestep, inject, tiling.spatial, tiling.temporal)


LTX_IMAGE_TO_VIDEO = Family(name="LTX-Video", frame_stride=8, forward=_forward(False), decode=decode_ltx,
                            unsupported=LTX_IMAGE_TO_VIDEO_UNSUPPORTED, latent_rgb=tuple(LATENT_RGB.items()))  # fmt: skip
LTX_CONDITION = Family(name="LTX-Video", frame_stride=8, forward=_forward(True), decode=decode_ltx,
                       unsupported=LTX_UNSUPPORTED, latent_rgb=tuple(LATENT_RGB.items()))  # fmt: skip

# 0.9.0 / 0.9.1 checkpoints (diffusers' LTXPipeline and LTXImageToVideoPipeline).
LTX_VIDEO = Variant(
    name="ltx-video", conditioning=FirstFrameLatent(patch_hw=(1, 1), sample_posterior=True), defaults=LTX_DEFAULTS,
    size_multiple=32, family=LTX_IMAGE_TO_VIDEO, prompts=MaskedPrompts(LTX_PROMPTS),
)  # fmt: skip

# 0.9.5+ checkpoints (diffusers' LTXConditionPipeline).
LTX_VIDEO_CONDITION = Variant(
    name="ltx-video-condition", conditioning=FrameConditions(), defaults=LTX_CONDITION_DEFAULTS, size_multiple=32,
    family=LTX_CONDITION, prompts=MaskedPrompts(LTX_CONDITION_PROMPTS), accepts_last_image=True,
)  # fmt: skip

PIPELINE_VARIANTS = {
    "LTXPipeline": LTX_VIDEO,
    "LTXImageToVideoPipeline": LTX_VIDEO,
    "LTXConditionPipeline": LTX_VIDEO_CONDITION,
}
LTX_VARIANTS = {v.name: v for v in (LTX_VIDEO, LTX_VIDEO_CONDITION)}


def ltx_variant(index: dict[str, Any], model_dir: Any) -> Variant:
    """The variant of an LTX checkpoint from its ``model_index.json``."""
    from ...errors import WeightLoadError

    name = index.get("_class_name")
    if name not in PIPELINE_VARIANTS:
        raise WeightLoadError(f"{model_dir}: unsupported LTX-Video pipeline {name!r} "
                              f"(expected one of {', '.join(PIPELINE_VARIANTS)})")  # fmt: skip
    return PIPELINE_VARIANTS[name]


@dataclass(frozen=True)
class LTXSamplers(Samplers):
    """The LTX pipelines' schedules for :class:`~mlx_i2v.schedulers.FlowMatchEulerDiscreteScheduler`.

    ``as_timesteps``: ``LTXConditionPipeline`` passes its grid as timesteps (``grid * 1000``, default
    :func:`linear_quadratic_schedule`); the others pass sigmas (default ``linspace(1, 1/N, N)``) with the
    dynamic shift ``mu`` of the token count (used only by dynamically shifted configs, 0.9.0/0.9.1)."""

    as_timesteps: bool = False

    def build(self, name, *, num_inference_steps, flow_shift, sigmas, preset, seed, image_seq_len=0):
        if name != "euler":
            raise InvalidInputError(f"LTX-Video samples with the euler sampler, not {name}")
        c = self.config
        sampler = FlowMatchEulerDiscreteScheduler.from_config(c)
        mu = calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.5), c.get("max_shift", 1.15))  # fmt: skip
        if self.as_timesteps:
            grid = linear_quadratic_schedule(num_inference_steps) if sigmas is None else np.asarray(sigmas)
            retrieve_timesteps(sampler, timesteps=grid * self.num_train_timesteps, mu=mu)
        else:
            grid = default_sigmas(num_inference_steps) if sigmas is None else np.asarray(sigmas)
            retrieve_timesteps(sampler, sigmas=grid, mu=mu)
        return sampler


def ltx_samplers(config: dict[str, Any], default: str | None, variant: Variant) -> LTXSamplers:
    """The samplers of an LTX checkpoint with this ``scheduler_config.json``, on its variant's schedule."""
    return replace(LTXSamplers.from_config(config, default), as_timesteps=variant.name in TIMESTEP_SCHEDULES)


# Variants whose pipeline passes its grid as timesteps (LTXConditionPipeline).
TIMESTEP_SCHEDULES = frozenset({LTX_VIDEO_CONDITION.name})
