"""Wan's own conditioning strategy: the encoded clip concatenated to the latents' channels (the shared
ones, :class:`~mlx_i2v.conditioning.FirstFrameLatent` included, are in :mod:`mlx_i2v.conditioning`)."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ...conditioning import ConditionState, PlainSteps, encode_raw
from ...motion import amplify_motion


@dataclass(frozen=True)
class ChannelConcat(PlainSteps):
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
    takes_strength: bool = False

    def prepare(self, vae, keyframes, num_frames, latent_shape, motion=1.0, seed=0):
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
