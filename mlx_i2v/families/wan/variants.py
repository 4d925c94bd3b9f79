"""The Wan family and its variants as data: how each conditions on the image and what it generates by default.

A variant is recognised from the checkpoint's configs (``model_index.json`` and the transformer's
``config.json``). The one thing the configs cannot tell apart is Wan2.1-I2V-14B-480P from -720P (same
architecture, different training resolution), so that choice of default size and shift follows the
model's name and falls back to 480P.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import mlx.core as mx

from ...conditioning import FirstFrameLatent
from ...denoise import plain_forward
from ...errors import InvalidInputError, WeightLoadError
from ...family import Family
from ...models.wan.vae_tiling import tiled_decode_frames
from ...preview import LATENT_RGB
from ...variants import Defaults, Variant
from ...weights import read_config
from .conditioning import ChannelConcat

# Wan's own default negative prompt (wan/configs/shared_config.py `sample_neg_prompt`); the original
# code uses it whenever the user gives none. English gloss: "garish colours, overexposed, static, blurry
# details, subtitles, style, artwork, painting, still frame, grey overall, worst quality, low quality, JPEG
# artefacts, ugly, mutilated, extra fingers, badly drawn hands/faces, deformed, disfigured, malformed limbs,
# fused fingers, motionless picture, cluttered background, three legs, crowded background, walking backwards".
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，"
    "杂乱的背景，三条腿，背景人很多，倒着走"
)

SIZES_480P = ((480, 832), (832, 480))
SIZES_720P = ((720, 1280), (1280, 720))


def decode_wan(vae, latents: mx.array, settings, tiling) -> Any:
    """The Wan VAEs' decode: normalised latents (1, T, h, w, C) -> chunks of frames, streamed one latent
    frame at a time (spatially tiled when ``tiling`` is given)."""
    z = vae.denormalize_latents(latents.astype(mx.float32))
    return tiled_decode_frames(vae, z, tiling) if tiling is not None else vae.decode_frames(z)


WAN = Family(name="Wan", frame_stride=4, forward=lambda dims, settings, keyframes=None: plain_forward,
             decode=decode_wan, unsupported=frozenset({"keyframes", "upscale"}),
             latent_rgb=tuple(LATENT_RGB.items()))  # fmt: skip


TI2V_5B = Variant(
    name="wan2.2-ti2v-5b",
    conditioning=FirstFrameLatent(),
    # wan/configs/wan_ti2v_5B.py: 50 steps, guide 5.0, shift 5.0, 121 frames at 24 fps, 1280x704 either way.
    defaults=Defaults(50, 5.0, 5.0, fps=24.0, num_frames=121, sizes=((704, 1280), (1280, 704)),
                      negative_prompt=WAN_NEGATIVE_PROMPT),
    size_multiple=32,
    family=WAN,
)

# Wan2.1 generate.py: i2v runs 40 steps at guide 5.0; shift 3.0 at 480x832, 5.0 otherwise; its negative
# prompt is prefixed with "镜头晃动，" ("camera shake,").
I2V_14B_480P = Variant(
    name="wan2.1-i2v-14b-480p",
    conditioning=ChannelConcat(),
    defaults=Defaults(40, 5.0, 3.0, fps=16.0, num_frames=81, sizes=SIZES_480P,
                      negative_prompt="镜头晃动，" + WAN_NEGATIVE_PROMPT),
    size_multiple=16,
    family=WAN,
    uses_clip=True,
)
I2V_14B_720P = Variant(
    name="wan2.1-i2v-14b-720p",
    conditioning=ChannelConcat(),
    defaults=Defaults(40, 5.0, 5.0, fps=16.0, num_frames=81, sizes=SIZES_720P,
                      negative_prompt="镜头晃动，" + WAN_NEGATIVE_PROMPT),
    size_multiple=16,
    family=WAN,
    uses_clip=True,
)
# Wan2.1 generate.py: flf2v runs 50 steps with shift 16; negative prompt prefixed "镜头切换，" ("scene cut,").
FLF2V_14B = Variant(
    name="wan2.1-flf2v-14b-720p",
    conditioning=ChannelConcat(),
    defaults=Defaults(50, 5.0, 16.0, fps=16.0, num_frames=81, sizes=SIZES_720P,
                      negative_prompt="镜头切换，" + WAN_NEGATIVE_PROMPT),
    size_multiple=16,
    family=WAN,
    uses_clip=True,
    takes_last_image=True,
    accepts_last_image=True,
)
# wan/configs/wan_i2v_A14B.py: 40 steps, shift 5.0, guide 3.5 for both experts, boundary 0.900 (read from
# model_index.json), 81 frames at 16 fps; generate.py's default size is 1280x720.
I2V_A14B = Variant(
    name="wan2.2-i2v-a14b",
    conditioning=ChannelConcat(),
    defaults=Defaults(40, 3.5, 5.0, fps=16.0, num_frames=81, sizes=SIZES_720P + SIZES_480P, guidance_scale_2=3.5,
                      negative_prompt=WAN_NEGATIVE_PROMPT),
    size_multiple=16,
    family=WAN,
    two_experts=True,
    accepts_last_image=True,
)

VARIANTS = {v.name: v for v in (TI2V_5B, I2V_14B_480P, I2V_14B_720P, FLF2V_14B, I2V_A14B)}


def load_variant(model_dir: str | Path, name: str = "") -> Variant:
    """The variant of a model directory: as recorded by the converter (with the default settings it
    wrote, which a user may have edited), else detected from the diffusers configs."""
    index = read_config(Path(model_dir), "model_index.json")
    recorded = index.get("_mlx_i2v")
    if recorded is None:
        return detect_variant(model_dir, name)
    try:
        variant = VARIANTS[recorded["variant"]]
        defaults = recorded.get("defaults")
        if defaults is None:
            return variant
        fields = {k: tuple(map(tuple, v)) if k == "sizes" else v for k, v in defaults.items()}
        return replace(variant, defaults=Defaults(**{"negative_prompt": WAN_NEGATIVE_PROMPT, **fields}))
    except (KeyError, TypeError, InvalidInputError) as e:
        raise WeightLoadError(f"{model_dir}: malformed _mlx_i2v entry in model_index.json ({e})") from None


def detect_variant(model_dir: str | Path, name: str = "") -> Variant:
    """Recognise the variant of a diffusers-layout directory from its configs. ``name`` (the repo id or
    directory name) only separates Wan2.1-I2V 480P from 720P."""
    model_dir = Path(model_dir)
    index = read_config(model_dir, "model_index.json")
    if index.get("expand_timesteps"):
        return TI2V_5B
    if _present(index, "transformer_2") and index.get("boundary_ratio") is not None:
        return I2V_A14B
    transformer = read_config(model_dir / "transformer")
    if transformer.get("image_dim") is not None:
        if transformer.get("pos_embed_seq_len"):
            return FLF2V_14B
        return I2V_14B_720P if "720" in (name or model_dir.name) else I2V_14B_480P
    raise WeightLoadError(f"{model_dir}: unsupported Wan variant ({_describe_index(index)})")


def _present(index: dict[str, Any], component: str) -> bool:
    entry = index.get(component)
    return isinstance(entry, list) and entry[0] is not None


def _describe_index(index: dict[str, Any]) -> str:
    return f"pipeline {index.get('_class_name', '?')}, components " + ", ".join(
        k for k in index if not k.startswith("_") and _present(index, k)
    )
