"""Extend: continue a clip. The model generates a window that opens with the clip's last frames (its
*context*, held fixed as the photo is in image-to-video) and the new frames follow; the result is the
original clip, carried over unchanged, followed by the new frames, so nothing is duplicated or dropped
at the seam.

Window arithmetic: the VAE encodes frame 0 alone and then s frames per latent frame (the family's frame
stride: 4 for Wan, 8 for LTX-Video), so a context of c = s(k-1)+1 frames fills k latent frames exactly, and
the new frames come in multiples of s: ``window = c + new``, a valid sm+1 frame count.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .clips import Clip
from .colour import match_colour
from .errors import InvalidInputError

log = logging.getLogger(__name__)

TEMPORAL_STRIDE = 4
DEFAULT_COLOUR_MATCH = 1.0


def context_frames(requested: int | None, default: int, available: int, stride: int = TEMPORAL_STRIDE) -> int:
    """How many of the clip's last frames the model sees: ``requested`` (must be ``stride * k + 1``), else
    the variant's ``default``, reduced to what a shorter clip has (with a notice)."""
    if requested is not None:
        if not _positive_int(requested) or (requested - 1) % stride:
            raise InvalidInputError(
                f"context must be 1, {stride + 1}, {2 * stride + 1}, ... ({stride}k+1) frames, got {requested}"
            )
        if requested > available:
            raise InvalidInputError(f"context of {requested} frames is longer than the clip ({available} frames)")
        return int(requested)
    context = min(default, (available - 1) // stride * stride + 1)
    if context != default:
        log.warning("the clip has %d frames; conditioning on its last %d instead of %d", available, context, default)
    return context


def new_frame_count(num_frames: int, stride: int = TEMPORAL_STRIDE) -> int:
    """New frames rounded to a multiple of ``stride`` (at least one), with a notice when rounded."""
    if not _positive_int(num_frames):
        raise InvalidInputError(f"num_frames (new frames) must be a positive integer, got {num_frames!r}")
    rounded = max(stride, round(num_frames / stride) * stride)
    if rounded != num_frames:
        log.warning("extending by %d frames: new frames come in multiples of %d; using %d", num_frames, stride,
                    rounded)  # fmt: skip
    return rounded


def _positive_int(n) -> bool:
    return isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1


def check_clip_fits(clip: Clip, multiple: int, variant: str) -> tuple[int, int]:
    """The clip's (height, width), which the new frames keep: so it must be one the model generates."""
    height, width = clip.size
    if height % multiple or width % multiple:
        raise InvalidInputError(
            f"clip {clip.name} is {width}x{height}; {variant} extends clips whose width and height are multiples "
            f"of {multiple} (restyle it to such a size first)"
        )
    return height, width


def check_colour_match(strength: float) -> float:
    """A colour-match strength in [0, 1]."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.integer, np.floating)):
        raise InvalidInputError(f"colour_match must be a number in [0, 1], got {strength!r}")
    strength = float(strength)
    if not 0.0 <= strength <= 1.0:
        raise InvalidInputError(f"colour_match must be in [0, 1], got {strength:g}")
    return strength


@dataclass(frozen=True)
class Continuation:
    """Turns a decoded window into the extended clip: the window's new frames (after the context),
    colour-matched to the context they continue, appended to the original frames."""

    clip: Clip
    context: int
    colour_match: float = DEFAULT_COLOUR_MATCH

    def __call__(self, window: np.ndarray) -> np.ndarray:
        """window (c + new, H, W, 3) float32 in [0, 1] -> (F + new, H, W, 3)."""
        new = window[self.context :]
        original = self.clip.as_float()
        new = match_colour(new, original[-self.context :], self.colour_match)
        return np.concatenate([original, new.astype(np.float32)], axis=0)
