"""One image-to-video pipeline for every Wan variant; the variant supplies conditioning and defaults."""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from .conditioning import ConditionState
from .errors import GenerationCancelled, InvalidInputError
from .image import ImageInput, fit_to_frame, load_image, to_model_range
from .models.tokenizer import UMT5Tokenizer
from .models.umt5 import UMT5Encoder, encode_prompts, load_umt5
from .models.wan_transformer import WanTransformer3DModel, load_wan_transformer
from .models.wan_vae import AutoencoderKLWan, load_wan_vae
from .runtime import dtype_name, resolve_dtype
from .schedulers import load_scheduler, scheduler_by_name
from .variants import Variant, detect_variant
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
    flow_shift: float
    seed: int | None
    negative_prompt: str
    fps: float


@dataclass
class WanPipeline:
    """Photo + prompt -> :class:`Video`. Build it with :func:`load_pipeline`."""

    variant: Variant
    model_name: str
    model_dir: Path
    dtype: mx.Dtype
    tokenizer: UMT5Tokenizer
    text_encoder: UMT5Encoder
    transformer: WanTransformer3DModel
    vae: AutoencoderKLWan
    scheduler_config_shift: float | None = None
    scheduler_factory: Callable[[], Any] = field(default=None, repr=False)  # type: ignore[assignment]

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
        flow_shift: float | None = None,
        seed: int | None = None,
        latents: np.ndarray | None = None,
        on_step: StepCallback | None = None,
    ) -> Video:
        """Generate a clip that starts from ``image`` (None: text-to-video where the variant supports it).

        Args:
            image: path, PIL image or uint8 array (H, W, 3); resized to cover the frame and center-cropped.
            prompt: what should happen. ``negative_prompt``: None for the model's default, "" for none.
            height, width: frame size; rounded to the variant's multiple (16 or 32) with a logged notice.
            num_frames: rounded to 4k+1. Unset settings take the variant's defaults.
            seed: for the initial noise; ``latents`` overrides it with explicit noise, a float array in
                diffusers' layout (1, C, T, H/stride, W/stride), to reproduce a diffusers run.
            on_step: ``on_step(step, total, timestep)`` after every denoising step; returning False stops
                the generation by raising :class:`GenerationCancelled`.

        Returns:
            A :class:`Video` with ``frames`` (num_frames, height, width, 3) float32 in [0, 1].
        """
        timings: dict[str, float] = {}
        pil_image = load_image(image) if image is not None else None
        settings = self._settings(
            pil_image, negative_prompt, height, width, num_frames, num_inference_steps, guidance_scale, flow_shift, seed
        )
        if not isinstance(prompt, str):
            raise InvalidInputError("prompt must be a string")
        mx.reset_peak_memory()

        tic = time.perf_counter()
        use_cfg = settings.guidance_scale > 1.0
        prompts = [prompt, settings.negative_prompt] if use_cfg else [prompt]
        context = self.encode_text(prompts)
        timings["text"] = time.perf_counter() - tic

        latent_shape = self._latent_shape(settings)
        noise = self._initial_noise(latent_shape, settings.seed, latents)

        tic = time.perf_counter()
        state: ConditionState | None = None
        if pil_image is not None:
            frame = to_model_range(fit_to_frame(pil_image, settings.width, settings.height))
            state = self.variant.conditioning.prepare(self.vae, [frame], settings.num_frames, latent_shape)
            mx.eval(state.latent)
        timings["image"] = time.perf_counter() - tic

        tic = time.perf_counter()
        final = self._denoise(noise, state, context, settings, use_cfg, on_step)
        timings["denoise"] = time.perf_counter() - tic

        tic = time.perf_counter()
        frames = self.decode(final)
        timings["decode"] = time.perf_counter() - tic

        metadata = {
            "prompt": prompt,
            "model": self.model_name,
            "variant": self.variant.name,
            "dtype": dtype_name(self.dtype),
            "image": pil_image is not None,
            **vars(settings),
        }
        stats = {"seconds": timings, "peak_memory_gb": mx.get_peak_memory() / 1e9}
        return Video(frames=frames, fps=settings.fps, metadata=metadata, stats=stats)

    # --- stages -------------------------------------------------------------------------------------

    def encode_text(self, prompts: list[str]) -> mx.array:
        """Prompts -> (len(prompts), 512, text_dim) embeddings, cut to their length and zero-padded."""
        ids, mask = self.tokenizer(prompts, max_length=TEXT_TOKENS)
        embeds = encode_prompts(self.text_encoder, mx.array(ids), mx.array(mask), max_length=TEXT_TOKENS)
        mx.eval(embeds)
        return embeds

    def _denoise(
        self,
        latents: mx.array,
        state: ConditionState | None,
        context: mx.array,
        settings: Settings,
        use_cfg: bool,
        on_step: StepCallback | None,
    ) -> mx.array:
        scheduler = self.scheduler_factory()
        scheduler.set_timesteps(settings.num_inference_steps, shift=settings.flow_shift)
        timesteps = [int(t) for t in np.asarray(scheduler.timesteps)]
        # Text (and image) embeddings are step-invariant: embed them once for the whole loop.
        context = self.transformer.embed_context(context.astype(self.dtype))
        batch = 2 if use_cfg else 1
        conditioning = self.variant.conditioning
        for i, t in enumerate(timesteps):
            x, timestep = conditioning.model_input(latents, state, float(t))
            x = mx.broadcast_to(x, (batch, *x.shape[1:])).astype(self.dtype)
            timestep = mx.broadcast_to(timestep, (batch, *timestep.shape[1:]))
            out = self.transformer(x, timestep, context=context).astype(mx.float32)
            # Classifier-free guidance: the conditional and unconditional passes ran as one batch of two.
            noise_pred = out[1:] + settings.guidance_scale * (out[:1] - out[1:]) if use_cfg else out
            latents = scheduler.step(noise_pred, t, latents)
            mx.eval(latents)
            if on_step is not None and on_step(i + 1, len(timesteps), t) is False:
                raise GenerationCancelled(f"cancelled after step {i + 1} of {len(timesteps)}")
        return conditioning.finalize(latents, state)

    def decode(self, latents: mx.array) -> np.ndarray:
        """Normalised latents (1, T, h, w, C) -> frames (4T-3, H, W, 3) float32 in [0, 1], streamed one
        latent frame at a time so memory does not grow with the clip length."""
        z = self.vae.denormalize_latents(latents.astype(mx.float32))
        chunks = []
        for chunk in self.vae.decode_frames(z):
            chunk = mx.clip(chunk.astype(mx.float32) / 2 + 0.5, 0.0, 1.0)
            mx.eval(chunk)
            chunks.append(np.array(chunk[0]))
        return np.concatenate(chunks, axis=0)

    # --- settings -----------------------------------------------------------------------------------

    def _settings(self, image, negative_prompt, height, width, num_frames, steps, guidance, shift, seed) -> Settings:
        d = self.variant.defaults
        if steps is None:
            steps = d.num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise InvalidInputError(f"num_inference_steps must be a positive integer, got {steps!r}")
        guidance = d.guidance_scale if guidance is None else float(guidance)
        if not np.isfinite(guidance) or guidance < 0:
            raise InvalidInputError(f"guidance_scale must be >= 0, got {guidance}")
        shift = (d.flow_shift if self.scheduler_config_shift is None else self.scheduler_config_shift) if shift is None else float(shift)
        if shift is None or not np.isfinite(shift) or shift <= 0:
            raise InvalidInputError(f"flow_shift must be > 0, got {shift}")
        if height is None and width is None:
            aspect = image.width / image.height if image is not None else d.sizes[0][1] / d.sizes[0][0]
            height, width = d.size_for(aspect)
        elif height is None or width is None:
            # One side given: keep the image's (or the default) aspect ratio.
            ref_h, ref_w = (image.height, image.width) if image is not None else d.sizes[0]
            height = height if height is not None else round(width * ref_h / ref_w)
            width = width if width is not None else round(height * ref_w / ref_h)
        height, width = self._round_size(int(height), int(width))
        num_frames = self._round_frames(d.num_frames if num_frames is None else int(num_frames))
        if seed is None:
            seed = secrets.randbits(31)
        if negative_prompt is None:
            negative_prompt = d.negative_prompt
        return Settings(height, width, num_frames, int(steps), guidance, shift, int(seed), negative_prompt, d.fps)

    def _round_size(self, height: int, width: int) -> tuple[int, int]:
        m = self.variant.size_multiple
        if height < m or width < m:
            raise InvalidInputError(f"height and width must be at least {m}, got {height}x{width}")
        rounded = (max(m, round(height / m) * m), max(m, round(width / m) * m))
        if rounded != (height, width):
            log.warning("size %dx%d is not a multiple of %d; using %dx%d", width, height, m, rounded[1], rounded[0])
        return rounded

    @staticmethod
    def _round_frames(num_frames: int) -> int:
        if num_frames < 1:
            raise InvalidInputError(f"num_frames must be >= 1, got {num_frames}")
        rounded = max(1, round((num_frames - 1) / TEMPORAL_STRIDE) * TEMPORAL_STRIDE + 1)
        if rounded != num_frames:
            log.warning("num_frames %d is not 4k+1; using %d", num_frames, rounded)
        return rounded

    def _latent_shape(self, s: Settings) -> tuple[int, int, int, int, int]:
        stride = self.vae.config.scale_factor_spatial
        frames = (s.num_frames - 1) // TEMPORAL_STRIDE + 1
        return (1, frames, s.height // stride, s.width // stride, self.vae.config.z_dim)

    @staticmethod
    def _initial_noise(shape: tuple[int, ...], seed: int | None, latents: np.ndarray | None) -> mx.array:
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


def load_pipeline(model: str | Path, *, dtype: str | None = None, quantize: int | None = None) -> WanPipeline:
    """Load a Wan image-to-video pipeline.

    Args:
        model: a local diffusers-layout directory (model_index.json + component folders) or a Hub repo id
            such as "Wan-AI/Wan2.2-TI2V-5B-Diffusers" (downloaded once with ``huggingface_hub``).
        dtype: "float32", "bfloat16" or "float16"; default bfloat16 on a GPU, float32 on the CPU.
        quantize: not supported yet; anything but None is an error.
    """
    from .hub import resolve_model

    if quantize is not None:
        raise InvalidInputError("quantization is not supported yet (quantize must be None)")
    compute_dtype = resolve_dtype(dtype)
    model_dir = resolve_model(model)
    variant = detect_variant(model_dir)
    log.info("loading %s from %s (%s)", variant.name, model_dir, dtype_name(compute_dtype))
    configured_shift = load_scheduler(model_dir).shift
    return WanPipeline(
        variant=variant,
        model_name=str(model),
        model_dir=model_dir,
        dtype=compute_dtype,
        tokenizer=UMT5Tokenizer.from_folder(model_dir / "tokenizer"),
        text_encoder=load_umt5(model_dir / "text_encoder", compute_dtype),
        transformer=load_wan_transformer(model_dir / "transformer", compute_dtype),
        vae=load_wan_vae(model_dir / "vae", compute_dtype),
        scheduler_config_shift=configured_shift,
        scheduler_factory=lambda: load_scheduler(model_dir),
    )
