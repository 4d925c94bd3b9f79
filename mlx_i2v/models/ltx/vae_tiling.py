"""Tiled LTX-Video VAE encode and decode: diffusers' ``AutoencoderKLLTXVideo`` spatial tiling
(``enable_tiling``: ``tiled_encode`` / ``tiled_decode``) and temporal tiling (``use_framewise_decoding``:
``_temporal_tiled_encode`` / ``_temporal_tiled_decode``), with diffusers' defaults and blending.

The LTX decoder is not causal, so it cannot stream frame by frame as the Wan VAE does; tiling is what
bounds its memory. Overlapping tiles (512 px every 448 px; 16 frames every 8) run through the VAE
independently, and each tile's overlap with its upper, left and previous neighbours is blended linearly,
in diffusers' order and with its float32 weights, so the result equals diffusers' tiled output. Like
diffusers' it is *approximate* with respect to the untiled VAE: a tile's convolutions see padding
instead of the neighbouring pixels, and the blend only hides the seams.

The decoded tiles are kept until they are blended, as in diffusers: memory is one tile's decoder
activations plus about one output video.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ..vae_ops import blend, stitch
from .vae import AutoencoderKLLTXVideo, noise_source
from .vae_blocks import NoiseSource


@dataclass(frozen=True)
class SpatialTiling:
    """Tile size and stride in video pixels: diffusers' ``tile_sample_min_height/width`` and
    ``tile_sample_stride_height/width`` (defaults 512 and 448); the overlap is blended. Multiples of the
    VAE's spatial ratio (32)."""

    height: int = 512
    width: int = 512
    stride_height: int = 448
    stride_width: int = 448

    def __post_init__(self) -> None:
        if not (0 < self.stride_height <= self.height and 0 < self.stride_width <= self.width):
            raise ValueError(f"tile strides must be in (0, size], got {self}")


@dataclass(frozen=True)
class TemporalTiling:
    """Tile length and stride in video frames: diffusers' ``tile_sample_min_num_frames`` and
    ``tile_sample_stride_num_frames`` (defaults 16 and 8). Multiples of the VAE's temporal ratio (8)."""

    frames: int = 16
    stride: int = 8

    def __post_init__(self) -> None:
        if not 0 < self.stride <= self.frames:
            raise ValueError(f"tile stride must be in (0, frames], got {self}")


def _chain(tiles: list[mx.array], extent: int, stride: int) -> mx.array:
    """Blend a sequence of overlapping temporal tiles with their (blended) predecessors and join them:
    the first keeps ``stride + 1`` frames, the others ``stride``."""
    kept = [tiles[0][:, : stride + 1]]
    previous = tiles[0]
    for tile in tiles[1:]:
        previous = blend(previous, tile, extent, axis=1)
        kept.append(previous[:, :stride])
    return mx.concatenate(kept, axis=1)


# --- decoding -----------------------------------------------------------------------------------------


def tiled_decode(
    vae: AutoencoderKLLTXVideo,
    z: mx.array,
    timestep: float | mx.array | None = None,
    noise: mx.array | NoiseSource | None = None,
    spatial: SpatialTiling | None = SpatialTiling(),
    temporal: TemporalTiling | None = None,
) -> mx.array:
    """:meth:`AutoencoderKLLTXVideo.decode` as diffusers' ``_decode`` runs it with ``use_tiling``
    (``spatial``) and ``use_framewise_decoding`` (``temporal``): temporal tiles when there are more latent
    frames than one tile holds, each spatially tiled when larger than one tile; latents within one tile
    are decoded whole. Each tile draws its own decoder noise, in diffusers' order.

    Args:
        z: (B, t, h, w, latent_channels), denormalised.
        timestep, noise: as for :meth:`~AutoencoderKLLTXVideo.decode`.
        spatial, temporal: the tilings, or None for none.

    Returns:
        (B, 8(t-1)+1, 32h, 32w, out_channels), not clamped.
    """
    z, t = vae.decoder_inputs(z, timestep)
    noise_fn = noise_source(noise)
    r = vae.config.temporal_ratio
    if temporal is not None and z.shape[1] > temporal.frames // r:
        return _temporal_decode(vae, z, t, noise_fn, spatial, temporal)
    return _spatial_decode(vae, z, t, noise_fn, spatial)


def _needs_spatial(vae: AutoencoderKLLTXVideo, latent_hw: tuple[int, ...], spatial: SpatialTiling | None) -> bool:
    s = vae.config.spatial_ratio
    return spatial is not None and (latent_hw[1] > spatial.width // s or latent_hw[0] > spatial.height // s)


def _spatial_decode(
    vae: AutoencoderKLLTXVideo, z: mx.array, t: mx.array | None, noise: NoiseSource, spatial: SpatialTiling | None
) -> mx.array:
    """diffusers' ``tiled_decode`` (or the whole decoder when one tile covers the latents)."""
    if not _needs_spatial(vae, z.shape[2:4], spatial):
        return vae.decoder(z, t, noise)
    s = vae.config.spatial_ratio
    h, w = z.shape[2:4]
    tile_h, tile_w = spatial.height // s, spatial.width // s
    tiles = []
    for y in range(0, h, spatial.stride_height // s):
        row = []
        for x in range(0, w, spatial.stride_width // s):
            row.append(vae.decoder(z[:, :, y : y + tile_h, x : x + tile_w], t, noise))
            mx.eval(row[-1])  # one tile's activations at a time
        tiles.append(row)
    extents = (spatial.height - spatial.stride_height, spatial.width - spatial.stride_width)
    out = stitch(tiles, extents, (spatial.stride_height, spatial.stride_width))
    return out[:, :, : h * s, : w * s]


def _temporal_decode(
    vae: AutoencoderKLLTXVideo,
    z: mx.array,
    t: mx.array | None,
    noise: NoiseSource,
    spatial: SpatialTiling | None,
    temporal: TemporalTiling,
) -> mx.array:
    """diffusers' ``_temporal_tiled_decode``: latent tiles of ``frames/8 + 1`` latent frames every
    ``stride/8``; every tile after the first drops its last decoded frame before blending."""
    r = vae.config.temporal_ratio
    length, stride = temporal.frames // r, temporal.stride // r
    tiles = []
    for i in range(0, z.shape[1], stride):
        decoded = _spatial_decode(vae, z[:, i : i + length + 1], t, noise, spatial)
        tiles.append(decoded[:, :-1] if i > 0 else decoded)
        mx.eval(tiles[-1])
    out = _chain(tiles, temporal.frames - temporal.stride, temporal.stride)
    return out[:, : (z.shape[1] - 1) * r + 1]


# --- encoding -----------------------------------------------------------------------------------------


def tiled_encode(
    vae: AutoencoderKLLTXVideo,
    video: mx.array,
    spatial: SpatialTiling | None = SpatialTiling(),
    temporal: TemporalTiling | None = None,
) -> tuple[mx.array, mx.array]:
    """:meth:`AutoencoderKLLTXVideo.encode` as diffusers' ``_encode`` runs it with ``use_tiling``
    (``spatial``) and temporal tiling (diffusers gates that on ``use_framewise_decoding``, the decoding
    flag): temporal tiles of ``frames + 1`` video frames every ``stride`` when the video is longer than
    one tile, each spatially tiled when larger than one tile.

    Args:
        video: (B, F, H, W, 3) in [-1, 1], F = 8k + 1, H and W multiples of 32.
        spatial, temporal: the tilings, or None for none.

    Returns:
        ``(mean, logvar)`` as :meth:`~AutoencoderKLLTXVideo.encode` gives them.
    """
    vae.check_video(video.shape)
    x = video.astype(vae.encoder.conv_in.conv.weight.dtype)
    if temporal is not None and x.shape[1] > temporal.frames:
        return vae.posterior(_temporal_encode(vae, x, spatial, temporal))
    return vae.posterior(_spatial_encode(vae, x, spatial))


def _spatial_encode(vae: AutoencoderKLLTXVideo, x: mx.array, spatial: SpatialTiling | None) -> mx.array:
    """diffusers' ``tiled_encode`` (or the whole encoder when one tile covers the video): raw moments."""
    if spatial is None or (x.shape[3] <= spatial.width and x.shape[2] <= spatial.height):
        return vae.encoder(x)
    s = vae.config.spatial_ratio
    h, w = x.shape[2:4]
    tiles = []
    for y in range(0, h, spatial.stride_height):
        row = []
        for x0 in range(0, w, spatial.stride_width):
            row.append(vae.encoder(x[:, :, y : y + spatial.height, x0 : x0 + spatial.width]))
            mx.eval(row[-1])
        tiles.append(row)
    stride = (spatial.stride_height // s, spatial.stride_width // s)
    extents = (spatial.height // s - stride[0], spatial.width // s - stride[1])
    return stitch(tiles, extents, stride)[:, :, : h // s, : w // s]


def _temporal_encode(
    vae: AutoencoderKLLTXVideo, x: mx.array, spatial: SpatialTiling | None, temporal: TemporalTiling
) -> mx.array:
    """diffusers' ``_temporal_tiled_encode``: every tile after the first drops its first latent frame."""
    r = vae.config.temporal_ratio
    tiles = []
    for i in range(0, x.shape[1], temporal.stride):
        moments = _spatial_encode(vae, x[:, i : i + temporal.frames + 1], spatial)
        tiles.append(moments[:, 1:] if i > 0 else moments)
        mx.eval(tiles[-1])
    length, stride = temporal.frames // r, temporal.stride // r
    return _chain(tiles, length - stride, stride)[:, : (x.shape[1] - 1) // r + 1]
