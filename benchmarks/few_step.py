"""The default 50-step guided run against the 4-step Lightning recipe: transformer FLOPs and wall time.

Two parts, written to ``benchmarks/README.md`` (and ``--json``) with the machine:

* **FLOPs at the real sizes** (:mod:`mlx_i2v.flops`, arithmetic only): each Wan variant's default run
  (its steps, classifier-free guidance: two passes a step) against ``preset="lightning"`` (4 steps, one
  pass a step), at its default size and frame count.
* **Measured** on this machine: the same job (photo, prompt, size, frames, initial noise) run twice through
  one pipeline, once with the variant's defaults and once with ``preset="lightning"``, every model kept
  loaded after a warm-up run (the times are compute, not loading). The model has the
  real Wan2.2-TI2V-5B transformer widths (dim 3072, 24 heads, FFN 14336, text 4096) with ``--layers``
  blocks (of 30), the umt5-xxl widths with one layer and a 512-row vocabulary, and the tests' tiny Wan2.2
  VAE (real latent channels and strides; its cost is the same for both runs and small). Random weights, so
  the video is noise; only the cost is measured. No Lightning LoRA exists for TI2V-5B: the recipe runs
  without one, which costs the same.

Usage::

    python benchmarks/few_step.py                      # 256x384 (HxW), 5 frames, 1 block: a few minutes on 2 cores
    python benchmarks/few_step.py --layers 30 --text-layers 24 --height 704 --width 1280 --frames 121  # a Mac

Wall times grow when other programs share the cores; each run records its CPU time and the 1-minute
load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_diffusers import TI2V_5B_TRANSFORMER, UMT5_XXL, machine, write_readme  # noqa: E402

PROMPT = "a red fox runs through snow, the camera slowly pans"
FEW_STEP_END = "<!-- few-step-end -->"

# The real transformer configs (diffusers' defaults are the 14B widths) and each variant's default job.
REAL = {
    "Wan2.2-TI2V-5B, 1280x704, 121 frames": (dict(TI2V_5B_TRANSFORMER, num_layers=30), 16, (704, 1280, 121), 50),
    "Wan2.1-I2V-14B-480P, 832x480, 81 frames": (
        dict(in_channels=36, out_channels=16, image_dim=1280, added_kv_proj_dim=5120), 8, (480, 832, 81), 40),
    "Wan2.2-I2V-A14B, 1280x720, 81 frames (each expert)": (dict(in_channels=36, out_channels=16), 8, (720, 1280, 81), 40),
}  # fmt: skip
LIGHTNING_STEPS = 4


def run_flops(shape, tokens: int, steps: int, cfg: bool) -> float:
    """Transformer FLOPs of one generation: every step's passes and the text context once per branch."""
    from mlx_i2v.flops import context_flops, step_flops

    return steps * step_flops(shape, tokens, cfg=cfg) + context_flops(shape, batch=2 if cfg else 1)


def real_size_table() -> list[dict[str, Any]]:
    from mlx_i2v.flops import DiTShape, video_tokens

    rows = []
    for name, (config, stride, (height, width, frames), steps) in REAL.items():
        shape = DiTShape.from_config(config)
        tokens = video_tokens(height, width, frames, spatial_stride=stride, patch_size=shape.patch_size)
        default, lightning = run_flops(shape, tokens, steps, True), run_flops(shape, tokens, LIGHTNING_STEPS, False)
        rows.append({"model": name, "steps": steps, "tokens": tokens, "default_pflop": default / 1e15,
                     "lightning_pflop": lightning / 1e15, "ratio": default / lightning})  # fmt: skip
    return rows


def build_model(model_dir: Path, layers: int, text_layers: int) -> None:
    """Save the random-weight pipeline as ``WanPipeline(expand_timesteps=True)`` (Wan2.2-TI2V-5B's layout)."""
    from diffusers import WanPipeline
    from ref_pipeline import tiny_scheduler
    from ref_text import build_text_encoder, build_tiny_tokenizer
    from ref_transformer import build_transformer
    from ref_vae import build_tiny_vae

    parts = model_dir.with_name(model_dir.name + ".parts")
    shutil.rmtree(parts, ignore_errors=True)
    pipe = WanPipeline(
        tokenizer=build_tiny_tokenizer(parts / "tokenizer"),
        text_encoder=build_text_encoder(None, dict(UMT5_XXL, vocab_size=512, num_layers=text_layers)),
        vae=build_tiny_vae(parts / "vae", "2.2"),
        scheduler=tiny_scheduler(5.0),
        transformer=build_transformer(parts / "transformer", dict(TI2V_5B_TRANSFORMER, num_layers=layers)),
        transformer_2=None,
        boundary_ratio=None,
        expand_timesteps=True,
    )
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    shutil.rmtree(parts)
    tmp.rename(model_dir)  # a half-written model is never mistaken for a cached one


def measure(pipe, job: dict[str, Any], **sampling) -> dict[str, Any]:
    """One generation of the job; its stage times, CPU time, load average, settings and transformer FLOPs."""
    from PIL import Image

    from mlx_i2v.flops import DiTShape, video_tokens

    y, x = np.mgrid[0 : job["height"], 0 : job["width"]]
    photo = Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8))
    shape = (1, 48, (job["frames"] - 1) // 4 + 1, job["height"] // 16, job["width"] // 16)
    noise = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    load_before = os.getloadavg()[0]
    cpu, start = os.times(), time.perf_counter()
    video = pipe(photo, PROMPT, height=job["height"], width=job["width"], num_frames=job["frames"], seed=0,
                 latents=noise, **sampling)  # fmt: skip
    wall, after = time.perf_counter() - start, os.times()
    m = video.metadata
    cfg = m["guidance_scale"] > 1
    dit = DiTShape.from_config(pipe.dims.transformer)
    tokens = video_tokens(m["height"], m["width"], m["num_frames"], spatial_stride=16, patch_size=dit.patch_size)
    return {
        "scheduler": m["scheduler"], "steps": m["num_inference_steps"], "guidance": m["guidance_scale"],
        "shift": m["flow_shift"], "sigmas": m["sigmas"], "passes": m["num_inference_steps"] * (2 if cfg else 1),
        "tokens": tokens, "tflop": run_flops(dit, tokens, m["num_inference_steps"], cfg) / 1e12,
        "seconds": video.stats["seconds"], "wall_s": wall,
        "cpu_s": (after.user + after.system) - (cpu.user + cpu.system),
        "loadavg_before_after": [load_before, os.getloadavg()[0]],
    }  # fmt: skip


def markdown(report: dict[str, Any]) -> str:
    job, mach, d, q = report["job"], report["machine"], report["default"], report["lightning"]
    real = "\n".join(
        f"| {r['model']} | {r['steps']} x 2 | {r['default_pflop']:.2f} | {r['lightning_pflop']:.3f} | **{r['ratio']:.1f}x** |"
        for r in report["real_sizes"]
    )  # fmt: skip
    rows = [("transformer passes", d["passes"], q["passes"], "{:d}"),
            ("transformer TFLOP (arithmetic)", d["tflop"], q["tflop"], "{:.2f}"),
            ("text encoder (s)", d["seconds"]["text"], q["seconds"]["text"], "{:.2f}"),
            ("image encode (s)", d["seconds"]["image"], q["seconds"]["image"], "{:.2f}"),
            ("**denoise (s)**", d["seconds"]["denoise"], q["seconds"]["denoise"], "{:.2f}"),
            ("VAE decode (s)", d["seconds"]["decode"], q["seconds"]["decode"], "{:.2f}"),
            ("**end to end (s)**", d["wall_s"], q["wall_s"], "{:.2f}"),
            ("end to end, CPU time (s)", d["cpu_s"], q["cpu_s"], "{:.2f}")]  # fmt: skip
    table = "\n".join(f"| {name} | {f.format(a)} | {f.format(b)} | {a / b:.1f}x |" for name, a, b, f in rows)
    load = lambda r: "{:.1f} -> {:.1f}".format(*r["loadavg_before_after"])  # noqa: E731
    lightning_grid = ", ".join(f"{s:g}" for s in q["sigmas"])
    return f"""{report['marker']}
### {mach.get('cpu', '?')}, {mach['cores']} cores, {mach.get('ram_gb', '?')} GB RAM ({report['date'][:10]})

FLOPs at the real sizes (transformer only; the default run guided, Lightning one pass a step):

| model, job | default steps x passes | default PFLOP | Lightning (4 x 1) PFLOP | default / Lightning |
|---|---|---:|---:|---:|
{real}

Measured: mlx {mach['mlx']} on `{report['device']}`, {job['dtype']}; TI2V-5B widths with {job['layers']} transformer
block(s), umt5-xxl widths with {job['text_layers']} layer, the tiny Wan2.2 VAE; height {job['height']} x width {job['width']},
{job['frames']} frames ({d['tokens']} video tokens); every model kept loaded after a warm-up run. Default:
{d['steps']} {d['scheduler']} steps, guidance {d['guidance']:g}, shift {d['shift']:g}. Lightning: {q['steps']} {q['scheduler']} steps on sigmas
{lightning_grid}, guidance {q['guidance']:g}, shift {q['shift']:g}. 1-minute load average before -> after: default {load(d)},
Lightning {load(q)}{report['load_note']}.

| | default | Lightning | default / Lightning |
|---|---:|---:|---:|
{table}
<!-- /{report['marker'][5:-4]} -->
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "mlx-i2v-bench")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--layers", type=int, default=1, help="transformer blocks (30 in TI2V-5B)")
    parser.add_argument("--text-layers", type=int, default=1, help="UMT5 layers (24 in umt5-xxl)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--load-note", default="", help="what else ran on the machine, for the README")
    parser.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "few_step.json")
    parser.add_argument("--no-readme", action="store_true", help="do not write benchmarks/README.md")
    args = parser.parse_args()

    import mlx.core as mx

    from mlx_i2v import load_pipeline

    model_dir = args.cache_dir / f"ti2v5b-widths-l{args.layers}-t{args.text_layers}-tinyvae"
    if not model_dir.exists():
        print(f"building {model_dir.name} ...", flush=True)
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        build_model(model_dir, args.layers, args.text_layers)
    job = {"height": args.height, "width": args.width, "frames": args.frames, "layers": args.layers,
           "text_layers": args.text_layers, "dtype": args.dtype}  # fmt: skip
    # Every model stays loaded after a one-step warm-up, so that the stage times are compute, not loading.
    pipe = load_pipeline(model_dir, dtype=args.dtype, keep_resident=True, keep_experts_resident=True)
    measure(pipe, job, num_inference_steps=1)
    runs = {}
    for name, sampling in (("lightning", {"preset": "lightning"}), ("default", {})):
        print(f"running {name} ...", flush=True)
        runs[name] = measure(pipe, job, **sampling)
    mach = machine()
    key = re.sub(r"[^a-z0-9]+", "-", f"{mach.get('cpu', '')}-{mach['cores']}c-{args.height}x{args.width}x"
                 f"{args.frames}-l{args.layers}-{args.dtype}".lower())  # fmt: skip
    note = f"; {args.load_note}" if args.load_note else ""
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "marker": f"<!-- few-step:{key} -->",
              "machine": mach, "device": str(mx.default_device()), "job": job, "real_sizes": real_size_table(),
              "load_note": note, **runs}  # fmt: skip
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    section = markdown(report)
    if not args.no_readme:
        write_readme(section, report["marker"], end=FEW_STEP_END)
    print(section)


if __name__ == "__main__":
    main()
