"""The generated clip and how it is written to disk (mp4, gif or a folder of PNGs), always atomically."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import InvalidInputError
from .outputs import ENCODER, FRAMES_MARKER, output_kind, resolve_output, staged_output

log = logging.getLogger(__name__)


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

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the clip: ``.mp4`` (H.264, yuv420p, with metadata), ``.gif``, or a name without a suffix
        for a folder of ``frame_00000.png`` files and ``metadata.json``. A name ending in ``/`` or an
        existing folder (not one of our PNG-frames folders) gets ``<stem>.mp4`` inside it, the stem being
        the photo's (``metadata["image_name"]``) or "video". The output appears only once complete.

        An existing output is replaced only with ``overwrite`` and only if it is of the same kind (by
        content); see :func:`mlx_i2v.outputs.resolve_output` for every rule. Returns the path written.

        Raises:
            InvalidInputError: the output is refused by those rules, or another process wrote it first.
        """
        target = resolve_output(path, default_stem=self._stem(), overwrite=overwrite)
        kind = output_kind(target)
        writer = {"mp4": self._write_mp4, "gif": self._write_gif, "frames": self._write_pngs}[kind]
        with staged_output(target, overwrite=overwrite, directory=kind == "frames") as staged:
            writer(staged.path)
        log.info("%s %s (%d frames, %dx%d, %.3g fps)", "replaced" if staged.replaced else "wrote", target,
                 self.num_frames, self.width, self.height, self.fps)
        return target

    def _stem(self) -> str:
        name = self.metadata.get("image_name")
        return Path(str(name)).stem if name else "video"

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
        # The marker that lets a later save with overwrite recognise (and replace) this folder.
        marker = {**self.metadata, "fps": self.fps, "encoder": ENCODER}
        (path / FRAMES_MARKER).write_text(json.dumps(marker, indent=2, ensure_ascii=False), encoding="utf-8")

    def _container_metadata(self) -> dict[str, str]:
        meta = {"comment": json.dumps(self.metadata, ensure_ascii=False, sort_keys=True), "encoder": ENCODER}
        if self.metadata.get("prompt"):
            meta["title"] = str(self.metadata["prompt"])
        return meta


def _fps_fraction(fps: float):
    from fractions import Fraction

    return Fraction(fps).limit_denominator(1001)
