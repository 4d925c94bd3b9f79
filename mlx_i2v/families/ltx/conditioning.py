"""LTX-Video 0.9.5+'s conditioning, as diffusers' ``LTXConditionPipeline`` conditions: a list of frame
conditions (images or clips, frame index, strength) lerped into the first latent frames or appended as extra
tokens, per-token timesteps, and noise on the held tokens each step (:class:`FrameConditions`)."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ...conditioning import ConditionState, Keyframe, channels_last_normal, condition_key, encode_sample

@dataclass
class HeldFrames(ConditionState):
    """:class:`FrameConditions`' state. ``latent`` (1, E, h, w, C): the keyframes' extra latent frames, already
    mixed with noise by their strength (E may be 0); ``blends``: (first latent frame, latents (1, n, h, w, C),
    strength) that ``start`` lerps into the clip's latents, in order; ``mask`` (1, T + E, h, w, 1): each latent
    position's conditioning strength (0 where free), the clip's ``clip_frames`` then the extra frames."""

    mask: mx.array | None = None
    blends: tuple[tuple[int, mx.array, float], ...] = ()
    clip_frames: int = 0
    noise_scale: float = 0.0
    seed: int = 0
    initial: mx.array | None = None  # the starting latents, set by ``start``


# Latent frames of a multi-frame condition at frame_index > 0 that become extra tokens (diffusers'
# ``num_prefix_latent_frames``); the rest are blended into the clip's latents.
PREFIX_LATENT_FRAMES = 2


def latent_frame_count(frames: int, stride: int) -> int:
    """Latent frames of ``frames`` = stride * k + 1 video frames (the causal VAE's first is one frame)."""
    return (frames - 1) // stride + 1


def extra_latent_frames(condition: Keyframe, stride: int) -> int:
    """Latent frames a condition adds after the clip's as extra tokens: none at frame 0 (blended into the
    clip's first latent frames), an image's one, a clip's first ``PREFIX_LATENT_FRAMES`` elsewhere."""
    if condition.index == 0:
        return 0
    return min(latent_frame_count(len(condition.frames), stride), PREFIX_LATENT_FRAMES)


def keyframe_noise(seed: int, index: int, shape: tuple[int, ...]) -> mx.array:
    """The noise the ``index``-th condition's extra latents (1, n, h, w, C) are mixed with by its strength,
    drawn from the seed in diffusers' (1, C, n, h, w) order."""
    return channels_last_normal(shape, condition_key(seed, 1, index))


def conditioning_noise(seed: int, t: float, shape: tuple[int, ...]) -> mx.array:
    """The noise a step at timestep ``t`` adds to fully held latents: standard normal of ``shape`` (1, T, h, w,
    C), drawn from the seed and the step's timestep in the order of diffusers' packed tokens (B, T*h*w, C),
    which is this channels-last order."""
    key = mx.random.key((seed * 1_000_003 + round(t * 1000)) % 2**63)
    return mx.random.normal(shape, key=key)


def _lerp(start: mx.array, end: mx.array, weight: float) -> mx.array:
    return start + weight * (end - start)  # torch.lerp


@dataclass(frozen=True)
class FrameConditions:
    """LTX-Video 0.9.5+ as diffusers' ``LTXConditionPipeline`` conditions on images and clips at frame indices
    (``prepare_latents``; :meth:`Keyframes.conditions` lists them, each a :class:`Keyframe`).

    * a condition at frame 0 (the photo, an extension's context clip) is encoded into n latent frames that
      are lerped into the clip's first n at start (``lerp(noise, latent, strength)``); their mask is the
      strength.
    * a condition at frame index i > 0 (a keyframe, a last photo) becomes extra latent frames after the
      clip's (diffusers' extra condition tokens, placed first in its sequence), positioned at pixel frame i
      (:class:`~mlx_i2v.families.ltx.variants.LTXForward`): an image's latent, or a clip's first two latent frames, mixed
      with noise by the strength; a clip's later latent frames are lerped into the clip's latents from
      latent frame ``i // stride + 2`` on. Extra frames are dropped at the end.
    * each step: positions held at full strength get ``initial + noise_scale * noise * (t / 1000)**2``
      (``image_cond_noise_scale``, fresh noise each step); the timestep per token is
      ``min(t, (1 - mask) * 1000)``.
    * the step: the per-token Euler step of ``-velocity`` (the scheduler's per-token branch steps by
      ``sigma_token - sigma_next``, the opposite sign), kept only for tokens with ``t / 1000 - 1e-6 <
      1 - mask``: the others stay frozen.

    Every condition's latent is a sample of the VAE posterior, as diffusers encodes each condition
    (:func:`encode_sample`, draw ``index`` of the condition's place in the list).

    Without an image the same model generates from text alone (one timestep per sample).
    """

    requires_image: bool = False
    supports_motion: bool = False
    # Two latent frames (diffusers requires 8k+1 frames): the motion of the clip's last eight frames carries over.
    extend_context: int = 9
    takes_strength: bool = True

    def prepare(self, vae, keyframes, num_frames, latent_shape, motion=1.0, seed=0):
        _, frames, h, w, _ = latent_shape
        stride = vae.config.temporal_ratio
        held = np.zeros(frames, np.float32)
        blends, extras, extra_held = [], [], []
        for i, condition in enumerate(keyframes.conditions(num_frames)):
            latent = encode_sample(vae, condition.frames, seed, index=i)  # (1, n, h, w, C)
            first, prefix = 0, extra_latent_frames(condition, stride)
            if condition.index > 0:
                first = condition.index // stride + PREFIX_LATENT_FRAMES
            if latent.shape[1] > prefix:
                blends.append((first, latent[:, prefix:], condition.strength))
                held[first : first + latent.shape[1] - prefix] = condition.strength
            if prefix:
                noise = keyframe_noise(seed, i, latent[:, :prefix].shape)
                extras.append(_lerp(noise, latent[:, :prefix], condition.strength))
                extra_held += [condition.strength] * prefix
        held = np.concatenate([held, np.asarray(extra_held, np.float32)])
        mask = mx.broadcast_to(mx.array(held)[None, :, None, None, None], (1, len(held), h, w, 1))
        extra = mx.concatenate(extras, axis=1) if extras else mx.zeros((1, 0, h, w, latent_shape[-1]))
        mx.eval(extra, mask, *(latent for _, latent, _ in blends))  # now, while the VAE is loaded
        return HeldFrames(latent=extra, mask=mask, blends=tuple(blends), clip_frames=frames,
                          noise_scale=keyframes.noise_scale, seed=seed)  # fmt: skip

    def start(self, latents, state):
        if state is None:
            return latents
        for first, latent, strength in state.blends:
            end = first + latent.shape[1]
            blended = _lerp(latents[:, first:end], latent.astype(latents.dtype), strength)
            latents = mx.concatenate([latents[:, :first], blended, latents[:, end:]], axis=1)
        state.initial = mx.concatenate([latents, state.latent.astype(latents.dtype)], axis=1)
        return state.initial

    def model_input(self, latents, state, t):
        batch = latents.shape[0]
        if state is None:
            return latents, mx.full((batch,), t, dtype=mx.float32)
        x = latents
        if state.noise_scale > 0:
            noise = conditioning_noise(state.seed, t, latents.shape)
            noised = state.initial + state.noise_scale * noise * (t / 1000.0) ** 2
            x = mx.where(state.mask > 1.0 - 1e-6, noised, latents)
        timestep = mx.minimum(mx.array(t, mx.float32), (1 - state.mask[..., 0]) * 1000.0)
        return x, timestep.reshape(batch, -1)

    def step(self, sampler, velocity, t, latents, x, timestep, state):
        if state is None:  # still the per-token step, as diffusers runs it without conditions
            return sampler.step(-velocity, t, latents, per_token_timesteps=mx.full(latents.shape[:-1], float(t)))
        per_token = timestep[:1].reshape(x.shape[:-1])
        stepped = sampler.step(-velocity, t, x, per_token_timesteps=per_token)
        denoise = (1.0 - state.mask) > float(t) / 1000.0 - 1e-6
        return mx.where(denoise, stepped, x)

    def finalize(self, latents, state):
        return latents if state is None else latents[:, : state.clip_frames]

    def preview(self, x0, state):
        # Positions held at full strength keep their given latent (the loop never steps them; the model saw
        # them at timestep 0, so x_t - sigma * v would distort them). Others are x0 as predicted.
        if state is None:
            return x0
        shown = mx.where(state.mask > 1.0 - 1e-6, state.initial.astype(x0.dtype), x0)
        return shown[:, : state.clip_frames]
