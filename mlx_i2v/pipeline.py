"""One image-to-video pipeline for every Wan variant; the variant supplies conditioning and defaults."""

from __future__ import annotations

import inspect
import logging
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np
from PIL import Image

from .clips import ClipInput, load_clip
from .conditioning import ConditionState, Keyframes, encode_mode
from .denoise import COND, UNCOND, Denoiser, StepInfo
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
from .models.wan_vae_tiling import Tiling, tiled_decode_frames
from .planner import ModelDims, Plan, check_fits, plan_generation
from .resident import Resident
from .image import ImageInput, fit_to_frame, load_image, to_model_range
from .models.clip import CLIPVisionTower
from .models.clip_preprocess import CLIPImageProcessor
from .models.tokenizer import UMT5Tokenizer
from .models.umt5 import UMT5Encoder, encode_prompts
from .models.wan_vae import AutoencoderKLWan
from .motion import check_motion
from .preview import LATENT_RGB, Preview
from .request import Request, close_loop, keep_frames
from .restyle import DEFAULT_STRENGTH, add_noise, check_strength, clip_frames, restyle_start
from .runtime import dtype_name
from .schedulers import Scheduler
from .variants import Variant
from .video import Video

log = logging.getLogger(__name__)

TEXT_TOKENS = 512  # Wan always pads prompts to 512 tokens (see wan.md §0.1-0.2)
TEMPORAL_STRIDE = 4

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


@dataclass
class ImageEncoder:
    """CLIP ViT-H/14 image tokens for Wan2.1 I2V/FLF2V: penultimate hidden states of the original photo(s)."""

    processor: CLIPImageProcessor
    tower: CLIPVisionTower

    def __call__(self, images: list[Image.Image]) -> mx.array:
        """N photos -> (N, 257, 1280) tokens (for ViT-H/14 at 224 px)."""
        return self.tower(mx.array(self.processor(images)))


@dataclass
class WanPipeline:
    """Photo + prompt -> :class:`Video`. Build it with :func:`load_pipeline`.

    Components are loaded when their stage starts and released when it ends (text encoder, CLIP, VAE,
    transformer experts), so only one large model is in memory at a time; ``keep_resident`` keeps them.
    """

    variant: Variant
    model_name: str
    dims: ModelDims
    dtype: mx.Dtype
    quantize_bits: int | None
    tokenizer: UMT5Tokenizer
    text_encoder: Resident[UMT5Encoder]
    experts: Experts
    vae_encoder: Resident[AutoencoderKLWan]  # the VAE without its decoder, for the photo
    vae_decoder: Resident[AutoencoderKLWan]  # the VAE without its encoder, for the result
    make_scheduler: Callable[[], Scheduler]
    image_encoder: Resident[ImageEncoder] | None = None

    def plan(
        self,
        *,
        height: int,
        width: int,
        num_frames: int,
        guidance: bool = True,
        budget: int | None = None,
        encode_frames: int | None = None,
    ) -> Plan:
        """Estimate this pipeline's peak memory for a request, before anything is loaded (see
        :mod:`mlx_i2v.planner`). Height, width and frame count should already be valid; ``encode_frames``
        (video frames the VAE encodes) defaults to what image-to-video encodes."""
        if encode_frames is None:
            encode_frames = num_frames if self.variant.conditioning.requires_image else 1
        return plan_generation(
            self.dims,
            height=height,
            width=width,
            num_frames=num_frames,
            guidance=guidance,
            dtype=self.dtype,
            quantize=self.quantize_bits,
            budget=budget,
            encode_frames=encode_frames,
            staged=not self.text_encoder.keep,
        )

    def plan_request(self, request: Request) -> Plan:
        """:meth:`plan` for a prepared request (guidance as its settings need)."""
        s = request.settings
        guidance = len(self.denoiser().branches_needed(self._scales(s))) > 1
        return self.plan(height=s.height, width=s.width, num_frames=s.num_frames, guidance=guidance,
                         encode_frames=request.encode_frames(self.variant.conditioning))  # fmt: skip

    def resolve_settings(self, image: ImageInput | None = None, **kwargs) -> Settings:
        """The settings a call with these arguments would use (defaults filled in, sizes rounded),
        without loading or generating anything. Accepts the keyword arguments of ``__call__``."""
        return self.prepare(image, **kwargs).settings

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
        on_step: StepCallback | None = None,
    ) -> Video:
        """Generate a clip that starts from ``image``, or restyle ``video``.

        Args:
            image: path, PIL image or uint8 array (H, W, 3); resized to cover the frame and center-cropped.
                None generates from the prompt alone where the variant can (Wan2.2-TI2V-5B); in a restyle,
                None takes the clip's first frame where the variant needs an image.
            prompt: what should happen. ``negative_prompt``: None for the model's default, "" for none.
            video: restyle this clip (see :func:`~mlx_i2v.clips.load_clip`; one frame is an image-to-image
                pass): it is encoded, noised to the first kept step and denoised over the last
                ``int(num_inference_steps * strength)`` steps (diffusers' ``WanVideoToVideoPipeline``).
                Its size and (4k+1 of its) frames are the defaults of ``height``, ``width``, ``num_frames``.
            strength: how much of the schedule a restyle reruns, in (0, 1] (default 0.6).
            loop: end the clip on its first frame (first-last-frame models and Wan2.2-I2V-A14B); the
                final frame, a copy of the first, is dropped so that the clip plays seamlessly in a loop.
            motion: experimental motion amplitude (PainterI2V, :mod:`mlx_i2v.motion`), in [0.25, 2];
                1 is off. Channel-concat models only (Wan2.1-I2V/FLF2V, Wan2.2-I2V-A14B).
            height, width: frame size; rounded to the variant's multiple (16 or 32) with a logged notice.
                Unset: the variant's default size in the photo's orientation (a restyle: the clip's size).
            num_frames: rounded to 4k+1. Unset settings take the variant's defaults.
            guidance_scale: classifier-free guidance (> 1 enables it); ``guidance_scale_2`` is the
                low-noise expert's for Wan2.2-A14B (default: its own default, else ``guidance_scale``).
            seed: for the initial noise; ``latents`` overrides it with explicit noise, a float array in
                diffusers' layout (1, C, T, H/stride, W/stride), to reproduce a diffusers run.
            last_image: the clip's last frame, for first-last-frame models (Wan2.1-FLF2V; optional on A14B).
            on_step: ``on_step(step, total, timestep)`` after every denoising step, or
                ``on_step(step, total, timestep, preview)`` with a :class:`~mlx_i2v.preview.Preview` of the
                predicted clean clip (computed only if asked); returning False stops the generation by
                raising :class:`GenerationCancelled`.

        Returns:
            A :class:`Video` with ``frames`` (num_frames, height, width, 3) float32 in [0, 1]
            (num_frames - 1 for a loop).
        """
        request = self.prepare(
            image, video=video, strength=strength, loop=loop, motion=motion, last_image=last_image,
            negative_prompt=negative_prompt, height=height, width=width, num_frames=num_frames,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            guidance_scale_2=guidance_scale_2, flow_shift=flow_shift, seed=seed,
        )  # fmt: skip
        return self.run(request, prompt, latents=latents, on_step=on_step)

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
        negative_prompt: str | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_scale_2: float | None = None,
        flow_shift: float | None = None,
        seed: int | None = None,
        latents: np.ndarray | None = None,
        on_step: StepCallback | None = None,
    ) -> Video:
        """Continue ``video`` by ``num_frames`` new frames (see :mod:`mlx_i2v.extend`).

        Args:
            video: the clip to continue (see :func:`~mlx_i2v.clips.load_clip`); its frame size must be a
                multiple of the variant's (16, or 32 for TI2V-5B), as the new frames are generated at it.
            num_frames: new frames, rounded to a multiple of 4.
            context: how many of the clip's last frames the model is given, 4k+1 (default: 5 for TI2V-5B,
                held as clean latent frames; 1 for the channel-concat models, their trained first-frame
                mask; more makes a pixel-mask prefix).
            colour_match: 0-1, how far the new frames' Lab mean and spread are moved to the context's
                (:mod:`mlx_i2v.colour`); 0 is off.
            last_image: where the continuation should end (Wan2.1-FLF2V, which requires it; optional on A14B).
            Other arguments as in ``__call__``; ``latents`` is the noise of the generated window
            (context + new frames).

        Returns:
            A :class:`Video`: the original frames, unchanged, followed by the new ones, at the clip's fps.
        """
        request = self.prepare_extend(
            video, num_frames=num_frames, context=context, colour_match=colour_match, motion=motion,
            last_image=last_image, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, guidance_scale_2=guidance_scale_2, flow_shift=flow_shift, seed=seed,
        )  # fmt: skip
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
        **settings,
    ) -> Request:
        """Resolve the inputs and settings of a ``__call__`` (same arguments, without prompt, latents and
        on_step) into a :class:`Request`, reading the inputs but loading no model: every bad input fails
        here with one line."""
        motion = check_motion(motion, self.variant.name, self.variant.conditioning.supports_motion)
        last_image = self._check_loop(loop, last_image)
        if video is not None:
            return self._prepare_restyle(image, video, strength, loop, motion, last_image, settings)
        if strength is not None:
            raise InvalidInputError("strength applies to a restyle: pass the clip as video=")
        photos = self._photos(image, image if loop else last_image)
        s = self._settings(photos, **settings)
        return Request(s, photos, self._keyframes(photos, s), motion, finish=close_loop if loop else keep_frames,
                       details={"mode": "generate", "loop": loop, "motion": motion})  # fmt: skip

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
        motion = check_motion(motion, self.variant.name, self.variant.conditioning.supports_motion)
        colour_match = check_colour_match(colour_match)
        clip = load_clip(video)
        height, width = check_clip_fits(clip, self.variant.size_multiple, self.variant.name)
        c = context_frames(context, self.variant.conditioning.extend_context, clip.num_frames)
        new = new_frame_count(num_frames)
        photos = self._photos(clip.image(clip.num_frames - c), last_image)
        s = self._settings(photos, height=height, width=width, num_frames=c + new, **settings)
        s = replace(s, fps=clip.fps or s.fps)
        tail = self._fit(photos[1], s) if len(photos) > 1 else None
        keyframes = Keyframes(clip.model_frames(width, height, slice(-c, None)), tail)
        details = {"mode": "extend", "source": clip.name, "source_frames": clip.num_frames, "context_frames": c,
                   "new_frames": new, "colour_match": colour_match, "motion": motion}  # fmt: skip
        return Request(s, photos, keyframes, motion, finish=Continuation(clip, c, colour_match), details=details)

    def _prepare_restyle(self, image, video, strength, loop, motion, last_image, settings) -> Request:
        clip = load_clip(video)
        strength = check_strength(DEFAULT_STRENGTH if strength is None else strength)
        num_frames = settings.pop("num_frames", None)
        frames = clip_frames(clip, None if num_frames is None else self._round_frames(int(num_frames)))
        conditioning = self.variant.conditioning
        first = image if image is not None else clip.image(0) if conditioning.requires_image else None
        if loop:
            last_image = first
        elif last_image is None and self.variant.takes_last_image:
            last_image = clip.image(frames - 1)  # FLF2V: the clip's own last frame closes it
        photos = self._photos(first, last_image)
        if settings.get("height") is None and settings.get("width") is None:
            settings["height"], settings["width"] = clip.size
        s = self._settings([clip.image(0)], num_frames=frames, **settings)
        s = replace(s, fps=clip.fps or s.fps)
        start = restyle_start(s.num_inference_steps, strength)
        details = {"mode": "restyle", "source": clip.name, "strength": strength,
                   "steps_run": s.num_inference_steps - start, "loop": loop, "motion": motion}  # fmt: skip
        source = clip.model_frames(s.width, s.height, slice(frames))
        return Request(s, photos, self._keyframes(photos, s), motion, source=source, start=start,
                       finish=close_loop if loop else keep_frames, details=details)  # fmt: skip

    def _keyframes(self, photos: list[Image.Image], s: Settings) -> Keyframes | None:
        """The photo (and last photo) fitted to the frame."""
        if not photos:
            return None
        tail = self._fit(photos[1], s) if len(photos) > 1 else None
        return Keyframes(self._fit(photos[0], s)[None], tail)

    @staticmethod
    def _fit(photo: Image.Image, s: Settings) -> np.ndarray:
        return to_model_range(fit_to_frame(photo, s.width, s.height))

    def _check_loop(self, loop: bool, last_image: ImageInput | None) -> ImageInput | None:
        if not loop:
            return last_image
        if not self.variant.accepts_last_image:
            raise InvalidInputError(
                f"{self.variant.name} has no last-frame input, so it cannot close a loop; "
                "use Wan2.1-FLF2V or Wan2.2-I2V-A14B"
            )
        if last_image is not None:
            raise InvalidInputError("a loop ends on its first frame; last_image does not apply")
        return None

    # --- generation ----------------------------------------------------------------------------------

    def run(
        self, request: Request, prompt: str, *, latents: np.ndarray | None = None, on_step: StepCallback | None = None
    ) -> Video:
        """Generate what a prepared :class:`Request` describes (see ``__call__`` for ``latents`` and
        ``on_step``)."""
        if not isinstance(prompt, str):
            raise InvalidInputError("prompt must be a string")
        s = request.settings
        scales = self._scales(s)
        denoiser = self.denoiser()
        branches = denoiser.branches_needed(scales)
        plan = self.plan_request(request)
        check_fits(plan)  # stop before loading anything rather than run out of memory halfway
        noise = self._initial_noise(self._latent_shape(s), s.seed, latents)
        timings: dict[str, float] = {}
        mx.reset_peak_memory()

        with _timed(timings, "text"):
            prompts = {COND: prompt, UNCOND: s.negative_prompt}
            text = self.encode_text([prompts[b] for b in branches])
            text = {b: text[i : i + 1] for i, b in enumerate(branches)}
            image_tokens = self.encode_image_tokens(request.photos)
        with _timed(timings, "image"):
            state, source = self.encode_inputs(request, noise.shape)
        with _timed(timings, "denoise"):
            sampler = self.make_scheduler()
            sampler.set_timesteps(s.num_inference_steps, shift=s.flow_shift)
            initial = noise if source is None else add_noise(source, noise, sampler.sigmas[request.start])
            observe = _observer(on_step, self._previewer(state))
            try:
                final = denoiser(
                    sampler, initial, state, text, image_tokens, scales, start=request.start, observe=observe
                )
            finally:
                self.experts.done()
        with _timed(timings, "decode"):
            frames = request.finish(self.decode(final, tiling=plan.vae_tiling))

        metadata = {
            "prompt": prompt,
            "model": self.model_name,
            "variant": self.variant.name,
            "dtype": dtype_name(self.dtype),
            "image": bool(request.photos),
            **vars(s),
            **request.details,
        }
        stats = {"seconds": timings, "peak_memory_gb": mx.get_peak_memory() / 1e9}
        return Video(frames=frames, fps=s.fps, metadata=metadata, stats=stats)

    # --- stages -------------------------------------------------------------------------------------

    def encode_text(self, prompts: list[str]) -> mx.array:
        """Prompts -> (len(prompts), 512, text_dim) embeddings, cut to their length and zero-padded."""
        ids, mask = self.tokenizer(prompts, max_length=TEXT_TOKENS)
        embeds = encode_prompts(self.text_encoder.get(), mx.array(ids), mx.array(mask), max_length=TEXT_TOKENS)
        mx.eval(embeds)
        self.text_encoder.release()
        return embeds

    def denoiser(self) -> Denoiser:
        """The denoising loop with this pipeline's experts, conditioning and compute dtype."""
        return Denoiser(self.experts, self.variant.conditioning, self.dtype)

    def encode_inputs(
        self, request: Request, latent_shape: tuple[int, ...]
    ) -> tuple[ConditionState | None, mx.array | None]:
        """VAE-encode what the request conditions on (its keyframes) and, for a restyle, the clip to
        noise: (condition state or None, normalised clip latents (1, T, h, w, C) or None)."""
        if request.keyframes is None and request.source is None:
            return None, None
        vae = self.vae_encoder.get()
        state = source = None
        if request.keyframes is not None:
            num_frames = request.settings.num_frames
            state = self.variant.conditioning.prepare(vae, request.keyframes, num_frames, latent_shape, request.motion)
            mx.eval(state.latent)
        if request.source is not None:
            source = encode_mode(vae, request.source)
            mx.eval(source)
        self.vae_encoder.release()
        return state, source

    def _previewer(self, state: ConditionState | None) -> Callable[[mx.array], Preview]:
        """Builds each step's :class:`Preview` (lazily: nothing is computed unless the callback asks)."""
        projection = LATENT_RGB[self.dims.vae.z_dim]
        conditioning = self.variant.conditioning
        return lambda x0: Preview(x0, projection, lambda latents: conditioning.finalize(latents, state))

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

    def decode(self, latents: mx.array, tiling: Tiling | None = None) -> np.ndarray:
        """Normalised latents (1, T, h, w, C) -> frames (4T-3, H, W, 3) float32 in [0, 1], streamed one
        latent frame at a time so memory does not grow with the clip length; spatially tiled when
        ``tiling`` is given (the plan asks for it when one frame does not fit the memory budget)."""
        vae = self.vae_decoder.get()
        z = vae.denormalize_latents(latents.astype(mx.float32))
        stream = tiled_decode_frames(vae, z, tiling) if tiling is not None else vae.decode_frames(z)
        chunks = []
        for chunk in stream:
            chunk = mx.clip(chunk.astype(mx.float32) / 2 + 0.5, 0.0, 1.0)
            mx.eval(chunk)
            chunks.append(np.array(chunk[0]))
        self.vae_decoder.release()
        return np.concatenate(chunks, axis=0)

    # --- inputs and settings ------------------------------------------------------------------------

    def _photos(self, image: ImageInput | None, last_image: ImageInput | None) -> list[Image.Image]:
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
        return [load_image(image)] + ([load_image(last_image)] if last_image is not None else [])

    def _settings(
        self,
        photos: list[Image.Image],
        *,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_scale_2: float | None = None,
        flow_shift: float | None = None,
        seed: int | None = None,
    ) -> Settings:
        steps, guidance, guidance_2, shift = num_inference_steps, guidance_scale, guidance_scale_2, flow_shift
        d = self.variant.defaults
        steps = d.num_inference_steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise InvalidInputError(f"num_inference_steps must be a positive integer, got {steps!r}")
        guidance = _non_negative("guidance_scale", d.guidance_scale if guidance is None else guidance)
        if self.variant.two_experts:
            guidance_2 = d.guidance_scale_2 if guidance_2 is None else guidance_2
            guidance_2 = _non_negative("guidance_scale_2", guidance if guidance_2 is None else guidance_2)
        elif guidance_2 is not None:
            raise InvalidInputError(f"{self.variant.name} has one transformer; guidance_scale_2 does not apply")
        shift = float(d.flow_shift if shift is None else shift)
        if not np.isfinite(shift) or shift <= 0:
            raise InvalidInputError(f"flow_shift must be > 0, got {shift}")
        height, width = self._size(photos[0] if photos else None, height, width)
        num_frames = self._round_frames(d.num_frames if num_frames is None else int(num_frames))
        if self.variant.takes_last_image and num_frames < 2:
            raise InvalidInputError("a first-last-frame clip needs at least 5 frames")
        seed = secrets.randbits(31) if seed is None else int(seed)
        negative_prompt = d.negative_prompt if negative_prompt is None else negative_prompt
        return Settings(height, width, num_frames, int(steps), guidance, guidance_2, shift, seed, negative_prompt, d.fps)

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

    @staticmethod
    def _round_frames(num_frames: int) -> int:
        if num_frames < 1:
            raise InvalidInputError(f"num_frames must be >= 1, got {num_frames}")
        rounded = round((num_frames - 1) / TEMPORAL_STRIDE) * TEMPORAL_STRIDE + 1
        if rounded != num_frames:
            log.warning("num_frames %d is not 4k+1; using %d", num_frames, rounded)
        return rounded

    def _latent_shape(self, s: Settings) -> tuple[int, int, int, int, int]:
        stride = self.dims.vae.scale_factor_spatial
        frames = (s.num_frames - 1) // TEMPORAL_STRIDE + 1
        return (1, frames, s.height // stride, s.width // stride, self.dims.vae.z_dim)

    @staticmethod
    def _initial_noise(shape: tuple[int, ...], seed: int, latents: np.ndarray | None) -> mx.array:
        """Noise in channels-last (1, T, h, w, C). Drawn in diffusers' (1, C, T, h, w) order, so a given
        seed fills the same element positions whichever layout the caller thinks in."""
        b, t, h, w, c = shape
        if latents is not None:
            latents = np.asarray(latents, dtype=np.float32)
            if latents.shape != (b, c, t, h, w):
                raise InvalidInputError(f"latents must have shape {(b, c, t, h, w)} (1, C, T, H, W); got {latents.shape}")
            noise = mx.array(latents)
        else:
            noise = mx.random.normal((b, c, t, h, w), key=mx.random.key(seed))
        return noise.transpose(0, 2, 3, 4, 1)


def _observer(on_step: StepCallback | None, previewer: Callable[[mx.array], Preview]):
    """The loop's per-step observer for a user's ``on_step``: a callback that takes a fourth argument gets
    the step's :class:`Preview`; returning False cancels the generation."""
    if on_step is None:
        return None
    with_preview = _takes_four_arguments(on_step)

    def observe(step: StepInfo, latents: mx.array, x0: mx.array) -> None:
        extra = (previewer(x0),) if with_preview else ()
        if on_step(step.number, step.total, step.timestep, *extra) is False:
            raise GenerationCancelled(f"cancelled after step {step.number} of {step.total}")

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
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    tic = time.perf_counter()
    yield
    timings[stage] = time.perf_counter() - tic


def _non_negative(name: str, value: float) -> float:
    value = float(value)
    if not np.isfinite(value) or value < 0:
        raise InvalidInputError(f"{name} must be >= 0, got {value}")
    return value
