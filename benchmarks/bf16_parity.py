"""Where a bfloat16 run loses against float32, stage by stage, in diffusers and in mlx-i2v.

Every case runs the tiny random-weight pipelines of the tests (``tests/ref_pipeline.py``: Wan2.2-TI2V-5B,
Wan2.1-I2V, Wan2.1-FLF2V and Wan2.2-I2V-A14B shaped) at 64x96, 5 frames, 2 UniPC steps, guidance 5, on
the same photo(s), prompts and noise as ``tests/test_bf16.py``, and reports the PSNR of the frames against
diffusers' float32 output, the squared errors pooled over ``--seeds`` noise seeds (one seed's PSNR moves
by about 1 dB either way). Stages are swapped one at a time:

- diffusers: its docs' path (transformer and text encoder in bfloat16, VAE and CLIP in float32), all in
  bfloat16, and bfloat16 in one stage only;
- mlx-i2v: the default (``dtype="bfloat16"``, VAE and CLIP float32), all in bfloat16
  (``vae_dtype="bfloat16"``), all in bfloat16 but one stage in float32, and bfloat16 in one stage only.

Stages: ``text`` (UMT5), ``clip`` (the CLIP image encoder, Wan2.1 I2V/FLF2V only), ``vae_encode``,
``vae_decode`` and ``transformer`` (every denoising pass; the scheduler's arithmetic is float32 in both
frameworks, as diffusers keeps its latents in float32). Needs the test dependencies (torch, diffusers,
transformers). Run: ``python benchmarks/bf16_parity.py`` (about 15 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the reference builders

import test_bf16 as case  # noqa: E402  (the test's request, noise and diffusers pipelines)
from ref_pipeline import build_tiny_i2v, build_tiny_ti2v  # noqa: E402

from mlx_i2v import load_pipeline  # noqa: E402
from mlx_i2v.models.wan.clip import load_clip_vision  # noqa: E402
from mlx_i2v.models.umt5 import load_umt5  # noqa: E402
from mlx_i2v.models.wan.vae import load_wan_vae  # noqa: E402
from mlx_i2v.families.wan.loading import ImageEncoder  # noqa: E402
from mlx_i2v.resident import Resident  # noqa: E402

VARIANTS = ("ti2v", "i2v", "flf2v", "a14b")
STAGES = ("text", "clip", "vae_encode", "vae_decode", "transformer")
F32, BF16 = mx.float32, mx.bfloat16
T32, TBF16 = torch.float32, torch.bfloat16


def build_models(root: Path) -> dict[str, Path]:
    dirs = {v: root / v for v in VARIANTS}
    if not (dirs["ti2v"] / "model_index.json").exists():
        build_tiny_ti2v(dirs["ti2v"])
    for v in VARIANTS[1:]:
        if not (dirs[v] / "model_index.json").exists():
            build_tiny_i2v(dirs[v], v)
    return dirs


# --- mlx-i2v with a dtype per stage ------------------------------------------------------------------


def ours(model_dir: Path, dtypes: dict[str, mx.Dtype]) -> Callable[[str, int], np.ndarray]:
    """An mlx-i2v pipeline whose stages load in ``dtypes`` (stage -> dtype)."""
    pipe = load_pipeline(model_dir, dtype="bfloat16" if dtypes["transformer"] == BF16 else "float32")
    pipe.text_encoder = Resident("text_encoder", lambda: load_umt5(model_dir / "text_encoder", dtypes["text"]))
    pipe.vae_encoder = Resident(
        "vae encoder", lambda: load_wan_vae(model_dir / "vae", dtypes["vae_encode"]).keep_only("encoder")
    )
    pipe.vae_decoder = Resident(
        "vae decoder", lambda: load_wan_vae(model_dir / "vae", dtypes["vae_decode"]).keep_only("decoder")
    )
    if pipe.image_encoder is not None:
        processor = pipe.image_encoder.get().processor
        pipe.image_encoder = Resident(
            "image_encoder", lambda: ImageEncoder(processor, load_clip_vision(model_dir / "image_encoder", dtypes["clip"]))
        )
    return lambda variant, seed: case._ours_frames(pipe, variant, seed)


def ours_default(model_dir: Path, **kwargs) -> Callable[[str, int], np.ndarray]:
    pipe = load_pipeline(model_dir, dtype="bfloat16", **kwargs)
    return lambda variant, seed: case._ours_frames(pipe, variant, seed)


# --- diffusers with a dtype per stage ----------------------------------------------------------------


def diffusers(model_dir: Path, dtypes: dict[str, torch.dtype]) -> Callable[[str, int], np.ndarray]:
    """diffusers' pipeline with its components loaded in ``dtypes`` (one VAE: ``vae_encode`` sets its)."""
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import CLIPVisionModelWithProjection, UMT5EncoderModel

    parts = {
        "vae": AutoencoderKLWan.from_pretrained(model_dir, subfolder="vae", dtype=dtypes["vae_encode"]),
        "text_encoder": UMT5EncoderModel.from_pretrained(model_dir, subfolder="text_encoder", dtype=dtypes["text"]),
        "transformer": WanTransformer3DModel.from_pretrained(model_dir, subfolder="transformer", dtype=dtypes["transformer"]),
    }  # fmt: skip
    if (model_dir / "transformer_2").exists():
        parts["transformer_2"] = WanTransformer3DModel.from_pretrained(
            model_dir, subfolder="transformer_2", dtype=dtypes["transformer"]
        )
    if (model_dir / "image_encoder").exists():
        parts["image_encoder"] = CLIPVisionModelWithProjection.from_pretrained(
            model_dir, subfolder="image_encoder", dtype=dtypes["clip"]
        )
    pipe = WanImageToVideoPipeline.from_pretrained(model_dir, **parts)
    pipe.set_progress_bar_config(disable=True)
    return lambda variant, seed: case._diffusers_frames(pipe, variant, seed)


# --- the table ----------------------------------------------------------------------------------------


def runs(dirs: dict[str, Path]) -> dict[str, Callable[[Path], Callable[[str, int], np.ndarray]]]:
    """Row name -> a builder of the run for one model directory."""
    table: dict[str, Callable] = {
        "diffusers bf16 (docs: VAE, CLIP float32)": lambda d: diffusers(
            d, {**dict.fromkeys(STAGES, TBF16), "vae_encode": T32, "vae_decode": T32, "clip": T32}
        ),
        "diffusers all bf16": lambda d: diffusers(d, dict.fromkeys(STAGES, TBF16)),
        "mlx-i2v default (bf16, vae_dtype float32)": lambda d: ours_default(d),
        "mlx-i2v all bf16 (vae_dtype bfloat16)": lambda d: ours_default(d, vae_dtype="bfloat16"),
    }
    for stage in ("text", "clip", "vae_encode", "transformer"):  # diffusers has one VAE for both halves
        label = "vae" if stage == "vae_encode" else stage
        table[f"diffusers bf16 in {label} only"] = lambda d, s=stage: diffusers(d, {**dict.fromkeys(STAGES, T32), s: TBF16})
    for stage in STAGES:
        table[f"mlx-i2v all bf16 but {stage} float32"] = lambda d, s=stage: ours(d, {**dict.fromkeys(STAGES, BF16), s: F32})
    for stage in STAGES:
        table[f"mlx-i2v bf16 in {stage} only"] = lambda d, s=stage: ours(d, {**dict.fromkeys(STAGES, F32), s: BF16})
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=None, help="where to build the tiny pipelines (default: temporary)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", default=None, help="run only the rows whose name contains this text")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as scratch:
        dirs = build_models(args.models or Path(scratch))
        references = {}
        for v in VARIANTS:
            reference, _ = case._diffusers_pipelines(dirs[v], half=False)
            references[v] = [case._diffusers_frames(reference, v, seed) for seed in range(args.seeds)]
        print(f"| run (PSNR vs diffusers float32, dB, {args.seeds} seeds pooled) | " + " | ".join(VARIANTS) + " |")
        print("|---" * (len(VARIANTS) + 1) + "|")
        for name, build in runs(dirs).items():
            if args.only and args.only not in name:
                continue
            cells = []
            for v in VARIANTS:
                if "clip" in name and v in ("ti2v", "a14b"):
                    cells.append("–")  # no CLIP in these variants
                    continue
                run = build(dirs[v])
                errors = [case._mse(run(v, seed), references[v][seed]) for seed in range(args.seeds)]
                cells.append(f"{case._psnr(errors):.1f}")
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
