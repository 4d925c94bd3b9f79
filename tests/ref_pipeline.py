"""Tiny random-weight diffusers pipelines with the real architectures, saved as the Hub repos are laid out."""

from __future__ import annotations

from pathlib import Path

import shutil

from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline
from ref_clip import build_tiny_clip
from ref_text import build_tiny_text_encoder, build_tiny_tokenizer
from ref_transformer import build_tiny_transformer
from ref_vae import build_tiny_vae


def tiny_scheduler(flow_shift: float) -> UniPCMultistepScheduler:
    """The scheduler the real repos ship (convert_wan_to_diffusers.py), with the variant's shift."""
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=flow_shift
    )


def build_tiny_ti2v(path: str | Path) -> Path:
    """A Wan2.2-TI2V-5B-shaped pipeline, saved like Wan-AI/Wan2.2-TI2V-5B-Diffusers (a ``WanPipeline`` with
    ``expand_timesteps=True``)."""
    path = Path(path)
    parts = path / "_parts"
    pipe = WanPipeline(
        tokenizer=build_tiny_tokenizer(parts / "tokenizer"),
        text_encoder=build_tiny_text_encoder(parts / "text_encoder"),
        vae=build_tiny_vae(parts / "vae", "2.2"),
        scheduler=tiny_scheduler(5.0),
        transformer=build_tiny_transformer(parts / "transformer", "ti2v"),
        transformer_2=None,
        boundary_ratio=None,
        expand_timesteps=True,
    )
    pipe.save_pretrained(path)
    shutil.rmtree(parts)
    return path


def build_tiny_i2v(path: str | Path, variant: str) -> Path:
    """A Wan2.1-I2V ("i2v"), Wan2.1-FLF2V ("flf2v") or Wan2.2-I2V-A14B ("a14b") shaped pipeline, saved as
    ``WanImageToVideoPipeline`` like the Wan-AI ``*-Diffusers`` repos, with each variant's shipped shift."""
    path = Path(path)
    parts = path / "_parts"
    components = dict(
        tokenizer=build_tiny_tokenizer(parts / "tokenizer"),
        text_encoder=build_tiny_text_encoder(parts / "text_encoder"),
        vae=build_tiny_vae(parts / "vae", "2.1"),
    )
    if variant == "a14b":
        components.update(
            scheduler=tiny_scheduler(5.0),
            transformer=build_tiny_transformer(parts / "transformer", "a14b", seed=12),
            transformer_2=build_tiny_transformer(parts / "transformer_2", "a14b", seed=13),
            boundary_ratio=0.9,
        )
    else:
        encoder, processor = build_tiny_clip(parts / "image_encoder", parts / "image_processor")
        components.update(
            scheduler=tiny_scheduler(16.0 if variant == "flf2v" else 3.0),
            transformer=build_tiny_transformer(parts / "transformer", variant),
            image_encoder=encoder,
            image_processor=processor,
        )
    WanImageToVideoPipeline(**components).save_pretrained(path)
    shutil.rmtree(parts)
    return path
