"""How large should a query chunk of the CPU attention be? Times mlx-i2v's attention at one shape with
several workspaces (the bytes of scores one chunk may hold), next to PyTorch's
``scaled_dot_product_attention`` on the same inputs, and reports each one's time and MLX's peak memory.

    python benchmarks/attention_chunks.py                    # TI2V-5B's pass in the compare_diffusers job
    python benchmarks/attention_chunks.py --shape 2 32 480 64  # LTX 2B's

Each variant runs ``--repeats`` times, interleaved with the others (``interleaved.py``).
"""

from __future__ import annotations

import argparse
import os

import mlx.core as mx
import numpy as np

from interleaved import report, time_interleaved

from mlx_i2v.models import attention as attn

MB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=4, default=(2, 24, 1056, 128), metavar=("B", "HEADS", "L", "D"))
    parser.add_argument("--workspaces-mb", type=int, nargs="+", default=(3072, 256, 128, 64, 32))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    b, heads, length, dim = args.shape
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((b, heads, length, dim), dtype=np.float32) for _ in range(3)]
    q, k, v = (mx.array(a) for a in arrays)
    mx.eval(q, k, v)
    runs = {f"mlx {ws} MB": _mlx_run(q, k, v, ws * MB) for ws in args.workspaces_mb}
    if args.torch:
        import torch

        tq, tk, tv = (torch.from_numpy(a) for a in arrays)
        runs["torch sdpa"] = lambda: (torch.nn.functional.scaled_dot_product_attention(tq, tk, tv), 0.0)[1]
    times, peaks = time_interleaved(runs, args.repeats)
    print(f"shape B={b} heads={heads} L={length} D={dim}; load average {os.getloadavg()[0]:.1f} after")
    report(times, peaks)


def _mlx_run(q: mx.array, k: mx.array, v: mx.array, workspace: int):
    chunk = attn.query_chunk_size(*q.shape[:3], k.shape[2], workspace)

    def run() -> float:
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        outs = []
        v_ones = attn.with_ones_column(v)
        for start in range(0, q.shape[2], chunk):
            out = attn.softmax_attention(q[:, :, start : start + chunk], k, v_ones, scale=q.shape[-1] ** -0.5)
            mx.eval(out)
            outs.append(out)
        mx.eval(mx.concatenate(outs, axis=2))
        return (mx.get_peak_memory() - base) / 1e9

    return run


if __name__ == "__main__":
    main()
