"""How large should a token chunk of a block's feed-forward be? Times mlx-i2v's tanh-GELU feed-forward at
one shape with several workspaces (the bytes of (tokens, ffn_dim) intermediates one chunk may hold, as
``models.layers.by_token_chunks`` cuts it), next to diffusers' ``FeedForward`` on the same inputs, and
reports each one's time and MLX's peak memory above its inputs and weights.

    python benchmarks/feed_forward_chunks.py                          # TI2V-5B's, compare_diffusers job
    python benchmarks/feed_forward_chunks.py --shape 2 1056 5120 13824  # Wan 14B's widths

Each variant runs ``--repeats`` times, interleaved with the others (``interleaved.py``).
"""

from __future__ import annotations

import argparse
import os

import mlx.core as mx
import numpy as np

from interleaved import report, time_interleaved

from mlx_i2v.memory import GB, set_memory_limit
from mlx_i2v.models import layers

MB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=4, default=(2, 1056, 3072, 14336), metavar=("B", "L", "DIM", "FFN"))
    parser.add_argument("--workspaces-mb", type=int, nargs="+", default=(1024, 128, 64, 32))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    b, length, dim, inner = args.shape
    ffn = layers.FeedForward(dim, inner, dim, approximate=True)
    x_np = np.random.default_rng(0).standard_normal((b, length, dim), dtype=np.float32)
    x = mx.array(x_np)
    mx.eval(ffn.parameters(), x)
    runs = {f"mlx {ws} MB": _mlx_run(ffn, x, inner, ws * MB) for ws in args.workspaces_mb}
    if args.torch:
        import torch
        from diffusers.models.attention import FeedForward

        ref = FeedForward(dim, inner_dim=inner, activation_fn="gelu-approximate").eval()
        tx = torch.from_numpy(x_np)

        def torch_run() -> float:
            with torch.no_grad():
                ref(tx)
            return 0.0

        runs["diffusers"] = torch_run
    times, peaks = time_interleaved(runs, args.repeats)
    print(f"shape B={b} L={length} dim={dim} ffn={inner}; load average {os.getloadavg()[0]:.1f} after")
    report(times, peaks)


def _mlx_run(ffn: layers.FeedForward, x: mx.array, inner: int, workspace: int):
    """The library's own chunking (``by_token_chunks``), under a budget whose feed-forward share is
    ``workspace`` bytes."""
    budget_gb = workspace / layers.FEED_FORWARD_FRACTION / GB

    def run() -> float:
        set_memory_limit(budget_gb)
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(layers.by_token_chunks(ffn, x, (), inner))
        set_memory_limit(None)
        return (mx.get_peak_memory() - base) / 1e9

    return run


if __name__ == "__main__":
    main()
