"""The Wan variants as data: how each conditions on the image and what it generates by default.

A variant is recognised from the checkpoint itself (``model_index.json`` and the transformer config),
never from the directory name alone, so a renamed or converted copy still loads as what it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .conditioning import Conditioning, FirstFrameLatent
from .errors import WeightLoadError
from .weights import read_config

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


@dataclass(frozen=True)
class Defaults:
    """Generation settings a variant uses when the caller leaves them unset (the original Wan configs)."""

    num_inference_steps: int
    guidance_scale: float
    fps: float
    num_frames: int
    sizes: tuple[tuple[int, int], ...]  # (height, width) choices; the one closest to the image's aspect wins
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    flow_shift: float | None = None  # None: the checkpoint's scheduler_config.json decides

    def size_for(self, aspect: float) -> tuple[int, int]:
        """The default (height, width) whose width/height ratio is closest to ``aspect``."""
        return min(self.sizes, key=lambda hw: abs(hw[1] / hw[0] - aspect))


@dataclass(frozen=True)
class Variant:
    """One member of the Wan family: its name, conditioning strategy and defaults."""

    name: str
    conditioning: Conditioning
    defaults: Defaults
    # Spatial multiple for height/width: VAE stride x transformer patch (32 for TI2V-5B, 16 otherwise).
    size_multiple: int


TI2V_5B = Variant(
    name="wan2.2-ti2v-5b",
    conditioning=FirstFrameLatent(),
    # wan/configs/wan_ti2v_5B.py: 50 steps, guide 5.0, shift 5.0, 121 frames at 24 fps, 704x1280 or 1280x704.
    defaults=Defaults(
        num_inference_steps=50,
        guidance_scale=5.0,
        fps=24.0,
        num_frames=121,
        sizes=((704, 1280), (1280, 704)),
        flow_shift=5.0,
    ),
    size_multiple=32,
)


def detect_variant(model_dir: str | Path) -> Variant:
    """Recognise the variant of a diffusers-layout directory from its configs."""
    model_dir = Path(model_dir)
    index = read_config(model_dir, "model_index.json")
    if index.get("expand_timesteps"):
        return TI2V_5B
    raise WeightLoadError(f"{model_dir}: unsupported Wan variant ({_describe_index(index)})")


def _describe_index(index: dict[str, Any]) -> str:
    return f"pipeline {index.get('_class_name', '?')}, components " + ", ".join(
        k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0]
    )
