"""One image-to-video pipeline for every model family and variant: the variant supplies its conditioning,
defaults and family strategies (:mod:`mlx_i2v.family`), the pipeline orchestrates."""

from __future__ import annotations

import functools
import inspect
import logging
import secrets
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import mlx.core as mx
import numpy as np
from PIL import Image

from . import validation
from .clips import Clip, ClipInput, load_clip
from .conditioning import ConditionState, Keyframe, Keyframes, channels_last_normal, encode_mode
from .denoise import COND, UNCOND, Denoiser, Forward, StepInfo, plain_forward, take_rows
from .errors import GenerationCancelled, InvalidInputError
from .experts import Experts
from .extend import (
    DEFAULT_COLOUR_MATCH,
    Continuation,
    check_clip_fits,
    check_colour_match,
    context_frames,
    new_frame_count,
)
from .image import ImageInput, ImageOptions, LoadReport, fit_to_frame, load_image, to_model_range
from .keyframes import KeyframeInput, KeyframeRequest, check_frame_index, check_keyframes, clip_keyframe_frames
from .lora.manager import TransformerLoras
from .motion import check_motion
from .parallel import Parallel
from .planner import GROUP_SIZE, FamilyDims, Plan, VAETiling, check_fits
from .preview import Preview
from .request import Request, close_loop, keep_frames
from .resident import Resident, loading_seconds
from .restyle import DEFAULT_STRENGTH, check_strength, clip_frames, restyle_start
from .runtime import dtype_name
from .sampling import Samplers, choose_sampling
from .schedulers import add_noise
from .stepcache import CacheMethod, StepCache, kept_bytes, resolve_cache
from .families.ltx.upscale import Upscale, UpscalePass, as_upscale, base_size, refine_noise
from .variants import Variant
from .video import Video

log = logging.getLogger(__name__)

# on_step(step, total, timestep) or on_step(step, total, timestep, preview); False cancels.
StepCallback = Callable[..., "bool | None"]


@dataclass
class Settings:
    """The resolved settings of one generation (what was actually used)."""

    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    guidance_scale_2: float | None
    flow_shift: float
    seed: int
    negative_prompt: str
    fps: float
    scheduler: str  # the sampler (see mlx_i2v.sampling)
    sigmas: tuple[float, ...] | None  # its explicit grid, unshifted; None for its own
    preset: str | None  # the few-step recipe that filled the defaults
    cache: CacheMethod | None = None  # the step cache's method, None without one
    # The timestep-conditioned VAE decode (LTX-Video 0.9.1+); None for models without one.
    decode_timestep: float | None = None
    decode_noise_scale: float | None = None
    # The noise added to fully held latents each step (LTX-Video 0.9.5+); None for models without it.
    image_cond_noise_scale: float | None = None


@dataclass(frozen=True)
class ClipFrame:
    """A frame of the input clip standing in for a photo (a restyle's first or last frame, an extension's
    context): used as it is and fitted as the clip's frames are; the image options are for the caller's
    photos."""

    image: Image.Image


def _one_call_at_a_time(method: Callable) -> Callable:
    """Serialise generations on one pipeline: its stages load and release shared models, so a second
    call from another thread waits for the running one to finish. The lock is re-entrant, so ``__call__``
    and ``extend`` hold it from reading the inputs through the ``run`` they make."""

    @functools.wraps(method)
    def wrapper(self: Pipeline, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


@dataclass
class Pipeline:
    """Photo + prompt -> :class:`Video`, for every family (Wan, LTX-Video). Build it with :func:`load_pipeline`.

    Components are loaded when their stage starts and released when it ends (text encoder, CLIP, VAE,
    transformer experts), so only one large model is in memory at a time; ``keep_resident`` keeps them.

    A pipeline can be called from any thread (a Mac app's worker thread, say), one generation at a time:
    a call made while another is running waits for it to finish.
    """

    variant: Variant
    model_name: str
    dims: FamilyDims  # the family's configs as the planner reads them (Wan's ModelDims, LTXDims)
    dtype: mx.Dtype  # the transformer's and the text encoder's compute dtype
    vae_dtype: mx.Dtype  # the VAE's and CLIP's (float32 by default, as diffusers' docs run them)
    quantize_bits: int | None
    tokenizer: Any  # the family's tokenizer (UMT5Tokenizer, T5Tokenizer)
    text_encoder: Resident[Any]
    experts: Experts
    vae_encoder: Resident[Any]  # the VAE without its decoder, for the photo
    vae_decoder: Resident[Any]  # the VAE without its encoder, for the result
    samplers: Samplers
    # Photos -> image tokens (N, L_img, dim) for variants that attend to them (Wan2.1's CLIP encoder).
    image_encoder: Resident[Callable[[list[Image.Image]], mx.array]] | None = None
    loras: TransformerLoras | None = None
    parallel: Parallel = field(default_factory=Parallel)  # this process's share of each generation
    _lock: threading.RLock = field(default_factory=threading.RLock, init=False, repr=False, compare=False)

    @property
    def has_preview(self) -> bool:
        """Whether step previews can be drawn (a latent-to-RGB map is known for this VAE)."""
        return self.variant.family.preview_projection(self.dims.latent_channels) is not None

    def set_loras(self, loras) -> None:
        """Change the LoRAs or their strengths without reloading the base model (same forms as
        ``load_pipeline(loras=...)``); ``[]`` restores the base weights exactly. Every file is checked
        first, so on error nothing changes. Loaded experts are updated in place (merged parameters are
        re-read from their checkpoint); the others pick the set up when they load."""
        if self.loras is None:
            raise InvalidInputError("this pipeline was built without LoRA support")
        self.loras.set(loras, self.experts.loaded())

    # --- plans ---------------------------------------------------------------------------------------

    def plan(
        self,
        *,
        height: int,
        width: int,
        num_frames: int,
        guidance: bool = True,
        budget: int | None = None,
        encode_frames: int | None = None,
        cache: CacheMethod | None = None,
        shards: int = 1,
    ) -> Plan:
        """Estimate this pipeline's peak memory for a request, before anything is loaded (see
        :mod:`mlx_i2v.planner`). Height, width and frame count should already be valid; ``encode_frames``
        (video frames the VAE encodes) defaults to what image-to-video encodes; ``cache`` is the step
        cache's method (``Settings.cache``), whose kept residuals take memory too; ``shards``: the token
        shards of a sequence-parallel run (the plan is then one rank's)."""
        if encode_frames is None:
            encode_frames = num_frames if self.variant.conditioning.requires_image else 1
        return self.dims.plan(
            height=height,
            width=width,
            num_frames=num_frames,
            guidance=guidance,
            dtype=self.dtype,
            vae_dtype=self.vae_dtype,
            quantize=self.quantize_bits,
            budget=budget,
            encode_frames=encode_frames,
            staged=not self.text_encoder.keep,
            cache_bytes=kept_bytes(cache, self.dtype),
            shards=shards,
            lora_bytes=self._lora_factor_bytes(),
        )

    def _lora_factor_bytes(self) -> int:
        """What the active LoRAs keep beside quantized weights (merged into float ones, they cost nothing)."""
        if self.loras is None or not self.quantize_bits:
            return 0
        return self.loras.factor_bytes(self.dtype, GROUP_SIZE)

    def plan_call(self, image: ImageInput | None = None, **kwargs) -> tuple[Settings, Plan]:
        """The settings and the memory plan of a call with these arguments (see :meth:`resolve_settings`),
        without loading a model."""
        request = self._resolve(image, kwargs)
        return request.settings, self.plan_request(request)

    def plan_request(self, request: Request) -> Plan:
        """The plan of this process for a prepared request: what ``--dry-run`` shows. An upscale's is the refine
        pass's (at twice the base size, where the peak is) with the upsample stage added."""
        up = request.upscale
        if up is None:
            return self.plan_settings(request.settings, encode_frames=request.encode_frames(self.variant.conditioning))
        plan = self.plan_settings(up.refine.settings, encode_frames=up.refine.encode_frames(self.variant.conditioning))
        grid = self._latent_shape(request.settings)[1:4]
        plan.stages.insert(-1, up.stage(plan.stage("denoise").weights, grid, self.vae_dtype, plan.budget))
        if not plan.fits():  # sizes suggested for the refine pass would read as output sizes: none of them
            plan.suggestions = [x for x in plan.suggestions if not x.startswith("--width")]
            if self.plan_settings(request.settings).fits():
                plan.suggestions.append("no --upscale")
        return plan

    def plan_settings(self, settings: Settings, encode_frames: int | None = None) -> Plan:
        """The plan of this process for resolved settings: with both guidance branches in its batch
        unless they are split over ranks, on its shard of the tokens in a sequence-parallel run."""
        scales = self._scales(settings)
        guidance = len(self.denoiser(scales).branches_needed(scales)) > 1
        plan = self.plan(height=settings.height, width=settings.width, num_frames=settings.num_frames,
                         guidance=guidance, encode_frames=encode_frames, cache=settings.cache,
                         shards=self.parallel.layout(scales).sequence)  # fmt: skip
        if self.parallel.size > 1:
            grid = self._latent_shape(settings)[1:4]
            plan.parallel = self.parallel.summary(scales, self.dims.transformer, grid, self.dtype)
        return plan

    def resolve_settings(self, image: ImageInput | None = None, **kwargs) -> Settings:
        """The settings a call with these arguments would use (defaults filled in, sizes rounded, every
        argument checked), without loading a model or generating anything. Accepts the keyword
        arguments of ``__call__`` (``prompt``, ``latents`` and ``on_step`` too, checked and otherwise unused)."""
        return self._resolve(image, kwargs).settings

    def _resolve(self, image: ImageInput | None, kwargs: dict[str, Any]) -> Request:
        if "prompt" in kwargs:
            validation.text("prompt", kwargs.pop("prompt"))
        _check_on_step(kwargs.pop("on_step", None))
        latents = kwargs.pop("latents", None)
        request = self.prepare(image, **kwargs)
        if latents is not None:
            self._initial_noise(self._latent_shape(request.settings), request.settings.seed, latents)
        return request

    # --- the calls -----------------------------------------------------------------------------------

    @_one_call_at_a_time
    def __call__(
        self,
        image: ImageInput | None,
        prompt: str,
        *,
        video: ClipInput | None = None,
        strength: float | None = None,
        loop: bool = False,
        motion: float = 1.0,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_scale_2: float | None = None,
        flow_shift: float | None = None,
        seed: int | None = None,
        latents: np.ndarray | None = None,
        last_image: ImageInput | None = None,
        keyframes: Sequence[KeyframeInput] | None = None,
        on_step: StepCallback | None = None,
        crop: tuple[int, int, int, int] | None = None,
        rotate: int = 0,
        fit: str = "cover",
        background: tuple[int, int, int] | str = (255, 255, 255),
        cache: str | CacheMethod | None = None,
        cache_threshold: float | None = None,
        scheduler: str | None = None,
        sigmas: list[float] | None = None,
        preset: str | None = None,
        fps: float | None = None,
        decode_timestep: float | None = None,
        decode_noise_scale: float | None = None,
        image_cond_noise_scale: float | None = None,
        upscale: str | Path | Upscale | Any | None = None,
    ) -> Video:
        """Generate a clip that starts from ``image``, or restyle ``video``.

        Args:
            image: path, PIL image or uint8 array (H, W), (H, W, 3) or (H, W, 4); turned upright by its EXIF
                orientation, then fitted to the frame (see ``fit``). None generates from the prompt alone
                where the variant can (Wan2.2-TI2V-5B); in a restyle, None takes the clip's first frame
                where the variant needs an image.
            prompt: what should happen; the model reads its first 511 tokens (a longer prompt is cut with
                a logged warning). ``negative_prompt``: None for the model's default, "" for none.
            video: restyle this clip (see :func:`~mlx_i2v.clips.load_clip`; one frame is an image-to-image
                pass): it is encoded, noised to the first kept step and denoised over the last
                ``int(num_inference_steps * strength)`` steps (diffusers' ``WanVideoToVideoPipeline``).
                Its size and (4k+1 of its) frames are the defaults of ``height``, ``width``, ``num_frames``.
            strength: how much of the schedule a restyle reruns, in (0, 1] (default 0.6); on LTX-Video 0.9.5+
                without ``video``, how strongly the photo holds latent frame 0 (default 1: kept exactly).
            loop: end the clip on its first frame (first-last-frame models, Wan2.2-I2V-A14B, LTX-Video 0.9.5+); the
                final frame, a copy of the first, is dropped so that the clip plays seamlessly in a loop.
            motion: experimental motion amplitude (PainterI2V, :mod:`mlx_i2v.motion`), in [0.25, 2];
                1 is off. Channel-concat models only (Wan2.1-I2V/FLF2V, Wan2.2-I2V-A14B).
            height, width: frame size; rounded to the variant's multiple (16 or 32) with a logged notice.
                Unset: the variant's default size in the photo's orientation (a restyle: the clip's size).
            num_frames: rounded to 4k+1. Unset settings take the variant's defaults.
            guidance_scale: classifier-free guidance (> 1 enables it); ``guidance_scale_2`` is the
                low-noise expert's for Wan2.2-A14B (default: its own default, else ``guidance_scale``).
            seed: for the initial noise, an int in [0, 2**64 - 1] (default: random); ``latents`` overrides
                it with explicit noise, a float array in diffusers' layout (1, C, T, H/stride, W/stride), to
                reproduce a diffusers run.
            last_image: the clip's last frame, for first-last-frame models (Wan2.1-FLF2V; optional on A14B and
                LTX-Video 0.9.5+, where it is a keyframe at the last frame).
            keyframes: LTX-Video 0.9.5+: frames the clip is held to at other frame indices, a list of
                ``(image, frame_index)`` or ``(image, frame_index, strength)`` (default strength: ``strength``'s);
                the image as ``image`` takes it (prepared with the same ``crop``, ``rotate``, ``fit``), or a
                :class:`Video` / :class:`~mlx_i2v.clips.Clip` whose frames from ``frame_index`` on are held
                (8k+1 of them, cut to the clip). ``frame_index`` in [1, num_frames - 1], any frame (the
                positions are pixel frames, diffusers' ``LTXVideoCondition(frame_index=...)``).
            on_step: ``on_step(step, total, timestep)`` after every denoising step, or
                ``on_step(step, total, timestep, preview)`` with a :class:`~mlx_i2v.preview.Preview` of the
                predicted clean clip (computed only if asked); returning False stops the generation by
                raising :class:`GenerationCancelled`.
            crop, rotate: applied to the photo(s) after the EXIF orientation: rotate clockwise by 0, 90,
                180 or 270 degrees, then crop to (x, y, width, height) pixels of the rotated photo. They
                apply to the photos given as ``image`` and ``last_image``, not to a clip's frames.
            fit: "cover" scales the photo to cover the frame and centre-crops; "contain" scales it to fit
                inside and pads with ``background``, which also shows through transparent pixels (an
                (R, G, B) tuple or a colour string such as "white" or "#202020").
            cache: step caching, off by default: "first-block", "magcache" or "teacache" (the last two
                with the variant's published calibration), or a method object from
                :mod:`mlx_i2v.stepcache`. ``cache_threshold`` overrides the method's default threshold.
            scheduler: the sampler, ``"unipc"``, ``"euler"`` or ``"dmd"`` (default: the pipeline's).
            sigmas: an explicit grid from 1 down, unshifted (``[1.0, 0.75, 0.5, 0.25]``): shifted by
                ``flow_shift`` for Euler (the sampler they choose unless ``scheduler`` names another that
                takes a grid), the recipe's timesteps / 1000 for DMD. See :mod:`mlx_i2v.sampling`.
            preset: a few-step recipe whose settings fill what is not given: ``"lightning"`` (lightx2v and
                Wan2.2-Lightning: 4 Euler steps, shift 5, no guidance), ``"dmd"`` (FastWan2.2-TI2V-5B) or
                ``"turbo"`` (Wan2.2-TI2V-5B-Turbo); on LTX-Video, ``"distilled"``.
            fps: the clip's frame rate (default: the model's). LTX-Video also conditions on it (it enters the
                RoPE positions, diffusers' ``frame_rate``); for Wan it is only the playback rate.
            decode_timestep, decode_noise_scale: LTX-Video 0.9.1+ (timestep-conditioned VAE): the decoder's
                timestep and how much noise is mixed into the latents before decoding (default: the
                official configs' 0.05 and 0.025; diffusers' names). Refused on models without such a VAE.
            image_cond_noise_scale: LTX-Video 0.9.5+: the scale of the noise added to the fully held photo
                latents each step, times (t / 1000)^2 (default 0.15, diffusers' ``LTXConditionPipeline``).
            upscale: LTX-Video 0.9.5+: generate at 2/3 of the size, upsample the latents x2 and refine them
                (see :mod:`mlx_i2v.families.ltx.upscale`): a latent upsampler (``latent_upsampler/`` folder, original
                ``ltxv-spatial-upscaler-*.safetensors`` file or loaded model) or an
                :class:`~mlx_i2v.families.ltx.upscale.Upscale` recipe. The settings are the base pass's; ``on_step`` counts
                the steps of both passes.

        Returns:
            A :class:`Video` with ``frames`` (num_frames, height, width, 3) float32 in [0, 1]
            (num_frames - 1 for a loop). In a parallel run (see :mod:`mlx_i2v.parallel`) only rank 0
            decodes: the other ranks' frames are empty, (0, height, width, 3); metadata and stats say how
            the ranks shared the work.

        Raises:
            InvalidInputError: for any argument of the wrong type or out of range, before any model loads.
        """
        request = self.prepare(
            image, video=video, strength=strength, loop=loop, motion=motion, last_image=last_image,
            keyframes=keyframes, negative_prompt=negative_prompt, height=height, width=width, num_frames=num_frames,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            guidance_scale_2=guidance_scale_2, flow_shift=flow_shift, seed=seed, crop=crop, rotate=rotate,
            fit=fit, background=background, cache=cache, cache_threshold=cache_threshold, scheduler=scheduler,
            sigmas=sigmas, preset=preset, fps=fps, decode_timestep=decode_timestep,
            decode_noise_scale=decode_noise_scale, image_cond_noise_scale=image_cond_noise_scale, upscale=upscale,
        )  # fmt: skip
        return self.run(request, prompt, latents=latents, on_step=on_step)

    @_one_call_at_a_time
    def extend(
        self,
        video: ClipInput,
        prompt: str,
        *,
        num_frames: int,
        context: int | None = None,
        colour_match: float = DEFAULT_COLOUR_MATCH,
        motion: float = 1.0,
        last_image: ImageInput | None = None,
        latents: np.ndarray | None = None,
        on_step: StepCallback | None = None,
        **settings,
    ) -> Video:
        """Continue ``video`` by ``num_frames`` new frames (see :mod:`mlx_i2v.extend`).

        Args:
            video: the clip to continue (see :func:`~mlx_i2v.clips.load_clip`); its frame size must be a
                multiple of the variant's (16, or 32 for TI2V-5B), as the new frames are generated at it.
            num_frames: new frames, rounded to a multiple of 4 (8 on LTX-Video).
            context: how many of the clip's last frames the model is given, 4k+1 (default: 5 for TI2V-5B,
                held as clean latent frames; 1 for the channel-concat models, their trained first-frame
                mask; more makes a pixel-mask prefix). LTX-Video 0.9.5+: 8k+1 (diffusers requires it), default
                9, a video condition at frame 0 (two latent frames, held at strength 1).
            colour_match: 0-1, how far the new frames' Lab mean and spread are moved to the context's
                (:mod:`mlx_i2v.colour`); 0 is off.
            last_image: where the continuation should end (Wan2.1-FLF2V, which requires it; optional on A14B and
                LTX-Video 0.9.5+).
            latents: the noise of the generated window (context + new frames), as in ``__call__``.
            settings: the other keyword arguments of ``__call__`` (``negative_prompt``,
                ``num_inference_steps``, ``guidance_scale``, ``guidance_scale_2``, ``flow_shift``, ``seed``,
                ``scheduler``, ``sigmas``, ``preset``, ``cache``, ``cache_threshold``; ``crop``, ``rotate``,
                ``fit`` and ``background`` for ``last_image``); the size is the clip's.

        Returns:
            A :class:`Video`: the original frames, unchanged, followed by the new ones, at the clip's fps
            (empty frames on the ranks other than 0 of a parallel run).
        """
        request = self.prepare_extend(video, num_frames=num_frames, context=context, colour_match=colour_match,
                                      motion=motion, last_image=last_image, **settings)  # fmt: skip
        return self.run(request, prompt, latents=latents, on_step=on_step)

    # --- requests ------------------------------------------------------------------------------------

    def prepare(
        self,
        image: ImageInput | None = None,
        *,
        video: ClipInput | None = None,
        strength: float | None = None,
        loop: bool = False,
        motion: float = 1.0,
        last_image: ImageInput | None = None,
        keyframes: Sequence[KeyframeInput] | None = None,
        upscale: str | Path | Upscale | Any | None = None,
        **settings,
    ) -> Request:
        """Resolve the inputs and settings of a ``__call__`` (same arguments, without prompt, latents and
        on_step) into a :class:`Request`, reading the inputs but loading no model: every bad input fails
        here with one line."""
        tic, report, seed = time.perf_counter(), LoadReport(), settings.get("seed")
        options = _image_options(settings)
        self._check_features(restyle=video is not None, loop=bool(loop), motion=motion != 1.0,
                             last_image=last_image is not None, keyframes=keyframes is not None,
                             upscale=upscale is not None)  # fmt: skip
        others = check_keyframes(keyframes)
        if others and image is None:
            raise InvalidInputError("keyframes need an image for the first frame too")
        if upscale is not None and video is not None:
            raise InvalidInputError("upscale applies to a generation, not to a restyle (video=)")
        if upscale is not None and others:
            raise InvalidInputError("upscale with keyframes= is not supported yet (a last_image= is)")
        recipe, upsampler = (None, None) if upscale is None else as_upscale(upscale, self.dims.latent_channels)
        motion = check_motion(motion, self.variant.name, self.variant.conditioning.supports_motion)
        last_image = self._check_loop(loop, last_image)
        if video is not None:
            request = self._prepare_restyle(image, video, strength, loop, motion, last_image, options, report, settings)
        elif strength is not None and not self.variant.conditioning.takes_strength:
            raise InvalidInputError("strength applies to a restyle (pass the clip as video=) or to the photo of "
                                    "LTX-Video 0.9.5+ models")  # fmt: skip
        else:
            sources = (image, image if loop else last_image)
            photos = self._photos(*sources, options, report)
            s = asked = self._settings(photos, **settings)
            if recipe is not None:  # the base pass at a fraction of the size asked for
                height, width = base_size(s.height, s.width, recipe.downscale, self.variant.size_multiple)
                s = replace(s, height=height, width=width)
            held = self._keyframes(sources, photos, s, options, report)
            details = {"mode": "generate", "loop": loop, "motion": motion}
            if self.variant.conditioning.takes_strength:  # how the photo is held (LTX-Video 0.9.5+)
                strength = 1.0 if strength is None else check_strength(strength)
                details["strength"] = strength
                if held is not None:
                    held = replace(held, strength=strength, noise_scale=s.image_cond_noise_scale,
                                   others=self._other_keyframes(others, s, strength, options, report))  # fmt: skip
                if others:
                    details["keyframes"] = [[k.index, k.strength] for k in held.others]
            request = Request(s, photos, held, motion, finish=close_loop if loop else keep_frames,
                              details=details)  # fmt: skip
            if recipe is not None:
                request.upscale = self._upscale_pass(recipe, upsampler, request, sources, options, report, asked)
        return self._complete(request, image, last_image, options, report, seed, tic)

    def _upscale_pass(self, recipe: Upscale, config, request: Request, sources: Sequence, options: ImageOptions,
                      report: LoadReport, asked: Settings) -> UpscalePass:  # fmt: skip
        """The refine pass of an upscale: at twice the base size, on the recipe's schedule from its
        ``denoise_strength``, holding the photos (refitted to that size) as the base pass holds them."""
        s = request.settings
        refine = replace(s, height=2 * s.height, width=2 * s.width, num_inference_steps=len(recipe.timesteps),
                         scheduler="euler", sigmas=tuple(t / 1000 for t in recipe.timesteps), preset=None)  # fmt: skip
        keyframes = self._keyframes(sources, request.photos, refine, options, report)
        if keyframes is not None:
            keyframes = replace(keyframes, strength=request.keyframes.strength,
                                noise_scale=request.keyframes.noise_scale)  # fmt: skip
        start = restyle_start(refine.num_inference_steps, recipe.denoise_strength)
        up = UpscalePass.build(recipe, config, Request(refine, request.photos, keyframes, request.motion, start=start),
                               asked.height, asked.width, self.vae_dtype)  # fmt: skip
        request.details.update(height=asked.height, width=asked.width, upscale=up.describe((s.height, s.width)))
        return up

    def prepare_extend(
        self,
        video: ClipInput,
        *,
        num_frames: int,
        context: int | None = None,
        colour_match: float = DEFAULT_COLOUR_MATCH,
        motion: float = 1.0,
        last_image: ImageInput | None = None,
        **settings,
    ) -> Request:
        """Resolve the inputs and settings of an :meth:`extend` into a :class:`Request` (loading no model)."""
        tic, report, seed = time.perf_counter(), LoadReport(), settings.get("seed")
        options = _image_options(settings)
        _check_known("extend", settings, self._settings, exclude=("photos", "reference", "height", "width", "num_frames"))
        self._check_features(extend=True, motion=motion != 1.0, last_image=last_image is not None)
        motion = check_motion(motion, self.variant.name, self.variant.conditioning.supports_motion)
        colour_match = check_colour_match(colour_match)
        clip = load_clip(video)
        height, width = check_clip_fits(clip, self.variant.size_multiple, self.variant.name)
        stride = self.variant.family.frame_stride
        c = context_frames(context, self.variant.conditioning.extend_context, clip.num_frames, stride)
        new = new_frame_count(num_frames, stride)
        photos = self._photos(ClipFrame(clip.image(clip.num_frames - c)), last_image, options, report)
        s = self._settings(photos, height=height, width=width, num_frames=c + new, **settings)
        s = replace(s, fps=clip.fps or s.fps) if settings.get("fps") is None else s
        tail = self._fit(photos[1], s, options, report) if len(photos) > 1 else None
        keyframes = Keyframes(clip.model_frames(width, height, slice(-c, None)), tail)
        if self.variant.conditioning.takes_strength:  # LTX-Video 0.9.5+: held fully, noised as a photo is
            keyframes = replace(keyframes, noise_scale=s.image_cond_noise_scale)
        details = {"mode": "extend", "source": clip.name, "source_frames": clip.num_frames, "context_frames": c,
                   "new_frames": new, "colour_match": colour_match, "motion": motion}  # fmt: skip
        request = Request(s, photos, keyframes, motion, finish=Continuation(clip, c, colour_match), details=details)
        return self._complete(request, None, last_image, options, report, seed, tic)

    def _prepare_restyle(self, image, video, strength, loop, motion, last_image, options, report, settings) -> Request:
        clip = load_clip(video)
        strength = check_strength(DEFAULT_STRENGTH if strength is None else strength)
        num_frames = settings.pop("num_frames", None)
        if num_frames is not None:
            num_frames = self._round_frames(validation.integer("num_frames", num_frames, minimum=1))
        frames = clip_frames(clip, num_frames, self.variant.family.frame_stride)
        conditioning = self.variant.conditioning
        first = image if image is not None else ClipFrame(clip.image(0)) if conditioning.requires_image else None
        if loop:
            last_image = first
        elif last_image is None and self.variant.takes_last_image:
            last_image = ClipFrame(clip.image(frames - 1))  # FLF2V: the clip's own last frame closes it
        photos = self._photos(first, last_image, options, report)
        if settings.get("height") is None and settings.get("width") is None:
            settings["height"], settings["width"] = clip.size
        s = self._settings(photos, reference=clip.image(0), num_frames=frames, **settings)
        s = replace(s, fps=clip.fps or s.fps) if settings.get("fps") is None else s
        start = restyle_start(s.num_inference_steps, strength)
        details = {"mode": "restyle", "source": clip.name, "strength": strength,
                   "steps_run": s.num_inference_steps - start, "loop": loop, "motion": motion}  # fmt: skip
        source = clip.model_frames(s.width, s.height, slice(frames))
        keyframes = self._keyframes((first, last_image), photos, s, options, report)
        if keyframes is not None and conditioning.takes_strength:  # LTX-Video 0.9.5+: the photo held fully
            keyframes = replace(keyframes, noise_scale=s.image_cond_noise_scale)
        return Request(s, photos, keyframes, motion, source=source, start=start,
                       finish=close_loop if loop else keep_frames, details=details)  # fmt: skip

    def _check_features(self, **used: bool) -> None:
        """Refuse, with one line, what this model's family does not have (see :data:`~mlx_i2v.family.FEATURES`)."""
        for feature, is_used in used.items():
            if is_used:
                self.variant.family.require(feature)

    def _complete(self, request: Request, image, last_image, options: ImageOptions, report: LoadReport, seed,
                  tic: float) -> Request:  # fmt: skip
        """What every mode records the same way: the image options (when the caller gave a photo), the
        photo's name, the cost of reading the inputs, and whether the seed was drawn."""
        self._check_cache_sharding(request.settings)
        if image is not None or last_image is not None:
            request.details.update(options.metadata())
        if isinstance(image, (str, Path)):
            request.details["image_name"] = Path(image).name
        request.report, request.random_seed = report, seed is None
        request.read_seconds = time.perf_counter() - tic
        return request

    def _keyframes(self, sources: Sequence, photos: list[Image.Image], s: Settings, options: ImageOptions,
                   report: LoadReport) -> Keyframes | None:  # fmt: skip
        """The photo (and last photo) fitted to the frame: the caller's as ``options`` say, a clip's frame
        as the clip's frames are (cover)."""
        if not photos:
            return None
        given = [p for p in sources if p is not None]
        frames = [self._fit(photo, s, ImageOptions() if isinstance(source, ClipFrame) else options, report)
                  for source, photo in zip(given, photos)]  # fmt: skip
        return Keyframes(frames[0][None], frames[1] if len(frames) > 1 else None)

    def _other_keyframes(self, others: list[KeyframeRequest], s: Settings, strength: float, options: ImageOptions,
                         report: LoadReport) -> tuple[Keyframe, ...]:  # fmt: skip
        """The keyframes at other frame indices, their index checked against the clip: an image prepared and
        fitted as the photo is, a clip's frames as :func:`~mlx_i2v.keyframes.clip_keyframe_frames` trims them;
        with their own strength, else ``strength``."""
        held = []
        for k in others:
            check_frame_index(k.index, s.num_frames)
            if isinstance(k.source, Clip):
                stride = self.variant.family.frame_stride
                frames = clip_keyframe_frames(k.source, k.index, s.num_frames, s.width, s.height, stride)
            else:
                seen = len(report.notices)
                frames = self._fit(load_image(k.source, options, report), s, options, report)[None]
                for notice in report.notices[seen:]:
                    log.warning("%s", notice)
            held.append(Keyframe(frames, k.index, strength if k.strength is None else k.strength))
        return tuple(held)

    @staticmethod
    def _fit(photo: Image.Image, s: Settings, options: ImageOptions, report: LoadReport) -> np.ndarray:
        return to_model_range(fit_to_frame(photo, s.width, s.height, options.fit, options.background, report))

    def _check_loop(self, loop: bool, last_image: ImageInput | None) -> ImageInput | None:
        if not isinstance(loop, (bool, np.bool_)):
            raise InvalidInputError(f"loop must be True or False, got {loop!r}")
        if not loop:
            return last_image
        if not self.variant.accepts_last_image:
            raise InvalidInputError(
                f"{self.variant.name} has no last-frame input, so it cannot close a loop; "
                "use Wan2.1-FLF2V, Wan2.2-I2V-A14B or LTX-Video 0.9.5+"
            )
        if last_image is not None:
            raise InvalidInputError("a loop ends on its first frame; last_image does not apply")
        return None

    # --- generation ----------------------------------------------------------------------------------

    @_one_call_at_a_time
    def run(
        self, request: Request, prompt: str, *, latents: np.ndarray | None = None, on_step: StepCallback | None = None
    ) -> Video:
        """Generate what a prepared :class:`Request` describes (see ``__call__`` for ``latents`` and
        ``on_step``)."""
        validation.text("prompt", prompt)
        _check_on_step(on_step)
        s = request.settings
        # With other ranks: stop here unless they were all asked the same, and use one seed.
        s.seed = self.parallel.agree(self._handshake(prompt, request, latents), s.seed)
        scales = self._scales(s)
        step_cache = StepCache(s.cache, plain=self.variant.family.forward(self.dims, s, request.keyframes))
        denoiser = self.denoiser(scales, step_cache)
        branches = denoiser.branches_needed(scales)
        plan = self.plan_request(request)
        check_fits(plan)  # stop before loading anything rather than run out of memory halfway
        noise = self._initial_noise(self._latent_shape(s), s.seed, latents)
        timings: dict[str, float] = {}
        loading: dict[str, float] = {}  # of each stage's seconds, those spent loading its components
        active_while_loading = mx.get_active_memory()
        mx.reset_peak_memory()

        with _timed(timings, loading, "text"):
            prompts = {COND: prompt, UNCOND: s.negative_prompt}
            text = self.encode_text([prompts[b] for b in branches], names=[PROMPT_NAMES[b] for b in branches])
            text = {b: take_rows(text, i, i + 1) for i, b in enumerate(branches)}
            image_tokens = self.encode_image_tokens(request.photos)
        with _timed(timings, loading, "image", request.read_seconds):
            state, source = self.encode_inputs(request, noise.shape)
        up = request.upscale
        steps = s.num_inference_steps - request.start
        total = steps + (0 if up is None else up.refine.settings.num_inference_steps - up.refine.start)
        context = (text, image_tokens, scales)
        try:
            with _timed(timings, loading, "denoise"):
                observe = _observer(on_step, self._previewer(state), total=total)
                final = self._denoise(denoiser, s, request.start, source, noise, state, context, observe)
            if up is not None:  # the transformer stays loaded for the refine pass
                with _timed(timings, loading, "upsample"):
                    upsampled = up.upsample(final)
                s = up.refine.settings
                with _timed(timings, loading, "refine"):
                    observe = _observer(on_step, self._previewer(up.state), offset=steps, total=total)
                    noise = refine_noise(upsampled.shape, s.seed)
                    final = self._denoise(denoiser, s, up.refine.start, upsampled, noise, up.state, context, observe)
        finally:
            self.experts.done()
        finish = request.finish if up is None else lambda frames: request.finish(up.finish(frames))
        with _timed(timings, loading, "decode"):
            if self.parallel.decodes():
                frames = finish(self.decode(final, s, tiling=plan.vae_tiling))
            else:  # rank 0 decodes; the other ranks' part is done
                frames = np.zeros((0, s.height, s.width, 3), np.float32)

        # The photos' Pillow buffers are not MLX's: the peak is MLX's plus the prepared photos held
        # throughout, or the Pillow buffers alive at once while loading and fitting them, if larger.
        report = request.report
        peak = max(mx.get_peak_memory() + report.held, active_while_loading + report.peak)
        stats = {
            "seconds": timings,
            "loading_seconds": {stage: t for stage, t in loading.items() if t > 0},
            "peak_memory_gb": peak / 1e9,
            "transformer_passes": step_cache.passes(),
        }
        metadata = self._metadata(request, prompt)
        if self.parallel.size > 1:
            metadata["parallel"] = self.parallel.describe(scales)
            stats["parallel"] = self.parallel.stats(scales)
        return Video(frames=frames, fps=s.fps, metadata=metadata, stats=stats)

    def _denoise(self, denoiser: Denoiser, s: Settings, start: int, clean: mx.array | None, noise: mx.array,
                 state: ConditionState | None, context: tuple, observe) -> mx.array:  # fmt: skip
        """One pass of the loop over the schedule of ``s`` from entry ``start``: from ``noise``, or from
        ``clean`` latents (a restyle's clip, an upscale's upsampled latents) noised to the sigma of that
        entry in this sampler's schedule. ``context``: (text, image tokens, guidance scales)."""
        sampler = self.sampler(s)
        initial = noise if clean is None else add_noise(clean, noise, float(sampler.sigmas[start]))
        text, image_tokens, scales = context
        return denoiser(sampler, initial, state, text, image_tokens, scales, start=start, observe=observe)

    def _metadata(self, request: Request, prompt: str) -> dict[str, Any]:
        s = request.settings
        return {
            "prompt": prompt,
            "model": self.model_name,
            "variant": self.variant.name,
            "dtype": dtype_name(self.dtype),
            "vae_dtype": dtype_name(self.vae_dtype),
            "image": bool(request.photos),
            **vars(s),
            "cache": s.cache.describe() if s.cache is not None else None,
            "loras": self.loras.records() if self.loras is not None else [],
            **request.details,
        }

    def _handshake(self, prompt: str, request: Request, latents: np.ndarray | None) -> dict[str, Any]:
        """What every rank of a parallel run must agree on (compared by digest, see
        :mod:`mlx_i2v.parallel.handshake`): the model, settings, prompt, every input the model sees (photos,
        keyframes, a restyle's clip) and the mode's details (strength, motion, loop, context...)."""
        s, k = request.settings, request.keyframes
        return {
            "model": [self.variant.name, self.dims, dtype_name(self.dtype), self.quantize_bits],
            "settings": {n: v for n, v in vars(s).items() if n != "seed"},
            "seed": "random" if request.random_seed else s.seed,
            "prompt": prompt,
            "photos": b"".join(np.asarray(p).tobytes() for p in request.photos),
            "keyframes": b"" if k is None else b"".join(f.frames.tobytes() for f in k.conditions(s.num_frames)),
            "source": b"" if request.source is None else request.source.tobytes(),
            "mode": {n: v for n, v in request.details.items() if n not in LOCAL_DETAILS},
            "latents": b"" if latents is None else np.asarray(latents, np.float32).tobytes(),
            "loras": self.loras.records() if self.loras is not None else [],
        }

    def _check_cache_sharding(self, s: Settings) -> None:
        """A step cache whose decisions read the hidden states (First-Block-Cache) or per-token timesteps
        (TeaCache) would decide on each rank's own token shard, and ranks that decide differently wait on
        each other forever; MagCache decides from its calibrated curve alone, the same on every rank."""
        if s.cache is not None and s.cache.name != "magcache" and self.parallel.layout(self._scales(s)).sequence > 1:
            raise InvalidInputError(
                f"--cache {s.cache.name} does not work with sequence-parallel ranks (each would decide on its own "
                "tokens); use --cache magcache, or --parallel cfg"
            )

    # --- stages -------------------------------------------------------------------------------------

    def encode_text(self, prompts: list[str], names: Sequence[str] | None = None) -> Any:
        """Prompts -> their text rows as the variant encodes them (:attr:`Variant.prompts`): Wan's
        (len(prompts), 512, text_dim) embeddings cut to their length and zero-padded, or LTX-Video's
        :class:`~mlx_i2v.family.MaskedText`. A prompt longer than the window is cut with a warning that uses
        its name in ``names``."""
        rows = self.variant.prompts(self.tokenizer, self.text_encoder.get(), prompts, names)
        mx.eval(rows)
        self.text_encoder.release()
        return rows

    def denoiser(self, scales: Sequence[float] = (1.0,), forward: Forward = plain_forward) -> Denoiser:
        """The denoising loop with this pipeline's experts, conditioning and compute dtype, and this
        process's share of the work for these per-expert guidance scales; ``forward`` runs each
        transformer pass (a :class:`~mlx_i2v.stepcache.StepCache` for step caching), on this rank's
        token shard in a sequence-parallel run."""
        guidance, forward = self.parallel.strategies(scales, forward)
        return Denoiser(self.experts, self.variant.conditioning, self.dtype, guidance, forward)

    def encode_inputs(
        self, request: Request, latent_shape: tuple[int, ...]
    ) -> tuple[ConditionState | None, mx.array | None]:
        """VAE-encode what the request conditions on (its keyframes) and, for a restyle, the clip to
        noise: (condition state or None, normalised clip latents (1, T, h, w, C) or None)."""
        if request.keyframes is None and request.source is None and request.upscale is None:
            return None, None
        vae = self.vae_encoder.get()
        state = source = None
        if request.keyframes is not None:
            num_frames = request.settings.num_frames
            state = self.variant.conditioning.prepare(vae, request.keyframes, num_frames, latent_shape, request.motion,
                                                      seed=request.settings.seed)  # fmt: skip
            mx.eval(state.latent)
        if request.source is not None:
            source = encode_mode(vae, request.source)
            mx.eval(source)
        if request.upscale is not None:  # the refine pass's photos, and the statistics the upsampler needs
            request.upscale.encode(vae, self.variant.conditioning, self._latent_shape(request.upscale.refine.settings))
        self.vae_encoder.release()
        return state, source

    def _previewer(self, state: ConditionState | None) -> Callable[[mx.array], Preview]:
        """Builds each step's :class:`Preview` (lazily: nothing is computed unless the callback asks)."""
        projection = self.variant.family.preview_projection(self.dims.latent_channels)
        conditioning = self.variant.conditioning
        return lambda x0: Preview(x0, projection, lambda latents: conditioning.preview(latents, state))

    def _scales(self, s: Settings) -> tuple[float, ...]:
        """The guidance scale of each expert: the high-noise expert takes ``guidance_scale``, the
        low-noise one ``guidance_scale_2``."""
        return (s.guidance_scale,) if s.guidance_scale_2 is None else (s.guidance_scale, s.guidance_scale_2)

    def encode_image_tokens(self, photos: list[Image.Image]) -> mx.array | None:
        """CLIP tokens for variants that attend to the photo(s): (len(photos), 257, 1280) for one row,
        the photos adjacent (what FLF2V's position table expects); None for the other variants."""
        if self.image_encoder is None:
            return None
        tokens = self.image_encoder.get()(photos)  # the photos as given, not fitted to the frame: as diffusers
        mx.eval(tokens)
        self.image_encoder.release()
        return tokens

    def decode(self, latents: mx.array, settings: Settings, tiling: VAETiling | None = None) -> np.ndarray:
        """Normalised latents (1, T, h, w, C) -> frames (stride * (T-1) + 1, H, W, 3) float32 in [0, 1], as
        the family decodes them (:attr:`Family.decode`): Wan streams one latent frame at a time so memory
        does not grow with the clip length, spatially tiled when ``tiling`` is given (the plan asks for it
        when one frame does not fit the memory budget); LTX-Video decodes at the settings' decode timestep."""
        vae = self.vae_decoder.get()
        chunks = []
        for chunk in self.variant.family.decode(vae, latents, settings, tiling):
            chunk = mx.clip(chunk.astype(mx.float32) / 2 + 0.5, 0.0, 1.0)
            mx.eval(chunk)
            chunks.append(np.array(chunk[0]))
        self.vae_decoder.release()
        return np.concatenate(chunks, axis=0)

    # --- inputs and settings ------------------------------------------------------------------------

    def _photos(
        self,
        image: ImageInput | ClipFrame | None,
        last_image: ImageInput | ClipFrame | None,
        options: ImageOptions,
        report: LoadReport,
    ) -> list[Image.Image]:
        """The prepared photos (first, then last): the caller's prepared as ``options`` say, their notices
        logged and their cost in ``report``; a :class:`ClipFrame` as it is."""
        v = self.variant
        if image is None:
            if v.conditioning.requires_image:
                raise InvalidInputError(f"{v.name} needs an input image")
            if last_image is not None:
                raise InvalidInputError("last_image needs an image for the first frame too")
            return []
        if last_image is None and v.takes_last_image:
            raise InvalidInputError(f"{v.name} needs a last image (--last-image)")
        if last_image is not None and not v.accepts_last_image:
            raise InvalidInputError(f"{v.name} does not take a last image; use a first-last-frame model (FLF2V)")
        photos = [p.image if isinstance(p, ClipFrame) else load_image(p, options, report)
                  for p in (image, last_image) if p is not None]  # fmt: skip
        for notice in dict.fromkeys(report.notices):  # (a loop reads its photo twice)
            log.warning("%s", notice)
        return photos

    def _settings(
        self,
        photos: list[Image.Image],
        *,
        reference: Image.Image | None = None,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_scale_2: float | None = None,
        flow_shift: float | None = None,
        seed: int | None = None,
        cache: str | CacheMethod | None = None,
        cache_threshold: float | None = None,
        scheduler: str | None = None,
        sigmas: list[float] | None = None,
        preset: str | None = None,
        fps: float | None = None,
        decode_timestep: float | None = None,
        decode_noise_scale: float | None = None,
        image_cond_noise_scale: float | None = None,
    ) -> Settings:
        """``reference``: the picture whose aspect ratio sets an unset side (default: the first photo)."""
        self._check_features(cache=cache is not None, flow_shift=flow_shift is not None)
        sampling = choose_sampling(
            self.variant, self.samplers.default, preset=preset, scheduler=scheduler, sigmas=sigmas,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            guidance_scale_2=guidance_scale_2, flow_shift=flow_shift,
        )  # fmt: skip
        d = self.variant.defaults
        steps = validation.integer("num_inference_steps", _or(sampling.num_inference_steps, d.num_inference_steps),
                                   minimum=1)  # fmt: skip
        guidance = validation.number("guidance_scale", _or(sampling.guidance_scale, d.guidance_scale))
        guidance_2 = sampling.guidance_scale_2
        if self.variant.two_experts:
            guidance_2 = validation.number("guidance_scale_2", _or(guidance_2, d.guidance_scale_2, guidance))
        elif guidance_2 is not None:
            raise InvalidInputError(f"{self.variant.name} has one transformer; guidance_scale_2 does not apply")
        shift = validation.number("flow_shift", _or(sampling.flow_shift, d.flow_shift), inclusive=False)
        self._sampler(sampling.scheduler, steps, shift, sampling.sigmas, sampling.preset, seed=0)  # refuses what it cannot run
        for name, value in (("height", height), ("width", width)):
            if value is not None:
                validation.integer(name, value, minimum=1)
        if reference is None and photos:
            reference = photos[0]
        height, width = self._size(reference, height, width)
        num_frames = self._round_frames(validation.integer("num_frames", _or(num_frames, d.num_frames), minimum=1))
        if self.variant.takes_last_image and num_frames < 2:
            raise InvalidInputError("a first-last-frame clip needs at least 5 frames")
        self.dims.check_request(height=height, width=width, num_frames=num_frames)
        seed = secrets.randbits(31) if seed is None else validation.seed(seed)
        negative_prompt = validation.text("negative_prompt", _or(negative_prompt, d.negative_prompt))
        method = resolve_cache(cache, cache_threshold, self.variant.name, has_image=bool(photos))
        fps = validation.number("fps", _or(fps, d.fps), inclusive=False)
        decode = self._optional_settings(decode_timestep=decode_timestep, decode_noise_scale=decode_noise_scale,
                                         image_cond_noise_scale=image_cond_noise_scale)  # fmt: skip
        return Settings(height, width, num_frames, steps, guidance, guidance_2, shift, seed, negative_prompt, fps,
                        scheduler=sampling.scheduler, sigmas=sampling.sigmas, preset=sampling.preset, cache=method,
                        **decode)  # fmt: skip

    def _optional_settings(self, **given: float | None) -> dict[str, float]:
        """Settings only some variants have (their defaults are None elsewhere): given, else the variant's
        default; refused where the variant has none."""
        settings = {}
        for name, value in given.items():
            default = getattr(self.variant.defaults, name)
            if default is None:
                if value is not None:
                    raise InvalidInputError(f"{name} does not apply to {self.variant.name}")
                continue
            settings[name] = validation.number(name, _or(value, default))
        if settings.get("decode_noise_scale", 0.0) > 1:
            raise InvalidInputError(f"decode_noise_scale must lie in [0, 1], got {settings['decode_noise_scale']:g}")
        return settings

    def sampler(self, settings: Settings) -> Any:
        """The sampler of a generation with these settings, its schedule set (``timesteps``, ``sigmas``)."""
        tokens = self.dims.tokens(settings.height, settings.width, settings.num_frames)
        return self._sampler(settings.scheduler, settings.num_inference_steps, settings.flow_shift, settings.sigmas,
                             settings.preset, seed=settings.seed, image_seq_len=tokens)  # fmt: skip

    def _sampler(
        self, name: str, steps: int, shift: float, sigmas: tuple[float, ...] | None, preset: str | None, *, seed: int,
        image_seq_len: int = 0,
    ) -> Any:  # fmt: skip
        """The sampler ``name`` with its schedule set (see :class:`~mlx_i2v.sampling.Samplers`)."""
        return self.samplers.build(name, num_inference_steps=steps, flow_shift=shift, sigmas=sigmas, preset=preset,
                                   seed=seed, image_seq_len=image_seq_len)  # fmt: skip

    def _size(self, photo: Image.Image | None, height: int | None, width: int | None) -> tuple[int, int]:
        d = self.variant.defaults
        ref_h, ref_w = (photo.height, photo.width) if photo is not None else d.sizes[0]
        if height is None and width is None:
            height, width = d.size_for(ref_w / ref_h)
        elif height is None:  # one side given: keep the photo's (or the default) aspect ratio
            height = round(width * ref_h / ref_w)
        elif width is None:
            width = round(height * ref_w / ref_h)
        m = self.variant.size_multiple
        if height < m or width < m:
            raise InvalidInputError(f"height and width must be at least {m}, got {height}x{width}")
        rounded = (round(height / m) * m, round(width / m) * m)
        if rounded != (height, width):
            log.warning("size %dx%d is not a multiple of %d; using %dx%d", width, height, m, rounded[1], rounded[0])
        return rounded

    def _round_frames(self, num_frames: int) -> int:
        family = self.variant.family
        rounded = family.round_frames(num_frames)
        if rounded != num_frames:
            log.warning("num_frames %d is not %dk+1; using %d", num_frames, family.frame_stride, rounded)
        return rounded

    def _latent_shape(self, s: Settings) -> tuple[int, int, int, int, int]:
        return self.dims.latent_shape(s.height, s.width, s.num_frames)

    @staticmethod
    def _initial_noise(shape: tuple[int, ...], seed: int, latents: np.ndarray | None) -> mx.array:
        """Noise in channels-last (1, T, h, w, C). Drawn in diffusers' (1, C, T, h, w) order, so a given
        seed fills the same element positions whichever layout the caller thinks in."""
        if latents is None:
            return channels_last_normal(shape, mx.random.key(seed))
        b, t, h, w, c = shape
        if not isinstance(latents, np.ndarray) or not np.issubdtype(latents.dtype, np.floating):
            raise InvalidInputError(f"latents must be a float numpy array, got {type(latents).__name__}")
        if latents.shape != (b, c, t, h, w):
            raise InvalidInputError(f"latents must have shape {(b, c, t, h, w)} (1, C, T, H, W); got {latents.shape}")
        if not np.isfinite(latents).all():
            raise InvalidInputError("latents contain NaN or infinite values")
        return mx.array(latents.astype(np.float32)).transpose(0, 2, 3, 4, 1)


WanPipeline = Pipeline  # the name before LTX-Video joined

PROMPT_NAMES = {COND: "prompt", UNCOND: "negative prompt"}  # how warnings name them
# Details of a request that name files, which may differ between hosts holding the same inputs: not
# compared by the parallel handshake (the inputs' contents are).
LOCAL_DETAILS = ("source", "image_name")


def _or(*values):
    """The first value that is not None (an argument, then its defaults)."""
    return next((v for v in values if v is not None), None)


def _image_options(kwargs: dict) -> ImageOptions:
    """Pop ``__call__``'s image keyword arguments from ``kwargs`` as :class:`ImageOptions`."""
    names = ("crop", "rotate", "fit", "background")
    return ImageOptions(**{n: kwargs.pop(n) for n in names if n in kwargs})


def _check_known(call: str, kwargs: dict[str, Any], accepts: Callable, exclude: Sequence[str] = ()) -> None:
    """A keyword argument ``call`` passes on to ``accepts`` that ``accepts`` does not take (or takes only from
    ``call`` itself) is a TypeError naming ``call``, as Python names a function's own unknown arguments."""
    known = set(inspect.signature(accepts).parameters) - set(exclude)
    for name in kwargs:
        if name not in known:
            raise TypeError(f"{call}() got an unexpected keyword argument {name!r}")


def _check_on_step(on_step: object) -> None:
    if on_step is not None and not callable(on_step):
        raise InvalidInputError(f"on_step must be callable or None, got {type(on_step).__name__}")


def _observer(on_step: StepCallback | None, previewer: Callable[[mx.array], Preview], offset: int = 0,
              total: int | None = None):  # fmt: skip
    """The loop's per-step observer for a user's ``on_step``: a callback that takes a fourth argument gets
    the step's :class:`Preview`; returning False cancels the generation. A pass that follows ``offset``
    steps of another (an upscale's refine) counts on from them, out of ``total`` for all passes."""
    if on_step is None:
        return None
    with_preview = _takes_four_arguments(on_step)

    def observe(step: StepInfo, latents: mx.array, x0: mx.array) -> None:
        extra = (previewer(x0),) if with_preview else ()
        number, of = step.number + offset, total or step.total
        if on_step(number, of, step.timestep, *extra) is False:
            raise GenerationCancelled(f"cancelled after step {number} of {of}")

    return observe


def _takes_four_arguments(fn: Callable) -> bool:
    """Whether ``fn`` accepts a fourth positional argument (inspected once, not per step)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature: call them the old way
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return any(p.kind is p.VAR_POSITIONAL for p in params) or len(positional) >= 4


@contextmanager
def _timed(timings: dict[str, float], loading: dict[str, float], stage: str, before: float = 0.0) -> Iterator[None]:
    """Time a stage into ``timings[stage]``, adding ``before`` (time already spent on it elsewhere), and
    the part of it spent loading components into ``loading[stage]``."""
    tic, loaded = time.perf_counter(), loading_seconds()
    yield
    timings[stage] = before + time.perf_counter() - tic
    loading[stage] = loading_seconds() - loaded
