"""Reading the user's photo and fitting it to the video frame."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InvalidInputError

log = logging.getLogger(__name__)

ImageInput = Union[str, Path, Image.Image, np.ndarray]


def load_image(image: ImageInput) -> Image.Image:
    """Open a path, PIL image or uint8 array (H, W, 3|4) / (H, W) as an RGB PIL image.

    Raises :class:`InvalidInputError` with a one-line message for a missing or unreadable file.
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise InvalidInputError(
                f"image array must be uint8 (H, W), (H, W, 3) or (H, W, 4); got {image.dtype} {image.shape}"
            )
        return Image.fromarray(image).convert("RGB")
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise InvalidInputError(f"image not found: {path}")
        try:
            with Image.open(path) as im:
                im.load()
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise InvalidInputError(f"cannot read image {path}: {e}") from None
    raise InvalidInputError(f"unsupported image type {type(image).__name__}; pass a path, PIL image or uint8 array")


def fit_to_frame(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize to cover (width, height) keeping the aspect ratio (Lanczos, as diffusers' VideoProcessor),
    then center-crop. An image already at the target size is returned unchanged, so inputs prepared at
    the video size match the reference pipeline exactly."""
    if image.size == (width, height):
        return image
    scale = max(width / image.width, height / image.height)
    resized_w, resized_h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    resized = image.resize((resized_w, resized_h), Image.Resampling.LANCZOS)
    left, top = (resized_w - width) // 2, (resized_h - height) // 2
    return resized.crop((left, top, left + width, top + height))


def to_model_range(image: Image.Image) -> np.ndarray:
    """RGB PIL image -> float32 (H, W, 3) in [-1, 1], as diffusers' VaeImageProcessor normalises."""
    return np.asarray(image, dtype=np.float32) / 255.0 * 2.0 - 1.0
