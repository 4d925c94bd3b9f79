"""The generated clip and how it is written to disk (mp4, gif or a folder of PNGs), always atomically."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import InvalidInputError

log = logging.getLogger(__name__)

FORMATS = (".mp4", ".gif", "")  # "" (no suffix) means a folder of PNG frames


@dataclass
class Video:
    """A generated clip.

    Attributes:
        frames: float32 (frames, height, width, 3) in [0, 1].
        fps: playback rate.
        metadata: prompt, seed, model and settings actually used; written into the mp4.
        stats: how the run went (seconds per stage, peak memory); not written to the file.
    """

    frames: np.ndarray
    fps: float
    metadata: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def height(self) -> int:
        return int(self.frames.shape[1])

    @property
    def width(self) -> int:
        return int(self.frames.shape[2])

    def to_uint8(self) -> np.ndarray:
        """(frames, height, width, 3) uint8, rounded as diffusers' ``numpy_to_pil`` does."""
        return (np.clip(self.frames, 0.0, 1.0) * 255).round().astype(np.uint8)

    def save(self, path: str | Path) -> Path:
        """Write the clip: ``.mp4`` (H.264, yuv420p, with metadata), ``.gif``, or a path without a
        suffix for a folder of ``frame_00000.png`` files. The file appears only once complete."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in FORMATS:
            raise InvalidInputError(f"unsupported output format {path.suffix!r}; use .mp4, .gif or a folder name")
        ensure_writable(path)
        writer = {".mp4": self._write_mp4, ".gif": self._write_gif, "": self._write_pngs}[suffix]
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}{path.suffix}")
        try:
            writer(tmp)
            if path.is_dir() and suffix == "":
                shutil.rmtree(path)
            os.replace(tmp, path)
        except BaseException:
            _remove(tmp)
            raise
        log.info("wrote %s (%d frames, %dx%d, %.3g fps)", path, self.num_frames, self.width, self.height, self.fps)
        return path

    def _write_mp4(self, path: Path) -> None:
        import av

        frames = self.to_uint8()
        if self.width % 2 or self.height % 2:
            raise InvalidInputError(f"H.264 needs even width and height; got {self.width}x{self.height}")
        with av.open(str(path), mode="w", format="mp4") as container:
            for key, value in self._container_metadata().items():
                container.metadata[key] = value
            stream = container.add_stream("libx264", rate=_fps_fraction(self.fps))
            stream.width, stream.height, stream.pix_fmt = self.width, self.height, "yuv420p"
            stream.options = {"crf": "18", "preset": "medium"}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)

    def _write_gif(self, path: Path) -> None:
        images = [Image.fromarray(f) for f in self.to_uint8()]
        images[0].save(
            path, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / self.fps), loop=0
        )

    def _write_pngs(self, path: Path) -> None:
        path.mkdir()
        for i, frame in enumerate(self.to_uint8()):
            Image.fromarray(frame).save(path / f"frame_{i:05d}.png")
        (path / "metadata.json").write_text(json.dumps(self.metadata, indent=2, ensure_ascii=False))

    def _container_metadata(self) -> dict[str, str]:
        meta = {"comment": json.dumps(self.metadata, ensure_ascii=False, sort_keys=True), "encoder": "mlx-i2v"}
        if self.metadata.get("prompt"):
            meta["title"] = str(self.metadata["prompt"])
        return meta


def ensure_writable(path: str | Path) -> None:
    """Fail early, with one line, if ``path`` cannot be written (run before a long generation)."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidInputError(f"cannot create output directory {parent}: {e.strerror or e}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidInputError(f"output directory is not writable: {parent}")
    if path.exists() and not os.access(path, os.W_OK):
        raise InvalidInputError(f"output is not writable: {path}")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".mlx-i2v-probe-"):
            pass
    except OSError as e:
        raise InvalidInputError(f"output directory is not writable: {parent} ({e.strerror or e})") from None


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fps_fraction(fps: float):
    from fractions import Fraction

    return Fraction(fps).limit_denominator(1001)
