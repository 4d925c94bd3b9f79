"""Keyframes at frame indices (LTX-Video 0.9.5+, diffusers' ``LTXVideoCondition(image|video, frame_index,
strength)``): the caller's ``keyframes=`` entries, checked before anything loads, and a clip keyframe's frames
trimmed as diffusers trims them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from . import validation
from .clips import Clip, load_clip
from .errors import InvalidInputError
from .image import ImageInput
from .restyle import check_strength
from .video import Video

log = logging.getLogger(__name__)

# An entry of ``keyframes=``: (image or clip, frame_index) or (image or clip, frame_index, strength).
KeyframeInput = Sequence[Any]


@dataclass(frozen=True)
class KeyframeRequest:
    """A checked ``keyframes=`` entry: an image (path, PIL image, uint8 array) or a :class:`Clip` (given as a
    :class:`Video` or :class:`Clip`), its frame index (>= 1), and its strength (None: the call's)."""

    source: ImageInput | Clip
    index: int
    strength: float | None = None


def check_keyframes(keyframes: Sequence[KeyframeInput] | None) -> list[KeyframeRequest]:
    """The ``keyframes=`` entries checked for what does not depend on the clip's length (types, frame index
    at least 1, strength in (0, 1]); a clip's frames are read now. One-line :class:`InvalidInputError`."""
    if keyframes is None:
        return []
    if isinstance(keyframes, (str, bytes, np.ndarray)) or not isinstance(keyframes, Sequence):
        raise InvalidInputError(f"keyframes must be a list of (image, frame_index[, strength]), got {keyframes!r:.60}")
    return [_check_entry(i, entry) for i, entry in enumerate(keyframes)]


def _check_entry(position: int, entry: KeyframeInput) -> KeyframeRequest:
    if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence) or len(entry) not in (2, 3):
        raise InvalidInputError(
            f"keyframes[{position}] must be (image, frame_index) or (image, frame_index, strength), got {entry!r:.80}"
        )
    source, index, *strength = entry
    index = validation.integer(f"keyframes[{position}] frame index", index, minimum=1)
    if isinstance(source, (Video, Clip)):
        source = load_clip(source)
    return KeyframeRequest(source, index, check_strength(strength[0]) if strength else None)


def check_frame_index(index: int, num_frames: int) -> None:
    """A keyframe's index must fall inside the clip after frame 0 (the photo's)."""
    if index > num_frames - 1:
        raise InvalidInputError(
            f"a keyframe at frame {index} is outside the {num_frames}-frame clip (frames 1 to {num_frames - 1})"
        )


def clip_keyframe_frames(clip: Clip, index: int, num_frames: int, width: int, height: int, stride: int) -> np.ndarray:
    """A clip keyframe at ``index``, as diffusers' ``trim_conditioning_sequence``: at most the frames left in
    the clip from ``index`` on, cut to ``stride * k + 1``; fitted to the frame. Returns (n, H, W, 3) in [-1, 1]."""
    n = min(clip.num_frames, num_frames - index)
    n = (n - 1) // stride * stride + 1
    if n != clip.num_frames:
        log.warning("the keyframe clip %s at frame %d has %d frames; using its first %d", clip.name, index,
                    clip.num_frames, n)  # fmt: skip
    return clip.model_frames(width, height, slice(n))
