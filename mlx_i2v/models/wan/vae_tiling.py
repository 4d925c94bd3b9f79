"""Spatially tiled Wan VAE encode/decode, for frames too large to run through the VAE in one piece.

Mirrors diffusers' ``AutoencoderKLWan.tiled_encode`` / ``tiled_decode`` (0.42.1): overlapping tiles
(default 256 px wide every 192 px) run through the VAE independently, and each tile's overlap with its
upper and left neighbours is blended linearly, in the same order, in the same (patchified) space and with
the same float32 weights, so the result matches diffusers' tiled output. It is *approximate* with respect
to the untiled VAE: a tile's convolutions see zero padding instead of the neighbouring pixels, and the
blend only hides the seams (for random weights the difference is of the order of the signal; for the
trained VAE it is the small seam error diffusers users accept).

Unlike diffusers, which decodes every frame of one tile before the next tile, both functions run frames
in the outer loop and keep one :class:`CausalCache` per tile, so memory stays flat in the frame count
(the caches hold two frames per cached layer for each tile, about (tile/stride)^2 times the untiled
cache).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import mlx.core as mx

from ..vae_ops import patchify, stitch, unpatchify
from .vae import AutoencoderKLWan
from .vae_blocks import CausalCache


@dataclass(frozen=True)
class Tiling:
    """Tile size and stride in video pixels (diffusers' ``tile_sample_min_*`` / ``tile_sample_stride_*``);
    the overlap ``size - stride`` is blended. Both must be multiples of the VAE's spatial factor."""

    size: int = 256
    stride: int = 192

    def __post_init__(self) -> None:
        if not 0 < self.stride <= self.size:
            raise ValueError(f"tile stride must be in (0, size], got size {self.size}, stride {self.stride}")

    def describe(self) -> str:
        """As a plan summary shows it."""
        return f"tiles {self.size} px, stride {self.stride} px"


def needs_decode_tiling(vae: AutoencoderKLWan, latent_hw: tuple[int, int], tiling: Tiling) -> bool:
    """diffusers' condition: tile when the latent frame is larger than one tile."""
    tile = tiling.size // vae.config.scale_factor_spatial
    return latent_hw[0] > tile or latent_hw[1] > tile


def tiled_decode_frames(vae: AutoencoderKLWan, z: mx.array, tiling: Tiling = Tiling()) -> Iterator[mx.array]:
    """:meth:`AutoencoderKLWan.decode_frames` over overlapping spatial tiles (diffusers ``tiled_decode``).

    Args:
        z: latents (B, T', h, w, z_dim), not normalised.
        tiling: tile size and stride in video pixels.

    Yields:
        (B, 1, H, W, 3), then (B, 4, H, W, 3) per further latent frame, clamped to [-1, 1]; frames
        smaller than one tile go through the untiled :meth:`~AutoencoderKLWan.decode_frames`.
    """
    if not needs_decode_tiling(vae, z.shape[2:4], tiling):
        yield from vae.decode_frames(z)
        return
    cfg = vae.config
    s, p = cfg.scale_factor_spatial, cfg.patch_size or 1
    z = z.astype(vae.post_quant_conv.weight.dtype)
    _, frames, h, w, _ = z.shape
    tile_lat, stride_lat = tiling.size // s, tiling.stride // s
    # The decoder's output is still patchified, so diffusers blends and strides in patchified pixels.
    stride_px = tiling.stride // p
    blend_px = tiling.size // p - stride_px
    starts_h, starts_w = range(0, h, stride_lat), range(0, w, stride_lat)
    caches = [[CausalCache() for _ in starts_w] for _ in starts_h]
    for k in range(frames):
        tiles = []
        for i, y in enumerate(starts_h):
            row = []
            for j, x in enumerate(starts_w):
                tile = z[:, k : k + 1, y : y + tile_lat, x : x + tile_lat]
                out = vae.decoder(vae.post_quant_conv(tile), caches[i][j], first_chunk=k == 0)
                mx.eval(out, caches[i][j].arrays())  # one tile at a time bounds the working set
                row.append(out)
            tiles.append(row)
        out = stitch(tiles, (blend_px, blend_px), (stride_px, stride_px))[:, :, : h * s // p, : w * s // p]
        if cfg.patch_size is not None:
            out = unpatchify(out, p)
        out = mx.clip(out, -1.0, 1.0)
        mx.eval(out)
        yield out


def tiled_decode(vae: AutoencoderKLWan, z: mx.array, tiling: Tiling = Tiling()) -> mx.array:
    """Latents (B, T', h, w, z_dim) -> video (B, 4T'-3, H, W, 3) in [-1, 1], tiled (see module doc)."""
    return mx.concatenate(list(tiled_decode_frames(vae, z, tiling)), axis=1)


def tiled_encode(
    vae: AutoencoderKLWan, video: mx.array, tiling: Tiling = Tiling()
) -> tuple[mx.array, mx.array]:
    """:meth:`AutoencoderKLWan.encode` over overlapping spatial tiles (diffusers ``tiled_encode``).

    As in diffusers, a video no larger than one tile (in video pixels) is encoded untiled, but the tiles
    themselves are measured on the patchified video (for the Wan2.2 VAE a 256-pixel tile covers 512
    video pixels).

    Args:
        video: (B, T, H, W, 3) in [-1, 1]; frames past the last full chunk of 4 are ignored.

    Returns:
        ``(mean, logvar)``, each (B, 1 + (T-1)//4, H/s, W/s, z_dim); logvar clamped to [-30, 20].
    """
    if video.shape[2] <= tiling.size and video.shape[3] <= tiling.size:
        return vae.encode(video)
    cfg = vae.config
    p = cfg.patch_size or 1
    x = video.astype(vae.quant_conv.weight.dtype)
    if cfg.patch_size is not None:
        x = patchify(x, p)
    _, frames, height, width, _ = x.shape
    ratio = cfg.scale_factor_spatial // p
    tile_lat, stride_lat = tiling.size // ratio, tiling.stride // ratio
    blend = tile_lat - stride_lat
    starts_h, starts_w = range(0, height, tiling.stride), range(0, width, tiling.stride)
    caches = [[CausalCache() for _ in starts_w] for _ in starts_h]
    chunks = []
    for k in range(1 + (frames - 1) // 4):
        t0, t1 = (0, 1) if k == 0 else (1 + 4 * (k - 1), 1 + 4 * k)
        tiles = []
        for i, y in enumerate(starts_h):
            row = []
            for j, x0 in enumerate(starts_w):
                tile = x[:, t0:t1, y : y + tiling.size, x0 : x0 + tiling.size]
                out = vae.quant_conv(vae.encoder(tile, caches[i][j]))
                mx.eval(out, caches[i][j].arrays())
                row.append(out)
            tiles.append(row)
        chunks.append(stitch(tiles, (blend, blend), (stride_lat, stride_lat)))
        mx.eval(chunks[-1])
    enc = mx.concatenate(chunks, axis=1)[:, :, : height // ratio, : width // ratio]
    mean, logvar = mx.split(enc, 2, axis=-1)
    return mean, mx.clip(logvar, -30.0, 20.0)
