"""One image-to-video pipeline for every Wan variant; the variant supplies conditioning and defaults."""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import numpy as np
from PIL import Image

from .conditioning import ConditionState
from .errors import GenerationCancelled, InvalidInputError
from .experts import Experts
from .lora.manager import TransformerLoras
from .models.wan_vae_tiling import Tiling, tiled_decode_frames
from .planner import ModelDims, Plan, check_fits, plan_generation
from .resident import Resident
from .image import ImageInput, fit_to_frame, load_image, to_model_range
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

StepCallback = Callable[[int, int, int], "bool | None"]


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
    loras: TransformerLoras | None = None

    def set_loras(self, loras) -> None:
        """Change the LoRAs or their strengths without reloading the base model (same forms as
        ``load_pipeline(loras=...)``); ``[]`` restores the base weights exactly. Every file is checked
        first, so on error nothing changes. Loaded experts are updated in place (merged parameters are
        re-read from their checkpoint); the others pick the set up when they load."""
        if self.loras is None:
            raise InvalidInputError("this pipeline was built without LoRA support")
        self.loras.set(loras, self.experts.loaded())

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
            quantize=self.quantize_bits,
            budget=budget,
            encode_frames=num_frames if self.variant.conditioning.requires_image else 1,
            staged=not self.text_encoder.keep,
        )

    def resolve_settings(self, image: ImageInput | None = None, **kwargs) -> Settings:
        """The settings a call with these arguments would use (defaults filled in, sizes rounded),
        without loading or generating anything. Accepts the keyword arguments of ``__call__``."""
        photos = self._photos(image, kwargs.pop("last_image", None))
        return self._settings(photos, **kwargs)

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
    ) -> Video:
        """Generate a clip that starts from ``image``.

        Args:
            image: path, PIL image or uint8 array (H, W, 3); resized to cover the frame and center-cropped.
                None generates from the prompt alone where the variant can (Wan2.2-TI2V-5B).
            prompt: what should happen. ``negative_prompt``: None for the model's default, "" for none.
            height, width: frame size; rounded to the variant's multiple (16 or 32) with a logged notice.
                Unset: the variant's default size in the photo's orientation.
            num_frames: rounded to 4k+1. Unset settings take the variant's defaults.
            guidance_scale: classifier-free guidance (> 1 enables it); ``guidance_scale_2`` is the
                low-noise expert's for Wan2.2-A14B (default: its own default, else ``guidance_scale``).
            seed: for the initial noise; ``latents`` overrides it with explicit noise, a float array in
                diffusers' layout (1, C, T, H/stride, W/stride), to reproduce a diffusers run.
            last_image: the clip's last frame, for first-last-frame models (Wan2.1-FLF2V).
            on_step: ``on_step(step, total, timestep)`` after every denoising step; returning False stops
                the generation by raising :class:`GenerationCancelled`.

        Returns:
            A :class:`Video` with ``frames`` (num_frames, height, width, 3) float32 in [0, 1].
        """
        if not isinstance(prompt, str):
            raise InvalidInputError("prompt must be a string")
        photos = self._photos(image, last_image)
        settings = self._settings(
            photos, negative_prompt=negative_prompt, height=height, width=width, num_frames=num_frames,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            guidance_scale_2=guidance_scale_2, flow_shift=flow_shift, seed=seed,
        )  # fmt: skip
        use_cfg = settings.guidance_scale > 1.0 or (settings.guidance_scale_2 or 0.0) > 1.0
        plan = self.plan(height=settings.height, width=settings.width, num_frames=settings.num_frames, guidance=use_cfg)
        check_fits(plan)  # stop before loading anything rather than run out of memory halfway
        noise = self._initial_noise(self._latent_shape(settings), settings.seed, latents)
        timings: dict[str, float] = {}
        mx.reset_peak_memory()

        tic = time.perf_counter()
        text = self.encode_text([prompt, settings.negative_prompt] if use_cfg else [prompt])
        image_tokens = self.encode_image_tokens(photos, batch=text.shape[0])
        timings["text"] = time.perf_counter() - tic

        tic = time.perf_counter()
        state: ConditionState | None = None
        if photos:
            frames = [to_model_range(fit_to_frame(p, settings.width, settings.height)) for p in photos]
            state = self.variant.conditioning.prepare(self.vae_encoder.get(), frames, settings.num_frames, noise.shape)
            mx.eval(state.latent)
            self.vae_encoder.release()
        timings["image"] = time.perf_counter() - tic

        tic = time.perf_counter()
        try:
            final = self._denoise(noise, state, text, image_tokens, settings, use_cfg, on_step)
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
            "image": image is not None,
            **vars(settings),
            "loras": self.loras.records() if self.loras is not None else [],
        }
        stats = {"seconds": timings, "peak_memory_gb": mx.get_peak_memory() / 1e9}
        return Video(frames=video, fps=settings.fps, metadata=metadata, stats=stats)

    # --- stages -------------------------------------------------------------------------------------

    def encode_text(self, prompts: list[str]) -> mx.array:
        """Prompts -> (len(prompts), 512, text_dim) embeddings, cut to their length and zero-padded."""
        ids, mask = self.tokenizer(prompts, max_length=TEXT_TOKENS)
        embeds = encode_prompts(self.text_encoder.get(), mx.array(ids), mx.array(mask), max_length=TEXT_TOKENS)
        mx.eval(embeds)
        self.text_encoder.release()
        return embeds

    def encode_image_tokens(self, photos: list[Image.Image], batch: int) -> mx.array | None:
        """CLIP tokens for variants that attend to the photo, repeated for each of ``batch`` rows:
        (batch * len(photos), 257, 1280), each row's photos adjacent (what FLF2V's position table expects)."""
        if self.image_encoder is None:
            return None
        tokens = self.image_encoder.get()(photos)  # the photos as given, not fitted to the frame: as diffusers
        tokens = mx.concatenate([tokens] * batch, axis=0)
        mx.eval(tokens)
        self.image_encoder.release()
        return tokens

    def _denoise(
        self,
        latents: mx.array,
        state: ConditionState | None,
        text: mx.array,
        image_tokens: mx.array | None,
        settings: Settings,
        use_cfg: bool,
        on_step: StepCallback | None,
    ) -> mx.array:
        scheduler = self.make_scheduler()
        scheduler.set_timesteps(settings.num_inference_steps, shift=settings.flow_shift)
        timesteps = [int(t) for t in np.asarray(scheduler.timesteps)]
        guidance = (settings.guidance_scale, settings.guidance_scale_2)
        batch = 2 if use_cfg else 1
        conditioning = self.variant.conditioning
        # The context and its cross-attention K/V, once per expert rather than per step. Timesteps only
        # decrease, so each expert runs one contiguous span: only the current expert's cache is kept.
        cached: tuple[int, list] | None = None
        for i, t in enumerate(timesteps):
            index = self.experts.index_for(t)
            model = self.experts.get(index)
            if cached is None or cached[0] != index:
                cached = None  # the previous expert's K/V goes before this one's is built
                context = model.embed_context(
                    text.astype(self.dtype), None if image_tokens is None else image_tokens.astype(self.dtype)
                )
                cached = (index, model.cross_attention_cache(context))
                mx.eval(cached[1])
            x, timestep = conditioning.model_input(latents, state, float(t))
            x = mx.broadcast_to(x, (batch, *x.shape[1:])).astype(self.dtype)
            timestep = mx.broadcast_to(timestep, (batch, *timestep.shape[1:]))
            out = model(x, timestep, context=cached[1]).astype(mx.float32)
            if use_cfg:  # the conditional and unconditional passes ran as one batch of two
                out = out[1:] + guidance[index] * (out[:1] - out[1:])
            latents = scheduler.step(out, t, latents)
            mx.eval(latents)
            if on_step is not None and on_step(i + 1, len(timesteps), t) is False:
                raise GenerationCancelled(f"cancelled after step {i + 1} of {len(timesteps)}")
        return conditioning.finalize(latents, state)

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
        if last_image is not None and not v.takes_last_image:
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


def _non_negative(name: str, value: float) -> float:
    value = float(value)
    if not np.isfinite(value) or value < 0:
        raise InvalidInputError(f"{name} must be >= 0, got {value}")
    return value
