"""Writing clips: playable H.264 mp4 with metadata, gif, PNG folder; atomic; early writability check."""

import json
import os

import av
import numpy as np
import pytest
from PIL import Image

from mlx_i2v.errors import InvalidInputError
from mlx_i2v.outputs import ensure_writable
from mlx_i2v.video import Video


def _video(frames=9, h=32, w=48):
    rng = np.random.default_rng(0)
    return Video(rng.random((frames, h, w, 3), dtype=np.float32), 24.0, {"prompt": "a cat", "seed": 7})


def test_mp4_is_h264_yuv420p_with_metadata(tmp_path):
    path = _video().save(tmp_path / "clip.mp4")
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert (stream.width, stream.height) == (48, 32)
        assert float(stream.average_rate) == 24.0
        assert len(list(c.decode(video=0))) == 9
        assert json.loads(c.metadata["comment"]) == {"prompt": "a cat", "seed": 7}
        assert c.metadata["title"] == "a cat"
    assert os.listdir(tmp_path) == ["clip.mp4"]


def test_gif_and_png_folder(tmp_path):
    video = _video(frames=5)
    gif = Image.open(video.save(tmp_path / "clip.gif"))
    assert gif.n_frames == 5 and gif.size == (48, 32)
    folder = video.save(tmp_path / "frames")
    pngs = sorted(p.name for p in folder.iterdir() if p.suffix == ".png")
    assert pngs == [f"frame_{i:05d}.png" for i in range(5)]
    first = np.asarray(Image.open(folder / pngs[0]))
    np.testing.assert_array_equal(first, video.to_uint8()[0])


def test_failed_write_leaves_nothing(tmp_path):
    odd = Video(np.zeros((3, 31, 48, 3), np.float32), 24.0)
    with pytest.raises(InvalidInputError, match="even"):
        odd.save(tmp_path / "odd.mp4")
    assert os.listdir(tmp_path) == []


def test_unsupported_format_and_unwritable_dir(tmp_path):
    with pytest.raises(InvalidInputError, match="format"):
        _video().save(tmp_path / "clip.avi")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # running as root: permissions do not bind
            blocker = tmp_path / "file"
            blocker.write_text("x")
            target = blocker / "clip.mp4"  # a regular file as parent directory
        else:
            target = locked / "clip.mp4"
        with pytest.raises(InvalidInputError):
            ensure_writable(target)
    finally:
        locked.chmod(0o700)
