"""One image-to-video pipeline for every Wan variant; the variant supplies conditioning and defaults."""

from __future__ import annotations

import functools
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np
from PIL import Image

from . import validation
from .conditioning import ConditionState
from .denoise import COND, UNCOND, Denoiser, StepInfo
from .errors import GenerationCancelled, InvalidInputError
from .experts import Experts
from .models.wan_vae_tiling import Tiling, tiled_decode_frames
from .planner import ModelDims, Plan, check_fits, plan_generation
from .resident import Resident
from .image import ImageInput, ImageOptions, LoadReport, fit_to_frame, load_image, to_model_range
from .models.clip import CLIPVisionTower
from .models.clip_preprocess import CLIPImageProcessor
from .models.tokenizer import UMT5Tokenizer
from .models.umt5 import UMT5Encoder, encode_prompts
from .models.wan_vae import AutoencoderKLWan
from .runtime import dtype_name
from .schedulers import Scheduler
from .variants import Variant
from .video import Video

log = logging.getLogger(__name__)

TEXT_TOKENS = 512  # Wan always pads prompts to 512 tokens (see wan.md §0.1-0.2)
TEMPORAL_STRIDE = 4

StepCallback = Callable[[int, int, float], "bool | None"]


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


def _one_call_at_a_time(method: Callable) -> Callable:
    """Serialise calls on one pipeline: its stages load and release shared models, so a second call
    from another thread waits for the running one to finish."""

    @functools.wraps(method)
    def wrapper(self: WanPipeline, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


@dataclass
class WanPipeline:
    """Photo + prompt -> :class:`Video`. Build it with :func:`load_pipeline`.

    Components are loaded when their stage starts and released when it ends (text encoder, CLIP, VAE,
    transformer experts), so only one large model is in memory at a time; ``keep_resident`` keeps them.

    A pipeline can be called from any thread (a Mac app's worker thread, say), one call at a time: a
    call made while another is running waits for it to finish.
    """

    variant: Variant
    model_name: str
    dims: ModelDims
    dtype: mx.Dtype  # the transformer's and the text encoder's compute dtype
    vae_dtype: mx.Dtype  # the VAE's and CLIP's (float32 by default, as diffusers' docs run them)
    quantize_bits: int | None
    tokenizer: UMT5Tokenizer
    text_encoder: Resident[UMT5Encoder]
    experts: Experts
    vae_encoder: Resident[AutoencoderKLWan]  # the VAE without its decoder, for the photo
    vae_decoder: Resident[AutoencoderKLWan]  # the VAE without its encoder, for the result
    make_scheduler: Callable[[], Scheduler]
    image_encoder: Resident[ImageEncoder] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def plan(
        self, *, height: int, width: int, num_frames: int, guidance: bool = True, budget: int | None = None
    ) -> Plan:
        """Estimate this pipeline's peak memory for a request, before anything is loaded (see
        :mod:`mlx_i2v.planner`). Height, width and frame count should already be valid."""
        return plan_generation(
            self.dims,
            height=height,
            width=width,
            num_frames=num_frames,
            guidance=guidance,
            dtype=self.dtype,
            vae_dtype=self.vae_dtype,
            quantize=self.quantize_bits,
            budget=budget,
            encode_frames=num_frames if self.variant.conditioning.requires_image else 1,
            staged=not self.text_encoder.keep,
        )

    def resolve_settings(self, image: ImageInput | None = None, **kwargs) -> Settings:
        """The settings a call with these arguments would use (defaults filled in, sizes rounded, every
        argument checked), without loading a model or generating anything. Accepts the keyword
        arguments of ``__call__`` (``prompt`` and ``on_step`` too, checked and otherwise unused)."""
        options = _image_options(kwargs)
        if "prompt" in kwargs:
            validation.text("prompt", kwargs.pop("prompt"))
        _check_on_step(kwargs.pop("on_step", None))
        latents = kwargs.pop("latents", None)
        photos = self._photos(image, kwargs.pop("last_image", None), options)
        settings = self._settings(photos, **kwargs)
        if latents is not None:
            self._initial_noise(self._latent_shape(settings), settings.seed, latents)
        return settings

    @_one_call_at_a_time
    def __call__(
        self,
        image: ImageInput | None,
        prompt: str,
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
        latents: np.ndarray | None = None,
        last_image: ImageInput | None = None,
        on_step: StepCallback | None = None,
        crop: tuple[int, int, int, int] | None = None,
        rotate: int = 0,
        fit: str = "cover",
        background: tuple[int, int, int] | str = (255, 255, 255),
    ) -> Video:
        """Generate a clip that starts from ``image``.

        Args:
            image: path, PIL image or uint8 array (H, W), (H, W, 3) or (H, W, 4); turned upright by its EXIF
                orientation, then fitted to the frame (see ``fit``). None generates from the prompt alone
                where the variant can (Wan2.2-TI2V-5B).
            prompt: what should happen; the model reads its first 511 tokens (a longer prompt is cut with
                a logged warning). ``negative_prompt``: None for the model's default, "" for none.
            height, width: frame size; rounded to the variant's multiple (16 or 32) with a logged notice.
                Unset: the variant's default size in the photo's orientation.
            num_frames: rounded to 4k+1. Unset settings take the variant's defaults.
            guidance_scale: classifier-free guidance (> 1 enables it); ``guidance_scale_2`` is the
                low-noise expert's for Wan2.2-A14B (default: its own default, else ``guidance_scale``).
            seed: for the initial noise, an int in [0, 2**64 - 1] (default: random); ``latents`` overrides
                it with explicit noise, a float array in diffusers' layout (1, C, T, H/stride, W/stride), to
                reproduce a diffusers run.
            last_image: the clip's last frame, for first-last-frame models (Wan2.1-FLF2V).
            on_step: ``on_step(step, total, timestep)`` after every denoising step; returning False stops
                the generation by raising :class:`GenerationCancelled`.
            crop, rotate: applied to the photo(s) after the EXIF orientation: rotate clockwise by 0, 90,
                180 or 270 degrees, then crop to (x, y, width, height) pixels of the rotated photo.
            fit: "cover" scales the photo to cover the frame and centre-crops; "contain" scales it to fit
                inside and pads with ``background``, which also shows through transparent pixels (an
                (R, G, B) tuple or a colour string such as "white" or "#202020").

        Returns:
            A :class:`Video` with ``frames`` (num_frames, height, width, 3) float32 in [0, 1].

        Raises:
            InvalidInputError: for any argument of the wrong type or out of range, before any model loads.
        """
        tic = time.perf_counter()
        options = ImageOptions(crop=crop, rotate=rotate, fit=fit, background=background)
        validation.text("prompt", prompt)
        _check_on_step(on_step)
        report = LoadReport()
        photos = self._photos(image, last_image, options, report)
        loading_seconds = time.perf_counter() - tic
        settings = self._settings(
            photos, negative_prompt=negative_prompt, height=height, width=width, num_frames=num_frames,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            guidance_scale_2=guidance_scale_2, flow_shift=flow_shift, seed=seed,
        )  # fmt: skip
        scales = self._scales(settings)
        denoiser = self.denoiser()
        branches = denoiser.branches_needed(scales)
        plan = self.plan(height=settings.height, width=settings.width, num_frames=settings.num_frames,
                         guidance=len(branches) > 1)  # fmt: skip
        check_fits(plan)  # stop before loading anything rather than run out of memory halfway
        noise = self._initial_noise(self._latent_shape(settings), settings.seed, latents)
        timings: dict[str, float] = {}
        active_while_loading = mx.get_active_memory()
        mx.reset_peak_memory()

        tic = time.perf_counter()
        prompts = {COND: prompt, UNCOND: settings.negative_prompt}
        text = self.encode_text([prompts[b] for b in branches], names=[PROMPT_NAMES[b] for b in branches])
        text = {b: text[i : i + 1] for i, b in enumerate(branches)}
        image_tokens = self.encode_image_tokens(photos)
        timings["text"] = time.perf_counter() - tic

        tic = time.perf_counter()
        state: ConditionState | None = None
        if photos:
            size = (settings.width, settings.height)
            frames = [to_model_range(fit_to_frame(p, *size, options.fit, options.background, report)) for p in photos]
            state = self.variant.conditioning.prepare(self.vae_encoder.get(), frames, settings.num_frames, noise.shape)
            mx.eval(state.latent)
            self.vae_encoder.release()
        timings["image"] = loading_seconds + time.perf_counter() - tic

        tic = time.perf_counter()
        sampler = self.make_scheduler()
        sampler.set_timesteps(settings.num_inference_steps, shift=settings.flow_shift)
        try:
            final = denoiser(sampler, noise, state, text, image_tokens, scales, observe=_observer(on_step))
        finally:
            self.experts.done()
        timings["denoise"] = time.perf_counter() - tic

        tic = time.perf_counter()
        video = self.decode(final, tiling=plan.vae_tiling)
        timings["decode"] = time.perf_counter() - tic

        metadata = {
            "prompt": prompt,
            "model": self.model_name,
            "variant": self.variant.name,
            "dtype": dtype_name(self.dtype),
            "vae_dtype": dtype_name(self.vae_dtype),
            "image": image is not None,
            **({"image_name": Path(image).name} if isinstance(image, (str, Path)) else {}),
            **(options.metadata() if photos else {}),
            **vars(settings),
        }
        # The photos' Pillow buffers are not MLX's: the peak is MLX's plus the prepared photos held
        # throughout, or the Pillow buffers alive at once while loading and fitting them, if larger.
        peak = max(mx.get_peak_memory() + report.held, active_while_loading + report.peak)
        stats = {"seconds": timings, "peak_memory_gb": peak / 1e9}
        return Video(frames=video, fps=settings.fps, metadata=metadata, stats=stats)

    # --- stages -------------------------------------------------------------------------------------

    def encode_text(self, prompts: list[str], names: Sequence[str] | None = None) -> mx.array:
        """Prompts -> (len(prompts), 512, text_dim) embeddings, cut to their length and zero-padded.
        A prompt longer than the window is cut with a warning that uses its name in ``names``."""
        ids, mask = self.tokenizer(prompts, max_length=TEXT_TOKENS, names=names)
        embeds = encode_prompts(self.text_encoder.get(), mx.array(ids), mx.array(mask), max_length=TEXT_TOKENS)
        mx.eval(embeds)
        self.text_encoder.release()
        return embeds

    def denoiser(self) -> Denoiser:
        """The denoising loop with this pipeline's experts, conditioning and compute dtype."""
        return Denoiser(self.experts, self.variant.conditioning, self.dtype)

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

    def _photos(
        self,
        image: ImageInput | None,
        last_image: ImageInput | None,
        options: ImageOptions,
        report: LoadReport | None = None,
    ) -> list[Image.Image]:
        """The prepared photos (first, then last), their notices logged and their cost in ``report``."""
        v = self.variant
        if image is None:
            if v.conditioning.requires_image:
                raise InvalidInputError(f"{v.name} needs an input image")
            if last_image is not None:
                raise InvalidInputError("last_image needs an image for the first frame too")
            return []
        if last_image is None and v.takes_last_image:
            raise InvalidInputError(f"{v.name} needs a last image (--last-image)")
        if last_image is not None and not v.takes_last_image:
            raise InvalidInputError(f"{v.name} does not take a last image; use a first-last-frame model (FLF2V)")
        report = report or LoadReport()
        photos = [load_image(p, options, report) for p in (image, last_image) if p is not None]
        for notice in report.notices:
            log.warning("%s", notice)
        return photos

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
        d = self.variant.defaults
        steps = validation.integer("num_inference_steps", _or(num_inference_steps, d.num_inference_steps), minimum=1)
        guidance = validation.number("guidance_scale", _or(guidance_scale, d.guidance_scale))
        guidance_2 = guidance_scale_2
        if self.variant.two_experts:
            guidance_2 = validation.number("guidance_scale_2", _or(guidance_2, d.guidance_scale_2, guidance))
        elif guidance_2 is not None:
            raise InvalidInputError(f"{self.variant.name} has one transformer; guidance_scale_2 does not apply")
        shift = validation.number("flow_shift", _or(flow_shift, d.flow_shift), inclusive=False)
        self.make_scheduler().set_timesteps(steps, shift=shift)  # refuses step counts it cannot run
        for name, value in (("height", height), ("width", width)):
            if value is not None:
                validation.integer(name, value, minimum=1)
        height, width = self._size(photos[0] if photos else None, height, width)
        num_frames = self._round_frames(validation.integer("num_frames", _or(num_frames, d.num_frames), minimum=1))
        if self.variant.takes_last_image and num_frames < 2:
            raise InvalidInputError("a first-last-frame clip needs at least 5 frames")
        self.dims.check_request(height=height, width=width, num_frames=num_frames)
        seed = secrets.randbits(31) if seed is None else validation.seed(seed)
        negative_prompt = validation.text("negative_prompt", _or(negative_prompt, d.negative_prompt))
        return Settings(height, width, num_frames, steps, guidance, guidance_2, shift, seed, negative_prompt, d.fps)

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
            if not isinstance(latents, np.ndarray) or not np.issubdtype(latents.dtype, np.floating):
                raise InvalidInputError(f"latents must be a float numpy array, got {type(latents).__name__}")
            if latents.shape != (b, c, t, h, w):
                raise InvalidInputError(f"latents must have shape {(b, c, t, h, w)} (1, C, T, H, W); got {latents.shape}")
            if not np.isfinite(latents).all():
                raise InvalidInputError("latents contain NaN or infinite values")
            noise = mx.array(latents.astype(np.float32))
        else:
            noise = mx.random.normal((b, c, t, h, w), key=mx.random.key(seed))
        return noise.transpose(0, 2, 3, 4, 1)


PROMPT_NAMES = {COND: "prompt", UNCOND: "negative prompt"}  # how warnings name them


def _or(*values):
    """The first value that is not None (an argument, then its defaults)."""
    return next((v for v in values if v is not None), None)


def _image_options(kwargs: dict) -> ImageOptions:
    """Pop ``__call__``'s image keyword arguments from ``kwargs`` as :class:`ImageOptions`."""
    names = ("crop", "rotate", "fit", "background")
    return ImageOptions(**{n: kwargs.pop(n) for n in names if n in kwargs})


def _check_on_step(on_step: object) -> None:
    if on_step is not None and not callable(on_step):
        raise InvalidInputError(f"on_step must be callable or None, got {type(on_step).__name__}")


def _observer(on_step: StepCallback | None):
    """The loop's per-step observer for a user's ``on_step(step, total, timestep)``: returning False from
    it cancels the generation."""
    if on_step is None:
        return None

    def observe(step: StepInfo, latents: mx.array, x0: mx.array) -> None:
        if on_step(step.number, step.total, step.timestep) is False:
            raise GenerationCancelled(f"cancelled after step {step.number} of {step.total}")

    return observe
