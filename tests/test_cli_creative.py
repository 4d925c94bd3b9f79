"""``mlx-i2v restyle``, ``mlx-i2v extend`` and ``generate --loop --motion --preview`` end to end on tiny
models, and their bad inputs: one line, nothing written, no input touched."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from ref_creative import moving_clip
from test_cli import _run

from mlx_i2v import Video
from mlx_i2v.clips import load_clip

SMALL = ["--steps", "2", "--seed", "3"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """A 9-frame 96x64 mp4 at 12 fps."""
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    Video(frames=moving_clip(9).astype(np.float32) / 255, fps=12.0).save(path)
    return path


def _mp4(path: Path) -> tuple[int, dict, float]:
    with av.open(str(path)) as c:
        frames = sum(1 for _ in c.decode(video=0))
        return frames, json.loads(c.metadata["comment"]), float(c.streams.video[0].average_rate)


def test_restyle_and_extend_write_playable_clips(tiny_ti2v_dir, clip, tmp_path):
    out = tmp_path / "restyled.mp4"
    result = _run("restyle", str(clip), "-p", "ink drawing", "--model", str(tiny_ti2v_dir), "--strength", "0.5",
                  *SMALL, "--output", str(out), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    frames, meta, fps = _mp4(out)
    assert (frames, fps, meta["mode"], meta["strength"], meta["source"]) == (9, 12.0, "restyle", 0.5, "clip.mp4")

    folder = tmp_path / "extended"  # PNG frames: lossless, so the carried-over part can be compared exactly
    result = _run("extend", str(clip), "-p", "it goes on", "--model", str(tiny_ti2v_dir), "--frames", "4", *SMALL,
                  "--output", str(folder), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "13 frames" in result.stdout
    extended = load_clip(folder)
    assert extended.num_frames == 13 and extended.fps == 12.0
    np.testing.assert_array_equal(extended.frames[:9], load_clip(clip).frames)
    meta = json.loads((folder / "metadata.json").read_text())
    assert (meta["mode"], meta["context_frames"], meta["new_frames"], meta["colour_match"]) == ("extend", 5, 4, 1.0)


def test_generate_loop_with_motion_and_live_preview(tiny_i2v_dirs, clip, tmp_path):
    photo = tmp_path / "photo.png"
    Image.fromarray(moving_clip(1)[0]).save(photo)
    out, preview = tmp_path / "loop.gif", tmp_path / "watch.png"
    result = _run("generate", str(photo), "-p", "x", "--model", str(tiny_i2v_dirs["a14b"]), "--frames", "9",
                  "--height", "64", "--width", "96", "--loop", "--motion", "1.5", "--preview", str(preview), *SMALL,
                  "--output", str(out), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert Image.open(out).n_frames == 8  # 9 generated, the final copy of the first dropped
    with Image.open(preview) as im:
        assert im.format == "PNG" and im.height == 160
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop.gif", "photo.png", "watch.png"]


def _unreadable(d: Path) -> Path:
    (d / "broken.mp4").write_text("not a video")
    return d / "broken.mp4"


def _odd_size(d: Path) -> Path:
    path = d / "odd.mp4"
    Video(frames=moving_clip(5, height=70, width=100).astype(np.float32) / 255, fps=8.0).save(path)
    return path


BAD = {
    "missing clip": (lambda d, c: ["restyle", str(d / "nope.mp4")], "clip not found"),
    "unreadable clip": (lambda d, c: ["extend", str(_unreadable(d)), "--frames", "4"], "cannot read clip"),
    "strength zero": (lambda d, c: ["restyle", str(c), "--strength", "0"], "--strength"),
    "strength above one": (lambda d, c: ["restyle", str(c), "--strength", "1.5"], "--strength"),
    "strength without a step": (lambda d, c: ["restyle", str(c), "--strength", "0.1", "--steps", "4"], "runs no step"),
    "clip size does not fit": (lambda d, c: ["extend", str(_odd_size(d)), "--frames", "4"], "multiples of 32"),
    "output over the input": (lambda d, c: ["restyle", str(c), "--output", str(c)], "would overwrite the input"),
    "preview not a PNG": (lambda d, c: ["extend", str(c), "--frames", "4", "--preview", str(d / "p.jpg")], "a PNG"),
    "preview over the input": (lambda d, c: ["generate", str(_png(d)), "--preview", str(d / "p.png")],
                               "would overwrite the input"),
    "preview in the output": (lambda d, c: ["extend", str(c), "--frames", "4", "--output", str(d / "frames"),
                                            "--preview", str(d / "frames" / "p.png")], "would write into the output"),
    "preview exists": (lambda d, c: ["restyle", str(c), "--preview", str(_png(d))], "already exists; pass --overwrite"),
    "preview over a non-PNG": (lambda d, c: ["restyle", str(c), "--preview", str(_text(d / "notes.png")),
                                             "--overwrite"], "is not a PNG image; not replacing it"),
    "loop without a last frame": (lambda d, c: ["generate", str(_png(d)), "--loop"], "cannot close a loop"),
    "motion on TI2V-5B": (lambda d, c: ["generate", str(_png(d)), "--motion", "1.3"], "motion is not supported"),
}


def _text(path: Path) -> Path:
    path.write_text("precious")
    return path


def _png(d: Path) -> Path:
    Image.fromarray(moving_clip(1)[0]).save(d / "p.png")
    return d / "p.png"


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_error(case, tiny_ti2v_dir, clip, tmp_path):
    make_args, expected = BAD[case]
    args = make_args(tmp_path, clip)
    if "--output" not in args:
        args += ["--output", str(tmp_path / "out.mp4")]
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    clip_bytes = clip.read_bytes()
    result = _run(*args, "-p", "x", "--model", str(tiny_ti2v_dir), cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0]
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before  # nothing written
    assert clip.read_bytes() == clip_bytes
