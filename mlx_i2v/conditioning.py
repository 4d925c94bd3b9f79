"""How a variant puts the photo (or a clip's frames) into the latent video: small strategies the pipeline
calls each step.

All latents are channels-last ``(B, T, h, w, C)`` and normalised with the VAE's per-channel statistics.
Frames arrive as float32 ``(H, W, 3)`` arrays in [-1, 1] at the video size, gathered in :class:`Keyframes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import mlx.core as mx
import numpy as np

from .motion import amplify_motion


@dataclass(frozen=True)
class Keyframes:
    """The frames a clip is held to, float32 in [-1, 1] at the video size.

    ``head`` (c, H, W, 3) opens the clip: the photo (c = 1), or the last c frames of a clip being
    extended (c = 4k+1, so that they fill whole latent frames). ``tail`` (H, W, 3), if given, closes it
    (first-last-frame models; a loop's tail is its head).
    """

    head: np.ndarray
    tail: np.ndarray | None = None


@dataclass
class ConditionState:
    """What ``prepare`` computed once per generation. ``latent``: (1, T|k, h, w, C_cond)."""

    latent: mx.array
    # Tokens of the given (clean) first latent frames (TI2V), which are given timestep 0.
    frozen_tokens: int = 0


class Conditioning(Protocol):
    """A variant's way of conditioning on the image(s)."""

    requires_image: bool
    # Whether ``motion`` (see :func:`mlx_i2v.motion.amplify_motion`) means something for this strategy.
    supports_motion: bool
    # Clip frames an extension conditions on by default (see ``WanPipeline.extend``).
    extend_context: int

    def prepare(
        self, vae, keyframes: Keyframes, num_frames: int, latent_shape: tuple[int, ...], motion: float = 1.0
    ) -> ConditionState:
        """Encode the keyframes once. ``latent_shape`` is the noise shape (1, T, h, w, C)."""
        ...

    def model_input(self, latents: mx.array, state: ConditionState | None, t: float) -> tuple[mx.array, mx.array]:
        """The transformer input for this step and its timestep: (B,) or per token (B, L)."""
        ...

    def finalize(self, latents: mx.array, state: ConditionState | None) -> mx.array:
        """The latents to decode after the last step."""
        ...


def encode_raw(vae, video: np.ndarray) -> mx.array:
    """(T, H, W, 3) in [-1, 1] -> the posterior mode (1, T', h, w, z), not normalised."""
    mean, _ = vae.encode(mx.array(video)[None])  # the VAE casts to its own dtype
    return mean.astype(mx.float32)


def encode_mode(vae, video: np.ndarray) -> mx.array:
    """(T, H, W, 3) in [-1, 1] -> normalised posterior mode (1, T', h, w, z), as diffusers'
    ``retrieve_latents(..., "argmax")`` followed by ``(z - mean) / std``."""
    return vae.normalize_latents(encode_raw(vae, video))


@dataclass(frozen=True)
class FirstFrameLatent:
    """Wan2.2-TI2V-5B: the encoded photo *is* the first latent frame. Every step it overwrites frame 0
    and that frame's tokens get timestep 0, so the model treats it as clean (diffusers ``expand_timesteps``).
    Without an image the same model generates from text alone.

    A head of c = 4(k-1)+1 frames (extending a clip) fills the first k latent frames the same way: all
    k are clean and held at timestep 0 (ComfyUI's ``Wan22ImageToVideoLatent`` with several start frames).
    """

    patch_hw: tuple[int, int] = (2, 2)
    requires_image: bool = False
    supports_motion: bool = False  # the photo enters clean; there are no condition latents to extrapolate
    extend_context: int = 5  # two latent frames: the motion of the clip's last four frames carries over

    def prepare(self, vae, keyframes, num_frames, latent_shape, motion=1.0):
        if keyframes.tail is not None:
            raise ValueError("FirstFrameLatent has no last-frame input")
        cond = encode_mode(vae, keyframes.head)  # (1, k, h, w, z)
        _, _, h, w, _ = latent_shape
        per_frame = (h // self.patch_hw[0]) * (w // self.patch_hw[1])
        return ConditionState(latent=cond, frozen_tokens=cond.shape[1] * per_frame)

    def model_input(self, latents, state, t):
        batch = latents.shape[0]
        if state is None:
            return latents, mx.full((batch,), t, dtype=mx.float32)
        x = self._replace_first_frames(latents, state)
        _, frames, h, w, _ = latents.shape
        tokens = frames * (h // self.patch_hw[0]) * (w // self.patch_hw[1])
        per_token = mx.concatenate(
            [mx.zeros((state.frozen_tokens,), mx.float32), mx.full((tokens - state.frozen_tokens,), t, mx.float32)]
        )
        return x, mx.broadcast_to(per_token, (batch, tokens))

    def finalize(self, latents, state):
        return latents if state is None else self._replace_first_frames(latents, state)

    @staticmethod
    def _replace_first_frames(latents: mx.array, state: ConditionState) -> mx.array:
        # Equal to diffusers' (1 - mask) * condition + mask * latents for a 0/1 mask, without the multiply.
        cond = mx.broadcast_to(state.latent, (latents.shape[0], *state.latent.shape[1:])).astype(latents.dtype)
        return mx.concatenate([cond, latents[:, cond.shape[1] :]], axis=1)


@dataclass(frozen=True)
class ChannelConcat:
    """Wan2.1 I2V/FLF2V and Wan2.2-I2V-A14B: the transformer sees 36 channels, the noisy latent (16) next
    to a 4-channel frame mask and the encoded clip [photo, zero frames..., (last photo)] (16).

    The mask marks which video frames are given. The first frame is repeated 4 times so that 4k+1 video
    frames fold into k+1 latent frames of 4 mask channels each (diffusers ``prepare_latents``). A head of
    several frames (extending a clip) is given the same way, a pixel-mask prefix (diffusers
    ``WanAnimatePipeline.prepare_prev_segment_cond_latents``, ComfyUI ``WanImageToVideo``).
    """

    temporal_stride: int = 4
    requires_image: bool = True
    supports_motion: bool = True
    extend_context: int = 1  # the last frame: the mask these models were trained with

    def prepare(self, vae, keyframes, num_frames, latent_shape, motion=1.0):
        _, latent_frames, h, w, _ = latent_shape
        head = keyframes.head
        clip = np.zeros((num_frames, *head.shape[1:]), np.float32)
        given = np.zeros(num_frames, np.float32)
        clip[: len(head)], given[: len(head)] = head, 1.0
        if keyframes.tail is not None:  # first-last-frame: the last photo closes the clip
            clip[-1], given[-1] = keyframes.tail, 1.0
        folded = np.concatenate([np.repeat(given[:1], self.temporal_stride), given[1:]])
        mask = folded.reshape(latent_frames, self.temporal_stride)  # (T, 4): channel c of latent frame t
        latent = encode_raw(vae, clip)  # (1, T, h, w, z)
        if motion != 1.0:
            latent = amplify_motion(latent, motion, free=mask.max(axis=1) == 0)
        latent = vae.normalize_latents(latent)
        mask = mx.broadcast_to(mx.array(mask)[None, :, None, None, :], (1, latent_frames, h, w, self.temporal_stride))
        return ConditionState(latent=mx.concatenate([mask, latent], axis=-1))

    def model_input(self, latents, state, t):
        cond = mx.broadcast_to(state.latent, (latents.shape[0], *state.latent.shape[1:])).astype(latents.dtype)
        return mx.concatenate([latents, cond], axis=-1), mx.full((latents.shape[0],), t, dtype=mx.float32)

    def finalize(self, latents, state):
        return latents
