"""Watching a clip form: the predicted clean latents of each step as small RGB frames.

Each denoising step predicts the clean latents ``x0 = x_t - sigma * v``. A linear map from the latent
channels to RGB (ComfyUI's ``Latent2RGB`` factors, ``comfy/latent_formats.py`` classes ``Wan21`` and
``Wan22``, fitted on normalised latents) turns them into a rough picture at the latent resolution (1/8 or
1/16 of the frame) for the cost of one tiny matmul, so the clip can be watched long before the VAE decodes
it. The factors belong to the VAE family, told apart by its latent width: 16 channels for the Wan2.1 VAE
(Wan2.1 models and Wan2.2-A14B), 48 for the Wan2.2 VAE (TI2V-5B).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
from PIL import Image

from .errors import InvalidInputError
from .outputs import staged_output

# fmt: off
_WAN21_FACTORS = (  # rows: latent channels 0..15; columns: R, G, B
    (-0.1299, -0.1692, 0.2932), (0.0671, 0.0406, 0.0442), (0.3568, 0.2548, 0.1747), (0.0372, 0.2344, 0.1420),
    (0.0313, 0.0189, -0.0328), (0.0296, -0.0956, -0.0665), (-0.3477, -0.4059, -0.2925), (0.0166, 0.1902, 0.1975),
    (-0.0412, 0.0267, -0.1364), (-0.1293, 0.0740, 0.1636), (0.0680, 0.3019, 0.1128), (0.0032, 0.0581, 0.0639),
    (-0.1251, 0.0927, 0.1699), (0.0060, -0.0633, 0.0005), (0.3477, 0.2275, 0.2950), (0.1984, 0.0913, 0.1861),
)
_WAN21_BIAS = (-0.1835, -0.0868, -0.3360)
_WAN22_FACTORS = (  # rows: latent channels 0..47
    (0.0119, 0.0103, 0.0046), (-0.1062, -0.0504, 0.0165), (0.0140, 0.0409, 0.0491), (-0.0813, -0.0677, 0.0607),
    (0.0656, 0.0851, 0.0808), (0.0264, 0.0463, 0.0912), (0.0295, 0.0326, 0.0590), (-0.0244, -0.0270, 0.0025),
    (0.0443, -0.0102, 0.0288), (-0.0465, -0.0090, -0.0205), (0.0359, 0.0236, 0.0082), (-0.0776, 0.0854, 0.1048),
    (0.0564, 0.0264, 0.0561), (0.0006, 0.0594, 0.0418), (-0.0319, -0.0542, -0.0637), (-0.0268, 0.0024, 0.0260),
    (0.0539, 0.0265, 0.0358), (-0.0359, -0.0312, -0.0287), (-0.0285, -0.1032, -0.1237), (0.1041, 0.0537, 0.0622),
    (-0.0086, -0.0374, -0.0051), (0.0390, 0.0670, 0.2863), (0.0069, 0.0144, 0.0082), (0.0006, -0.0167, 0.0079),
    (0.0313, -0.0574, -0.0232), (-0.1454, -0.0902, -0.0481), (0.0714, 0.0827, 0.0447), (-0.0304, -0.0574, -0.0196),
    (0.0401, 0.0384, 0.0204), (-0.0758, -0.0297, -0.0014), (0.0568, 0.1307, 0.1372), (-0.0055, -0.0310, -0.0380),
    (0.0239, -0.0305, 0.0325), (-0.0663, -0.0673, -0.0140), (-0.0416, -0.0047, -0.0023), (0.0166, 0.0112, -0.0093),
    (-0.0211, 0.0011, 0.0331), (0.1833, 0.1466, 0.2250), (-0.0368, 0.0370, 0.0295), (-0.3441, -0.3543, -0.2008),
    (-0.0479, -0.0489, -0.0420), (-0.0660, -0.0153, 0.0800), (-0.0101, 0.0068, 0.0156), (-0.0690, -0.0452, -0.0927),
    (-0.0145, 0.0041, 0.0015), (0.0421, 0.0451, 0.0373), (0.0504, -0.0483, -0.0356), (-0.0837, 0.0168, 0.0055),
)
_WAN22_BIAS = (0.0317, -0.0878, -0.1388)
# fmt: on


@dataclass(frozen=True)
class LatentRGB:
    """A linear latent-to-RGB map: ``rgb = x @ weight + bias`` in [-1, 1], shown as ``(rgb + 1) / 2``."""

    weight: tuple[tuple[float, float, float], ...]  # (C, 3)
    bias: tuple[float, float, float]

    def __call__(self, latents: mx.array) -> mx.array:
        """Normalised latents (..., C) -> uint8 RGB (..., 3)."""
        rgb = latents.astype(mx.float32) @ mx.array(self.weight) + mx.array(self.bias)
        return (mx.clip((rgb + 1.0) / 2.0, 0.0, 1.0) * 255.0).round().astype(mx.uint8)


# By the VAE's latent channel count: the Wan2.1 VAE (16) and the Wan2.2 VAE (48).
LATENT_RGB = {16: LatentRGB(_WAN21_FACTORS, _WAN21_BIAS), 48: LatentRGB(_WAN22_FACTORS, _WAN22_BIAS)}


class Preview:
    """One step's prediction of the finished clip, computed only when asked for.

    Attributes:
        latents: the predicted clean latents ``x0 = x_t - sigma * v`` (1, T, h, w, C), normalised,
            channels-last, as the sampler sees them (mx.array; for TI2V-5B frame 0 is the sampler's own
            prediction, not the photo).
    """

    def __init__(self, latents: mx.array, projection: LatentRGB | None, restore: Callable[[mx.array], mx.array]):
        self.latents = latents
        self._projection = projection
        self._restore = restore  # puts given frames (the photo, an extension's context) back in place

    @property
    def num_frames(self) -> int:
        """Latent frames (each stands for 4 video frames, the first for one)."""
        return int(self.latents.shape[1])

    def frames(self, indices: list[int] | None = None) -> np.ndarray:
        """The latent frames ``indices`` (default: all) as uint8 RGB (n, h, w, 3), at the latent size,
        with the given frames (the photo) shown as they will be decoded."""
        if self._projection is None:
            raise InvalidInputError(f"no latent-to-RGB preview is known for {self.latents.shape[-1]}-channel latents")
        x = self._restore(self.latents)[0]
        if indices is not None:
            x = x[mx.array(indices)]
        rgb = self._projection(x)
        mx.eval(rgb)
        return np.array(rgb)

    def image(self, count: int = 4, height: int = 160) -> Image.Image:
        """A strip of ``count`` latent frames evenly spaced from the first to the last, each scaled to
        ``height`` pixels: what ``mlx-i2v --preview`` writes."""
        count = max(1, min(count, self.num_frames))
        indices = np.linspace(0, self.num_frames - 1, count).round().astype(int).tolist()
        strip = np.concatenate(list(self.frames(indices)), axis=1)
        h, w = strip.shape[:2]
        scale = height / h
        return Image.fromarray(strip).resize((max(1, round(w * scale)), height), Image.Resampling.BILINEAR)


def write_png_atomically(image: Image.Image, path: str | Path) -> None:
    """Write ``image`` to ``path`` as :func:`~mlx_i2v.outputs.staged_output` writes outputs: through a
    hidden temporary file published in one step, so a reader never sees half a PNG and an interruption
    leaves no partial file (the last complete preview stays). Replaces only a PNG."""
    with staged_output(Path(path), overwrite=True, replaceable=lambda found: found == "png") as staged:
        image.save(staged.path, format="PNG", compress_level=1)  # a third faster than the default level, ~same size
