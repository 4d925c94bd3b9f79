"""The VAE's convolutions (Winograd, sub-pixel upsampling, per-tap matmuls) against their direct forms:
PyTorch's conv3d / conv2d (and nearest upsampling), float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mlx.core as mx
import mlx.nn as nn
from mlx_i2v import runtime
from mlx_i2v.models.conv import (
    F2X2,
    F4X4,
    WINOGRAD,
    conv3d,
    conv3d_by_taps,
    conv_cost,
    conv_plan,
    tap_major,
    upsample2x_conv2d,
    winograd_applies,
    winograd_conv3d,
    winograd_tiles,
    winograd_workspace,
)
from mlx_i2v.models.elementwise import silu
from mlx_i2v.models.wan.vae_blocks import CausalConv3d, RMSNorm, norm_silu

TOL = 1e-5
# F(4x4, 3x3)'s transforms scale by up to 8 and 1/24 (Lavin & Gray measure ~1e-5 float32 error against
# ~1e-6 for F(2x2, 3x3)).
TOL_4X4 = 3e-5


def rel_err(ours: mx.array, ref: torch.Tensor) -> float:
    ours, ref = np.array(ours), ref.numpy()
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def torch_conv3d(x: mx.array, w: mx.array, b: mx.array | None, padding: tuple[int, int]) -> torch.Tensor:
    """The reference on channels-last (B, T, H, W, C) input and MLX (O, kt, kh, kw, C) weights."""
    xt = torch.from_numpy(np.array(x)).permute(0, 4, 1, 2, 3)
    wt = torch.from_numpy(np.array(w)).permute(0, 4, 1, 2, 3)
    bt = None if b is None else torch.from_numpy(np.array(b))
    return F.conv3d(xt, wt, bt, padding=(0, *padding)).permute(0, 2, 3, 4, 1)


def random(shape: tuple[int, ...], seed: int) -> mx.array:
    return mx.random.normal(shape, key=mx.random.key(seed))


@pytest.mark.parametrize("kt", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tiles,tol", [(F2X2, TOL), (F4X4, TOL_4X4)], ids=["2x2", "4x4"])
def test_winograd_equals_direct_convolution(kt, bias, tiles, tol):
    x = random((2, kt + 3, 8, 12, 16), 0)  # two videos, kt - 1 frames of context
    w = random((24, kt, 3, 3, 16), 1) * 0.1
    b = random((24,), 2) if bias else None
    y = winograd_conv3d(x, w, b, tiles)
    assert y.shape == (2, 4, 8, 12, 24)
    assert rel_err(y, torch_conv3d(x, w, b, (1, 1))) < tol


def test_winograd_tilings_by_frame_size():
    """F(4x4) tiles need frame sides divisible by 4, F(2x2) even ones; the plan uses only those that fit."""
    assert winograd_tiles(8, 12) == [F2X2, F4X4]
    assert winograd_tiles(6, 12) == winograd_tiles(8, 10) == [F2X2]
    assert winograd_tiles(7, 12) == []
    assert conv_plan(4, 3, 90, 160, 512, 512, 4, 1 << 40)[0] == "winograd2x2"  # 720p Wan2.1 latents
    assert conv_plan(4, 3, 88, 160, 512, 512, 4, 1 << 40)[0] == "winograd4x4"
    x = random((1, 4, 6, 10, 16), 26)
    w = random((8, 3, 3, 3, 16), 27) * 0.1
    assert rel_err(conv3d(x, w, None, (1, 1)), torch_conv3d(x, w, None, (1, 1))) < TOL


def test_plan_picks_the_tiling_by_channels_and_frame_size():
    """Measured (benchmarks/README.md, "Winograd F(4x4, 3x3)"): F(4x4) does 1.8x fewer products and wins
    where the frames are large, 1.6x at 256-512 channels, 1.3x at 64, a tie at 32; on the latents' small
    frames the per-call kernel transform (4x the weights, against 16/9) leaves F(2x2) or per-tap
    matmuls ahead."""
    big = 1 << 40
    large = [(4, 128, 192, 256, 256), (4, 64, 96, 512, 512), (4, 128, 192, 32, 32), (4, 64, 96, 64, 64)]
    for frames, h, w, c, o in large:
        assert conv_plan(frames, 3, h, w, c, o, 4, big)[0] == "winograd4x4", (h, w, c)
        assert conv_cost("winograd4x4", frames, 3, h, w, c, o, 4) < conv_cost("winograd2x2", frames, 3, h, w, c, o, 4)
    for frames, h, w, c, o in [(2, 16, 24, 1024, 1024), (5, 8, 12, 1024, 1024)]:
        assert conv_plan(frames, 3, h, w, c, o, 4, big)[0] == "winograd2x2", (h, w, c)


@pytest.mark.parametrize("method", ["winograd2x2", "winograd4x4", "taps"])
def test_frame_groups_equal_all_at_once(method):
    """A workspace that fits one output frame: conv3d computes frame by frame, with the same result."""
    x = random((2, 7, 8, 12, 8), 3)
    w = random((8, 3, 3, 3, 8), 4) * 0.1
    winograd = method in WINOGRAD
    # the frame size restricts the tilings: 8x12 allows both, 6x12 only F(2x2)
    h = 6 if method == "winograd2x2" else 8
    x = x[:, :, :h]
    one_frame = conv_plan(1, 3, h, 12, 8, 8, 4, 1 << 40, winograd)[2]
    assert conv_plan(5, 3, h, 12, 8, 8, 4, one_frame, winograd) == (method, 1, one_frame)
    whole = conv_plan(5, 3, h, 12, 8, 8, 4, 1 << 40, winograd)
    assert whole[:2] == (method, 5) and whole[2] > one_frame
    padding = (1, 1) if winograd else (1, 0)  # padding (1, 0) rules Winograd out
    grouped = conv3d(x, w, None, padding, workspace=one_frame)
    at_once = winograd_conv3d(x, w, None, WINOGRAD[method]) if winograd else conv3d_by_taps(x, w, None, padding)
    # The same sums; BLAS may block a matmul of fewer rows differently (float32 rounding only, which
    # F(4x4)'s output transform scales by up to 8).
    tol = TOL_4X4 if method == "winograd4x4" else TOL
    assert float(mx.abs(grouped - at_once).max()) < tol / 3 * float(mx.abs(at_once).max())
    assert rel_err(grouped, torch_conv3d(x, w, None, padding)) < tol


def test_winograd_falls_back_to_taps_when_one_frame_does_not_fit():
    """Wide channels (Winograd's transformed kernel dominates its buffers): with a workspace just short of
    one Winograd frame, by either tiling, per-tap matmuls run, as many frames at a time as fit."""
    winograd_frame = min(winograd_workspace(1, 3, 8, 12, 256, 256, 4, tiles) for tiles in WINOGRAD.values())
    method, group, size = conv_plan(4, 3, 8, 12, 256, 256, 4, winograd_frame - 1)
    assert method == "taps" and group >= 1 and size <= winograd_frame - 1


def test_plan_skips_winograd_where_its_kernel_transform_outweighs_the_products_saved():
    """The LTX encoder's 2048-channel convolutions on one 8x12 frame: transforming the 453 MB kernel
    costs more than the products Winograd saves, so per-tap matmuls; the same kernel on larger or more
    frames, and the Wan VAEs' convolutions (narrow or wide), stay Winograd."""
    big = 1 << 40
    for method in WINOGRAD:
        assert conv_cost(method, 1, 3, 8, 12, 2048, 2048, 4) > conv_cost("taps", 1, 3, 8, 12, 2048, 2048, 4)
    assert conv_plan(1, 3, 8, 12, 2048, 2048, 4, big)[0] == "taps"
    assert conv_plan(1, 3, 64, 96, 2048, 2048, 4, big)[0] in WINOGRAD
    assert conv_plan(5, 3, 8, 12, 1024, 1024, 4, big)[0] in WINOGRAD
    wan = [(1, 16, 24, 1024, 1024), (4, 64, 96, 512, 512), (4, 128, 192, 32, 32), (1, 16, 24, 128, 128)]
    for frames, h, w, c, o in wan:
        assert conv_plan(frames, 3, h, w, c, o, 4, big)[0] in WINOGRAD, (h, w, c)
    # The cost grows with the work: more frames, wider channels.
    for method in ("winograd2x2", "winograd4x4", "taps"):
        assert conv_cost(method, 2, 3, 16, 24, 64, 64, 4) > conv_cost(method, 1, 3, 16, 24, 64, 64, 4)
        assert conv_cost(method, 1, 3, 16, 24, 128, 64, 4) > conv_cost(method, 1, 3, 16, 24, 64, 64, 4)


def test_conv3d_by_the_plans_taps_equals_direct_convolution():
    """A shape the plan computes by per-tap matmuls although Winograd's shape holds (wide channels on a
    tiny frame; narrowed here to 256 channels on 2x2 frames): the same convolution."""
    assert conv_plan(1, 3, 2, 2, 256, 256, 4, 1 << 40)[0] == "taps"
    x = random((1, 3, 2, 2, 256), 18)
    w = tap_major(random((256, 3, 3, 3, 256), 19) * 0.02)
    b = random((256,), 20)
    assert rel_err(conv3d(x, w, b, (1, 1)), torch_conv3d(x, w, b, (1, 1))) < TOL


@pytest.mark.parametrize(
    "kernel,padding,size",
    [((3, 3, 3), (1, 1), (5, 7)), ((3, 1, 1), (0, 0), (6, 4)), ((1, 1, 1), (0, 0), (5, 5)), ((1, 3, 3), (0, 0), (6, 8))],
)
def test_per_tap_matmuls_equal_direct_convolution(kernel, padding, size):
    x = random((2, 4, *size, 12), 5)
    w = random((10, *kernel, 12), 6) * 0.1
    b = random((10,), 7)
    y = conv3d_by_taps(x, w, b, padding)
    ref = torch_conv3d(x, w, b, padding)
    assert y.shape == tuple(ref.shape)
    assert rel_err(y, ref) < TOL


def test_upsample_conv_equals_upsampling_then_convolving():
    x = random((3, 5, 7, 16), 8)
    w = random((12, 3, 3, 16), 9) * 0.1
    b = random((12,), 10)
    xt = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)
    wt = torch.from_numpy(np.array(w)).permute(0, 3, 1, 2)
    # diffusers' WanUpsample: nearest-exact 2x, then Conv2d(3, padding=1)
    ref = F.conv2d(F.interpolate(xt, scale_factor=2.0, mode="nearest-exact"), wt, torch.from_numpy(np.array(b)), padding=1)
    y = upsample2x_conv2d(x, w, b)
    assert y.shape == (3, 10, 14, 12)
    assert rel_err(y, ref.permute(0, 2, 3, 1)) < TOL


def test_causal_conv_picks_winograd_only_where_it_applies():
    w3 = mx.zeros((4, 3, 3, 3, 4))
    assert winograd_applies(w3, (1, 1), 8, 12)
    assert not winograd_applies(w3, (1, 1), 7, 12)  # odd height: per-tap matmuls
    assert not winograd_applies(w3, (0, 0), 8, 12)
    assert not winograd_applies(mx.zeros((4, 3, 1, 1, 4)), (0, 0), 8, 12)
    conv = CausalConv3d(6, 5, 3, padding=1)
    for size in [(6, 8), (5, 7)]:  # Winograd, then the fallback
        x = random((1, 3, *size, 6), 11)
        padded = mx.pad(x, [(0, 0), (2, 0), (0, 0), (0, 0), (0, 0)])
        assert rel_err(conv(x), torch_conv3d(padded, conv.weight, conv.bias, (1, 1))) < TOL


@pytest.mark.parametrize("frames", [1, 2])
def test_causal_conv_leaves_out_taps_that_read_only_padding(frames):
    """A chunk shorter than the kernel (a video's first frame): the taps over zero padding alone are
    skipped, with the result of convolving the zero-padded input."""
    conv = CausalConv3d(6, 5, 3, padding=1)
    x = random((1, frames, 6, 8, 6), 17)
    padded = mx.pad(x, [(0, 0), (2, 0), (0, 0), (0, 0), (0, 0)])
    assert rel_err(conv(x), torch_conv3d(padded, conv.weight, conv.bias, (1, 1))) < TOL


def test_tap_major_weights_give_the_same_convolution():
    """Weights stored tap-major (as CausalConv3d keeps them after its first call) hold the same values and
    give the same result, by Winograd and by per-tap matmuls."""
    w = random((24, 3, 3, 3, 16), 14) * 0.1
    stored = tap_major(w)
    assert stored.shape == w.shape and mx.array_equal(stored, w).item()
    for size in [(6, 10), (5, 9)]:  # Winograd, per-tap matmuls
        x = random((1, 5, *size, 16), 15)
        # The same sums to float32 rounding: a BLAS may order a transposed operand's products differently
        # (4e-6 with MLX's reference BLAS, 0 with OpenBLAS).
        in_mlx_order = torch.from_numpy(np.array(conv3d(x, w, None, (1, 1))))
        assert rel_err(conv3d(x, stored, None, (1, 1)), in_mlx_order) < TOL
    conv = CausalConv3d(16, 24, 3, padding=1)
    before = conv.weight
    conv(random((1, 1, 6, 10, 16), 16))
    assert mx.array_equal(conv.weight, before).item() and set(conv.parameters()) == {"weight", "bias"}


@pytest.mark.parametrize("layout", ["torch", "mlx"])
@pytest.mark.parametrize("padding,bias", [((1, 1), True), ((0, 0), False)])
def test_unfolded_rows_equal_direct_convolution(layout, padding, bias):
    """Wide channels on small frames (the LTX VAE at its latent size, narrowed to 256 channels): one
    matmul on gathered rows, with the kernel stored in PyTorch's order (read in place) or MLX's, padded
    or not, on a video that is a slice of a batch."""
    assert conv_plan(3, 3, 4, 6, 256, 256, 4, 1 << 40, True, layout)[0] == "unfold"
    x = random((2, 5, 4, 6, 256), 21)
    w_torch = random((256, 256, 3, 3, 3), 22) * 0.02
    w = w_torch.transpose(0, 2, 3, 4, 1) if layout == "torch" else mx.contiguous(w_torch.transpose(0, 2, 3, 4, 1))
    b = random((256,), 23) if bias else None
    assert rel_err(conv3d(x, w, b, padding, layout=layout), torch_conv3d(x, w, b, padding)) < TOL


def test_plan_by_layout():
    """Gathered rows where frames are small and channels wide, unless the kernel is stored tap-major (it
    would be copied); large frames stay Winograd whatever the layout, which then copies the kernel."""
    big = 1 << 40
    for layout in ("torch", "mlx"):
        assert conv_plan(5, 3, 8, 12, 1024, 1024, 4, big, True, layout)[0] == "unfold"
        assert conv_plan(1, 3, 8, 12, 2048, 2048, 4, big, True, layout)[0] == "unfold"
        assert conv_plan(17, 3, 32, 48, 256, 256, 4, big, True, layout)[0] in WINOGRAD
        assert conv_plan(1, 3, 64, 96, 128, 128, 4, big, True, layout)[0] in WINOGRAD
    assert conv_plan(1, 3, 8, 12, 2048, 2048, 4, big, True, "tap-major")[0] == "taps"
    # the copy to tap-major costs more from PyTorch's order than from MLX's
    for method in WINOGRAD:
        shape = (9, 3, 16, 24, 512, 512, 4)
        assert conv_cost(method, *shape, "torch") > conv_cost(method, *shape, "mlx")
    # rows that do not fit the workspace are gathered a frame group at a time, or not at all
    one = conv_plan(1, 3, 8, 12, 1024, 1024, 4, big, True, "torch")[2]
    assert conv_plan(5, 3, 8, 12, 1024, 1024, 4, 2 * one, True, "torch")[:2] == ("unfold", 2)
    assert conv_plan(5, 3, 8, 12, 1024, 1024, 4, one - 1, True, "torch")[0] != "unfold"


def test_unfolded_rows_read_the_kernel_in_place():
    """A PyTorch-ordered kernel much larger than the activations: the gathered-rows convolution allocates
    far less than the kernel (a copy of it would allocate all of it)."""
    w = random((512, 512, 3, 3, 3), 24) * 0.02  # 28 MB
    x = random((1, 3, 2, 2, 512), 25)
    mx.eval(w, x)
    mx.synchronize()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    y = conv3d(x, w.transpose(0, 2, 3, 4, 1), None, (1, 1), layout="torch")
    mx.eval(y)
    assert mx.get_peak_memory() - before < w.nbytes / 4
    assert rel_err(y, torch_conv3d(x, w.transpose(0, 2, 3, 4, 1), None, (1, 1))) < TOL


def test_norm_silu_on_two_streams_equals_one_call():
    norm = RMSNorm(64)
    norm.gamma = random((64,), 12)
    x = random((2, 3, 40, 90, 64), 13)  # over 2**20 elements: split across two CPU streams
    assert x.size >= 1 << 20
    assert float(mx.abs(norm_silu(norm, x) - silu(norm(x))).max()) == 0.0
    assert mx.allclose(norm_silu(norm, x), nn.silu(norm(x)), rtol=1e-6, atol=1e-6).item()


def test_malloc_keeps_freed_memory_on_linux_cpu(monkeypatch):
    monkeypatch.setenv("MLX_I2V_KEEP_FREED_MEMORY", "0")
    assert runtime.keep_freed_memory() is False
    monkeypatch.delenv("MLX_I2V_KEEP_FREED_MEMORY")
    import sys

    expected = sys.platform == "linux" and not runtime.has_gpu()
    assert runtime.keep_freed_memory() is expected
