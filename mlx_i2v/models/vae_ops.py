"""What both families' VAEs do alike, channels-last (B, T, H, W, C): diffusers' pixel patchify (Wan2.2 and
LTX-Video fold p x p pixels into channels) and its tiled decode's blending of overlapping tiles."""

from __future__ import annotations

import mlx.core as mx
import numpy as np


def patchify(x: mx.array, p: int) -> mx.array:
    """(B, T, H, W, C) -> (B, T, H/p, W/p, C*p*p), channels ordered (c, p_w, p_h) like diffusers."""
    b, t, h, w, c = x.shape
    x = x.reshape(b, t, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 6, 5, 3)
    return x.reshape(b, t, h // p, w // p, c * p * p)


def unpatchify(x: mx.array, p: int) -> mx.array:
    """Inverse of :func:`patchify`: (B, T, h, w, C*p*p) -> (B, T, h*p, w*p, C)."""
    b, t, h, w, cpp = x.shape
    x = x.reshape(b, t, h, w, cpp // (p * p), p, p).transpose(0, 1, 2, 6, 3, 5, 4)
    return x.reshape(b, t, h * p, w * p, cpp // (p * p))


def _ramps(extent: int) -> tuple[mx.array, mx.array]:
    """float32 ramps (1 - y/e, y/e) for y < e, rounded from float64 as PyTorch rounds Python floats."""
    y = np.arange(extent, dtype=np.float64) / extent
    return mx.array((1 - y).astype(np.float32)), mx.array(y.astype(np.float32))


def blend(a: mx.array, b: mx.array, extent: int, axis: int) -> mx.array:
    """diffusers' ``blend_t`` (axis 1), ``blend_v`` (axis 2) and ``blend_h`` (axis 3) on (B, T, H, W, C):
    the first ``extent`` slices of ``b`` fade in from the last ones of ``a``."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent <= 0:
        return b
    wa, wb = _ramps(extent)
    shape = [1] * b.ndim
    shape[axis] = extent
    a_end = mx.take(a, mx.arange(a.shape[axis] - extent, a.shape[axis]), axis=axis)
    b_start = mx.take(b, mx.arange(extent), axis=axis)
    b_rest = mx.take(b, mx.arange(extent, b.shape[axis]), axis=axis)
    return mx.concatenate([a_end * wa.reshape(shape) + b_start * wb.reshape(shape), b_rest], axis=axis)


def stitch(tiles: list[list[mx.array]], extents: tuple[int, int], stride: tuple[int, int]) -> mx.array:
    """Blend a grid of overlapping tiles (each (B, T, h, w, C)) with their upper and left neighbours over
    ``extents`` rows/columns and join their stride-sized corners. Blending uses the already blended
    neighbours, as diffusers' in-place version does."""
    rows, previous = [], []
    for i, row in enumerate(tiles):
        blended: list[mx.array] = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = blend(previous[j], tile, extents[0], axis=2)
            if j > 0:
                tile = blend(blended[j - 1], tile, extents[1], axis=3)
            blended.append(tile)
        rows.append(mx.concatenate([t[:, :, : stride[0], : stride[1]] for t in blended], axis=3))
        previous = blended
    return mx.concatenate(rows, axis=2)
