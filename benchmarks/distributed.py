"""Several processes, one clip: what each parallel mode exchanges, and what it costs here.

Two parts:

1. **Bytes per step at the real sizes**, counted from the code (``mlx_i2v.parallel.traffic``, the same
   counts the exchanges add up at run time), for Wan2.2-TI2V-5B at 1280x704x121 and the Wan 14B models
   (Wan2.1-I2V-14B, each Wan2.2-A14B expert) at 1280x720x81 and 832x480x81, bfloat16 as on a Mac, with
   the time those bytes take on Thunderbolt 5, Thunderbolt 4 and 10 GbE next to each rank's compute at
   10 TFLOP/s (an M-series Max).
2. **A measured run on this machine**: the denoising loop of a transformer with TI2V-5B widths (random
   weights, ``--layers`` blocks) in one process, then as 2 ranks in CFG and in sequence mode (and 4
   ranks with ``--ranks 4``) over the ring backend on 127.0.0.1: seconds per step, each rank's counted
   bytes against the formula, and the final latents against the single process.

    python benchmarks/distributed.py                 # a few minutes on 2 cores
    python benchmarks/distributed.py --ranks 4 --no-readme

Results go to ``benchmarks/distributed.json`` and a section of ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).parent
README = HERE / "README.md"
MARKER = "<!-- distributed -->"
END_MARKER = "<!-- /distributed -->"
LINKS_GB_S = {"Thunderbolt 5 (6 GB/s)": 6.0, "Thunderbolt 4 (3 GB/s)": 3.0, "10 GbE (1.1 GB/s)": 1.1}
MAC_TFLOPS = 10.0
MODES = {  # name -> (ranks, parallel mode)
    "cfg, 2 ranks": (2, "cfg"),
    "sequence, 2 ranks": (2, "sequence"),
    "cfg x sequence, 4 ranks": (4, "auto"),
    "sequence, 4 ranks": (4, "sequence"),
}


# --- part 1: the budget at the real sizes --------------------------------------------------------------


def real_sizes() -> list[dict[str, Any]]:
    from mlx_i2v.models.wan.transformer import WanTransformerConfig
    from mlx_i2v.families.wan.planner import TI2V_5B_TRANSFORMER

    wan14b = WanTransformerConfig(in_channels=36, out_channels=16)  # diffusers' defaults are the 14B widths
    return [
        {"model": "Wan2.2-TI2V-5B", "config": TI2V_5B_TRANSFORMER, "size": (704, 1280, 121), "stride": 16},
        {"model": "Wan 14B (2.1-I2V, 2.2-A14B expert)", "config": wan14b, "size": (720, 1280, 81), "stride": 8},
        {"model": "Wan 14B (2.1-I2V, 2.2-A14B expert)", "config": wan14b, "size": (480, 832, 81), "stride": 8},
    ]


def budget() -> list[dict[str, Any]]:
    import mlx.core as mx

    from mlx_i2v.flops import DiTShape, step_flops, video_tokens
    from mlx_i2v.parallel import choose_layout
    from mlx_i2v.parallel.traffic import step_bytes

    rows = []
    for case in real_sizes():
        config, (height, width, frames), stride = case["config"], case["size"], case["stride"]
        latent = ((frames - 1) // 4 + 1, height // stride, width // stride)
        tokens = video_tokens(height, width, frames, spatial_stride=stride)
        flops = step_flops(DiTShape.from_config(config), tokens, cfg=True)
        for name, (ranks, mode) in MODES.items():
            layout = choose_layout(mode, ranks, guided=True)
            counted = step_bytes(config, latent, layout, True, mx.bfloat16)
            total = sum(counted.values())
            compute_s = flops / ranks / (MAC_TFLOPS * 1e12)
            rows.append({
                "model": case["model"], "size": f"{width}x{height}x{frames}", "tokens": tokens, "mode": name,
                "bytes": counted, "total_bytes": total, "compute_s": compute_s,
                "link_s": {link: total / (gb_s * 1e9) for link, gb_s in LINKS_GB_S.items()},
            })  # fmt: skip
    return rows


# --- part 2: measured on this machine -------------------------------------------------------------------


def rank_job(job: dict[str, Any]) -> None:
    """One rank (or the single process): the loop on random weights; rank 0 saves latents and timings."""
    import mlx.core as mx

    from mlx_i2v.conditioning import FirstFrameLatent
    from mlx_i2v.denoise import COND, UNCOND, Denoiser
    from mlx_i2v.experts import Experts
    from mlx_i2v.models.wan.transformer import WanTransformer3DModel
    from mlx_i2v.parallel import join
    from mlx_i2v.families.wan.planner import TI2V_5B_TRANSFORMER
    from mlx_i2v.schedulers import FlowUniPCMultistepScheduler

    parallel = join(job["parallel"])
    config = dataclasses.replace(TI2V_5B_TRANSFORMER, num_layers=job["layers"])
    mx.random.seed(0)  # the same random weights on every rank
    model = WanTransformer3DModel(config)
    mx.eval(model.parameters())
    T, h, w = job["latent"]
    text = {b: mx.random.normal((1, 512, config.text_dim), key=mx.random.key(i)) * 0.1
            for i, b in enumerate((COND, UNCOND))}  # fmt: skip
    latents = mx.random.normal((1, T, h, w, config.in_channels), key=mx.random.key(7))
    scales = (5.0,)
    parallel.agree({"job": job}, 0)  # as the pipeline does: same job everywhere, and a fresh traffic count
    guidance, forward = parallel.strategies(scales)
    denoiser = Denoiser(Experts([lambda: model]), FirstFrameLatent(), mx.float32, guidance, forward)
    sampler = FlowUniPCMultistepScheduler(flow_shift=5.0)
    sampler.set_timesteps(job["steps"], shift=5.0)
    ends: list[float] = []
    load = os.getloadavg()[0]
    start = time.perf_counter()
    final = denoiser(sampler, latents, None, text, None, scales, observe=lambda *_: ends.append(time.perf_counter()))
    steps = np.diff([start, *ends])
    out = Path(job["out"])
    result = {"rank": parallel.rank, "step_s": steps.tolist(), "loadavg": [load, os.getloadavg()[0]],
              "parallel": parallel.stats(scales)}  # fmt: skip
    (out / f"rank{parallel.rank}.json").write_text(json.dumps(result))
    if parallel.rank == 0:
        np.save(out / "latents.npy", np.array(final))


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def launch(ranks: int, job: dict[str, Any], work: Path) -> list[dict[str, Any]]:
    """Run ``job`` as ``ranks`` local processes over the ring backend (one process: no launcher at all)."""
    out = work / f"{job['parallel']}-{ranks}"
    out.mkdir(parents=True, exist_ok=True)
    job = {**job, "out": str(out)}
    spec = out / "job.json"
    spec.write_text(json.dumps(job))
    hostfile = out / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in _free_ports(ranks)]))
    procs = []
    for rank in range(ranks):
        env = dict(os.environ)
        if ranks > 1:
            env.update(MLX_RANK=str(rank), MLX_HOSTFILE=str(hostfile))
        procs.append(subprocess.Popen([sys.executable, __file__, "--rank-job", str(spec)], env=env,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    for rank, proc in enumerate(procs):
        _, err = proc.communicate()
        if proc.returncode != 0:
            sys.exit(f"rank {rank} of {job['parallel']} failed ({proc.returncode}):\n{err[-3000:]}")
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
    results[0]["latents"] = np.load(out / "latents.npy")
    return results


def measure(layers: int, latent: tuple[int, int, int], steps: int, max_ranks: int, work: Path) -> list[dict]:
    import mlx.core as mx

    from mlx_i2v.parallel import choose_layout
    from mlx_i2v.parallel.traffic import step_bytes
    from mlx_i2v.families.wan.planner import TI2V_5B_TRANSFORMER

    config = dataclasses.replace(TI2V_5B_TRANSFORMER, num_layers=layers)
    job = {"layers": layers, "latent": list(latent), "steps": steps}
    single = launch(1, {**job, "parallel": "none"}, work)[0]
    rows = [{"mode": "one process", "ranks": 1, "step_s": single["step_s"], "loadavg": single["loadavg"],
             "max_diff": 0.0, "bytes_per_step": 0, "formula_per_step": 0}]  # fmt: skip
    for name, (ranks, mode) in MODES.items():
        if ranks > max_ranks:
            continue
        print(f"measuring {name} ...", file=sys.stderr)
        results = launch(ranks, {**job, "parallel": mode}, work)
        layout = choose_layout(mode, ranks, guided=True)
        formula = sum(step_bytes(config, latent, layout, True, mx.float32).values())
        counted = [r["parallel"]["total_bytes_received"] - r["parallel"]["bytes_received"].get("start-up", 0)
                   for r in results]  # fmt: skip
        rows.append({
            "mode": name, "ranks": ranks, "step_s": results[0]["step_s"], "loadavg": results[0]["loadavg"],
            "max_diff": float(np.abs(results[0]["latents"] - single["latents"]).max()),
            "bytes_per_step": max(counted) / steps, "formula_per_step": formula,
            "counted_equals_formula": all(c == formula * steps for c in counted),
            "wait_s": [r["parallel"]["wait_seconds"] for r in results],
        })  # fmt: skip
    return rows


# --- report ------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import re

    import mlx.core as mx

    info: dict[str, Any] = {"os": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count(),
                            "mlx": mx.__version__, "cpu": platform.processor()}  # fmt: skip
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), flags=re.M)
        info["cpu"] = names[0].strip() if names else info["cpu"]
    info["blas"] = os.environ.get("LD_PRELOAD", "MLX's bundled BLAS")
    return info


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g}" if n >= 1e8 else f"{n / 1e9:.2g}"


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [MARKER, "## Parallel generation (`distributed.py`)", "",
             "Bytes each rank receives per denoising step (both guidance branches), counted from the code "
             "(`mlx_i2v/parallel/traffic.py`), bfloat16; link time assumes no overlap with compute, next to "
             f"each rank's compute at {MAC_TFLOPS:g} TFLOP/s:", "",
             "| model | size (tokens) | mode | GB / step / rank | compute s / rank | "
             + " | ".join(LINKS_GB_S) + " |",
             "|---|---|---|---:|---:|" + "---:|" * len(LINKS_GB_S)]  # fmt: skip
    for r in report["budget"]:
        links = " | ".join(f"{s:.2g} s ({100 * s / r['compute_s']:.1f} %)" for s in r["link_s"].values())
        lines.append(f"| {r['model']} | {r['size']} ({r['tokens']:,}) | {r['mode']} | {_gb(r['total_bytes'])} | "
                     f"{r['compute_s']:.0f} | {links} |")  # fmt: skip
    run = report["run"]
    blocks = f"{run['layers']} block{'s' * (run['layers'] != 1)}"
    lines += ["", f"Measured on {m['cpu']}, {m['cores']} cores ({m['os']}, mlx {m['mlx']}, BLAS {m['blas']}), "
              f"{report['date']}: the denoising loop of a TI2V-5B-width transformer with {blocks} "
              f"(random weights, float32), latent grid {'x'.join(map(str, run['latent']))} "
              f"({run['tokens']} tokens), {run['steps']} UniPC steps with guidance 5, ranks on 127.0.0.1 "
              "(ring backend). Other helpers' jobs shared these cores during the run: see the load average.", "",
              "| mode | ranks | s / step (steps 2+) | first step (s) | MB received / step / rank | formula | "
              "max abs diff vs one process | load avg |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in run["rows"]:
        later = np.median(r["step_s"][1:]) if len(r["step_s"]) > 1 else r["step_s"][0]
        same = "" if r["ranks"] == 1 else (" (=)" if r.get("counted_equals_formula") else " (differs!)")
        lines.append(f"| {r['mode']} | {r['ranks']} | {later:.2f} | {r['step_s'][0]:.2f} | "
                     f"{r['bytes_per_step'] / 1e6:.2f} | {r['formula_per_step'] / 1e6:.2f}{same} | "
                     f"{r['max_diff']:.1e} | {r['loadavg'][0]:.1f} -> {r['loadavg'][1]:.1f} |")  # fmt: skip
    lines += ["", "Reading it: the ranks here share the same two cores, so two processes cannot be faster than one; "
              "the runs verify that each mode gives the single-process result and exchanges exactly the "
              "counted bytes (`(=)`: every rank's count equals the formula). The load average shows how "
              "much other work shared the machine. On separate Macs each rank has its own chip: CFG then "
              "halves the step time, and the table above bounds what the link adds.", "", END_MARKER]
    return "\n".join(lines) + "\n"


def write_readme(section: str) -> None:
    text = README.read_text()
    if MARKER in text and END_MARKER in text:
        before, rest = text.split(MARKER, 1)
        text = before + section.rstrip("\n") + rest.split(END_MARKER, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    README.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank-job", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=1, help="transformer blocks (TI2V-5B has 30)")
    parser.add_argument("--latent", default="3x16x24", help="latent grid TxHxW (tokens: T*H/2*W/2)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=2, choices=(2, 4), help="also measure the 4-rank modes")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "mlx-i2v-bench" / "distributed")
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    if args.rank_job:
        rank_job(json.loads(Path(args.rank_job).read_text()))
        return
    latent = tuple(int(n) for n in args.latent.lower().split("x"))
    report = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "budget": budget()}
    rows = measure(args.layers, latent, args.steps, args.ranks, args.work)
    tokens = latent[0] * (latent[1] // 2) * (latent[2] // 2)
    report["run"] = {"layers": args.layers, "latent": latent, "tokens": tokens, "steps": args.steps, "rows": rows}
    (HERE / "distributed.json").write_text(json.dumps(report, indent=2, default=str))
    section = markdown(report)
    print(section)
    if not args.no_readme:
        write_readme(section)


if __name__ == "__main__":
    main()
