"""Motion amplitude ("motion strength"), experimental: the community PainterI2V method.

No Wan model was trained with a motion input. PainterI2V (``princepainter/ComfyUI-PainterI2V``,
``nodes.py``) changes what the channel-concat models (Wan2.1-I2V/FLF2V, Wan2.2-I2V-A14B) see of the frames
they must invent: the encoded condition clip [photo, grey frames...] is extrapolated away from the photo's
latent frame, per latent frame, in the VAE's *raw* latent space (ComfyUI encodes without normalising),
and clamped to +-6::

    base = y[0];  diff = y[t] - base;  m = mean(diff over C, H, W)
    y[t] = clip(base + (diff - m) * amplitude + m, -6, 6)

Values above 1 push the invented frames' condition further from the photo (PainterI2V's range is 1-2,
default 1.15), which the community reports as livelier motion; below 1 the same formula pulls it towards
the photo (damped motion; PainterI2V itself only amplifies). 1 leaves the condition untouched.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .errors import InvalidInputError

CLAMP = 6.0  # PainterI2V's bound, in raw latent units
MOTION_RANGE = (0.25, 2.0)  # what the API accepts; PainterI2V's own slider is 1-2


def amplify_motion(raw: mx.array, amplitude: float, free: np.ndarray) -> mx.array:
    """Extrapolate the condition latents of the frames to invent away from latent frame 0.

    Args:
        raw: the encoded condition clip, raw (not normalised) latents (1, T, h, w, C).
        amplitude: the factor; 1 returns ``raw`` unchanged.
        free: (T,) bool, the latent frames no given frame falls in (for a photo: frames 1..T-1). Given
            frames (a first-last-frame model's last photo, an extension's context) are left as they are.

    Returns:
        (1, T, h, w, C) raw latents.
    """
    if amplitude == 1.0 or not free.any():
        return raw
    base = raw[:, :1]
    diff = raw - base
    mean = mx.mean(diff, axis=(2, 3, 4), keepdims=True)  # per latent frame, over h, w and C
    moved = mx.clip(base + (diff - mean) * amplitude + mean, -CLAMP, CLAMP)
    keep = mx.array(free)[None, :, None, None, None]
    return mx.where(keep, moved, raw)


def check_motion(motion: float, variant: str, supported: bool) -> float:
    """A motion amplitude in :data:`MOTION_RANGE`, and anything but 1 only where ``supported``."""
    low, high = MOTION_RANGE
    if isinstance(motion, bool) or not isinstance(motion, (int, float, np.integer, np.floating)):
        raise InvalidInputError(f"motion must be a number in [{low:g}, {high:g}], got {motion!r}")
    motion = float(motion)
    if not low <= motion <= high:
        raise InvalidInputError(f"motion must be in [{low:g}, {high:g}] (1 is off), got {motion:g}")
    if motion != 1.0 and not supported:
        raise InvalidInputError(
            f"motion is not supported on {variant}: its photo enters as a clean latent frame, with no "
            "condition latents to extrapolate (use Wan2.1-I2V/FLF2V or Wan2.2-I2V-A14B)"
        )
    return motion
