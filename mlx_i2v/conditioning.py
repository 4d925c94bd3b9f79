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
    """Frames the clip is held to from pixel frame ``index`` on (LTX-Video 0.9.5+, :class:`~mlx_i2v.families.ltx.conditioning.FrameConditions`):
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
    # How the frames are held where the conditioning has the knobs (LTX-Video 0.9.5+, :class:`~mlx_i2v.families.ltx.conditioning.FrameConditions`):
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

    def preview(self, x0: mx.array, state: ConditionState | None) -> mx.array:
        """A step's predicted clean latents as a preview shows them: the clip's frames, the given ones
        (the photo) as they will be decoded."""
        ...


class PlainSteps:
    """The loop as most strategies run it: from the initial latents, one sampler step on the latents."""

    def start(self, latents, state):
        return latents

    def preview(self, x0, state):
        return self.finalize(x0, state)

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


def channels_last_normal(shape: tuple[int, ...], key: mx.array) -> mx.array:
    """Standard-normal latents of channels-last ``shape`` (B, T, h, w, C), drawn in diffusers' (B, C, T, h, w)
    order: a key fills the same element positions as diffusers' draw of that shape."""
    b, t, h, w, c = shape
    return mx.random.normal((b, c, t, h, w), key=key).transpose(0, 2, 3, 4, 1)


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
    return channels_last_normal(shape, condition_key(seed, 0, index))


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
