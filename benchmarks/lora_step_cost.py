"""Per-step cost of a rank-64 LoRA kept unmerged (run-time factors) at the Wan2.2-TI2V-5B widths.

On a quantized model mlx-i2v never merges a LoRA into the packed weights; every block linear computes
``base(x) + s * (x @ A^T) @ B^T`` (:class:`mlx_i2v.lora.LoRALinear`). This measures what that costs per
denoising step, on one real-width transformer block (dim 3072, 24 heads, FFN 14336, text 4096) run the
way the pipeline runs it (cross-attention K/V of the 512 text tokens computed once, not per step):

* float32 block, with and without LoRA wrappers on its eight per-step linears (self-attention q/k/v/o,
  cross-attention q/o, FFN in/out): the LoRA's cost relative to a step whose matmuls run at full speed,
  which is the situation on a GPU, where 4-bit matmuls are about as fast as float ones;
* 4-bit (group 64) block, with and without the same LoRA: MLX has no fast quantized matmul on the CPU
  (about 40x slower than float32 with OpenBLAS here), so this is run at fewer tokens and mostly shows
  that the LoRA branch is negligible next to it;
* the arithmetic: LoRA FLOPs / block FLOPs at the same token count.

    python benchmarks/lora_step_cost.py [--tokens 880] [--quantized-tokens 32] [--rank 64] [--repeats 3]

880 tokens are one latent frame of a 1280x704 TI2V-5B video (22 x 40 patches); a full 121-frame clip has
27,280, where attention grows quadratically and the LoRA share shrinks further.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from mlx_i2v.lora import LoRALinear
from mlx_i2v.models.wan.transformer import WanRotaryPosEmbed, WanTransformerBlock, WanTransformerConfig
from mlx_i2v.families.wan.planner import TI2V_5B_TRANSFORMER
from mlx_i2v.runtime import keep_freed_memory

PER_STEP_LINEARS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0",
                    "ffn.net.0.proj", "ffn.net.2")  # fmt: skip
TEXT_TOKENS = 512
FULL_CLIP_TOKENS = 31 * 22 * 40  # TI2V-5B, 1280x704, 121 frames: 31 latent frames of 22 x 40 patches


def build_block(config: WanTransformerConfig, bits: int | None) -> WanTransformerBlock:
    block = WanTransformerBlock(config)
    block.scale_shift_table = 0.02 * mx.random.normal(block.scale_shift_table.shape, key=mx.random.key(1))
    if bits is not None:
        nn.quantize(block, group_size=64, bits=bits, class_predicate=lambda p, m: isinstance(m, nn.Linear))
    mx.eval(block.parameters())
    return block


def lora_layers(block: WanTransformerBlock, rank: int) -> list[tuple[str, LoRALinear]]:
    """A rank-``rank`` LoRA (random factors, scale 1) around each per-step linear of ``block``."""
    modules = dict(block.named_modules())
    layers = []
    for i, path in enumerate(PER_STEP_LINEARS):
        base = modules[path]
        out_dim = base.weight.shape[0]
        in_dim = base.weight.shape[1] * (32 // base.bits if isinstance(base, nn.QuantizedLinear) else 1)
        layer = LoRALinear(base)
        key = mx.random.split(mx.random.key(100 + i))
        layer.add_low_rank(0.01 * mx.random.normal((rank, in_dim), key=key[0]),
                           0.01 * mx.random.normal((out_dim, rank), key=key[1]), 1.0)  # fmt: skip
        mx.eval(layer.loras)
        layers.append((path, layer))
    return layers


def time_steps(block: WanTransformerBlock, layers: list[tuple[str, LoRALinear]], tokens: int,
               config: WanTransformerConfig, repeats: int) -> tuple[float, float]:  # fmt: skip
    """Fastest CPU seconds (all threads) of one block forward over ``tokens`` tokens without and with the
    LoRA layers, alternating the two after a warm-up of each. CPU time rather than wall time: on a
    machine other programs share, wall time measures them as much as this."""
    dim = config.inner_dim
    width = 40 if tokens % 40 == 0 else tokens
    rope = WanRotaryPosEmbed(config.attention_head_dim, config.rope_max_seq_len)((1, tokens // width, width))
    x = mx.random.normal((1, tokens, dim), key=mx.random.key(2))
    context = mx.random.normal((1, TEXT_TOKENS, dim), key=mx.random.key(3))
    kv = block.attn2.project_kv(context)  # once per generation in the pipeline
    time_proj = 0.1 * mx.random.normal((1, 6, dim), key=mx.random.key(4))
    index = mx.zeros((1, 1), dtype=mx.int32)
    mx.eval(x, kv, time_proj, rope)
    variants = (tree_unflatten([(p, layer.base) for p, layer in layers]), tree_unflatten(layers))
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats + 1):
        for modules, out in zip(variants, times):
            block.update_modules(modules)
            tic = time.process_time()
            mx.eval(block(x, kv, time_proj, index, rope))
            out.append(time.process_time() - tic)
    return min(times[0][1:]), min(times[1][1:])


def block_flops(config: WanTransformerConfig, tokens: int) -> dict[str, float]:
    """Multiply-adds x 2 of the per-step work of one block, and of its LoRA branches."""
    d, f, L = config.inner_dim, config.ffn_dim, tokens
    linears = {p: (d, d) for p in PER_STEP_LINEARS[:6]} | {"ffn.net.0.proj": (d, f), "ffn.net.2": (f, d)}
    dense = sum(2 * L * i * o for i, o in linears.values())
    attention = 2 * 2 * L * L * d + 2 * 2 * L * TEXT_TOKENS * d  # QK^T and PV, self and cross
    return {"linears": dense, "attention": attention, "block": dense + attention,
            "lora_per_rank": sum(2 * L * (i + o) for i, o in linears.values())}  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    keep_freed_memory()  # as load_pipeline does: fresh 50 MB outputs would otherwise be page-faulted in
    config = TI2V_5B_TRANSFORMER
    flops = block_flops(config, args.tokens)
    lora_flops = flops["lora_per_rank"] * args.rank
    load_before = os.getloadavg()[0]
    results: dict = {"tokens": args.tokens, "quantized_tokens": args.quantized_tokens, "rank": args.rank}
    for name, bits, tokens in (("float32", None, args.tokens), ("4-bit", 4, args.quantized_tokens)):
        block = build_block(config, bits)
        base, with_lora = time_steps(block, lora_layers(block, args.rank), tokens, config, args.repeats)
        results[name] = {"tokens": tokens, "step_cpu_s": base, "step_with_lora_cpu_s": with_lora,
                         "lora_share": (with_lora - base) / base}  # fmt: skip
        print(f"{name:>8} block, {tokens} tokens: {base:.3f} CPU s, with rank-{args.rank} LoRA {with_lora:.3f} CPU s "
              f"(+{100 * (with_lora - base) / base:.1f} %)")  # fmt: skip
    results["lora_flops_share"] = lora_flops / flops["block"]
    results["lora_flops_share_of_linears"] = lora_flops / flops["linears"]
    full = block_flops(config, FULL_CLIP_TOKENS)
    results["lora_flops_share_full_clip"] = full["lora_per_rank"] * args.rank / full["block"]
    results["machine"] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cpus": os.cpu_count(), "device": str(mx.default_device()),
                          "load_before": load_before, "load_after": os.getloadavg()[0],
                          "blas": os.environ.get("LD_PRELOAD", "")}  # fmt: skip
    print(f"LoRA FLOPs: {100 * results['lora_flops_share']:.2f} % of the block at {args.tokens} tokens "
          f"({100 * results['lora_flops_share_of_linears']:.2f} % of its linears); "
          f"{100 * results['lora_flops_share_full_clip']:.2f} % at a full clip's {FULL_CLIP_TOKENS} tokens")
    print(f"load average {load_before:.1f} before, {results['machine']['load_after']:.1f} after")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=880, help="tokens of the float32 runs")
    parser.add_argument("--quantized-tokens", type=int, default=32, help="tokens of the 4-bit runs (slow on a CPU)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    results = run(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
