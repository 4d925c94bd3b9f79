"""Tiny random-weight LTX-Video diffusers pipelines (0.42.1), saved as the Hub repos are laid out: the tiny
T5 encoder and tokenizer (ref_t5), VAE of one generation (ref_ltx_vae), transformer (ref_ltx_transformer)
and the scheduler config of that generation (diffusers ``scripts/convert_ltx_to_diffusers.py``).

The VAE is an ordinary random-weight one: its posterior's standard deviation is of order one, so the
pipelines' posterior *sample* of each encoded image differs from its mean, and the parity tests give both
sides the same posterior noise.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from diffusers import FlowMatchEulerDiscreteScheduler, LTXConditionPipeline, LTXImageToVideoPipeline
from ref_ltx_transformer import TINY, build_transformer
from ref_ltx_vae import build_tiny_ltx_vae
from ref_t5 import TINY_T5_CONFIG, build_t5_encoder, build_t5_tokenizer
from transformers import AutoTokenizer

# The tiny transformer on the tiny VAE's 16 latent channels and the tiny T5's 64-wide states.
PIPELINE_TRANSFORMER = dict(TINY, in_channels=16, out_channels=16, caption_channels=TINY_T5_CONFIG["d_model"])
PIPELINES = {"LTXImageToVideoPipeline": LTXImageToVideoPipeline, "LTXConditionPipeline": LTXConditionPipeline}


def ltx_scheduler(version: str) -> FlowMatchEulerDiscreteScheduler:
    """0.9.0/0.9.1: dynamic shifting with a terminal sigma; 0.9.5+: none (ltx.md §1.3)."""
    if version in ("0.9.0", "0.9.1"):
        return FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024,
            max_image_seq_len=4096, shift_terminal=0.1,
        )  # fmt: skip
    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=False)


def build_tiny_ltx(path: str | Path, version: str, pipeline: str = "LTXImageToVideoPipeline") -> Path:
    """A tiny LTX-Video checkpoint with a ``version`` VAE ("0.9.0", "0.9.1", "0.9.5"), saved by ``pipeline``
    (its ``model_index.json`` ``_class_name``). Returns the folder."""
    path = Path(path)
    parts = path / "_parts"
    build_t5_tokenizer(parts / "tokenizer")
    pipe = PIPELINES[pipeline](
        scheduler=ltx_scheduler(version),
        vae=build_tiny_ltx_vae(None, version, seed=4),
        text_encoder=build_t5_encoder(None, TINY_T5_CONFIG, seed=3),
        tokenizer=AutoTokenizer.from_pretrained(parts / "tokenizer"),
        transformer=build_transformer(None, PIPELINE_TRANSFORMER, seed=5),
    )
    pipe.save_pretrained(path)
    shutil.rmtree(parts)
    return path
