"""A generation with its inputs read and settings resolved: what differs between generate, restyle,
extend and loop, as data for the one run (see :meth:`mlx_i2v.pipeline.Pipeline.run`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from PIL import Image

from .conditioning import Conditioning, Keyframes
from .image import LoadReport

if TYPE_CHECKING:
    from .pipeline import Settings


def keep_frames(frames: np.ndarray) -> np.ndarray:
    """Return the decoded frames as they are."""
    return frames


def close_loop(frames: np.ndarray) -> np.ndarray:
    """A loop's final frame is its first again: dropped, so that the clip repeats without a stall."""
    return frames[:-1]


@dataclass
class Request:
    """One generation, nothing loaded yet (built by ``Pipeline.prepare`` / ``prepare_extend``)."""

    settings: Settings
    photos: list[Image.Image]  # what CLIP sees, as given (Wan2.1 variants)
    keyframes: Keyframes | None  # what the conditioning encodes, fitted to the frame
    motion: float = 1.0  # see mlx_i2v.motion
    source: np.ndarray | None = None  # restyle: the clip to noise, (F, H, W, 3) in [-1, 1]
    start: int = 0  # the first schedule entry to run (a restyle starts partway)
    finish: Callable[[np.ndarray], np.ndarray] = keep_frames  # decoded (F, H, W, 3) -> the returned clip
    details: dict[str, Any] = field(default_factory=dict)  # the mode's entries in the metadata
    random_seed: bool = False  # the seed was drawn, not given (parallel ranks then take rank 0's)
    report: LoadReport = field(default_factory=LoadReport)  # what reading the photos cost (peak memory)
    read_seconds: float = 0.0  # time spent reading the inputs
    upscale: Any = None  # LTX-Video's upsample-and-refine second stage (mlx_i2v.families.ltx.upscale.UpscalePass)

    def encode_frames(self, conditioning: Conditioning) -> int:
        """Video frames the VAE encodes at once: the restyled clip or the conditioning's clip (all frames for
        channel-concat models, the given head for TI2V-5B, the longest frame condition for LTX-Video)."""
        if self.source is not None or conditioning.requires_image:
            return self.settings.num_frames
        if self.keyframes is None:
            return 1
        return max(len(k.frames) for k in self.keyframes.conditions(self.settings.num_frames))
