"""How a variant puts the photo into the latent video: small strategies the pipeline calls each step.

All latents are channels-last ``(B, T, h, w, C)`` and normalised with the VAE's per-channel statistics.
Images arrive as float32 ``(H, W, 3)`` arrays in [-1, 1] at the video size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import mlx.core as mx
import numpy as np


@dataclass
class ConditionState:
    """What ``prepare`` computed once per generation. ``latent``: (1, T|1, h, w, C_cond)."""

    latent: mx.array
    # Tokens of the first latent frame (TI2V), which are given timestep 0.
    frozen_tokens: int = 0


class Conditioning(Protocol):
    """A variant's way of conditioning on the image(s)."""

    requires_image: bool

    def prepare(self, vae, images: Sequence[np.ndarray], num_frames: int, latent_shape: tuple[int, ...]) -> ConditionState:
        """Encode the image(s) once. ``latent_shape`` is the noise shape (1, T, h, w, C)."""
        ...

    def model_input(self, latents: mx.array, state: ConditionState | None, t: float) -> tuple[mx.array, mx.array]:
        """The transformer input for this step and its timestep: (B,) or per token (B, L)."""
        ...

    def finalize(self, latents: mx.array, state: ConditionState | None) -> mx.array:
        """The latents to decode after the last step."""
        ...


def _encode_mode(vae, video: np.ndarray) -> mx.array:
    """(T, H, W, 3) in [-1, 1] -> normalised posterior mode (1, T', h, w, z)."""
    mean, _ = vae.encode(mx.array(video)[None])  # the VAE casts to its own dtype
    return vae.normalize_latents(mean.astype(mx.float32))


@dataclass(frozen=True)
class FirstFrameLatent:
    """Wan2.2-TI2V-5B: the encoded photo *is* the first latent frame. Every step it overwrites frame 0
    and that frame's tokens get timestep 0, so the model treats it as clean (diffusers ``expand_timesteps``).
    Without an image the same model generates from text alone."""

    patch_hw: tuple[int, int] = (2, 2)
    requires_image: bool = False

    def prepare(self, vae, images, num_frames, latent_shape):
        cond = _encode_mode(vae, images[0][None])  # (1, 1, h, w, z)
        _, _, h, w, _ = latent_shape
        return ConditionState(latent=cond, frozen_tokens=(h // self.patch_hw[0]) * (w // self.patch_hw[1]))

    def model_input(self, latents, state, t):
        batch = latents.shape[0]
        if state is None:
            return latents, mx.full((batch,), t, dtype=mx.float32)
        x = self._replace_first_frame(latents, state)
        _, frames, h, w, _ = latents.shape
        tokens = frames * (h // self.patch_hw[0]) * (w // self.patch_hw[1])
        per_token = mx.concatenate(
            [mx.zeros((state.frozen_tokens,), mx.float32), mx.full((tokens - state.frozen_tokens,), t, mx.float32)]
        )
        return x, mx.broadcast_to(per_token, (batch, tokens))

    def finalize(self, latents, state):
        return latents if state is None else self._replace_first_frame(latents, state)

    @staticmethod
    def _replace_first_frame(latents: mx.array, state: ConditionState) -> mx.array:
        # Equal to diffusers' (1 - mask) * condition + mask * latents for a 0/1 mask, without the multiply.
        cond = mx.broadcast_to(state.latent, (latents.shape[0], *state.latent.shape[1:])).astype(latents.dtype)
        return mx.concatenate([cond, latents[:, 1:]], axis=1)


@dataclass(frozen=True)
class ChannelConcat:
    """Wan2.1 I2V/FLF2V and Wan2.2-I2V-A14B: the transformer sees 36 channels, the noisy latent (16) next
    to a 4-channel frame mask and the encoded clip [photo, zero frames..., (last photo)] (16).

    The mask marks which video frames are given. The first frame is repeated 4 times so that 4k+1 video
    frames fold into k+1 latent frames of 4 mask channels each (diffusers ``prepare_latents``).
    """

    temporal_stride: int = 4
    requires_image: bool = True

    def prepare(self, vae, images, num_frames, latent_shape):
        _, latent_frames, h, w, _ = latent_shape
        height, width = images[0].shape[:2]
        clip = np.zeros((num_frames, height, width, 3), np.float32)
        clip[0] = images[0]
        given = np.zeros(num_frames, np.float32)
        given[0] = 1.0
        if len(images) > 1:  # first-last-frame: the last photo closes the clip
            clip[-1] = images[1]
            given[-1] = 1.0
        latent = _encode_mode(vae, clip)  # (1, T, h, w, z)
        folded = np.concatenate([np.repeat(given[:1], self.temporal_stride), given[1:]])
        mask = folded.reshape(latent_frames, self.temporal_stride)  # (T, 4): channel c of latent frame t
        mask = mx.broadcast_to(mx.array(mask)[None, :, None, None, :], (1, latent_frames, h, w, self.temporal_stride))
        return ConditionState(latent=mx.concatenate([mask, latent], axis=-1))

    def model_input(self, latents, state, t):
        cond = mx.broadcast_to(state.latent, (latents.shape[0], *state.latent.shape[1:])).astype(latents.dtype)
        return mx.concatenate([latents, cond], axis=-1), mx.full((latents.shape[0],), t, dtype=mx.float32)

    def finalize(self, latents, state):
        return latents
