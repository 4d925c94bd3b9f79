"""Lab colour matching against scikit-image's conversions and a re-implementation of Wan2GP's
``match_and_blend_colors`` on whole segments."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from mlx_i2v.colour import lab_statistics, lab_to_rgb, match_colour, rgb_to_lab

skimage_color = pytest.importorskip("skimage.color")


def _frames(seed: int, n: int = 3, tint=(0.0, 0.0, 0.0), gain: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.random((n, 12, 16, 3)) * 0.4 + 0.3
    return np.clip((base - 0.5) * gain + 0.5 + np.asarray(tint), 0, 1).astype(np.float32)


def test_lab_conversions_match_scikit_image():
    rgb = np.random.default_rng(0).random((20, 30, 3))
    np.testing.assert_allclose(rgb_to_lab(rgb), skimage_color.rgb2lab(rgb), atol=1e-10)
    lab = skimage_color.rgb2lab(rgb) + np.random.default_rng(1).normal(0, 20, rgb.shape)  # partly out of gamut
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skimage warns about the negative Z it clips, as we clip it silently
        np.testing.assert_allclose(lab_to_rgb(lab), skimage_color.lab2rgb(lab), atol=1e-10)
    np.testing.assert_allclose(rgb_to_lab([1.0, 1.0, 1.0]), [100, 0, 0], atol=1e-2)  # D65 white


def _wan2gp_segment(frames: np.ndarray, reference: np.ndarray, strength: float) -> np.ndarray:
    """Wan2GP's per-channel Lab transfer (skimage conversions, clip, blend), with the source and reference
    statistics taken over the whole segment and all reference frames."""
    src = skimage_color.rgb2lab(frames.astype(np.float64))
    ref = skimage_color.rgb2lab(reference.astype(np.float64))
    mu_s, sd_s = src.mean(axis=(0, 1, 2)), src.std(axis=(0, 1, 2))
    mu_r, sd_r = ref.mean(axis=(0, 1, 2)), ref.std(axis=(0, 1, 2))
    corrected = np.clip(skimage_color.lab2rgb((src - mu_s) * (sd_r / sd_s) + mu_r), 0, 1)
    return (1 - strength) * frames + strength * corrected


@pytest.mark.parametrize("strength", [1.0, 0.4])
def test_match_colour_moves_segment_statistics_to_the_reference(strength):
    reference = _frames(0, n=2)
    drifted = _frames(1, tint=(0.08, -0.03, -0.06), gain=0.7)  # warmer and flatter
    out = match_colour(drifted, reference, strength)
    assert out.dtype == np.float32 and out.shape == drifted.shape
    np.testing.assert_allclose(out, _wan2gp_segment(drifted, reference, strength), atol=2e-6)
    if strength == 1.0:  # in gamut, the transfer lands on the reference's statistics
        for got, want in zip(lab_statistics(out), lab_statistics(reference)):
            np.testing.assert_allclose(got, want, atol=0.05)


def test_match_colour_off_and_flat_segments():
    frames = _frames(2)
    assert match_colour(frames, _frames(3), 0.0) is frames  # strength 0: untouched
    flat = np.full((2, 4, 4, 3), 0.5, np.float32)
    out = match_colour(flat, _frames(3), 1.0)  # no spread to scale: only the mean moves
    assert np.isfinite(out).all() and np.ptp(out.reshape(-1, 3), axis=0).max() < 1e-6  # still flat
    np.testing.assert_allclose(lab_statistics(out)[0], lab_statistics(_frames(3))[0], atol=0.05)
