"""How a variant puts the photo (or a clip's frames) into the latent video: small strategies the pipeline
calls each step. The strategies more than one family uses are here; one family's own live with it
(Wan's channel concatenation in :mod:`mlx_i2v.families.wan.conditioning`).

All latents are channels-last ``(B, T, h, w, C)`` and normalised with the VAE's per-channel statistics.
Frames arrive as float32 ``(H, W, 3)`` arrays in [-1, 1] at the video size, gathered in :class:`Keyframes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import mlx.core as mx
import numpy as np


@dataclass(frozen=True)
class Keyframe:
    """Frames the clip is held to from pixel frame ``index`` on (LTX-Video 0.9.5+, :class:`FrameConditions`):
    ``frames`` (c, H, W, 3) float32 in [-1, 1], one image (c = 1) or c = 8k+1 frames of a clip; ``strength``
    in (0, 1]: diffusers' ``LTXVideoCondition(image|video, frame_index, strength)``."""

    frames: np.ndarray
    index: int
    strength: float = 1.0


@dataclass(frozen=True)
class Keyframes:
    """The frames a clip is held to, float32 in [-1, 1] at the video size.

    ``head`` (c, H, W, 3) opens the clip: the photo (c = 1), or the last c frames of a clip being
    extended (c = 4k+1 on Wan, 8k+1 on LTX-Video, so that they fill whole latent frames). ``tail`` (H, W, 3),
    if given, closes it (first-last-frame models; a loop's tail is its head). ``others``: keyframes at
    other frame indices (LTX-Video 0.9.5+).
    """

    head: np.ndarray
    tail: np.ndarray | None = None
    # How the frames are held where the conditioning has the knobs (LTX-Video 0.9.5+, :class:`FrameConditions`):
    # the head's and tail's strength in (0, 1] and the scale of the noise added to fully held latents each step.
    strength: float = 1.0
    noise_scale: float = 0.0
    others: tuple[Keyframe, ...] = ()

    def conditions(self, num_frames: int) -> list[Keyframe]:
        """Every frame condition of a ``num_frames`` clip in diffusers' ``conditions`` order: the head at
        frame 0, the other keyframes as given, the tail at the last frame."""
        tail = [] if self.tail is None else [Keyframe(self.tail[None], num_frames - 1, self.strength)]
        return [Keyframe(self.head, 0, self.strength), *self.others, *tail]


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
    # Clip frames an extension conditions on by default (see ``Pipeline.extend``).
    extend_context: int
    # Whether ``strength`` (without a clip to restyle) sets how strongly the photo is held.
    takes_strength: bool

    def prepare(
        self, vae, keyframes: Keyframes, num_frames: int, latent_shape: tuple[int, ...], motion: float = 1.0,
        seed: int = 0,
    ) -> ConditionState:
        """Encode the keyframes once. ``latent_shape`` is the noise shape (1, T, h, w, C); ``seed`` seeds
        any draws the strategy makes during the loop."""
        ...

    def start(self, latents: mx.array, state: ConditionState | None) -> mx.array:
        """The latents the loop starts from, given the initial ones (noise, or a restyle's noised clip)."""
        ...

    def model_input(self, latents: mx.array, state: ConditionState | None, t: float) -> tuple[mx.array, mx.array]:
        """The transformer input for this step and its timestep: (B,) or per token (B, L)."""
        ...

    def step(self, sampler, velocity: mx.array, t: float, latents: mx.array, x: mx.array, timestep: mx.array,
             state: ConditionState | None) -> mx.array:  # fmt: skip
        """The latents after this step, from the guided ``velocity`` (1, T, h, w, C), the latents, and the
        step's ``model_input`` (``x``, ``timestep``)."""
        ...

    def finalize(self, latents: mx.array, state: ConditionState | None) -> mx.array:
        """The latents to decode after the last step."""
        ...


class PlainSteps:
    """The loop as most strategies run it: from the initial latents, one sampler step on the latents."""

    def start(self, latents, state):
        return latents

    def step(self, sampler, velocity, t, latents, x, timestep, state):
        return sampler.step(velocity, t, latents)


def encode_raw(vae, video: np.ndarray) -> mx.array:
    """(T, H, W, 3) in [-1, 1] -> the posterior mode (1, T', h, w, z), not normalised."""
    mean, _ = vae.encode(mx.array(video)[None])  # the VAE casts to its own dtype
    return mean.astype(mx.float32)


def encode_mode(vae, video: np.ndarray) -> mx.array:
    """(T, H, W, 3) in [-1, 1] -> normalised posterior mode (1, T', h, w, z), as diffusers'
    ``retrieve_latents(..., "argmax")`` followed by ``(z - mean) / std``."""
    return vae.normalize_latents(encode_raw(vae, video))


def condition_key(seed: int, draw: int, index: int) -> mx.array:
    """The random key of the ``index``-th frame condition's ``draw`` (0: its VAE posterior sample, 1: the
    noise a keyframe's latent is mixed with), from the generation's seed: each its own, apart from the
    decode's two (:func:`~mlx_i2v.families.ltx.variants.decode_noises`)."""
    family = mx.random.split(mx.random.key(seed), 5)[3 + draw]
    return mx.random.split(family, index + 1)[index]


def posterior_noise(seed: int, index: int, shape: tuple[int, ...]) -> mx.array:
    """The standard-normal noise that samples the posterior of the ``index``-th image (or clip) a generation
    encodes (in :meth:`Keyframes.conditions` order: 0 is the photo), for latents of ``shape`` (1, T, h, w, C),
    drawn from the seed in diffusers' (1, C, T, h, w) order."""
    b, t, h, w, c = shape
    return mx.random.normal((b, c, t, h, w), key=condition_key(seed, 0, index)).transpose(0, 2, 3, 4, 1)


def encode_sample(vae, video: np.ndarray, seed: int, index: int = 0) -> mx.array:
    """(T, H, W, 3) in [-1, 1] -> normalised posterior sample (1, T', h, w, z), as diffusers'
    ``retrieve_latents(..., generator)`` (its default ``sample_mode="sample"``) followed by ``(z - mean) / std``,
    with the noise of :func:`posterior_noise`."""
    mean, logvar = vae.encode(mx.array(video)[None])
    mean, logvar = mean.astype(mx.float32), logvar.astype(mx.float32)
    noise = posterior_noise(seed, index, mean.shape)
    return vae.normalize_latents(mean + mx.exp(0.5 * logvar) * noise)  # diffusers' latent_dist.sample()


@dataclass(frozen=True)
class FirstFrameLatent(PlainSteps):
    """Wan2.2-TI2V-5B: the encoded photo *is* the first latent frame. Every step it overwrites frame 0
    and that frame's tokens get timestep 0, so the model treats it as clean (diffusers ``expand_timesteps``).
    Without an image the same model generates from text alone. LTX-Video's ``LTXImageToVideoPipeline``
    (0.9.0/0.9.1) conditions the same way, per token (patch 1x1): ``t * (1 - mask)`` with the mask 1 on
    latent frame 0, whose scheduler step it skips (here: stepped, then overwritten, the same numbers).

    A head of c = 4(k-1)+1 frames (extending a clip) fills the first k latent frames the same way: all
    k are clean and held at timestep 0 (ComfyUI's ``Wan22ImageToVideoLatent`` with several start frames).

    The photo's latent is the VAE posterior's mode (Wan: ``sample_mode="argmax"``), or with
    ``sample_posterior`` a sample of it (LTX-Video: ``retrieve_latents``' default, see :func:`encode_sample`).
    """

    patch_hw: tuple[int, int] = (2, 2)
    sample_posterior: bool = False
    requires_image: bool = False
    supports_motion: bool = False  # the photo enters clean; there are no condition latents to extrapolate
    extend_context: int = 5  # two latent frames: the motion of the clip's last four frames carries over
    takes_strength: bool = False

    def prepare(self, vae, keyframes, num_frames, latent_shape, motion=1.0, seed=0):
        if keyframes.tail is not None:
            raise ValueError("FirstFrameLatent has no last-frame input")
        head = keyframes.head
        cond = encode_sample(vae, head, seed) if self.sample_posterior else encode_mode(vae, head)  # (1, k, h, w, z)
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
    b, f, h, w, c = shape
    return mx.random.normal((b, c, f, h, w), key=condition_key(seed, 1, index)).transpose(0, 2, 3, 4, 1)


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
