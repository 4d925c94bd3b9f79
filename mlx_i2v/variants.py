"""What a variant is: one member of a model family, as data (its conditioning strategy, defaults and
family strategies). The variants themselves live with their family: Wan's in
:mod:`mlx_i2v.families.wan.variants`, LTX-Video's in :mod:`mlx_i2v.families.ltx.variants`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import validation
from .conditioning import Conditioning
from .errors import InvalidInputError
from .family import Family, PaddedPrompts, PromptEncoder


@dataclass(frozen=True)
class Defaults:
    """Generation settings a variant uses when the caller leaves them unset (its family's reference
    configs)."""

    num_inference_steps: int
    guidance_scale: float
    flow_shift: float
    fps: float
    num_frames: int
    sizes: tuple[tuple[int, int], ...]  # (height, width) choices; the one closest to the image's aspect wins
    negative_prompt: str
    guidance_scale_2: float | None = None  # the low-noise expert's guidance (two-expert models only)
    # The timestep-conditioned decoder's timestep and noise (LTX-Video 0.9.1+); None: no such decoder.
    decode_timestep: float | None = None
    decode_noise_scale: float | None = None
    # The noise added to fully held conditioning latents each step (LTX-Video 0.9.5+); None: not taken.
    image_cond_noise_scale: float | None = None

    def __post_init__(self) -> None:
        """Checked, because a converted model's defaults are a JSON file a user may edit."""
        validation.integer("num_inference_steps", self.num_inference_steps, minimum=1)
        validation.integer("num_frames", self.num_frames, minimum=1)
        validation.number("guidance_scale", self.guidance_scale)
        validation.number("flow_shift", self.flow_shift, inclusive=False)
        validation.number("fps", self.fps, inclusive=False)
        validation.text("negative_prompt", self.negative_prompt)
        for name in ("guidance_scale_2", "decode_timestep", "decode_noise_scale", "image_cond_noise_scale"):
            if getattr(self, name) is not None:
                validation.number(name, getattr(self, name))
        if not self.sizes or not all(isinstance(hw, tuple) and len(hw) == 2 for hw in self.sizes):
            raise InvalidInputError(f"sizes must be a list of [height, width] pairs, got {self.sizes!r}")
        for h, w in self.sizes:
            validation.integer("a default height", h, minimum=1)
            validation.integer("a default width", w, minimum=1)

    def size_for(self, aspect: float) -> tuple[int, int]:
        """The default (height, width) whose width/height ratio is closest to ``aspect``."""
        return min(self.sizes, key=lambda hw: abs(hw[1] / hw[0] - aspect))


@dataclass(frozen=True)
class Variant:
    """One member of a model family: its name, conditioning strategy, components and defaults."""

    name: str
    conditioning: Conditioning
    defaults: Defaults
    size_multiple: int  # VAE stride x transformer patch: 32 for TI2V-5B, 16 otherwise
    family: Family
    uses_clip: bool = False  # CLIP ViT-H image tokens in cross-attention (Wan2.1)
    takes_last_image: bool = False  # first-last-frame-to-video: a last image is required
    # A last image may be given (FLF2V; A14B, whose channel-concat input has the slot, as in diffusers):
    # what closes a loop.
    accepts_last_image: bool = False
    two_experts: bool = False  # Wan2.2-A14B: high-noise and low-noise transformers
    prompts: PromptEncoder = field(default_factory=PaddedPrompts)  # how prompts become text rows
