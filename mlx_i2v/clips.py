"""Reading an input clip (for restyle and extend): a video file, a folder of PNG frames, a :class:`Video`
or an array of frames."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from .errors import InvalidInputError
from .image import fit_to_frame, load_image, to_model_range
from .video import Video

log = logging.getLogger(__name__)

# Still images read as one-frame clips (an image-to-image pass is a restyle of a one-frame clip).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Clip:
    """An input clip.

    Attributes:
        frames: the frames as given, (F, H, W, 3) uint8, or float32 in [0, 1]. An extension carries
            these over unchanged.
        fps: the clip's frame rate, when the source records one.
        name: where it came from (a file or folder name), for the output's metadata.
    """

    frames: np.ndarray
    fps: float | None = None
    name: str = "<frames>"

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return int(self.frames.shape[1]), int(self.frames.shape[2])

    def uint8(self, index: slice | int = slice(None)) -> np.ndarray:
        """Frames as uint8, float frames rounded as :meth:`Video.to_uint8` (what the models are conditioned
        on, so an in-memory clip and the same clip saved losslessly give the same result)."""
        frames = self.frames[index]
        if frames.dtype == np.uint8:
            return frames
        return (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)

    def as_float(self) -> np.ndarray:
        """Frames as float32 (F, H, W, 3) in [0, 1], the layout of :attr:`Video.frames`."""
        if self.frames.dtype == np.uint8:
            return self.frames.astype(np.float32) / 255.0
        return self.frames

    def model_frames(self, width: int, height: int, index: slice = slice(None)) -> np.ndarray:
        """Frames fitted to the video size as photos are (:func:`fit_to_frame`: unchanged at that size,
        else Lanczos cover and center crop), float32 (n, height, width, 3) in [-1, 1]."""
        frames = self.uint8(index)
        return np.stack([to_model_range(fit_to_frame(Image.fromarray(f), width, height)) for f in frames])

    def image(self, index: int) -> Image.Image:
        """One frame as an RGB PIL image."""
        return Image.fromarray(self.uint8(index))


ClipInput = Union[str, Path, Video, Clip, np.ndarray]


def load_clip(source: ClipInput) -> Clip:
    """Read a clip. Raises :class:`InvalidInputError` with one line for anything unusable.

    Args:
        source: a video file anything FFmpeg decodes (mp4, mov, webm, gif, ...); a folder of PNG frames
            (as ``Video.save`` writes them: ``frame_00000.png``..., with ``metadata.json`` giving the fps);
            a still image file (a one-frame clip); a :class:`Video` or :class:`Clip`; or an array of frames
            (F, H, W, 3) / one frame (H, W, 3), uint8 or float in [0, 1].
    """
    if isinstance(source, Clip):
        return source
    if isinstance(source, Video):
        return Clip(_frames_from_array(source.frames), source.fps, "<Video>")
    if isinstance(source, np.ndarray):
        return Clip(_frames_from_array(source))
    if not isinstance(source, (str, Path)):
        raise InvalidInputError(
            f"unsupported clip type {type(source).__name__}; pass a path, a Video or an array of frames"
        )
    path = Path(source)
    if path.is_dir():
        return _read_png_folder(path)
    if not path.is_file():
        raise InvalidInputError(f"clip not found: {path}")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return Clip(np.asarray(load_image(path))[None], None, path.name)
    return _read_video_file(path)


def _frames_from_array(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise InvalidInputError(f"clip frames must have shape (F, H, W, 3) or (H, W, 3); got {frames.shape}")
    if frames.dtype == np.uint8:
        return frames
    if not np.issubdtype(frames.dtype, np.floating):
        raise InvalidInputError(f"clip frames must be uint8 or float in [0, 1]; got {frames.dtype}")
    frames = frames.astype(np.float32, copy=False)  # never modified: an extension carries it over as given
    if not np.isfinite(frames).all() or frames.min() < 0.0 or frames.max() > 1.0:
        raise InvalidInputError("float clip frames must be finite and in [0, 1]")
    return frames


def _read_video_file(path: Path) -> Clip:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InvalidInputError(f"cannot read clip {path}: no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise InvalidInputError(f"cannot read clip {path}: {_reason(e)}") from None
    if not frames:
        raise InvalidInputError(f"cannot read clip {path}: it has no frames")
    return Clip(np.stack(frames), float(rate) if rate else None, path.name)


def _read_png_folder(path: Path) -> Clip:
    files = sorted(path.glob("*.png"))
    if not files:
        raise InvalidInputError(f"cannot read clip {path}: the folder has no PNG frames")
    frames = [np.asarray(load_image(f)) for f in files]
    sizes = {f.shape for f in frames}
    if len(sizes) > 1:
        raise InvalidInputError(f"cannot read clip {path}: its PNG frames differ in size")
    fps = None
    meta = path / "metadata.json"
    if meta.is_file():
        try:
            fps = float(json.loads(meta.read_text()).get("fps")) or None
        except (ValueError, TypeError, AttributeError):
            log.warning("%s: no usable fps in metadata.json", path)
    return Clip(np.stack(frames), fps, path.name)


def _reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e)
