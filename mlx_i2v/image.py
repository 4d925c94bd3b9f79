"""Reading the user's photo and fitting it to the video frame.

A photo is prepared in this order (:func:`load_image`): decoded, turned upright by its EXIF orientation
(as ``PIL.ImageOps.exif_transpose``), rotated clockwise by ``ImageOptions.rotate``, cropped to
``ImageOptions.crop``, and converted to 8-bit RGB: 16-bit grayscale is scaled to 8 bits (Pillow alone
clips it to white), palette, CMYK and grayscale-with-alpha images are converted, and transparent pixels
are composited over ``ImageOptions.background`` (with a logged notice) rather than revealing the colours
stored under them. :func:`fit_to_frame` then covers the frame and centre-crops (``fit="cover"``) or fits
inside it and pads with the background (``fit="contain"``), resampling only the part of the photo that
is used, so an extreme aspect ratio never builds a huge intermediate.

:class:`LoadReport` collects the notices (transparency, a very large image) and counts the bytes of the
Pillow image buffers alive at once during these steps, so the pipeline can include image loading in the
peak memory it reports.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import ExifTags, Image, ImageColor, ImageOps

from .errors import InvalidInputError
from .validation import integer

log = logging.getLogger(__name__)

ImageInput = Union[str, Path, Image.Image, np.ndarray]
RGB = tuple[int, int, int]

FITS = ("cover", "contain")
ROTATIONS = {0: None, 90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_90}
# Downscaling by more than this factor first box-averages by an integer factor (``Image.reduce``), so that
# Lanczos reads at most this many source pixels per output pixel; Pillow documents 3 as indistinguishable
# from a direct Lanczos resize.
REDUCING_GAP = 3.0


@dataclass(frozen=True)
class ImageOptions:
    """How a photo becomes a frame of the video.

    Attributes:
        crop: (x, y, width, height) in pixels of the upright, rotated photo, or None for all of it.
        rotate: clockwise rotation in degrees, 0, 90, 180 or 270, after the EXIF orientation.
        fit: "cover" (scale to cover the frame, centre-crop) or "contain" (scale to fit inside, pad).
        background: RGB colour under transparent pixels and of the padding; a 3-tuple of 0-255 ints or a
            colour string Pillow knows ("white", "#202020", "rgb(0,0,0)") or "R,G,B".
    """

    crop: tuple[int, int, int, int] | None = None
    rotate: int = 0
    fit: str = "cover"
    background: RGB | str = (255, 255, 255)

    def __post_init__(self) -> None:
        if self.crop is not None:
            if not isinstance(self.crop, (tuple, list)) or len(self.crop) != 4:
                raise InvalidInputError(f"crop must be (x, y, width, height), got {self.crop!r}")
            x, y, w, h = (integer(f"crop {n}", v, minimum=0) for n, v in zip("xywh", self.crop))
            if w < 1 or h < 1:
                raise InvalidInputError(f"crop width and height must be >= 1, got {w}x{h}")
            object.__setattr__(self, "crop", (x, y, w, h))
        if isinstance(self.rotate, (bool, np.bool_)) or self.rotate not in ROTATIONS:
            raise InvalidInputError(f"rotate must be 0, 90, 180 or 270 (degrees clockwise), got {self.rotate!r}")
        object.__setattr__(self, "rotate", int(self.rotate))
        if self.fit not in FITS:
            raise InvalidInputError(f"fit must be 'cover' or 'contain', got {self.fit!r}")
        object.__setattr__(self, "background", parse_color(self.background))

    def metadata(self) -> dict[str, object]:
        """The options as JSON-ready values, for the video's metadata."""
        return {
            "crop": None if self.crop is None else list(self.crop),
            "rotate": self.rotate,
            "fit": self.fit,
            "background": list(self.background),
        }


def parse_color(color: RGB | str) -> RGB:
    """An RGB tuple from a 3-sequence of 0-255 ints, "R,G,B", or a colour name/hex string."""
    if isinstance(color, str):
        text = color.strip()
        parts = text.split(",")
        if len(parts) == 3 and all(p.strip().isdigit() for p in parts):
            color = tuple(int(p) for p in parts)
        else:
            try:
                color = ImageColor.getrgb(text)[:3]
            except ValueError:
                raise InvalidInputError(f"unknown colour {color!r} (use a name, #RRGGBB or R,G,B)") from None
    if not isinstance(color, (tuple, list)) or len(color) != 3:
        raise InvalidInputError(f"background must be an (R, G, B) colour, got {color!r}")
    rgb = tuple(integer("background channel", c, minimum=0, maximum=255) for c in color)
    return rgb  # type: ignore[return-value]


# --- memory ---------------------------------------------------------------------------------------


def image_bytes(image: Image.Image) -> int:
    """Bytes of a Pillow image's buffer: 1 per pixel for "1", "L" and "P", 2 for 16-bit, else 4 (Pillow
    stores RGB and every other multi-band or 32-bit mode in 4 bytes per pixel)."""
    mode = image.mode
    per_pixel = 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4
    return image.width * image.height * per_pixel


class LoadReport:
    """What preparing photos noticed and cost: ``notices`` (one-line warnings for the user) and ``peak``,
    the most bytes of Pillow image buffers alive at once: each step's input and output (and the reduced
    intermediate of a large downscale), from their sizes and modes, on top of the ``held`` photos
    already prepared."""

    def __init__(self) -> None:
        self.peak = 0
        self.held = 0  # prepared photos that stay alive for the rest of the generation
        self.notices: list[str] = []

    def step(self, *alive: Image.Image | int) -> None:
        """Record one step during which ``alive`` (images or byte counts) exist together."""
        total = sum(a if isinstance(a, int) else image_bytes(a) for a in alive)
        self.peak = max(self.peak, self.held + total)

    def hold(self, image: Image.Image) -> None:
        self.held += image_bytes(image)


# --- loading ----------------------------------------------------------------------------------------


def load_image(
    image: ImageInput, options: ImageOptions | None = None, report: LoadReport | None = None
) -> Image.Image:
    """Open a path, PIL image or uint8 array (H, W), (H, W, 3) or (H, W, 4) as the RGB photo the model
    sees, prepared as the module docstring describes (EXIF orientation, rotation, crop, 8-bit RGB over the
    background). Notices are logged as warnings, or only collected in ``report`` when one is given.

    Raises :class:`InvalidInputError` with a one-line message for a missing, unreadable, empty or
    oversized image, or a crop outside it.
    """
    options = options or ImageOptions()
    if report is not None:
        return _prepare(image, options, report)
    report = LoadReport()
    photo = _prepare(image, options, report)
    for notice in report.notices:
        log.warning("%s", notice)
    return photo


def _prepare(image: ImageInput, options: ImageOptions, report: LoadReport) -> Image.Image:
    im = _decode(image, report)
    if im.width < 1 or im.height < 1:
        raise InvalidInputError(f"the image is empty ({im.width}x{im.height})")
    im = _step(im, _upright, report)
    transpose = ROTATIONS[options.rotate]
    if transpose is not None:
        im = _step(im, lambda x: x.transpose(transpose), report)
    if options.crop is not None:
        x, y, w, h = options.crop
        if x + w > im.width or y + h > im.height:
            raise InvalidInputError(
                f"crop {x},{y},{w},{h} (x,y,width,height) does not fit inside the {im.width}x{im.height} photo"
                + (" (after rotation)" if options.rotate else "")
            )
        im = _step(im, lambda i: i.crop((x, y, x + w, y + h)), report)
    im = _step(im, lambda i: _to_rgb(i, options.background, report), report)
    report.hold(im)
    return im


def _step(image: Image.Image, operation, report: LoadReport) -> Image.Image:
    out = operation(image)
    if out is not image:
        report.step(image, out)
    return out


def _decode(image: ImageInput, report: LoadReport) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise InvalidInputError(
                f"image array must be uint8 (H, W), (H, W, 3) or (H, W, 4); got {image.dtype} {image.shape}"
            )
        if image.size == 0:
            raise InvalidInputError(f"the image array is empty (shape {image.shape})")
        im = Image.fromarray(np.ascontiguousarray(image))
        report.step(image.nbytes, im)
        return im
    if isinstance(image, (str, Path)):
        return _decode_file(Path(image), report)
    raise InvalidInputError(f"unsupported image type {type(image).__name__}; pass a path, PIL image or uint8 array")


def _decode_file(path: Path, report: LoadReport) -> Image.Image:
    if not path.is_file():
        raise InvalidInputError(f"image not found: {path}")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                report.step(im)
                # The file closes on leaving the block; the decoded pixels stay with the image.
                decoded = im
        if any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught):
            width, height = decoded.size
            report.notices.append(f"{path} is very large ({width}x{height}): decoding it takes a lot of memory")
        return decoded
    except MemoryError:
        raise
    except Exception as e:  # Pillow's decoders raise OSError, ValueError, SyntaxError, EOFError, ...
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InvalidInputError(f"cannot read image {path}: {message}") from None


def _upright(image: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: its EXIF orientation applied (a copy only when needed)."""
    if image.getexif().get(ExifTags.Base.Orientation, 1) in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(image)
    return image


def _to_rgb(image: Image.Image, background: RGB, report: LoadReport) -> Image.Image:
    """8-bit RGB: 16/32-bit grayscale scaled from its 16-bit range, transparency composited."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        values = np.asarray(image).astype(np.float32)
        return Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)).convert("RGB")
    if image.has_transparency_data:
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        lowest = rgba.getextrema()[3][0]
        if lowest == 255:
            return rgba.convert("RGB")
        report.notices.append(
            "the image has transparent pixels: composited over the background colour "
            f"{','.join(map(str, background))} (set another with background= / --background)"
        )
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


# --- fitting ----------------------------------------------------------------------------------------


def fit_to_frame(
    image: Image.Image,
    width: int,
    height: int,
    fit: str = "cover",
    background: RGB = (255, 255, 255),
    report: LoadReport | None = None,
) -> Image.Image:
    """Fit an RGB photo to a (width, height) frame with Lanczos resampling (as diffusers' VideoProcessor).

    ``fit="cover"`` scales to cover the frame and centre-crops; ``fit="contain"`` scales to fit inside
    and pads with ``background``. Only the part of the photo that is used is resampled (``box``), and
    large reductions go through ``Image.reduce`` first. An image already at the target size is returned
    unchanged, so inputs prepared at the video size match the reference pipeline exactly.
    """
    report = report or LoadReport()
    if image.size == (width, height):
        return image
    if fit == "cover":
        scale = max(width / image.width, height / image.height)
        box_w, box_h = min(image.width, width / scale), min(image.height, height / scale)
        left, top = (image.width - box_w) / 2, (image.height - box_h) / 2
        return _resample(image, (width, height), (left, top, left + box_w, top + box_h), report)
    if fit != "contain":
        raise InvalidInputError(f"fit must be 'cover' or 'contain', got {fit!r}")
    scale = min(width / image.width, height / image.height)
    size = (min(width, max(1, round(image.width * scale))), min(height, max(1, round(image.height * scale))))
    inner = _resample(image, size, (0, 0, image.width, image.height), report)
    canvas = Image.new("RGB", (width, height), tuple(background))
    report.step(inner, canvas)
    canvas.paste(inner, ((width - size[0]) // 2, (height - size[1]) // 2))
    return canvas


def _resample(image: Image.Image, size: tuple[int, int], box: tuple[float, ...], report: LoadReport) -> Image.Image:
    factor_x = int((box[2] - box[0]) / size[0] / REDUCING_GAP) or 1
    factor_y = int((box[3] - box[1]) / size[1] / REDUCING_GAP) or 1
    reduced = -(-int(box[2] - box[0]) // factor_x) * -(-int(box[3] - box[1]) // factor_y) * 4
    out = image.resize(size, Image.Resampling.LANCZOS, box=box, reducing_gap=REDUCING_GAP)
    report.step(image, reduced if factor_x * factor_y > 1 else 0, out)
    return out


def to_model_range(image: Image.Image) -> np.ndarray:
    """RGB PIL image -> float32 (H, W, 3) in [-1, 1], as diffusers' VaeImageProcessor normalises."""
    return np.asarray(image, dtype=np.float32) / 255.0 * 2.0 - 1.0
