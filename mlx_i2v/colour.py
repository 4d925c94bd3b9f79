"""Colour matching between chained segments: each new segment's CIE Lab statistics are moved to those of
the frames it continues.

Extending a clip segment by segment drifts in colour and contrast (Wan-Video/Wan2.1#302, Wan2.2#172,
SwarmUI#899). The correction is Reinhard-style statistics transfer in Lab, as Wan2GP's
``match_and_blend_colors`` does: per channel, ``(x - mean_src) * std_ref / std_src + mean_ref``, back to
RGB, clipped, then blended with the uncorrected frames by a strength. Here the statistics are those of the
whole new segment (one transform for all its frames, so motion and lighting changes inside the segment
survive) against the reference frames.

The Lab conversion is sRGB (IEC 61966-2-1) with the D65 white and the 2-degree observer, with the
constants scikit-image uses (``skimage.color.rgb2lab`` / ``lab2rgb``), in numpy.
"""

from __future__ import annotations

import numpy as np

_XYZ_FROM_RGB = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_RGB_FROM_XYZ = np.linalg.inv(_XYZ_FROM_RGB)
_D65 = np.array([0.95047, 1.0, 1.08883])
_EPSILON, _KAPPA = 0.008856, 7.787  # the CIE cube-root cut-off and the slope of the linear part below it


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (..., 3) in [0, 1] -> CIE Lab (..., 3): L in [0, 100], a and b around 0. float64."""
    rgb = np.asarray(rgb, np.float64)
    linear = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = linear @ _XYZ_FROM_RGB.T / _D65
    f = np.where(xyz > _EPSILON, np.cbrt(xyz), _KAPPA * xyz + 16.0 / 116.0)
    fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
    return np.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=-1)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """CIE Lab (..., 3) -> sRGB (..., 3), clipped to [0, 1]. float64."""
    lab = np.asarray(lab, np.float64)
    fy = (lab[..., 0] + 16.0) / 116.0
    f = np.stack([lab[..., 1] / 500.0 + fy, fy, np.maximum(fy - lab[..., 2] / 200.0, 0.0)], axis=-1)
    xyz = np.where(f > 0.2068966, f**3, (f - 16.0 / 116.0) / _KAPPA) * _D65
    linear = xyz @ _RGB_FROM_XYZ.T
    rgb = np.where(linear > 0.0031308, 1.055 * np.abs(linear) ** (1 / 2.4) - 0.055, linear * 12.92)
    return np.clip(rgb, 0.0, 1.0)


def lab_statistics(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation (3,) of frames (F, H, W, 3) in Lab, one frame at a time."""
    count, total, squares = 0, np.zeros(3), np.zeros(3)
    for frame in frames:
        lab = rgb_to_lab(frame).reshape(-1, 3)
        count += len(lab)
        total += lab.sum(axis=0)
        squares += (lab**2).sum(axis=0)
    mean = total / count
    return mean, np.sqrt(np.maximum(squares / count - mean**2, 0.0))


def match_colour(frames: np.ndarray, reference: np.ndarray, strength: float = 1.0) -> np.ndarray:
    """Move the Lab statistics of ``frames`` to those of ``reference``.

    Args:
        frames: the new segment, float (F, H, W, 3) in [0, 1].
        reference: the frames it continues, float (N, H', W', 3) in [0, 1].
        strength: 0 returns ``frames`` unchanged, 1 applies the full correction; in between blends.

    Returns:
        float32 (F, H, W, 3) in [0, 1].
    """
    if strength == 0.0:
        return frames
    ref_mean, ref_std = lab_statistics(reference)
    src_mean, src_std = lab_statistics(frames)
    # A flat channel (std ~ 0) keeps its spread rather than being blown up to the reference's.
    scale = np.where(src_std > 1e-6, ref_std / np.maximum(src_std, 1e-6), 1.0)
    out = np.empty(frames.shape, np.float32)
    for i, frame in enumerate(frames):
        corrected = lab_to_rgb((rgb_to_lab(frame) - src_mean) * scale + ref_mean)
        out[i] = (1.0 - strength) * frame + strength * corrected
    return out
