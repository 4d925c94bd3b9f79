"""Measure the LTX-Video VAE's peak activation memory and compare it with the planner's estimate.

Builds a random-weight VAE of a released generation at its real widths or narrowed (MLX only, no PyTorch), then for
each requested size decodes (or encodes) once and records MLX's peak allocation above the weights, next
to :func:`mlx_i2v.models.ltx.vae_memory.decode_activation_bytes` /
:func:`~mlx_i2v.models.ltx.vae_memory.encode_activation_bytes`. The constants in ``vae_memory.py`` were
fitted on this script's output (see there).

    python benchmarks/ltx_vae_memory.py --generation 0.9.5 --decode 2x4x4 2x8x8 --encode 9x128x128
    python benchmarks/ltx_vae_memory.py --narrow 8 --budget-gb 4 --decode 3x16x24 --tile 256,192
    python benchmarks/ltx_vae_memory.py --narrow 8 --budget-gb 4 --decode 5x8x8 --temporal

Decode sizes are latent ``frames x height x width``; encode sizes are video ``frames x height x width``.
The memory budget (which sizes the convolutions' workspace) is fixed by ``--budget-gb``; ``--narrow N``
divides every block width by N (the structure stays; the compute falls by N squared). The points and
the fit are in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import mlx.core as mx

from mlx_i2v.memory import set_memory_limit
from mlx_i2v.models.ltx.vae import GENERATION_CONFIGS, AutoencoderKLLTXVideo, LTXVAEConfig
from mlx_i2v.models.ltx.vae_memory import decode_activation_bytes, encode_activation_bytes
from mlx_i2v.models.ltx.vae_tiling import SpatialTiling, TemporalTiling, tiled_decode, tiled_encode


def _size(text: str) -> tuple[int, int, int]:
    t, h, w = (int(v) for v in text.split("x"))
    return t, h, w


def _measure(fn) -> tuple[int, float]:
    mx.synchronize()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    start = time.perf_counter()
    mx.eval(fn())
    mx.synchronize()
    return mx.get_peak_memory() - base, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generation", default="0.9.5", choices=sorted(GENERATION_CONFIGS))
    parser.add_argument("--decode", nargs="*", type=_size, default=[])
    parser.add_argument("--encode", nargs="*", type=_size, default=[])
    parser.add_argument("--tile", help="spatial tiling SIZE,STRIDE in video pixels")
    parser.add_argument("--temporal", action="store_true", help="temporal tiling (16 frames every 8)")
    parser.add_argument("--budget-gb", type=float, default=16.0)
    parser.add_argument("--narrow", type=int, default=1, help="divide every block width by this (cheaper runs)")
    args = parser.parse_args()
    set_memory_limit(args.budget_gb)
    spatial = None
    if args.tile:
        size, stride = (int(v) for v in args.tile.split(","))
        spatial = SpatialTiling(size, size, stride, stride)
    temporal = TemporalTiling() if args.temporal else None
    cfg = LTXVAEConfig(**GENERATION_CONFIGS[args.generation])
    if args.narrow > 1:
        cfg = replace(
            cfg,
            block_out_channels=tuple(c // args.narrow for c in cfg.block_out_channels),
            decoder_block_out_channels=tuple(c // args.narrow for c in cfg.decoder_block_out_channels),
        )
    for half, sizes in (("decoder", args.decode), ("encoder", args.encode)):
        if not sizes:
            continue
        vae = AutoencoderKLLTXVideo(cfg).keep_only(half)
        mx.eval(vae.parameters())
        for t, h, w in sizes:
            key = mx.random.key(t * 1000 + h * 10 + w)
            if half == "decoder":
                z = mx.random.normal((1, t, h, w, cfg.latent_channels), key=key)
                mx.eval(z)
                peak, seconds = _measure(lambda: tiled_decode(vae, z, 0.05, key, spatial, temporal))
                estimate = decode_activation_bytes(cfg, (t, h, w), mx.float32, spatial, temporal)
            else:
                video = mx.random.uniform(-1, 1, (1, t, h, w, 3), key=key)
                mx.eval(video)
                peak, seconds = _measure(lambda: tiled_encode(vae, video, spatial, temporal)[0])
                estimate = encode_activation_bytes(cfg, (t, h, w), mx.float32, spatial, temporal)
            record = {
                "generation": args.generation, "narrow": args.narrow, "budget_gb": args.budget_gb, "half": half,
                "size": [t, h, w], "tile": args.tile,
                "temporal": args.temporal, "peak_bytes": peak, "estimate_bytes": estimate,
                "estimate_over_peak": round(estimate / peak, 3), "seconds": round(seconds, 1),
            }  # fmt: skip
            print(json.dumps(record), flush=True)
        del vae


if __name__ == "__main__":
    main()
