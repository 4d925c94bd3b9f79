"""Wan-AI original-layout repos for the converter tests, and the diffusers pipelines they must match.

``ref_original.build_original_repo`` covers TI2V-5B and A14B as they are. Its Wan2.1-I2V CLIP is 24 wide
with 2 heads, which no converter can recover from the ``.pth`` (it stores no head count; the converter
assumes 64-wide heads below ViT-H's 1280), so the I2V repo here has a 128-wide, 2-head CLIP and a
transformer whose image branch takes 128-wide tokens. Every builder also leaves the diffusers-layout
reference components of the same weights, from which :func:`reference_pipeline` assembles the diffusers
pipeline to compare against.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanTransformer3DModel
from ref_clip import TINY_CLIP_CONFIG, build_clip, build_processor
from ref_original import (
    CLIP_FILE,
    T5_FILE,
    TEXT_TOWER_SHAPES,
    TOKENIZER_DIR,
    VAE_FILES,
    _round_and_perturb_norms,
    build_original_repo,
    build_original_umt5,
    build_original_vae,
    clip_to_original,
    write_original_transformer,
)
from ref_pipeline import tiny_scheduler
from ref_text import build_tiny_tokenizer
from ref_transformer import TINY_COMMON, build_transformer
from transformers import AutoTokenizer, CLIPVisionModelWithProjection, UMT5EncoderModel

# 2 heads of 64: what the converter infers for a 128-wide tower.
CLIP_128 = dict(TINY_CLIP_CONFIG, hidden_size=128, intermediate_size=256, num_attention_heads=2)
I2V_CLIP_128 = dict(TINY_COMMON, in_channels=36, out_channels=16, image_dim=128, added_kv_proj_dim=32)

# The scheduler shift diffusers' converter writes for each kind (and so the converter too).
SHIFTS = {"ti2v": 5.0, "i2v": 3.0, "a14b": 3.0}
KINDS = tuple(SHIFTS)


def build_original_i2v(root: Path, reference: Path) -> None:
    """A Wan2.1-I2V original repo with the 128-wide CLIP at ``root``; diffusers components at ``reference``."""
    root.mkdir(parents=True, exist_ok=True)
    write_original_transformer(root, build_transformer(reference / "transformer", I2V_CLIP_128), "i2v")
    build_original_vae(root / VAE_FILES["2.1"], reference / "vae", "2.1")
    build_original_umt5(root / T5_FILE, reference / "text_encoder")
    build_tiny_tokenizer(root / TOKENIZER_DIR)
    # As ref_original.build_original_clip, at another width: float16 values, text tower included.
    clip = build_clip(reference / "image_encoder", CLIP_128)
    _round_and_perturb_norms(clip, torch.float16, 1)
    clip.save_pretrained(reference / "image_encoder")
    original = clip_to_original(clip.state_dict())
    generator = torch.Generator().manual_seed(2)
    original.update({k: torch.randn(shape, generator=generator) for k, shape in TEXT_TOWER_SHAPES.items()})
    torch.save({k: v.to(torch.float16) for k, v in original.items()}, root / CLIP_FILE)


def build_original(root: Path, reference: Path, kind: str) -> None:
    """An original repo of ``kind`` ("ti2v", "i2v" or "a14b") and its diffusers reference components."""
    if kind == "i2v":
        build_original_i2v(root, reference)
    else:
        build_original_repo(root, reference, kind)


def reference_pipeline(root: Path, reference: Path, kind: str) -> WanImageToVideoPipeline:
    """diffusers' pipeline over the reference components of an original repo built above."""
    components = dict(
        tokenizer=AutoTokenizer.from_pretrained(root / TOKENIZER_DIR),
        text_encoder=UMT5EncoderModel.from_pretrained(reference / "text_encoder"),
        vae=AutoencoderKLWan.from_pretrained(reference / "vae"),
        scheduler=tiny_scheduler(SHIFTS[kind]),
        transformer=WanTransformer3DModel.from_pretrained(reference / "transformer"),
    )
    if kind == "ti2v":
        components["expand_timesteps"] = True
    if kind == "a14b":
        components.update(
            transformer_2=WanTransformer3DModel.from_pretrained(reference / "transformer_2"), boundary_ratio=0.9
        )
    if kind == "i2v":
        image_size = CLIP_128["image_size"]
        components.update(
            image_encoder=CLIPVisionModelWithProjection.from_pretrained(reference / "image_encoder"),
            image_processor=build_processor(reference / "image_processor", shortest_edge=image_size, crop=image_size),
        )
    return WanImageToVideoPipeline(**components)
