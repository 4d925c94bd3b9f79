"""The CLI end to end on a tiny model: a playable mp4, and one-line errors for every bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

GOOD = ["--frames", "5", "--height", "64", "--width", "96", "--steps", "2", "--seed", "3"]


def _run(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it (a fresh process each time)."""
    exe = Path(sys.executable).parent / "mlx-i2v"
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=300, input=stdin)


def test_generate_writes_playable_mp4(tiny_ti2v_dir, photo, tmp_path):
    out = tmp_path / "clip.mp4"
    result = _run("generate", str(photo), "--prompt", "a fox", "--model", str(tiny_ti2v_dir), *GOOD,
                  "--fps", "12", "--output", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    assert "peak memory" in result.stdout and "denoise" in result.stdout
    assert "of which loading models: text " in result.stdout  # the stages' load times, said apart
    with av.open(str(out)) as c:
        stream = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        assert len(frames) == 5 and frames[0].shape == (64, 96, 3)
        assert float(stream.average_rate) == 12
        meta = json.loads(c.metadata["comment"])
    assert meta["prompt"] == "a fox" and meta["seed"] == 3 and meta["num_inference_steps"] == 2
    assert meta["model"] == str(tiny_ti2v_dir)


def _broken_model(src: Path, dst: Path, damage) -> Path:
    shutil.copytree(src, dst)
    damage(dst / "transformer" / "diffusion_pytorch_model.safetensors")
    return dst


def _truncate(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _misshape(f: Path) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(f))
    tensors["proj_out.bias"] = np.zeros(3, dtype=tensors["proj_out.bias"].dtype)
    save_file(tensors, str(f))


BAD_INPUTS = {
    "missing image": (lambda d, m, p: ["generate", str(d / "nope.jpg")], "image not found"),
    "unreadable image": (lambda d, m, p: ["generate", str(_text_file(d / "fake.jpg"))], "cannot read image"),
    "missing model": (lambda d, m, p: ["generate", str(p), "--model", str(d / "no-model")], "not found"),
    "missing weights": (
        lambda d, m, p: ["generate", str(p), "--model", str(_broken_model(m, d / "m", Path.unlink))],
        "no .safetensors weights",
    ),
    "truncated weights": (
        lambda d, m, p: ["generate", str(p), "--model", str(_broken_model(m, d / "m", _truncate))],
        "truncated",
    ),
    "mis-shaped weights": (
        lambda d, m, p: ["generate", str(p), "--model", str(_broken_model(m, d / "m", _misshape))],
        "proj_out.bias",
    ),
    "zero steps": (lambda d, m, p: ["generate", str(p), "--model", str(m), "--steps", "0"], "--steps"),
    "negative guidance": (lambda d, m, p: ["generate", str(p), "--model", str(m), "--guidance", "-2"], "guidance"),
    # A Latin-1 terminal's "café": Python keeps the undecodable byte as a lone surrogate.
    "non-UTF-8 negative prompt": (
        lambda d, m, p: ["generate", str(p), "--model", str(m), "--negative-prompt", os.fsdecode(b"caf\xe9")],
        "not UTF-8 text (byte 0xE9",
    ),
    "fps nan": (lambda d, m, p: ["generate", str(p), "--model", str(m), "--fps", "nan"], "not a finite number"),
    "guidance inf": (
        lambda d, m, p: ["generate", str(p), "--model", str(m), "--guidance", "inf"], "not a finite number"
    ),
    "negative seed": (lambda d, m, p: ["generate", str(p), "--model", str(m), "--seed", "-1"], "--seed"),
    "crop outside the photo": (
        lambda d, m, p: ["generate", str(p), "--model", str(m), "--crop", "100,0,50,50"],
        "does not fit inside the 120x80 photo",
    ),
    "cache threshold alone": (
        lambda d, m, p: ["generate", str(p), "--model", str(m), "--cache-threshold", "0.1"],
        "cache_threshold needs a cache method",
    ),
    "unwritable output": (
        lambda d, m, p: ["generate", str(p), "--model", str(m), "--output", str(_text_file(d / "file") / "x.mp4")],
        "output",
    ),
}


def _text_file(path: Path) -> Path:
    path.write_text("not an image")
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_error_without_output(case, tiny_ti2v_dir, photo, tmp_path):
    make_args, expected = BAD_INPUTS[case]
    work = tmp_path / "work"
    work.mkdir()
    args = make_args(tmp_path, tiny_ti2v_dir, photo)
    if "--output" not in args:
        args += ["--output", str(work / "out.mp4")]
    before = set(os.listdir(work))
    result = _run(*args, "--prompt", "x", *GOOD[:6], cwd=work)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert set(os.listdir(work)) == before  # nothing written, not even a partial file


def test_generate_first_last_frame_and_two_experts(tiny_i2v_dirs, photo, tmp_path):
    last = tmp_path / "last.png"
    Image.fromarray(np.full((80, 120, 3), 200, np.uint8)).save(last)
    out = tmp_path / "flf2v.gif"
    result = _run("generate", str(photo), "-p", "x", "--model", str(tiny_i2v_dirs["flf2v"]), "--last-image", str(last),
                  *GOOD, "--output", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert Image.open(out).n_frames == 5
    out = tmp_path / "a14b.mp4"
    result = _run("generate", str(photo), "-p", "x", "--model", str(tiny_i2v_dirs["a14b"]), "--guidance-2", "2.5",
                  "--cache", "first-block", "--cache-threshold", "1e9", *GOOD, "--output", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # one step per expert: each expert's first pass computes (caches reset at the switch), none skip
    assert "transformer passes: 4 computed, 0 skipped (first-block, threshold 1e+09)" in result.stdout
    with av.open(str(out)) as c:
        meta = json.loads(c.metadata["comment"])
        assert meta["guidance_scale_2"] == 2.5 and meta["cache"] == {"method": "first-block", "threshold": 1e9}
    result = _run("generate", str(photo), "-p", "x", "--model", str(tiny_i2v_dirs["flf2v"]), *GOOD,
                  "--output", str(tmp_path / "no-last.mp4"), cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.strip() == "error: wan2.1-flf2v-14b-720p needs a last image (--last-image)"


def test_dry_run_prints_the_plan_and_a_request_too_big_stops_before_loading(tiny_ti2v_dir, photo, tmp_path):
    out = tmp_path / "never.mp4"
    result = _run("generate", str(photo), "-p", "x", "--model", str(tiny_ti2v_dir), *GOOD, "--dry-run",
                  "--cache", "magcache", "--output", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "96x64, 5 frames, 2 steps" in result.stdout and "peak" in result.stdout and "fits" in result.stdout
    assert "cache magcache 0.06" in result.stdout
    assert not out.exists()
    result = _run("generate", str(photo), "-p", "x", "--model", str(tiny_ti2v_dir), *GOOD, "--memory-limit", "0.001",
                  "--output", str(out), cwd=tmp_path)
    assert result.returncode == 1 and not out.exists()
    line = result.stderr.strip()
    assert line.startswith("error: ") and "\n" not in line and "GB" in line


def test_prompt_from_stdin_or_file_long_prompt_notice_and_image_options(tiny_ti2v_dir, photo, tmp_path):
    out = tmp_path / "clip.mp4"
    long_prompt = " ".join(f"word{i}" for i in range(600))
    result = _run("generate", str(photo), "-p", "-", "--model", str(tiny_ti2v_dir), *GOOD, "--rotate", "90",
                  "--crop", "0,0,80,100", "--fit", "contain", "--background", "0,0,0", "--output", str(out),
                  cwd=tmp_path, stdin=long_prompt + "\n")
    assert result.returncode == 0, result.stderr
    # The library's warning reaches the user through the CLI's logging setup.
    assert re.search(r"WARNING .*the prompt is \d+ tokens, more than the 511 the model reads", result.stderr)
    with av.open(str(out)) as c:
        meta = json.loads(c.metadata["comment"])
    assert meta["prompt"] == long_prompt
    options = (meta["rotate"], meta["crop"], meta["fit"], meta["background"])
    assert options == (90, [0, 0, 80, 100], "contain", [0, 0, 0])

    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_bytes(b"caf\xe9 au lait")  # Latin-1
    result = _run("generate", str(photo), "--prompt-file", str(prompt_file), "--model", str(tiny_ti2v_dir), *GOOD,
                  "--output", str(tmp_path / "never.mp4"), cwd=tmp_path)
    assert result.returncode == 2 and not (tmp_path / "never.mp4").exists()
    assert result.stderr.strip() == f"error: the prompt in {prompt_file} is not UTF-8 text (byte 0xE9 at offset 3)"
    result = _run("generate", str(photo), "-p", os.fsdecode(b"caf\xe9"), "--model", str(tiny_ti2v_dir), *GOOD,
                  "--output", str(tmp_path / "never.mp4"), cwd=tmp_path)
    assert result.returncode == 2 and "not UTF-8 text (byte 0xE9 at character 4)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_requests_past_the_model_limits_stop_in_the_dry_run(tiny_ti2v_dir, photo, tmp_path):
    for extra, message in ((["--frames", "10001"], "num_frames 10001 is more than this model can take: at most 4093"),
                           (["--steps", "10000", "--shift", "100"], "at most 9578 steps")):
        result = _run("generate", str(photo), "-p", "x", "--model", str(tiny_ti2v_dir), *GOOD, *extra, "--dry-run",
                      cwd=tmp_path)
        assert result.returncode == 1 and result.stderr.startswith("error: ")
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
