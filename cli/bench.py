"""``mlx-i2v bench``: how fast this machine generates, in numbers that compare across machines."""

from __future__ import annotations

import json
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from mlx_i2v.stepcache.calibrations import METHODS

from .options import DEFAULT_MODEL


def _size(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", value)
    if not match or 0 in (int(match[1]), int(match[2])):
        raise click.BadParameter(f"expected WIDTHxHEIGHT such as 832x480, got {value!r}")
    return int(match[1]), int(match[2])


@click.command()
@click.option("-m", "--model", default=DEFAULT_MODEL, show_default=True, help="Model directory or Hub repo id.")
@click.option("--size", default="832x480", show_default=True, callback=_size, help="Frame size, WIDTHxHEIGHT.")
@click.option("--frames", "num_frames", type=click.IntRange(min=1), default=41, show_default=True,
              help="Number of frames (4k+1).")
@click.option("--steps", "num_inference_steps", type=click.IntRange(min=1), default=4, show_default=True,
              help="Denoising steps.")
@click.option("--guidance", "guidance_scale", type=click.FloatRange(min=0), default=None,
              help="Guidance scale (default: the model's, which uses classifier-free guidance).")
@click.option("--quantize", type=int, default=None, help="Quantize the transformer to N bits.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Compute dtype (default: bfloat16 on a GPU, float32 on the CPU).")
@click.option("--cache", type=click.Choice(METHODS), default=None, help="Step caching (off by default).")
@click.option("--cache-threshold", type=float, default=None, help="The cache's threshold (default: the method's).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def bench(model: str, size: tuple[int, int], num_frames: int, num_inference_steps: int,
          guidance_scale: float | None, quantize: int | None, dtype: str | None, cache: str | None,
          cache_threshold: float | None, as_json: bool) -> None:
    """Time one generation on a synthetic photo: seconds per stage and per step, peak memory, DiT tokens
    per second and the achieved TFLOP/s (from the transformer's FLOP count, mlx_i2v.flops)."""
    import mlx.core as mx

    from mlx_i2v import load_pipeline

    width, height = size
    tic = time.perf_counter()
    pipe = load_pipeline(model, dtype=dtype, quantize=quantize)
    load_s = time.perf_counter() - tic

    step_ends: list[float] = []
    video = pipe(
        _photo(width, height), "a red fox runs through snow, the camera slowly pans", height=height, width=width,
        num_frames=num_frames, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=0,
        cache=cache, cache_threshold=cache_threshold,
        on_step=lambda step, total, t: step_ends.append(time.perf_counter()),
    )  # fmt: skip
    report = _report(pipe, video, load_s, step_ends)
    report["device"] = {"mlx": mx.__version__, "device": str(mx.default_device()), **_machine()}
    report["quantize"] = quantize
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(_text(report))


def _report(pipe, video, load_s: float, step_ends: list[float]) -> dict[str, Any]:
    """The figures of one run, from the pipeline's own stage timings and the per-step callbacks."""
    from dataclasses import replace

    from mlx_i2v.flops import context_flops, forward_flops, step_flops

    m = video.metadata
    seconds = {"load": load_s, **video.stats["seconds"]}
    steps = m["num_inference_steps"]
    cfg = m["guidance_scale"] > 1.0 or (m.get("guidance_scale_2") or 0.0) > 1.0
    text_tokens = pipe.variant.prompts.max_length
    shape = pipe.dims.flop_shape(text_tokens)
    tokens = pipe.dims.tokens(m["height"], m["width"], m["num_frames"])
    passes = 2 if cfg else 1
    loading = video.stats["loading_seconds"]
    # The denoise loop alone: the stage also loads the transformer (its load time is reported apart).
    denoise_s = seconds["denoise"] - loading.get("denoise", 0.0)
    # on_step fires as each step ends and the stage ends just after the last one, so the first step's time
    # is what the others leave of the loop (it also embeds the text context, once per generation).
    per_step = [denoise_s - (step_ends[-1] - step_ends[0]), *np.diff(step_ends)]
    # A pass the step cache skipped still ran the embedding, the head and its probe blocks.
    counted = video.stats["transformer_passes"]
    skipped_pass = forward_flops(replace(shape, num_layers=counted["probe_blocks"]), tokens)
    flops = counted["computed"] * forward_flops(shape, tokens) + counted["skipped"] * skipped_pass
    flops += context_flops(shape, passes, text_tokens=text_tokens)
    return {
        "model": m["model"],
        "variant": m["variant"],
        "dtype": m["dtype"],
        "width": m["width"],
        "height": m["height"],
        "frames": m["num_frames"],
        "steps": steps,
        "cfg": cfg,
        "cache": m["cache"],
        "transformer_passes": {k: counted[k] for k in ("computed", "skipped", "by_branch")},
        "seconds": seconds,
        "loading_seconds": loading,
        "total_s": sum(seconds.values()),
        "seconds_per_step": denoise_s / steps,
        "step_seconds": [float(s) for s in per_step],
        "peak_memory_gb": video.stats["peak_memory_gb"],
        "peak_rss_gb": _peak_rss_gb(),
        "dit_tokens": tokens,
        "tokens_per_s": tokens * passes * steps / denoise_s,
        "tflop_per_step": step_flops(shape, tokens, cfg=cfg) / 1e12,
        "tflop": flops / 1e12,
        "tflops": flops / denoise_s / 1e12,
    }


def _text(r: dict[str, Any]) -> str:
    s = r["seconds"]
    stages = " | ".join(f"{k} {v:.1f}s" for k, v in s.items())
    passes = "2 passes (CFG)" if r["cfg"] else "1 pass"
    return "\n".join([
        f"{r['variant']} ({r['dtype']}{', q' + str(r['quantize']) if r['quantize'] else ''}) on {r['device']['device']}"
        f" [{r['device']['cpu']}]: {r['width']}x{r['height']}, {r['frames']} frames, {r['steps']} steps",
        f"time: {stages} | total {r['total_s']:.1f}s"
        + (" | of which loading: " + ", ".join(f"{k} {v:.1f}s" for k, v in r["loading_seconds"].items()) if r["loading_seconds"] else ""),
        f"denoise: {r['seconds_per_step']:.2f} s/step (" + ", ".join(f"{x:.2f}" for x in r["step_seconds"]) + ")",
        f"DiT: {r['dit_tokens']:,} tokens x {passes}, {r['tflop_per_step']:.3g} TFLOP/step -> "
        f"{r['tokens_per_s']:,.0f} tokens/s, {r['tflops']:.3g} TFLOP/s",
        f"peak memory: {r['peak_memory_gb']:.2f} GB (MLX), {r['peak_rss_gb']:.2f} GB resident",
        f"transformer passes: {r['transformer_passes']['computed']} computed, {r['transformer_passes']['skipped']} "
        "skipped" + (f" ({r['cache']['method']}, threshold {r['cache']['threshold']:g})" if r["cache"] else ""),
    ])  # fmt: skip


def _photo(width: int, height: int):
    """A synthetic photo with smooth gradients and some texture, at the frame size."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 / width, y * 255 / height, 128 + 127 * np.sin((x + y) / 17)], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def _peak_rss_gb() -> float:
    """This process's peak resident memory in GB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9


def _machine() -> dict[str, Any]:
    """The chip and memory, so that numbers from different machines can be told apart."""
    import mlx.core as mx

    info = {"os": platform.platform(), "cpu": mx.device_info().get("device_name") or platform.processor()}
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        info["ram_gb"] = round(int(re.search(r"MemTotal:\s+(\d+)", meminfo.read_text())[1]) * 1024 / 1e9, 1)
    elif "memory_size" in mx.device_info():
        info["ram_gb"] = round(mx.device_info()["memory_size"] / 1e9, 1)
    return info
