"""Reference CLIP components built with transformers, shared by the CLIP tests and later pipeline tests.

The tiny encoder keeps every state-dict key name of the ViT-H/14 tower diffusers ships for Wan2.1 I2V
(``image_encoder/`` is a ``CLIPVisionModelWithProjection``); only widths and depth are shrunk.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

TINY_CLIP_CONFIG = dict(
    hidden_size=24,
    intermediate_size=48,
    num_attention_heads=2,
    num_hidden_layers=3,
    image_size=56,
    patch_size=14,
    hidden_act="gelu",
    projection_dim=16,
    layer_norm_eps=1e-5,
)

# ViT-H/14 widths (hidden 1280, 16 heads, MLP 5120) with only two layers, to test at realistic scale.
VIT_H_2LAYER_CONFIG = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_attention_heads=16,
    num_hidden_layers=2,
    image_size=224,
    patch_size=14,
    hidden_act="gelu",
    projection_dim=1024,
    layer_norm_eps=1e-5,
)


def build_clip(path: str | Path, config: dict, *, seed: int = 0) -> CLIPVisionModelWithProjection:
    """Save a seeded, randomly initialised ``CLIPVisionModelWithProjection`` to ``path`` and return it
    (float32, eval mode)."""
    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**config)).eval()
    model.save_pretrained(path)
    return model


def build_processor(path: str | Path, *, shortest_edge: int = 56, crop: int = 56) -> CLIPImageProcessor:
    """Save the processor the Wan2.1 I2V repos ship (bicubic shortest-edge resize, centre crop, OpenAI
    CLIP mean/std), at a small resolution. Without torchvision this resolves to ``CLIPImageProcessorPil``."""
    processor = CLIPImageProcessor(
        size={"shortest_edge": shortest_edge},
        crop_size={"height": crop, "width": crop},
        do_center_crop=True,
        resample=3,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    processor.save_pretrained(path)
    return processor


def build_tiny_clip(
    path_encoder: str | Path, path_processor: str | Path
) -> tuple[CLIPVisionModelWithProjection, CLIPImageProcessor]:
    """The tiny ``image_encoder`` (17 tokens: CLS + 4x4 patches) and ``image_processor`` (56x56)."""
    return build_clip(path_encoder, TINY_CLIP_CONFIG), build_processor(path_processor)


@torch.no_grad()
def penultimate_states(model: CLIPVisionModelWithProjection, pixel_values: torch.Tensor) -> torch.Tensor:
    """What the Wan I2V pipeline feeds its transformer: ``hidden_states[-2]`` (B, tokens, hidden)."""
    return model(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2]
