"""Peak activation memory of the LTX-Video VAE, for the planner: the bytes above the weights that one
(tiled or untiled) encode or decode allocates at its peak, from the config and the size alone.

One VAE call peaks at ``max(copies * A + share * W, T)``:

- ``A``, one activation of the dominant stage: the decoder's last stage (output frames x H/4 x W/4 x its
  width) or the encoder's first (frames x H/4 x W/4 x its width);
- ``W``, the largest workspace :func:`~mlx_i2v.models.conv.conv_plan` plans for one of its 3x3x3
  convolutions under the budget (Winograd or per-tap buffers, frames grouped to 1/16 of the budget);
- ``T``, the kernel copies of the widest convolution that runs by Winograd or per-tap matmuls: the
  kernels are kept in PyTorch's order and copied to tap-major order for those (:data:`RELAYOUT_COPIES`),
  and Winograd transforms them (:data:`KERNEL_TRANSFORM_COPIES`); the widest convolutions, on small
  latents, gather rows instead and copy nothing (see :func:`~mlx_i2v.models.conv.conv_cost`). It
  happens at low resolution, while the activations are still small, hence the maximum.

A tiled decode adds the decoded tiles, all kept for blending as in diffusers, and the blended output.

``copies`` and ``share`` were fitted with ``benchmarks/ltx_vae_memory.py`` on the CPU (MLX 0.32,
float32) on the 0.9.5 VAE narrowed 4x and 8x (its structure at 1/16 and 1/64 of the compute), untiled,
at budgets of 2, 4 and 16 GB, last after the convolutions gained F(4x4, 3x3) Winograd: on those 18
points decode estimates are within 0.87-1.15 and encode estimates within 0.88-1.13 of the measured
peak. Outside the fit (same run): the real-width decode of 2x4x4, 2x8x8 and 3x4x6 latents 1.00, 1.05 and
0.95 (there the kernel transform ``T`` is the peak; :data:`KERNEL_TRANSFORM_COPIES` was measured on the
real-width 2x8x8 decode), the real-width encode of 9x128x128 0.83, a tiled decode (narrowed 8x, 3x16x24
latents, 256/192 px tiles) 0.93. The history of these constants is in benchmarks/README.md. Nothing was
measured on Metal.
"""

from __future__ import annotations

import mlx.core as mx

from ...memory import memory_budget
from ..conv import F2X2, WINOGRAD, conv_plan, conv_workspace
from .vae import LTXVAEConfig, decoder_stages
from .vae_tiling import SpatialTiling, TemporalTiling

DECODE_COPIES, DECODE_WORKSPACE_SHARE = 5.8, 0.87
ENCODE_COPIES, ENCODE_WORKSPACE_SHARE = 6.1, 0.82
# The Winograd kernel transform holds about this many weight-sized buffers at once: its two products (4/3
# and 16/9 of tap-major weights for F(2x2, 3x3)), measured 3.3 when the kernels were stored tap-major;
# F(4x4, 3x3)'s products are 2 and 4 weight sizes, scaled alike (WinogradTiles.kernel_copies).
KERNEL_TRANSFORM_COPIES = 3.3
# The kernels are kept in PyTorch's order; Winograd and per-tap matmuls first copy one to tap-major order,
# by two copies (conv.tap_major), so two more weight-sized buffers at once. Gathered rows copy nothing.
RELAYOUT_COPIES = 2
# Decoded tiles alive while they are blended, and the blended output, in multiples of the tiles' bytes.
TILED_OUTPUT_COPIES = 1.6

Conv = tuple[int, int, int, int, int]  # output frames, height, width, input and output channels


def _transients(convs: list[Conv], itemsize: int, budget: int) -> tuple[int, int]:
    """(largest planned workspace, largest kernel copy and transform) of 3x3x3 convolutions."""
    workspace = conv_workspace(budget)
    planned, transform = 0, 0
    for frames, h, w, c_in, c_out in convs:
        method, _, size = conv_plan(
            frames, 3, h, w, c_in, c_out, itemsize, workspace, h % 2 == 0 and w % 2 == 0, layout="torch"
        )
        planned = max(planned, size)
        copies = RELAYOUT_COPIES if method == "taps" else 0.0
        if method in WINOGRAD:
            scale = WINOGRAD[method].kernel_copies / F2X2.kernel_copies
            copies = RELAYOUT_COPIES + KERNEL_TRANSFORM_COPIES * scale
        transform = max(transform, int(copies * 27 * c_in * c_out * itemsize))
    return planned, transform


def _call_peak(activation: int, convs: list[Conv], itemsize: int, budget: int, copies: float, share: float) -> int:
    planned, transform = _transients(convs, itemsize, budget)
    return max(int(copies * activation + share * planned), transform)


def _decoder_convs(cfg: LTXVAEConfig, grid: tuple[int, int, int]) -> list[Conv]:
    """conv_in and a mid-block conv at the latent size, each stage's upsampler conv and resnet conv at
    their sizes, and conv_out (to the patchified output channels); the one before last is the last
    stage's resnet conv."""
    t, h, w = grid
    widest = cfg.decoder_block_out_channels[-1]
    convs: list[Conv] = [(t, h, w, cfg.latent_channels, widest), (t, h, w, widest, widest)]
    flags, factors = cfg.decoder_spatio_temporal_scaling[::-1], cfg.upsample_factor[::-1]
    scale = 1
    for (_, width, _), up, factor in zip(decoder_stages(cfg), flags, factors):
        if up:
            convs.append(((t - 1) * scale + 1, h * scale, w * scale, width * factor, width * 8))
            scale *= 2
        convs.append(((t - 1) * scale + 1, h * scale, w * scale, width, width))
    frames, h_last, w_last, _, width = convs[-1]
    return convs + [(frames, h_last, w_last, width, cfg.out_channels * cfg.patch_size**2)]


def decode_activation_bytes(
    cfg: LTXVAEConfig,
    latent_grid: tuple[int, int, int],
    dtype: mx.Dtype = mx.float32,
    spatial: SpatialTiling | None = None,
    temporal: TemporalTiling | None = None,
    budget: int | None = None,
) -> int:
    """Estimated peak bytes (above the weights) of :func:`~mlx_i2v.models.ltx.vae_tiling.tiled_decode`
    of latents (t, h, w) in ``dtype`` (the untiled decode when both tilings are None or do not apply)."""
    budget = memory_budget() if budget is None else budget
    t, h, w = latent_grid
    s, r = cfg.spatial_ratio, cfg.temporal_ratio
    temporal_tiles = temporal is not None and t > temporal.frames // r
    spatial_tiles = spatial is not None and (h > spatial.height // s or w > spatial.width // s)
    tile = (
        min(t, temporal.frames // r + 1) if temporal_tiles else t,
        min(h, spatial.height // s) if spatial_tiles else h,
        min(w, spatial.width // s) if spatial_tiles else w,
    )
    convs = _decoder_convs(cfg, tile)
    frames, lh, lw, _, width = convs[-2]
    activation = frames * lh * lw * width * dtype.size
    call = _call_peak(activation, convs, dtype.size, budget, DECODE_COPIES, DECODE_WORKSPACE_SHARE)
    if not (temporal_tiles or spatial_tiles):
        return call
    # The decoded tiles (each one the decoder's output for its latent tile, less a frame after the first
    # temporal tile) are all kept for blending, as in diffusers.
    frames = _tile_lengths(t, temporal.frames // r + 1, temporal.stride // r) if temporal_tiles else [t]
    heights = _tile_lengths(h, spatial.height // s, spatial.stride_height // s) if spatial_tiles else [h]
    widths = _tile_lengths(w, spatial.width // s, spatial.stride_width // s) if spatial_tiles else [w]
    decoded_frames = sum((f - 1) * r + 1 - (i > 0) for i, f in enumerate(frames) if f > 0)
    tiles = decoded_frames * sum(heights) * s * sum(widths) * s * cfg.out_channels * dtype.size
    return call + int(TILED_OUTPUT_COPIES * tiles)


def _tile_lengths(extent: int, length: int, stride: int) -> list[int]:
    """Lengths of the tiles diffusers' loops cut along one latent axis: ``length`` every ``stride``."""
    return [min(length, extent - start) for start in range(0, extent, stride)]


def encode_activation_bytes(
    cfg: LTXVAEConfig,
    video_grid: tuple[int, int, int],
    dtype: mx.Dtype = mx.float32,
    spatial: SpatialTiling | None = None,
    temporal: TemporalTiling | None = None,
    budget: int | None = None,
) -> int:
    """Estimated peak bytes (above the weights) of :func:`~mlx_i2v.models.ltx.vae_tiling.tiled_encode`
    of a (frames, height, width) video in ``dtype``. The latents are small, so only the largest encoder
    call counts."""
    budget = memory_budget() if budget is None else budget
    frames, height, width = video_grid
    if temporal is not None and frames > temporal.frames:
        frames = temporal.frames + 1
    if spatial is not None and (height > spatial.height or width > spatial.width):
        height, width = min(height, spatial.height), min(width, spatial.width)
    p, widths = cfg.patch_size, cfg.block_out_channels
    h, w = height // p, width // p
    convs: list[Conv] = [(frames, h, w, cfg.in_channels * p * p, widths[0]), (frames, h, w, widths[0], widths[0])]
    # Each down stage's convolutions at its input size, for the kernel transform of the widest one that
    # runs by Winograd ("spatial", "temporal" or, as "conv" and "spatiotemporal", both halved after it).
    stage = (frames, h, w)
    for channels, scaling, kind in zip(widths, cfg.spatio_temporal_scaling, cfg.downsample_type):
        convs.append((*stage, channels, channels))
        if scaling:
            t_s, h_s, w_s = stage
            stage = (t_s if kind == "spatial" else 1 + (t_s - 1) // 2, h_s if kind == "temporal" else h_s // 2,
                     w_s if kind == "temporal" else w_s // 2)  # fmt: skip
    convs.append((1 + (frames - 1) // cfg.temporal_ratio, height // cfg.spatial_ratio, width // cfg.spatial_ratio,
                  widths[-1], widths[-1]))  # the middle: the widest kernels  # fmt: skip
    activation = frames * h * w * widths[0] * dtype.size
    return _call_peak(activation, convs, dtype.size, budget, ENCODE_COPIES, ENCODE_WORKSPACE_SHARE)
