"""Tiny random-weight diffusers pipelines with the real architectures, saved as the Hub repos are laid out."""

from __future__ import annotations

from pathlib import Path

from diffusers import UniPCMultistepScheduler, WanPipeline
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
    import shutil

    shutil.rmtree(parts)
    return path
