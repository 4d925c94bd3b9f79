"""Reductions along a row for MLX's CPU backend.

MLX's CPU reduction along the last axis goes one element at a time, while one across rows runs
element-wise along them: for (1, 24, 165, 1056) float32 scores, ``mx.max(s, axis=-1)`` takes 3.5 ms where a
subtraction over the same scores takes 1.0 ms (2-core EPYC). So a row of n is split as (a, b) and reduced
over a first, then over the b that are left: the attention's row max, and the transformers' LayerNorm and
RMSNorm statistics, which ``mx.fast``'s CPU kernels take one row element at a time.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx

from .elementwise import on_cpu


def row_max(x: mx.array) -> mx.array:
    """``mx.max(x, axis=-1, keepdims=True)`` for a contiguous x (..., n), the same values in a third of the
    time on the CPU (see the module docstring): a max does not depend on the order, so the two steps give
    the identical result. Without a divisor b of n in [16, 128] it is the plain max."""
    return _in_two_steps(mx.max, x)


def row_sum(x: mx.array) -> mx.array:
    """``mx.sum(x, axis=-1, keepdims=True)`` for a contiguous x (..., n), in two steps as :func:`row_max`
    takes its max: the same sum in another order, so equal to float rounding."""
    return _in_two_steps(mx.sum, x)


def _in_two_steps(reduce: Callable[..., mx.array], x: mx.array) -> mx.array:
    """``reduce`` (``mx.max`` or ``mx.sum``) of each row of x (..., n), over a (n // b, b) split of it when
    :func:`_row_split` finds one."""
    n = x.shape[-1]
    b = _row_split(n)
    if b is None:
        return reduce(x, axis=-1, keepdims=True)
    return reduce(reduce(x.reshape(*x.shape[:-1], n // b, b), axis=-2), axis=-1, keepdims=True)


@mx.compile
def _square(x: mx.array) -> mx.array:
    return x * x


def _by_rows(x: mx.array) -> bool:
    """Whether the norms below compute their statistics with :func:`row_sum`: float32 on the CPU, with a
    split of the row. Elsewhere ``mx.fast``'s kernels are used as they are."""
    return on_cpu() and x.dtype == mx.float32 and _row_split(x.shape[-1]) is not None


def layer_norm(x: mx.array, weight: mx.array | None, bias: mx.array | None, eps: float) -> mx.array:
    """``mx.fast.layer_norm(x, weight, bias, eps)`` over the last axis of x (..., n); weight, bias (n,).

    For float32 on the CPU the mean and variance come from :func:`row_sum` (of x, then of the centred
    squares): (2, 1056, 3072) in 8.1 against 16.5 ms, within 7e-6 of ``mx.fast`` for values of order 1."""
    if not _by_rows(x):
        return mx.fast.layer_norm(x, weight, bias, eps)
    inv_n = 1 / x.shape[-1]
    centred = x - row_sum(x) * inv_n
    out = centred * mx.rsqrt(row_sum(_square(centred)) * inv_n + eps)
    out = out if weight is None else out * weight
    return out if bias is None else out + bias


def rms_norm(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    """``mx.fast.rms_norm(x, weight, eps)`` over the last axis of x (..., n); weight (n,). For float32 on the
    CPU the mean square comes from :func:`row_sum`: (2, 1056, 3072) in 6.5 against 10.8 ms."""
    if not _by_rows(x):
        return mx.fast.rms_norm(x, weight, eps)
    out = x * mx.rsqrt(row_sum(_square(x)) * (1 / x.shape[-1]) + eps)
    return out if weight is None else out * weight


def _row_split(n: int) -> int | None:
    """The length b of the vectorised inner axis for :func:`row_max` and :func:`row_sum`: the least divisor
    of n in [32, 128], else the greatest in [16, 32), else None. (For rows of 1056 scores, b = 32-66 ran
    fastest; 16 and 132 were 1.2-1.5x slower.)"""
    divisors = [b for b in range(16, 129) if n % b == 0 and b < n]
    wide = [b for b in divisors if b >= 32]
    return wide[0] if wide else (divisors[-1] if divisors else None)
