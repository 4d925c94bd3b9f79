"""What a step preview costs next to the denoising step it accompanies, at real latent sizes.

The preview (``mlx_i2v.preview.Preview``) is measured as the CLI uses it: ``image()`` (four latent frames
projected to RGB and scaled to 160 px high) written atomically to a PNG, and as an app might use it:
``frames()``, every latent frame. The step is the real model's: this machine's achieved FLOP/s is
measured on one TI2V-5B-width transformer block (random weights, float32) and the step time of each full
model at its latent size is that rate applied to its FLOP count (``mlx_i2v.flops``, classifier-free
guidance on). Attention over more tokens is no cheaper per FLOP, so the step estimate errs on the fast
side and the ratio on the high side. For machines faster than this one, the ratio is also given for a
step run at a sustained 20 TFLOP/s, more than an Apple-silicon GPU delivers.

Usage::

    python benchmarks/preview_cost.py            # TI2V-5B 1280x704x121 and Wan2.1-14B 832x480x81
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_i2v.flops import DiTShape, forward_flops, step_flops, video_tokens
from mlx_i2v.models.wan.transformer import WanTransformer3DModel, WanTransformerConfig
from mlx_i2v.preview import LATENT_RGB, Preview, write_png_atomically

CASES = {
    # name: (transformer config, VAE spatial stride, latent channels, height, width, frames)
    "wan2.2-ti2v-5b 1280x704x121": (
        WanTransformerConfig(num_attention_heads=24, attention_head_dim=128, in_channels=48, out_channels=48,
                             ffn_dim=14336, num_layers=30),  # fmt: skip
        16, 48, 704, 1280, 121,
    ),
    "wan2.1-i2v-14b 832x480x81": (
        WanTransformerConfig(in_channels=36, out_channels=16, image_dim=1280, added_kv_proj_dim=5120),
        8, 16, 480, 832, 81,
    ),
}


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def achieved_flops_per_second(config: WanTransformerConfig, dtype: mx.Dtype = mx.float32) -> float:
    """FLOP/s of one real-width block with guidance's batch of two, on a 768-token clip."""
    one = replace(config, num_layers=1)
    model = WanTransformer3DModel(one)
    model.set_dtype(dtype)
    grid = (2, 24, 64)  # latent frames, height, width: 2 * 12 * 32 = 768 tokens
    x = mx.random.normal((2, *grid, one.in_channels)).astype(dtype)
    text = mx.random.normal((2, 512, one.text_dim)).astype(dtype)
    context = model.cross_attention_cache(model.embed_context(text))
    mx.eval(model.parameters(), x, context)
    seconds = _median_seconds(lambda: mx.eval(model(x, mx.array([500.0, 500.0]), context=context)), repeats=3)
    tokens = grid[0] * (grid[1] // 2) * (grid[2] // 2)
    return forward_flops(DiTShape.from_config(one), tokens, batch=2) / seconds


FAST = 20e12  # FLOP/s


def main() -> None:
    rate = achieved_flops_per_second(next(iter(CASES.values()))[0])
    print(f"this machine: {rate / 1e9:.1f} GFLOP/s on a TI2V-5B-width block (float32)")
    for name, (config, stride, channels, height, width, frames) in CASES.items():
        latent = (1, (frames - 1) // 4 + 1, height // stride, width // stride, channels)
        x0 = mx.random.normal(latent)
        mx.eval(x0)
        preview = Preview(x0, LATENT_RGB[channels], lambda latents: latents)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "preview.png"
            cli = _median_seconds(lambda: write_png_atomically(preview.image(), path), repeats=10)
        every = _median_seconds(preview.frames, repeats=10)
        tokens = video_tokens(height, width, frames, spatial_stride=stride)
        flop = step_flops(DiTShape.from_config(config), tokens, cfg=True)
        step, fast = flop / rate, flop / FAST
        print(f"{name}: latent {latent[1:4]}, {tokens} tokens, {flop:.3g} FLOP per step: ~{step:.0f} s here, "
              f"{fast:.0f} s at 20 TFLOP/s")  # fmt: skip
        for what, seconds in (("image + PNG (the CLI)", cli), (f"frames(), all {latent[1]}", every)):
            print(f"  preview {what}: {seconds * 1e3:.1f} ms = {100 * seconds / step:.5f} % of a step here, "
                  f"{100 * seconds / fast:.3f} % at 20 TFLOP/s")  # fmt: skip


if __name__ == "__main__":
    np.random.seed(0)
    main()
