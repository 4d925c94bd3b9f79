"""References for restyle, extend, loop, motion and previews, written as small subclasses and functions of
diffusers 0.42.1 code where diffusers has no pipeline for the feature.

* TI2V-5B restyle: diffusers' own ``WanVideoToVideoPipeline``, with its spatial VAE factor set to the
  Wan2.2 VAE's 16 (it reads 8 from ``temperal_downsample``, workflow.md §1.1).
* Channel-concat restyle: ``WanImageToVideoPipeline`` whose random latents are replaced by the encoded
  clip noised with ``WanVideoToVideoPipeline.prepare_latents`` and whose loop runs the tail of the
  schedule from ``WanVideoToVideoPipeline.get_timesteps`` (:func:`restyle_reference`).
* Extend: ``WanImageToVideoPipeline`` with ``prepare_latents`` overridden, TI2V-5B with k clean latent
  frames at timestep 0 (:class:`PrefixTI2V`, workflow.md §2.2), the channel-concat models with
  ``WanAnimatePipeline.prepare_prev_segment_cond_latents``' pixel-mask prefix (:class:`PrefixI2V`).
* Motion: PainterI2V's formula applied to the condition ``WanImageToVideoPipeline.prepare_latents`` returns,
  in raw latent space (:class:`PainterI2V`).
* Previews: ``x0 = sample - sigma * model_output`` captured at each scheduler step (:func:`capture_x0`).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import WanAnimatePipeline, WanImageToVideoPipeline, WanPipeline, WanVideoToVideoPipeline
from diffusers.pipelines.wan.pipeline_wan_i2v import retrieve_latents
from diffusers.video_processor import VideoProcessor
from PIL import Image


def noise(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """The noise diffusers' ``randn_tensor`` draws from ``torch.Generator().manual_seed(seed)`` on the CPU."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).numpy()


def pil_frames(frames: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(f) for f in frames]


def _run(pipe, **kwargs) -> np.ndarray:
    with torch.no_grad():
        out = pipe(output_type="np", max_sequence_length=512, **kwargs).frames
    return np.asarray(out[0], np.float32)


def ti2v_video_to_video(model_dir, clip: np.ndarray, seed: int, scheduler=None, **kwargs) -> np.ndarray:
    """diffusers ``WanVideoToVideoPipeline`` on the TI2V-5B components, scale-16 patch applied; with the
    checkpoint's scheduler or ``scheduler``."""
    base = WanPipeline.from_pretrained(model_dir, dtype=torch.float32)
    pipe = WanVideoToVideoPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder,
                                   transformer=base.transformer, vae=base.vae,
                                   scheduler=scheduler or base.scheduler)  # fmt: skip
    pipe.vae_scale_factor_spatial = 16
    pipe.video_processor = VideoProcessor(vae_scale_factor=16)
    return _run(pipe, video=pil_frames(clip), generator=torch.Generator().manual_seed(seed), **kwargs)


class _TailTimesteps:
    """A scheduler whose ``timesteps`` are the tail from ``start``, what ``WanVideoToVideoPipeline`` loops
    over, while ``step`` still locates each timestep in the whole schedule (as there)."""

    def __init__(self, scheduler, start: int) -> None:
        self.__dict__.update(_scheduler=scheduler, _start=start)

    @property
    def timesteps(self):
        return self._scheduler.timesteps[self._start :]

    def __getattr__(self, name):
        return getattr(self._scheduler, name)


def restyle_reference(model_dir, clip: np.ndarray, strength: float, seed: int, *, height: int, width: int,
                      num_inference_steps: int, image: Image.Image | None = None, **kwargs) -> np.ndarray:  # fmt: skip
    """The channel-concat restyle: ``WanImageToVideoPipeline`` (image = the clip's first frame) started
    from the clip encoded and noised as ``WanVideoToVideoPipeline`` does, over the same truncated
    timesteps."""
    pipe = WanImageToVideoPipeline.from_pretrained(model_dir, dtype=torch.float32)
    v2v = WanVideoToVideoPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder,
                                  transformer=pipe.transformer, vae=pipe.vae, scheduler=pipe.scheduler)  # fmt: skip
    pipe.scheduler.set_timesteps(num_inference_steps)
    timesteps, run = v2v.get_timesteps(num_inference_steps, pipe.scheduler.timesteps, strength, "cpu")
    video = v2v.video_processor.preprocess_video(pil_frames(clip), height=height, width=width).float()
    with torch.no_grad():
        latents = v2v.prepare_latents(video, 1, 16, height, width, torch.float32, "cpu",
                                      torch.Generator().manual_seed(seed), None, timesteps[:1])  # fmt: skip
    pipe.__dict__["scheduler"] = _TailTimesteps(pipe.scheduler, num_inference_steps - run)
    image = image if image is not None else Image.fromarray(clip[0])
    return _run(pipe, image=image, latents=latents, height=height, width=width, num_frames=len(clip),
                num_inference_steps=num_inference_steps, **kwargs)  # fmt: skip


def _normalize(vae, z: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    return (z - mean) * (1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1))


def _to_video_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 (F, H, W, 3) -> (1, 3, F, H, W) in [-1, 1], as the video processor gives."""
    return torch.from_numpy(frames).float().div(255).mul(2).sub(1).permute(3, 0, 1, 2)[None]


class PrefixTI2V(WanImageToVideoPipeline):
    """TI2V-5B conditioned on k clean latent frames: the encoded prefix padded with zeros to every latent
    frame and ``first_frame_mask[:, :, :k] = 0`` (workflow.md §2.2; the loop is mask-generic)."""

    prefix: np.ndarray  # uint8 (c, H, W, 3), c = 4(k-1)+1

    def prepare_latents(self, image, batch_size, num_channels_latents, height, width, num_frames, dtype, device,
                        generator=None, latents=None, last_image=None):  # fmt: skip
        latents, _, mask = super().prepare_latents(
            image, batch_size, num_channels_latents, height, width, num_frames, dtype, device, generator, latents,
            last_image,
        )  # fmt: skip
        encoded = retrieve_latents(self.vae.encode(_to_video_tensor(self.prefix)), sample_mode="argmax")
        cond = _normalize(self.vae, encoded)
        k = cond.shape[2]
        condition = torch.cat([cond, cond.new_zeros(*cond.shape[:2], latents.shape[2] - k, *cond.shape[3:])], dim=2)
        mask = torch.ones_like(mask)
        mask[:, :, :k] = 0
        return latents, condition, mask


class PrefixI2V(WanImageToVideoPipeline):
    """A channel-concat model conditioned on a c-frame pixel-mask prefix, built by diffusers'
    ``WanAnimatePipeline.prepare_prev_segment_cond_latents`` (prefix, zero frames, 4:1-folded mask)."""

    prefix: np.ndarray  # uint8 (c, H, W, 3)
    get_i2v_mask = WanAnimatePipeline.get_i2v_mask

    def prepare_latents(self, image, batch_size, num_channels_latents, height, width, num_frames, dtype, device,
                        generator=None, latents=None, last_image=None):  # fmt: skip
        latents, _ = super().prepare_latents(image, batch_size, num_channels_latents, height, width, num_frames,
                                             dtype, device, generator, latents, last_image)  # fmt: skip
        condition = WanAnimatePipeline.prepare_prev_segment_cond_latents(
            self, _to_video_tensor(self.prefix), segment_frame_length=num_frames, start_frame=1, height=height,
            width=width, prev_segment_cond_frames=len(self.prefix), sample_mode="argmax", dtype=torch.float32,
            device=device,
        )  # fmt: skip
        return latents, condition


class PainterI2V(WanImageToVideoPipeline):
    """``WanImageToVideoPipeline`` with PainterI2V's motion amplitude applied to its condition latents in
    raw space: ``y[1:] = clamp(base + (y[1:] - base - m) * amp + m, -6, 6)`` with ``base = y[0]`` and ``m``
    the per-frame mean over (C, H, W) of ``y[1:] - base`` (princepainter/ComfyUI-PainterI2V ``nodes.py``)."""

    amplitude: float = 1.0

    def prepare_latents(self, *args, **kwargs):
        latents, condition = super().prepare_latents(*args, **kwargs)
        mask, y = condition[:, :4], condition[:, 4:]
        mean = torch.tensor(self.vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(self.vae.config.latents_std).view(1, -1, 1, 1, 1)
        raw = y * std + mean
        base = raw[:, :, :1]
        diff = raw[:, :, 1:] - base
        m = diff.mean(dim=(1, 3, 4), keepdim=True)
        raw = torch.cat([base, torch.clamp(base + (diff - m) * self.amplitude + m, -6.0, 6.0)], dim=2)
        return latents, torch.cat([mask, _normalize(self.vae, raw)], dim=1)


def run_reference(
    pipe_cls, model_dir, *, attributes: dict | None = None, capture: list | None = None, **kwargs
) -> np.ndarray:
    """Load ``pipe_cls`` from ``model_dir``, set ``attributes`` on it, run it; with ``capture``, append each
    step's ``x0 = sample - sigma * model_output`` (numpy, diffusers layout) to it."""
    pipe = pipe_cls.from_pretrained(model_dir, dtype=torch.float32)
    for name, value in (attributes or {}).items():
        setattr(pipe, name, value)
    if capture is not None:
        capture_x0(pipe.scheduler, capture)
    return _run(pipe, **kwargs)


def capture_x0(scheduler, into: list) -> None:
    """Wrap ``scheduler.step`` to record the data prediction of every step: the guided model output and
    the sample it is applied to, at the sigma of the step index the scheduler used."""
    step = scheduler.step

    def recording(model_output, timestep, sample, *args, **kwargs):
        out = step(model_output, timestep, sample, *args, **kwargs)
        sigma = scheduler.sigmas[scheduler.step_index - 1]
        into.append((sample - sigma * model_output).numpy())
        return out

    scheduler.step = recording


def moving_clip(frames: int, height: int = 64, width: int = 96, seed: int = 0) -> np.ndarray:
    """A synthetic uint8 clip (frames, height, width, 3): a colour gradient drifting right, with grain."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    out = []
    for i in range(frames):
        shifted = x + 3 * i
        rgb = np.stack([shifted * 255 / width % 255, y * 255 / height, (shifted + y) % 64 * 4], axis=-1)
        out.append(np.clip(rgb + rng.normal(0, 8, rgb.shape), 0, 255))
    return np.stack(out).astype(np.uint8)
