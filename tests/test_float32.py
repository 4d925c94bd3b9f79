"""float32 on MLX's default device is full float32, as the parity tests' tolerances assume.

conftest.py sets ``MLX_ENABLE_TF32=0`` before MLX starts: on GPUs with matrix units (CUDA tensor cores,
Apple M5) MLX otherwise runs float32 matmul-family operations at TF32-class precision, ~1e-3 relative
(seen on an H200: MLX's float32 matmul ran at 340 TFLOP/s, PyTorch's float32 at 51). These fail there if
that setting is lost; on the CPU they hold by construction.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

# The matmul below: float32 rounding gives 5.7e-7 of the largest output; inputs rounded to TF32's 10-bit
# mantissa (emulated in numpy) give 2.9e-4.
FULL_FLOAT32 = 2e-5


def _relative_error(got: mx.array, exact: np.ndarray) -> float:
    return float(np.max(np.abs(np.array(got, dtype=np.float64) - exact)) / np.max(np.abs(exact)))


def test_float32_matmul_is_full_precision() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((128, 256)).astype(np.float32), rng.standard_normal((256, 96)).astype(np.float32)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    assert _relative_error(mx.array(a) @ mx.array(b), exact) < FULL_FLOAT32


def test_float32_convolution_is_full_precision() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 12, 12, 32)).astype(np.float32)  # (N, H, W, C_in)
    w = rng.standard_normal((16, 3, 3, 32)).astype(np.float32)  # (C_out, kH, kW, C_in)
    windows = np.lib.stride_tricks.sliding_window_view(x.astype(np.float64), (3, 3), axis=(1, 2))
    exact = np.einsum("nhwcij,oijc->nhwo", windows, w.astype(np.float64))  # valid padding: (1, 10, 10, 16)
    assert _relative_error(mx.conv2d(mx.array(x), mx.array(w)), exact) < FULL_FLOAT32
