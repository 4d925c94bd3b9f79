"""Quality and size of MLX affine quantization at the real Wan widths; prints markdown tables.

* Transformer: one block at the Wan2.2-TI2V-5B widths (dim 3072, 24 heads, FFN 14336, text 4096), built
  and saved by diffusers with its default initialisation (``tests/ref_transformer.py``), loaded in
  float32, quantized, and its output compared with the float output on the same input.
* Sizes: the full transformers (TI2V-5B, each Wan2.2 A14B expert, Wan2.1 I2V-14B) and umt5-xxl, built
  lazily from their configs, so the byte counts are exact without allocating the weights. The float
  baseline is what the pipeline holds in bfloat16 (the float32 islands stay float32).
* UMT5: one umt5-xxl layer (d_model 4096, 64 heads, d_ff 10240) built by transformers, on padded prompts.

Metrics, over all output elements: relative error ``||q - f|| / ||f||``; PSNR ``20 log10(max|f| / rms(q -
f))``; for UMT5 also the cosine similarity of each real token's embedding (mean and worst). The weights
are randomly initialised, not trained ones: trained weights have heavier tails, so expect somewhat larger
errors on real checkpoints. Needs the test dependencies (torch, diffusers, transformers).

Run: ``python benchmarks/quantization_quality.py`` (float32 on the CPU takes a few minutes).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import torch
from mlx.utils import tree_flatten, tree_unflatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the reference builders

from ref_text import UMT5_XXL_1LAYER_CONFIG, build_text_encoder  # noqa: E402
from ref_transformer import TI2V_5B_1LAYER, build_transformer  # noqa: E402

from mlx_i2v.models.umt5 import DIFFUSERS_MAP as UMT5_MAP  # noqa: E402
from mlx_i2v.models.umt5 import UMT5Config, UMT5Encoder  # noqa: E402
from mlx_i2v.models.wan.transformer import (  # noqa: E402
    KEEP_FLOAT32,
    WanTransformer3DModel,
    WanTransformerConfig,
    load_wan_transformer,
)
from mlx_i2v.quantize import (  # noqa: E402
    Quantization,
    parameter_bytes,
    prepare_for_quantized_load,
    quantize_text_encoder,
    quantize_transformer,
)
from mlx_i2v.weights import config_from_dict, load_strict  # noqa: E402

# Full-size configs (diffusers / transformers config.json values).
WAN_14B = dict(
    num_attention_heads=40, attention_head_dim=128, in_channels=36, out_channels=16, ffn_dim=13824, num_layers=40
)
FULL_TRANSFORMERS = {
    "Wan2.2-TI2V-5B": dict(TI2V_5B_1LAYER, num_layers=30),
    "Wan2.2-I2V-A14B (one expert)": WAN_14B,
    "Wan2.1-I2V-14B": dict(WAN_14B, image_dim=1280, added_kv_proj_dim=5120),  # plus the CLIP image branch
}
UMT5_XXL = dict(UMT5_XXL_1LAYER_CONFIG, vocab_size=256384, num_layers=24)


def metrics(quantized: mx.array, reference: mx.array) -> tuple[float, float]:
    """Relative L2 error and PSNR (peak = max |reference|) over all elements."""
    q = np.asarray(quantized.astype(mx.float32), dtype=np.float64)
    f = np.asarray(reference.astype(mx.float32), dtype=np.float64)
    rel = float(np.linalg.norm(q - f) / np.linalg.norm(f))
    psnr = 20 * math.log10(np.abs(f).max() / np.sqrt(np.mean((q - f) ** 2)))
    return rel, psnr


def token_cosines(quantized: mx.array, reference: mx.array, mask: np.ndarray) -> np.ndarray:
    """Cosine similarity of each real token's embedding: (B, L, D) x2 and a (B, L) mask -> (N_real,)."""
    q = np.asarray(quantized, dtype=np.float64)[mask > 0]
    f = np.asarray(reference, dtype=np.float64)[mask > 0]
    return (q * f).sum(-1) / (np.linalg.norm(q, axis=-1) * np.linalg.norm(f, axis=-1))


def cast_like_loader(model: nn.Module, dtype: mx.Dtype, keep_float32: tuple[str, ...]) -> None:
    """What load_strict does to dtypes, lazily (nothing is allocated)."""
    keep = [re.compile(p) for p in keep_float32]
    params = tree_flatten(model.parameters())
    cast = [(k, v.astype(mx.float32 if any(p.search(k) for p in keep) else dtype)) for k, v in params]
    model.update(tree_unflatten(cast))


def size_table() -> list[str]:
    rows = ["| model | bfloat16 | 8-bit | 4-bit | 4-bit / bf16 | 8-bit / bf16 |", "|---|---|---|---|---|---|"]

    def row(name: str, bf16: int, b8: int, b4: int) -> str:
        gb = " | ".join(f"{n / 1e9:.2f} GB" for n in (bf16, b8, b4))
        return f"| {name} | {gb} | {b4 / bf16:.3f} | {b8 / bf16:.3f} |"

    def sizes(build: Callable[[], nn.Module], keep: tuple[str, ...]) -> list[int]:
        """bfloat16, 8-bit and 4-bit parameter bytes."""
        out = []
        for bits in (None, 8, 4):
            model = build()
            cast_like_loader(model, mx.bfloat16, keep)
            if bits is not None:
                prepare_for_quantized_load(model, Quantization(bits))  # lazy: shapes only
            out.append(parameter_bytes(model))
        return out

    for name, cfg in FULL_TRANSFORMERS.items():
        config = config_from_dict(WanTransformerConfig, cfg)
        bf16, b8, b4 = sizes(lambda: WanTransformer3DModel(config), KEEP_FLOAT32)
        rows.append(row(f"{name} transformer", bf16, b8, b4))
    config = config_from_dict(UMT5Config, UMT5_XXL)
    bf16, b8, b4 = sizes(lambda: UMT5Encoder(config), ())
    rows.append(row("umt5-xxl encoder", bf16, b8, b4))
    return rows


def transformer_table(folder: Path, tokens_hw: int, text_tokens: int) -> list[str]:
    g = torch.Generator().manual_seed(4)
    # (B, F, H, W, C) latents: 2 latent frames of tokens_hw x tokens_hw patches
    x = mx.array(torch.randn(1, 2, 2 * tokens_hw, 2 * tokens_hw, 48, generator=g).numpy())
    text = mx.array(torch.randn(1, text_tokens, 4096, generator=g).numpy())
    num_tokens = 2 * tokens_hw * tokens_hw
    # TI2V per-token timesteps: the conditioning frame at 0, the rest at t
    t = mx.array(np.r_[np.zeros(num_tokens // 2), np.full(num_tokens // 2, 875.0)][None].astype(np.float32))

    float_model = load_wan_transformer(folder, mx.float32)
    reference = float_model(x, t, text)
    mx.eval(reference)
    float_bytes = parameter_bytes(float_model)
    del float_model

    rows = [
        f"Output of one TI2V-5B-width block ({num_tokens} tokens, {text_tokens} text tokens), "
        "float32 compute unless stated:",
        "",
        "| weights | group size | bytes / float32 | rel. error | PSNR (dB) | CPU time (s) |",
        "|---|---|---|---|---|---|",
    ]
    # bfloat16 without quantization, for scale: the error every bfloat16 run already has
    settings = [(None, None)] + [(bits, group) for bits in (8, 4) for group in (32, 64, 128)]
    for bits, group_size in settings:
        model = load_wan_transformer(folder, mx.float32 if bits else mx.bfloat16)
        if bits:
            quantize_transformer(model, bits, group_size)
        start = time.perf_counter()
        out = model(x, t, text)
        mx.eval(out)
        seconds = time.perf_counter() - start
        rel, psnr = metrics(out, reference)
        ratio = parameter_bytes(model) / float_bytes
        label = f"{bits}-bit" if bits else "bfloat16"
        group = group_size or "-"
        rows.append(f"| {label} | {group} | {ratio:.3f} | {rel:.2e} | {psnr:.1f} | {seconds:.1f} |")
    return rows


def umt5_table(seq_len: int) -> list[str]:
    ref_model = build_text_encoder(None, UMT5_XXL_1LAYER_CONFIG, seed=1)
    state = {k: mx.array(v.numpy()) for k, v in ref_model.state_dict().items()}
    del ref_model
    config = config_from_dict(UMT5Config, UMT5_XXL_1LAYER_CONFIG)
    generator = torch.Generator().manual_seed(0)
    vocab = UMT5_XXL_1LAYER_CONFIG["vocab_size"]
    ids = mx.array(torch.randint(3, vocab, (2, seq_len), generator=generator).numpy())
    mask = np.ones((2, seq_len), np.int32)
    mask[1, seq_len * 2 // 3 :] = 0  # a padded prompt

    def fresh() -> UMT5Encoder:
        model = UMT5Encoder(config)
        load_strict(model, UMT5_MAP.apply(state), dtype=mx.float32, what="text_encoder")
        return model

    reference = fresh()(ids, mx.array(mask))
    mx.eval(reference)
    rows = [
        f"UMT5 embeddings, one umt5-xxl-width layer (2 prompts x {seq_len} tokens, one padded), "
        "float32 compute:",
        "",
        "| quantized | bits | group size | rel. error | PSNR (dB) | mean cosine | min cosine |",
        "|---|---|---|---|---|---|---|",
    ]
    variants = [("all (default)", 8), ("all", 4), ("`shared` only", 8)]
    for label, bits in variants:
        model = fresh()
        if label == "`shared` only":
            nn.quantize(model, 64, bits, class_predicate=lambda path, _: path == "shared")
        else:
            quantize_text_encoder(model, bits, 64)
        out = model(ids, mx.array(mask))
        rel, psnr = metrics(out, reference)
        cos = token_cosines(out, reference, mask)
        cosines = f"{cos.mean():.6f} | {cos.min():.6f}"
        rows.append(f"| {label} | {bits} | 64 | {rel:.2e} | {psnr:.1f} | {cosines} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens-hw", type=int, default=4, help="patches per side per latent frame")
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--umt5-tokens", type=int, default=48)
    args = parser.parse_args()

    print("Parameter bytes of the full models (exact, from their configs):\n")
    print("\n".join(size_table()), "\n")
    with tempfile.TemporaryDirectory() as tmp:
        build_transformer(tmp, TI2V_5B_1LAYER, seed=7)
        print("\n".join(transformer_table(Path(tmp), args.tokens_hw, args.text_tokens)), "\n")
    print("\n".join(umt5_table(args.umt5_tokens)))


if __name__ == "__main__":
    main()
