"""``mlx-i2v generate`` on a tiny LTX-Video checkpoint: a playable clip with the same options as Wan, LTX
options refused on Wan and Wan-only options refused on LTX, each with one line and before any model loads."""

from __future__ import annotations

import json

import av
import pytest

from test_cli import _run

SMALL = ["--frames", "9", "--height", "64", "--width", "96", "--steps", "2", "--seed", "3"]


def test_generate_ltx_writes_playable_mp4(tiny_ltx_condition_dir, photo, tmp_path):
    out = tmp_path / "clip.mp4"
    result = _run("generate", str(photo), "-p", "a fox", "--model", str(tiny_ltx_condition_dir), *SMALL,
                  "--fps", "24", "--strength", "0.9", "--decode-timestep", "0.1", "--output", str(out),
                  cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    with av.open(str(out)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert len(frames) == 9 and frames[0].shape == (64, 96, 3)
        assert float(c.streams.video[0].average_rate) == 24
        meta = json.loads(c.metadata["comment"])
    assert (meta["variant"], meta["strength"], meta["decode_timestep"], meta["fps"]) == (
        "ltx-video-condition", 0.9, 0.1, 24)  # fmt: skip


@pytest.mark.parametrize(
    "model,extra,message",
    [
        ("wan", ["--decode-timestep", "0.05"], "decode_timestep does not apply to wan2.2-ti2v-5b"),
        ("wan", ["--preset", "distilled"], "distilled preset is for LTX-Video models"),
        ("ltx", ["--motion", "1.5"], "motion amplitude (motion=): not supported on LTX-Video models"),
        ("ltx", ["--cache", "magcache"], "no published magcache calibration"),
        ("ltx", ["--shift", "3"], "flow_shift"),
        ("ltx", ["--guidance-2", "2"], "guidance_scale_2 does not apply"),
    ],
)
def test_options_of_the_other_family_are_refused(
    tiny_ti2v_dir, tiny_ltx_condition_dir, photo, tmp_path, model, extra, message
):
    folder = tiny_ti2v_dir if model == "wan" else tiny_ltx_condition_dir
    result = _run("generate", str(photo), "-p", "x", "--model", str(folder), *SMALL, *extra,
                  "--output", str(tmp_path / "out.mp4"), cwd=tmp_path)  # fmt: skip
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "out.mp4").exists()


def test_dry_run_prints_the_ltx_plan(tiny_ltx_condition_dir, photo, tmp_path):
    result = _run("generate", str(photo), "-p", "x", "--model", str(tiny_ltx_condition_dir), "--frames", "20",
                  "--dry-run", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "ltx-video-condition: 704x512, 17 frames, 50 steps" in result.stdout
    assert "weights" in result.stdout and "peak" in result.stdout
    assert not list(tmp_path.iterdir())
