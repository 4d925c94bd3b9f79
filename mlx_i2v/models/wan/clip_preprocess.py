"""CLIP image preprocessing, bit-for-bit transformers' ``CLIPImageProcessor`` on its PIL backend.

transformers 5 picks the torchvision backend when torchvision is installed and falls back to
``CLIPImageProcessorPil`` otherwise; diffusers' Wan I2V pipeline calls whichever it gets. The PIL path
is the reference here because it needs nothing beyond Pillow and NumPy. Per image it does:

1. convert to RGB, compositing any transparency onto white;
2. resize the uint8 image with Pillow (bicubic for CLIP) so the shortest edge is ``size["shortest_edge"]``
   and the long edge ``int(shortest * long / short)`` (truncated, not rounded);
3. centre-crop in uint8 (offset ``(size - crop) // 2``), zero-padding an image smaller than the crop;
4. rescale: float64 multiply by ``rescale_factor`` (1/255), then cast to float32;
5. normalize in float32: ``(x - mean) / std``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from ...errors import InvalidInputError
from ...weights import read_config

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(image: Image.Image) -> Image.Image:
    """Drop alpha the way transformers does: composite onto opaque white (plain ``convert`` would
    keep the colour under transparent pixels)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(height, width) after an aspect-preserving resize (transformers' ``get_resize_output_image_size``
    with ``default_to_square=False``): the long edge is truncated by ``int``."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Crop (H, W, C) to (height, width) around the centre like transformers' ``center_crop``.

    Along an axis longer than the target the crop starts at ``(size - target) // 2``; along a shorter
    one the image is zero-padded with ``ceil((target - size) / 2)`` before it. transformers pads the
    whole image first, but the two axes are independent, so this is the same result.
    """
    for axis, target in ((0, height), (1, width)):
        size = image.shape[axis]
        if size >= target:
            start = (size - target) // 2
            image = image[start : start + target] if axis == 0 else image[:, start : start + target]
        else:
            before = (target - size + 1) // 2
            pad = [(0, 0)] * image.ndim
            pad[axis] = (before, target - size - before)
            image = np.pad(image, pad)
    return image


def _size_dict(value: int | Sequence[int] | Mapping[str, int], *, square: bool) -> dict[str, int]:
    """transformers' ``get_size_dict`` for legacy configs: an int is a square (``crop_size``) or a
    shortest edge (``size``, since CLIP sets ``default_to_square=False``); a pair is (height, width)."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, int):
        return {"height": value, "width": value} if square else {"shortest_edge": value}
    height, width = value
    return {"height": height, "width": width}


@dataclass(frozen=True)
class CLIPImageProcessor:
    """The fields of ``image_processor/preprocessor_config.json`` that the CLIP processor uses.

    ``size`` is ``{"shortest_edge": n}`` (aspect-preserving) or ``{"height": h, "width": w}``;
    ``crop_size`` is ``{"height": h, "width": w}``. ``resample`` is a Pillow filter id (3 = bicubic).
    Images are always converted to RGB (``do_convert_rgb``): the tower takes three channels, and for
    RGB input the flag changes nothing.
    """

    do_resize: bool = True
    size: Mapping[str, int] = field(default_factory=lambda: {"shortest_edge": 224})
    resample: int = Image.Resampling.BICUBIC
    do_center_crop: bool = True
    crop_size: Mapping[str, int] = field(default_factory=lambda: {"height": 224, "width": 224})
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD

    def __post_init__(self) -> None:
        if set(self.size) not in ({"shortest_edge"}, {"height", "width"}):
            raise InvalidInputError(
                "image_processor: size must have keys {'shortest_edge'} or {'height', 'width'}, "
                f"got {dict(self.size)}"
            )
        if set(self.crop_size) != {"height", "width"}:
            raise InvalidInputError(
                f"image_processor: crop_size must have keys {{'height', 'width'}}, got {dict(self.crop_size)}"
            )
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise InvalidInputError("image_processor: image_mean and image_std need one value per RGB channel")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CLIPImageProcessor:
        """From a ``preprocessor_config.json`` dict; unknown keys (``image_processor_type``, ...) are
        ignored, missing ones take transformers' CLIP defaults."""
        kwargs = {k: data[k] for k in cls.__dataclass_fields__ if data.get(k) is not None}
        if "size" in kwargs:
            kwargs["size"] = _size_dict(kwargs["size"], square=False)
        if "crop_size" in kwargs:
            kwargs["crop_size"] = _size_dict(kwargs["crop_size"], square=True)
        for key in ("image_mean", "image_std"):
            if key in kwargs:
                value = kwargs[key]
                kwargs[key] = tuple(value) if isinstance(value, Sequence) else (value,) * 3
        return cls(**kwargs)

    @classmethod
    def from_folder(
        cls, folder: str | Path, filename: str = "preprocessor_config.json"
    ) -> CLIPImageProcessor:
        """Read ``image_processor/preprocessor_config.json``."""
        return cls.from_dict(read_config(folder, filename))

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """One PIL image (any mode, any size) -> (H, W, 3) float32."""
        image = to_rgb(image)
        if self.do_resize:
            if "shortest_edge" in self.size:
                height, width = shortest_edge_size(image.height, image.width, self.size["shortest_edge"])
            else:
                height, width = self.size["height"], self.size["width"]
            # Pillow resamples the uint8 image; transformers never resizes in float.
            image = image.resize((width, height), resample=Image.Resampling(self.resample))
        pixels = np.asarray(image)
        if self.do_center_crop:
            pixels = center_crop(pixels, self.crop_size["height"], self.crop_size["width"])
        if self.do_rescale:
            # float64 product, then float32, exactly as transformers' rescale (not a float32 multiply).
            pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            pixels = pixels.astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)
            std = np.asarray(self.image_std, dtype=np.float32)
            pixels = (pixels - mean) / std
        return pixels

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Preprocess a batch of PIL images.

        Returns:
            (B, H, W, 3) float32, channels-last (transformers' ``pixel_values`` moved from NCHW), with
            (H, W) = ``crop_size`` when centre-cropping.
        """
        if not images or not all(isinstance(im, Image.Image) for im in images):
            raise InvalidInputError("image_processor: expected a non-empty list of PIL images")
        arrays = [self.preprocess(im) for im in images]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise InvalidInputError(f"image_processor: images preprocess to different sizes {sorted(shapes)}")
        return np.stack(arrays)
