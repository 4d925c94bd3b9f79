"""Time the VAE convolutions by each method and check :func:`mlx_i2v.models.conv.conv_plan`'s choice.

Two parts, each comparing the alternatives within one run (alternating, best of ``--repeats``) so that
other load on the machine affects them alike:

- **Single convolutions** at the shapes that dominate the VAEs (random weights, float32, tap-major
  kernels): Winograd by F(2x2, 3x3) and by F(4x4, 3x3) tiles (the kernel transform included: it runs
  once per call), per-tap matmuls, and the method ``conv_plan`` picks with its cost model.
- **Whole VAE calls** (``--vae``): the LTX-Video 0.9.5 VAE (real widths, random weights) encoding one
  256x384 frame and decoding 5 latent frames at 8x12, and the narrow Wan2.2 VAE (``compare_diffusers.py
  --vae small``) decoding 11 latent frames at 16x24; "after" is the library as it is, "before" the
  library without one change (``--before``): ``phases-apart`` queues the Winograd phases together, as
  before they ran apart on the CPU; ``winograd4x4`` allows F(2x2, 3x3) tiles only, as before F(4x4, 3x3).

    python benchmarks/conv_speed.py                 # single convolutions, ~2 minutes on 2 cores
    python benchmarks/conv_speed.py --vae ltx wan   # plus the whole VAE calls, ~10 minutes
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import mlx.core as mx

from mlx_i2v.models import conv
from mlx_i2v.runtime import keep_freed_memory

# (name, output frames, height, width, C in, C out): the LTX VAE at 256x384x33 (latents 5x8x12; the image
# encode sees one frame), the real and the narrow Wan2.2 VAE decoding 256x384 (latents 16x24).
SHAPES = [
    ("LTX encoder 2048 ch, 1 frame 8x12", 1, 8, 12, 2048, 2048),
    ("LTX decoder 1024 ch, 5 frames 8x12", 5, 8, 12, 1024, 1024),
    ("LTX decoder upsampler 1024 -> 4096, 5 x 8x12", 5, 8, 12, 1024, 4096),
    ("LTX decoder 512 ch, 9 frames 16x24", 9, 16, 24, 512, 512),
    ("Wan real 1024 ch, 1 frame 16x24", 1, 16, 24, 1024, 1024),
    ("Wan real 512 ch, 4 frames 64x96", 4, 64, 96, 512, 512),
    ("Wan real 256 ch, 4 frames 128x192", 4, 128, 192, 256, 256),
    ("Wan narrow 128 ch, 2 frames 32x48", 2, 32, 48, 128, 128),
    ("Wan narrow 64 ch, 4 frames 64x96", 4, 64, 96, 64, 64),
    ("Wan narrow 32 ch, 4 frames 128x192", 4, 128, 192, 32, 32),
]


def best_of(fn: Callable[[], mx.array], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        mx.synchronize()
        start = time.perf_counter()
        mx.eval(fn())
        mx.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def single_convolutions(repeats: int) -> None:
    methods = [*conv.WINOGRAD, "taps"]
    print("| convolution | Winograd F(2x2) | Winograd F(4x4) | per-tap | plan picks | plan's time |")
    print("|---|---:|---:|---:|---|---:|")
    for name, frames, h, w, c, o in SHAPES:
        x = mx.random.normal((frames + 2, h, w, c))
        stored = conv.tap_major(mx.random.normal((o, 3, 3, 3, c)) * 0.01)
        mx.eval(x, stored)
        runs = {
            tiles.method: lambda tiles=tiles: conv.winograd_conv3d(x[None], stored, None, tiles)
            for tiles in conv.winograd_tiles(h, w)
        }
        runs["taps"] = lambda: conv._taps_one_video(x, stored, None, (1, 1))
        times: dict[str, float] = {k: float("inf") for k in runs}
        for _ in range(repeats):  # alternate, so that load changes hit every method alike
            for key, run in runs.items():
                times[key] = min(times[key], best_of(run, 1))
        method = conv.conv_plan(frames, 3, h, w, c, o, 4, 1 << 40)[0]
        cells = " | ".join(f"{times[m]:.3f} s" if m in times else "-" for m in methods)
        print(f"| {name} | {cells} | {method} | {times[method]:.3f} s |", flush=True)


@contextmanager
def without_winograd4x4() -> Iterator[None]:
    """Winograd by F(2x2, 3x3) tiles only, as the library was before F(4x4, 3x3)."""
    tilings = dict(conv.WINOGRAD)
    conv.WINOGRAD.clear()
    conv.WINOGRAD[conv.F2X2.method] = conv.F2X2
    try:
        yield
    finally:
        conv.WINOGRAD.update(tilings)


@contextmanager
def without_phases_apart() -> Iterator[None]:
    """The Winograd phases queued together, as the library did before it evaluated each apart."""
    apart = conv._phase_apart
    conv._phase_apart = lambda phase: phase
    try:
        yield
    finally:
        conv._phase_apart = apart


BEFORE = {"phases-apart": without_phases_apart, "winograd4x4": without_winograd4x4}


def ltx_calls() -> list[tuple[str, Callable[[], mx.array]]]:
    from mlx_i2v.models.ltx.vae import GENERATION_CONFIGS, AutoencoderKLLTXVideo, LTXVAEConfig

    vae = AutoencoderKLLTXVideo(LTXVAEConfig(**GENERATION_CONFIGS["0.9.5"]))
    mx.eval(vae.parameters())
    frame = mx.random.uniform(-1, 1, (1, 1, 256, 384, 3))
    z = mx.random.normal((1, 5, 8, 12, 128))
    return [
        ("LTX 0.9.5 encode, 1 frame 256x384", lambda: vae.encode(frame)[0]),
        ("LTX 0.9.5 decode, 5 x 8x12 latents", lambda: vae.decode(z, 0.05)),
    ]


def wan_calls() -> list[tuple[str, Callable[[], mx.array]]]:
    from mlx_i2v.models.wan.vae import AutoencoderKLWan, WanVAEConfig

    cfg = WanVAEConfig(
        base_dim=20, decoder_base_dim=32, z_dim=48, dim_mult=(1, 2, 4, 4), num_res_blocks=2, attn_scales=(),
        temperal_downsample=(False, True, True), is_residual=True, in_channels=12, out_channels=12,
        patch_size=2, scale_factor_spatial=16, latents_mean=(0.0,) * 48, latents_std=(1.0,) * 48,
    )  # fmt: skip
    vae = AutoencoderKLWan(cfg)
    mx.eval(vae.parameters())
    z = mx.random.normal((1, 11, 16, 24, 48))
    vae.decode(z[:, :1])  # stores the kernels tap-major (on first use)
    return [("narrow Wan2.2 decode, 11 x 16x24 latents", lambda: vae.decode(z))]


def vae_calls(which: list[str], repeats: int, before_this_change: Callable[[], Iterator[None]]) -> None:
    print("\n| VAE call | before | after | after / before |")
    print("|---|---:|---:|---:|")
    for family in which:
        for name, run in {"ltx": ltx_calls, "wan": wan_calls}[family]():
            before, after = float("inf"), float("inf")
            for _ in range(repeats):
                with before_this_change():
                    before = min(before, best_of(run, 1))
                after = min(after, best_of(run, 1))
            print(f"| {name} | {before:.2f} s | {after:.2f} s | {after / before:.2f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vae", nargs="*", default=[], choices=["ltx", "wan"])
    parser.add_argument("--no-single", action="store_true", help="skip the single convolutions")
    parser.add_argument(
        "--before", choices=sorted(BEFORE), default="phases-apart", help="the change the VAE calls are timed without"
    )
    args = parser.parse_args()
    keep_freed_memory()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, mlx {mx.__version__} on "
          f"{mx.default_device()}; 1-minute load average before: {os.getloadavg()[0]:.1f}")  # fmt: skip
    if not args.no_single:
        single_convolutions(args.repeats)
    if args.vae:
        vae_calls(args.vae, args.repeats, BEFORE[args.before])
    print(f"1-minute load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
