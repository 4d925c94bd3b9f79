"""Time one VAE convolution by each method, with its kernel stored in PyTorch's or MLX's order, next to
the method :func:`mlx_i2v.models.conv.conv_plan` picks for that order.

Methods: one matmul on gathered rows (reads the kernel in place), Winograd F(2x2, 3x3) and F(4x4, 3x3)
(where the frame size allows it) and per-tap matmuls (all three after the copy to tap-major order that
:func:`~mlx_i2v.models.conv.conv3d` makes for such kernels). The shapes are the LTX-Video 0.9.5 VAE's and
the narrow Wan VAE's at 256x384. Random weights, float32, best of 2; malloc keeps freed memory as the
pipeline sets it.

    python benchmarks/conv_layouts.py torch     # the LTX VAE's kernels, as loaded from diffusers
    python benchmarks/conv_layouts.py mlx       # row-major in MLX's shape (the latent upsampler's)
"""

from __future__ import annotations

import sys
import time

import mlx.core as mx

from mlx_i2v import runtime
from mlx_i2v.models import conv

# (input frames incl. the two of time padding, height, width, C in, C out)
SHAPES = [
    (7, 8, 12, 1024, 1024), (7, 8, 12, 1024, 4096), (3, 8, 12, 2048, 2048), (3, 64, 96, 48, 128),
    (3, 64, 96, 128, 128), (3, 32, 48, 256, 256), (3, 16, 24, 512, 512), (11, 16, 24, 512, 512),
    (11, 16, 24, 512, 2048), (19, 32, 48, 256, 256), (7, 8, 12, 128, 1024), (6, 16, 24, 128, 128),
    (12, 32, 48, 64, 64),
]  # fmt: skip


def best_of(fn, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        best = min(best, time.perf_counter() - start)
    return best


def main(layout: str) -> None:
    runtime.keep_freed_memory()
    print(
        "| input (frames, h, w, C -> O) | gathered rows | Winograd F(2x2) | Winograd F(4x4) | per-tap "
        f"| plan picks ({layout} order) |"
    )
    print("|---|---:|---:|---:|---:|---|")
    for t, h, w, c, o in SHAPES:
        x = mx.random.normal((t, h, w, c))
        torch_order = mx.random.normal((o, c, 3, 3, 3)) * 0.02
        bias = mx.zeros((o,))
        mx.eval(x, torch_order, bias)
        weight = torch_order.transpose(0, 2, 3, 4, 1)
        if layout == "mlx":
            weight = mx.contiguous(weight)
            mx.eval(weight)
        seconds = {
            "unfold": best_of(lambda: conv._unfold_one_video(x, weight, bias, (1, 1), layout)),
            **{
                tiles.method: best_of(lambda: conv.winograd_conv3d(x[None], conv.tap_major(weight), bias, tiles))
                for tiles in conv.winograd_tiles(h, w)
            },
            "taps": best_of(lambda: conv._taps_one_video(x, conv.tap_major(weight), bias, (1, 1))),
        }
        pick = conv.conv_plan(t - 2, 3, h, w, c, o, 4, 1 << 40, True, layout)[0]
        fastest = min(seconds, key=seconds.get)
        methods = ["unfold", *conv.WINOGRAD, "taps"]  # a tiling that does not fit the frame is "-"
        cells = " | ".join(
            "-" if m not in seconds else f"**{seconds[m]:.3f} s**" if m == fastest else f"{seconds[m]:.3f} s"
            for m in methods
        )
        print(f"| {t - 2} x {h}x{w}, {c} -> {o} | {cells} | {pick} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "torch")
