"""``mlx-i2v bench`` on the tiny TI2V model: the JSON report is complete and self-consistent."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mlx_i2v.cli.bench import bench
from mlx_i2v.flops import DiTShape, step_flops
from mlx_i2v.weights import read_config

ARGS = ["--size", "96x64", "--frames", "9", "--steps", "3", "--dtype", "float32"]


def _invoke(*args: str):
    # The command alone: the `mlx-i2v` group that registers it turns errors into one-line messages.
    return CliRunner().invoke(bench, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def report(tiny_ti2v_dir) -> dict:
    result = _invoke("--model", str(tiny_ti2v_dir), *ARGS, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_json_reports_the_job_and_every_stage(report):
    assert (report["width"], report["height"], report["frames"], report["steps"]) == (96, 64, 9, 3)
    assert report["cfg"] is True and report["dtype"] == "float32" and report["quantize"] is None
    assert set(report["seconds"]) == {"load", "text", "image", "denoise", "decode"}
    assert all(s > 0 for s in report["seconds"].values())
    assert report["total_s"] == pytest.approx(sum(report["seconds"].values()))
    # the steps share the denoise loop: the stage less the transformer's loading
    loop = report["seconds"]["denoise"] - report["loading_seconds"]["denoise"]
    assert 0 < report["loading_seconds"]["denoise"] < report["seconds"]["denoise"]
    assert len(report["step_seconds"]) == 3 and all(s > 0 for s in report["step_seconds"])
    assert sum(report["step_seconds"]) == pytest.approx(loop, rel=1e-3)
    assert report["seconds_per_step"] == pytest.approx(loop / 3)
    assert 0 < report["peak_memory_gb"] < 10 and report["peak_rss_gb"] > 0
    assert report["device"]["mlx"] and report["device"]["cpu"]


def test_throughput_follows_from_the_flop_count(report, tiny_ti2v_dir):
    tokens = 3 * 2 * 3  # 9 frames -> 3 latent frames of 4x6, 2x2 patches
    assert report["dit_tokens"] == tokens
    shape = DiTShape.from_config(read_config(tiny_ti2v_dir / "transformer"))
    assert report["tflop_per_step"] == pytest.approx(step_flops(shape, tokens, cfg=True) / 1e12)
    denoise = report["seconds"]["denoise"] - report["loading_seconds"]["denoise"]
    assert report["tokens_per_s"] == pytest.approx(tokens * 2 * 3 / denoise)
    # the text-context projection is included once, so the total is a little over steps x per-step
    assert report["tflop"] >= 3 * report["tflop_per_step"]
    assert report["tflops"] == pytest.approx(report["tflop"] / denoise)


def test_text_output_and_bad_size(tiny_ti2v_dir):
    result = _invoke("--model", str(tiny_ti2v_dir), *ARGS[:-2], "--steps", "1", "--guidance", "1")
    assert result.exit_code == 0, result.output
    assert "s/step" in result.output and "TFLOP/s" in result.output and "1 pass" in result.output
    assert "transformer passes: 1 computed, 0 skipped" in result.output
    bad = CliRunner().invoke(bench, ["--size", "96by64"])
    assert bad.exit_code == 2 and "WIDTHxHEIGHT" in bad.output


def test_skipped_passes_are_reported_and_not_counted_as_work(tiny_ti2v_dir):
    """First-Block-Cache with a huge threshold: the second step reuses the first's residual, so it costs
    the embedding, block 0 and the head only."""
    from dataclasses import replace

    from mlx_i2v.flops import context_flops, forward_flops

    result = _invoke("--model", str(tiny_ti2v_dir), *ARGS[:-4], "--steps", "2", "--guidance", "1",
                     "--cache", "first-block", "--cache-threshold", "1e9", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["cache"] == {"method": "first-block", "threshold": 1e9}
    assert report["transformer_passes"] == {
        "computed": 1, "skipped": 1, "by_branch": {"cond": {"computed": 1, "skipped": 1}},
    }  # fmt: skip
    shape = DiTShape.from_config(read_config(tiny_ti2v_dir / "transformer"))
    flops = forward_flops(shape, 18) + forward_flops(replace(shape, num_layers=1), 18) + context_flops(shape, 1)
    assert report["tflop"] == pytest.approx(flops / 1e12)


def test_ltx_throughput_counts_its_own_tokens_and_caption(tiny_ltx_condition_dir):
    """LTX-Video: tokens from its 32x32x8 latent grid, FLOPs from its shape with the 256 caption tokens of
    LTXConditionPipeline."""
    from mlx_i2v.flops import context_flops, ltx_shape, ltx_video_tokens, step_flops

    result = _invoke("--model", str(tiny_ltx_condition_dir), "--size", "64x64", "--frames", "9", "--steps", "2",
                     "--dtype", "float32", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    tokens = ltx_video_tokens(64, 64, 9)
    assert report["dit_tokens"] == tokens == 2 * 2 * 2
    shape = ltx_shape(read_config(tiny_ltx_condition_dir / "transformer"), context_tokens=256)
    assert report["tflop_per_step"] == pytest.approx(step_flops(shape, tokens, cfg=report["cfg"]) / 1e12)
    passes = 2 if report["cfg"] else 1
    expected = 2 * step_flops(shape, tokens, cfg=report["cfg"]) + context_flops(shape, passes, text_tokens=256)
    assert report["tflop"] == pytest.approx(expected / 1e12)
