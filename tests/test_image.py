"""Photos as people have them: EXIF orientation, 16-bit scans, palette/CMYK/LA images, transparency,
extreme sizes, crop/rotate/fit options."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
from PIL import Image

from mlx_i2v.errors import InvalidInputError
from mlx_i2v.image import ImageOptions, LoadReport, fit_to_frame, load_image, parse_color


def _pattern(width: int = 12, height: int = 8) -> np.ndarray:
    """A photo whose every pixel differs, so any transposition shows."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 20, y * 30, (x * 7 + y * 13) % 256], axis=-1).astype(np.uint8)


def _rgb(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


@pytest.mark.parametrize(
    "orientation, expected",
    [
        (3, lambda a: np.rot90(a, 2)),
        (6, lambda a: np.rot90(a, -1)),  # stored landscape, shown rotated 90 degrees clockwise: a phone portrait
        (8, lambda a: np.rot90(a, 1)),
        (2, lambda a: a[:, ::-1]),
    ],
)
def test_exif_orientation_is_applied(tmp_path, orientation, expected):
    stored = _pattern()
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "phone.png"
    Image.fromarray(stored).save(path, exif=exif)
    np.testing.assert_array_equal(_rgb(load_image(path)), expected(stored))


def test_16_bit_grayscale_scan_keeps_its_tones(tmp_path):
    values = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    path = tmp_path / "scan.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")  # Pillow reads it as 16-bit
    expected = np.round(values / 257.0)
    for source in (path, Image.fromarray(values)):
        out = _rgb(load_image(source))
        assert np.abs(out - expected[..., None]).max() <= 1
        assert out.min() == 0 and out.max() == 255 and 100 < out.mean() < 155  # not all white


def test_palette_cmyk_and_grayscale_modes(tmp_path):
    palette = Image.new("P", (4, 4))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putpixel((1, 1), 1)
    out = _rgb(load_image(palette))
    assert tuple(out[0, 0]) == (10, 20, 30) and tuple(out[1, 1]) == (200, 100, 50)

    red = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    red.save(tmp_path / "red.tif")
    red.save(tmp_path / "red.jpg", quality=95)
    assert tuple(_rgb(load_image(tmp_path / "red.tif"))[0, 0]) == (255, 0, 0)
    assert np.abs(_rgb(load_image(tmp_path / "red.jpg")) - [255, 0, 0]).max() <= 3

    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    np.testing.assert_array_equal(_rgb(load_image(gray)), np.repeat(gray[..., None], 3, axis=-1))


def test_transparent_pixels_are_composited_over_the_background(tmp_path, caplog):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255  # hidden red under fully transparent pixels
    rgba[:4, :, 3] = 255  # top half opaque red
    path = tmp_path / "logo.png"
    Image.fromarray(rgba).save(path)
    with caplog.at_level(logging.WARNING, logger="mlx_i2v"):
        out = _rgb(load_image(path))
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[7, 7]) == (255, 255, 255)
    assert "transparent" in caplog.text and "255,255,255" in caplog.text
    out = _rgb(load_image(path, ImageOptions(background="black")))
    assert tuple(out[7, 7]) == (0, 0, 0)

    # Half-transparent gray over white, and a palette image with a transparent index.
    la = Image.new("LA", (2, 2), (100, 128))
    expected = round(100 * 128 / 255 + 255 * (1 - 128 / 255))
    assert abs(int(_rgb(load_image(la))[0, 0, 0]) - expected) <= 1
    palette = Image.new("P", (2, 2))
    palette.putpalette([255, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert tuple(_rgb(load_image(palette, ImageOptions(background=(1, 2, 3))))[0, 0]) == (1, 2, 3)

    caplog.clear()
    opaque = rgba.copy()
    opaque[..., 3] = 255
    with caplog.at_level(logging.WARNING, logger="mlx_i2v"):
        load_image(opaque)
    assert caplog.text == ""  # an alpha channel that hides nothing is no news


def test_extreme_aspect_ratio_is_cheap():
    # A 5000x1 image covering a 1280x704 frame: scaling all of it first needed a 3.5M x 704 image (10 GB).
    line = Image.fromarray(_pattern(5000, 1))
    report = LoadReport()
    tic = time.perf_counter()
    out = fit_to_frame(load_image(line, report=report), 1280, 704, report=report)
    assert time.perf_counter() - tic < 2.0
    assert out.size == (1280, 704)
    assert report.peak < 20e6  # a few frame-sized buffers, not gigabytes


def test_cover_resamples_only_the_visible_part_like_a_full_resize():
    photo = Image.fromarray(_pattern(300, 200))
    out = np.asarray(fit_to_frame(photo, 96, 96), dtype=float)
    full = photo.resize((144, 96), Image.Resampling.LANCZOS).crop((24, 0, 120, 96))  # the old way
    assert np.abs(out - np.asarray(full, dtype=float)).mean() < 2.0
    big = Image.fromarray(np.tile(_pattern(300, 200), (10, 10, 1)))  # 3000x2000: reduced first
    report = LoadReport()
    assert fit_to_frame(big, 96, 64, report=report).size == (96, 64)
    assert 0 < report.peak < 2 * 3000 * 2000 * 4


def test_images_past_the_decompression_bomb_limit(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.fromarray(_pattern(100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # 10,000 pixels is past twice the limit
    with pytest.raises(InvalidInputError, match="cannot read image .*exceeds limit") as e:
        load_image(path)
    assert "\n" not in str(e.value)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # past the limit, within twice it: a notice
    report = LoadReport()
    assert load_image(path, report=report).size == (100, 100)
    assert report.notices == [f"{path} is very large (100x100): decoding it takes a lot of memory"]


def test_rotate_then_crop_then_contain():
    a = _pattern(12, 8)
    rotated = _rgb(load_image(a, ImageOptions(rotate=90)))
    np.testing.assert_array_equal(rotated, np.rot90(a, -1))  # clockwise
    np.testing.assert_array_equal(_rgb(load_image(a, ImageOptions(rotate=270))), np.rot90(a, 1))
    cropped = _rgb(load_image(a, ImageOptions(rotate=90, crop=(1, 2, 5, 4))))
    np.testing.assert_array_equal(cropped, np.rot90(a, -1)[2:6, 1:6])

    square = Image.fromarray(np.full((10, 10, 3), 128, np.uint8))
    padded = np.asarray(fit_to_frame(square, 40, 20, fit="contain", background=(0, 0, 255)))
    assert padded.shape == (20, 40, 3)
    assert tuple(padded[10, 20]) == (128, 128, 128)  # the photo, whole, in the middle
    assert tuple(padded[10, 2]) == (0, 0, 255) and tuple(padded[10, 37]) == (0, 0, 255)  # the padding
    assert (np.asarray(fit_to_frame(square, 40, 20)) == 128).all()  # cover: no padding


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(rotate=45), "rotate"),
        (dict(rotate=True), "rotate"),
        (dict(fit="stretch"), "fit"),
        (dict(crop=(0, 0, 10)), "crop"),
        (dict(crop=(0, 0, 0, 5)), "crop width and height"),
        (dict(crop=(-1, 0, 5, 5)), "crop x"),
        (dict(crop=(0.5, 0, 5, 5)), "crop x"),
        (dict(background="blorp"), "colour"),
        (dict(background=(0, 0, 256)), "background"),
    ],
)
def test_bad_image_options(options, message):
    with pytest.raises(InvalidInputError, match=message):
        ImageOptions(**options)


def test_crop_outside_the_photo_and_empty_images():
    with pytest.raises(InvalidInputError, match="does not fit inside the 12x8 photo"):
        load_image(_pattern(), ImageOptions(crop=(10, 0, 5, 5)))
    with pytest.raises(InvalidInputError, match="empty"):
        load_image(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(InvalidInputError, match="empty"):
        load_image(Image.new("RGB", (0, 0)))


def test_colours():
    assert parse_color("white") == (255, 255, 255)
    assert parse_color("#102030") == (16, 32, 48)
    assert parse_color("1, 2,3") == (1, 2, 3)
    assert parse_color([4, 5, 6]) == (4, 5, 6)
    metadata = ImageOptions(background="black").metadata()
    assert metadata == {"crop": None, "rotate": 0, "fit": "cover", "background": [0, 0, 0]}
