"""Reading input clips: files, PNG folders, Video objects and arrays, and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mlx_i2v import Video
from mlx_i2v.clips import load_clip
from mlx_i2v.errors import InvalidInputError


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    """Five smooth 48x32 frames (what a lossy codec keeps well)."""
    y, x = np.mgrid[0:32, 0:48]
    return np.stack([np.stack([x * 4 + 8 * i, y * 7, np.full_like(x, 40 * i)], -1) for i in range(5)]).astype(np.uint8)


def test_lossless_sources_round_trip(frames, tmp_path):
    video = Video(frames=frames.astype(np.float32) / 255, fps=10.0, metadata={"prompt": "x", "fps": 10.0})
    folder = video.save(tmp_path / "frames")  # a folder of PNGs with metadata.json
    clip = load_clip(folder)
    np.testing.assert_array_equal(clip.frames, frames)
    assert (clip.fps, clip.name, clip.num_frames, clip.size) == (10.0, "frames", 5, (32, 48))
    gif = load_clip(video.save(tmp_path / "clip.gif"))
    assert gif.num_frames == 5 and gif.fps == 10.0 and np.abs(gif.frames.astype(int) - frames).mean() < 3
    still = tmp_path / "still.png"
    Image.fromarray(frames[0]).save(still)
    np.testing.assert_array_equal(load_clip(still).frames, frames[:1])  # an image is a one-frame clip


def test_mp4_and_in_memory_sources(frames, tmp_path):
    mp4 = load_clip(Video(frames=frames.astype(np.float32) / 255, fps=12.0).save(tmp_path / "c.mp4"))
    assert (mp4.num_frames, mp4.fps, mp4.frames.dtype) == (5, 12.0, np.uint8)
    assert np.abs(mp4.frames.astype(int) - frames).mean() < 3  # H.264 at crf 18
    as_float = frames.astype(np.float32) / 255
    from_video = load_clip(Video(frames=as_float, fps=8.0))
    assert from_video.frames is as_float and from_video.fps == 8.0  # carried over as given
    np.testing.assert_array_equal(from_video.uint8(), frames)
    assert load_clip(frames[0]).num_frames == 1


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "nope.mp4", "clip not found"),
        (lambda d: _write(d / "fake.mp4", b"not a video"), "cannot read clip"),
        (lambda d: _mkdir(d / "empty"), "no PNG frames"),
        (lambda d: np.zeros((2, 8, 8, 4), np.uint8), "shape"),
        (lambda d: np.full((2, 8, 8, 3), 2.0, np.float32), r"in \[0, 1\]"),
        (lambda d: np.zeros((2, 8, 8, 3), np.int64), "uint8 or float"),
        (lambda d: 42, "unsupported clip type"),
    ],
)
def test_bad_clips(make, message, tmp_path):
    with pytest.raises(InvalidInputError, match=message):
        load_clip(make(tmp_path))


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _mkdir(path):
    path.mkdir()
    return path
