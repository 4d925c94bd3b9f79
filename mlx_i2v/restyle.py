"""Restyle (video-to-video, SDEdit): the clip is encoded, noised to the first kept timestep and denoised
over the tail of the schedule, with diffusers' ``WanVideoToVideoPipeline`` semantics.

``strength`` is a fraction of the *steps*, not a noise level (diffusers ``get_timesteps``, copied from
AnimateDiff): the last ``int(steps * strength)`` steps run, starting at the noise level of the first of
them. With Wan's large flow shifts that level is high: strength 0.5 with shift 5 starts at sigma 0.83.
The clip's latents are noised to that step's sigma in the generation's own sampler (UniPC, Euler or DMD)
by the flow-matching forward process, :func:`mlx_i2v.schedulers.add_noise`.
"""

from __future__ import annotations

import logging

import numpy as np

from .clips import Clip
from .errors import InvalidInputError

log = logging.getLogger(__name__)

DEFAULT_STRENGTH = 0.6
TEMPORAL_STRIDE = 4


def check_strength(strength: float) -> float:
    """A strength in (0, 1], or a one-line error."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating, np.integer)):
        raise InvalidInputError(f"strength must be a number in (0, 1], got {strength!r}")
    strength = float(strength)
    if not 0.0 < strength <= 1.0:
        raise InvalidInputError(f"strength must be in (0, 1], got {strength:g}")
    return strength


def restyle_start(num_inference_steps: int, strength: float) -> int:
    """The schedule entry a restyle starts at: ``steps - int(steps * strength)``.

    Raises :class:`InvalidInputError` when no step would run (diffusers crashes there instead).
    """
    run = min(int(num_inference_steps * strength), num_inference_steps)
    if run == 0:
        need = 1.0 / num_inference_steps
        raise InvalidInputError(
            f"strength {strength:g} of {num_inference_steps} steps runs no step; use a strength of at least "
            f"{need:.3g} or more steps"
        )
    return num_inference_steps - run


def clip_frames(clip: Clip, num_frames: int | None, stride: int = TEMPORAL_STRIDE) -> int:
    """The frames of ``clip`` a restyle uses: the first ``stride``k+1 (diffusers drops the rest,
    ``(F-1)//4*4+1`` for Wan; 8k+1 for LTX-Video), or the first ``num_frames`` (already rounded)."""
    usable = (clip.num_frames - 1) // stride * stride + 1
    if num_frames is None:
        if usable != clip.num_frames:
            log.warning("the clip has %d frames, not %dk+1; restyling the first %d", clip.num_frames, stride, usable)
        return usable
    if num_frames > clip.num_frames:
        raise InvalidInputError(f"num_frames {num_frames} is more than the clip has ({clip.num_frames})")
    return num_frames
