"""Transcendental element-wise functions for MLX's CPU backend, rebuilt from fused arithmetic.

MLX's CPU build for x86 has no SIMD math: ``mx.exp``, ``mx.tanh`` and ``mx.sigmoid`` run one element at a
time on one thread, 20-45 ns per element (a fused multiply-add chain is ~1 ns), which made the softmax
and the tanh-GELU a third of a Wan transformer block on a 2-core CPU. Here they are written with
multiplies, adds, comparisons and integer shifts that ``mx.compile`` fuses into vectorised loops:

- :func:`exp2_nonpositive`: ``2**y`` for ``y <= 0`` as ``2**n * 2**f`` with ``n = round(y)``, the same
  Cephes polynomial for ``2**f`` as MLX's own ``exp`` (so the same accuracy, ~2 ulp) and ``2**n`` from its
  IEEE bits; for the softmax and the sigmoid, whose exponents can always be made non-positive.
- :func:`gelu_tanh`: the tanh-approximated GELU with Eigen's rational tanh (``generic_fast_tanh_float``,
  what PyTorch's vectorised CPU tanh also uses on some targets): within 4e-7 of float64 tanh.
- :func:`silu`: ``x * sigmoid(x)`` from the same exponential, at half the argument and squared.

MLX fuses a chain of element-wise operations into one kernel only up to a depth of 11 operations and
only for intermediate results that no other kernel reads, so each compiled function below has one output
and a shallow graph: each is exactly one pass over memory. The host compiler vectorises such a pass
unless a select has a computed branch or MLX's ``maximum`` (which tests for NaN) precedes arithmetic,
so clamps here are selects between a value and a constant. On a GPU (Metal, CUDA) the backend's own
functions are fused and fast, so :func:`gelu_tanh` and :func:`silu` use them there; without a C++
compiler on the CPU, ``mx.compile`` runs the operations one by one, which is about as fast as the
functions it replaces.
"""

from __future__ import annotations

import math
import threading
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

LOG2E = 1.4426950408889634

# 2**f on [-0.5, 0.5] (Cephes; the coefficients of MLX's CPU ``simd::exp``), highest degree first.
_EXP2_POLY = (
    1.535336188319500e-4, 1.339887440266574e-3, 9.618437357674640e-3, 5.550332471162809e-2,
    2.402264791363012e-1, 6.931472028550421e-1, 1.0,
)  # fmt: skip
# 2**y underflows to 0 below the smallest normal float32 exponent.
_EXP2_FLOOR = -127.0

# Eigen's rational tanh: odd numerator (alpha_1 ... alpha_13) and even denominator (beta_0 ... beta_6),
# exact to float32 rounding on [-c, c] and +-1 beyond (the non-FMA clamp).
_TANH_CLAMP = 7.90531110763549805
_TANH_P = (
    4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08,
    -8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16,
)  # fmt: skip
_TANH_Q = (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)
_GELU_C = math.sqrt(2 / math.pi)


def on_cpu() -> bool:
    """Whether work is scheduled on MLX's CPU backend (where these rebuilt functions pay off)."""
    return mx.default_device() == mx.cpu


# MLX streams belong to the thread that made them (another thread gets "There is no Stream(cpu, N) in
# current thread"), so each thread makes its own, once.
_THREAD = threading.local()


def two_streams() -> list[mx.Stream]:
    """Two streams on the default device, made once per thread: independent element-wise work alternates
    between them (on the CPU each stream is a thread)."""
    streams = getattr(_THREAD, "streams", None)
    if streams is None:
        streams = _THREAD.streams = [mx.new_stream(mx.default_device()) for _ in range(2)]
    return streams


# Adding and subtracting 1.5 * 2**23 rounds a float32 of magnitude below 2**22 to an integer (to nearest):
# two additions, where float -> int -> float takes three dependent steps (MLX fuses only shallow graphs).
_ROUNDER = 12582912.0


def _round(y: mx.array) -> mx.array:
    return (y + _ROUNDER) - _ROUNDER


def exp2_kernel(argument: Callable[..., mx.array], *, finite: bool = False) -> Callable[..., mx.array]:
    """``2 ** argument(*inputs)`` for arguments that are never positive, as two fused passes.

    The first pass writes the IEEE bits of ``2**n``, ``n = round(argument)`` (0 below ``2**-126``), the
    second reads them as float32 and multiplies by the polynomial for ``2**(argument - n)``. Both
    recompute ``argument`` (a cheap expression of the inputs, at most two operations deep) rather than
    storing it: a pass over memory costs more than a few multiplies. NaN stays NaN.

    ``finite``: the caller guarantees the argument is never ``-inf``, so the second pass skips the clamp
    that keeps ``-inf`` out of the polynomial (any finite argument leaves the fraction finite). With the
    clamp the host compiler leaves that pass unvectorised: 22 ms against 8 ms for 8.4M elements (2-core
    EPYC). ``-inf`` then gives NaN.
    """

    @mx.compile
    def pow2_bits(*inputs: mx.array) -> mx.array:
        n = _round(argument(*inputs)).astype(mx.int32)  # far below range (or NaN): INT_MIN
        n = mx.where(n < -127, -127, n)
        return (n + 127) << 23  # n = -127 gives the bits of 0.0

    @mx.compile
    def times_fraction(pow2n: mx.array, *inputs: mx.array) -> mx.array:
        y = argument(*inputs)
        if not finite:
            y = mx.where(y < _EXP2_FLOOR, _EXP2_FLOOR, y)  # keeps -inf out of the polynomial
        f = y - _round(y)  # in [-0.5, 0.5]
        c = _EXP2_POLY  # Estrin's form: a shallow graph
        f2 = f * f
        p = ((c[6] + c[5] * f) + f2 * (c[4] + c[3] * f)) + (f2 * f2) * ((c[2] + c[1] * f) + f2 * c[0])
        return pow2n * p

    def exp2(*inputs: mx.array) -> mx.array:
        return times_fraction(pow2_bits(*inputs).view(mx.float32), *inputs)

    return exp2


exp2_nonpositive = exp2_kernel(lambda y: y)
exp2_nonpositive.__doc__ = "2**y for float32 y <= 0 (any shape), 0 below 2**-126. Two fused passes."
# exp(-|x| / 2), squared by silu: halved, the argument is finite for every finite x (-|x| log2 e overflows
# above 2.4e38), so the kernel needs no clamp, whose pass the host compiler leaves scalar (3.0 against 8.9 ms
# for 3.1 M elements, 2-core EPYC).
_exp_minus_half_abs = exp2_kernel(lambda x: mx.abs(x) * (-LOG2E / 2), finite=True)


@mx.compile
def _gelu_tanh_argument(x: mx.array) -> mx.array:
    """The GELU's tanh argument sqrt(2/pi) * (x + 0.044715 x^3), clamped to the rational tanh's range by
    selects of constants: ``mx.clip`` (``maximum``, which tests for NaN) left the loop scalar, 13.2 against
    5.9 ms for 15 M elements (2-core EPYC). NaN fails both tests and stays NaN."""
    u = _GELU_C * (x + 0.044715 * (x * x * x))
    return mx.where(u < -_TANH_CLAMP, -_TANH_CLAMP, mx.where(u > _TANH_CLAMP, _TANH_CLAMP, u))


@mx.compile
def _gelu_from_argument(x: mx.array, u: mx.array) -> mx.array:
    """0.5 x (1 + tanh(u)), tanh as Eigen's rational function (Estrin's form keeps the graph shallow).

    At the clamp the rational function is 2e-7 short of 1, so far below it the factor 1 + tanh(u) would be
    2e-7 instead of 0 (a -1e-5 error at x = -100); there it is set to 0, as float32 tanh's -1 gives. A
    select would do that too, but the host compiler then leaves this long loop unvectorised (4x slower).
    """
    a, b = _TANH_P, _TANH_Q
    z = u * u
    z2 = z * z
    p = ((a[0] + a[1] * z) + z2 * (a[2] + a[3] * z)) + (z2 * z2) * ((a[4] + a[5] * z) + z2 * a[6])
    q = (b[0] + b[1] * z) + z2 * (b[2] + b[3] * z)
    above = u + _TANH_CLAMP  # exactly 0 where u was clamped at -c, else at least 4.7e-7 (an ulp of c)
    on = above / (above + 1e-30)  # 0 there, exactly 1 elsewhere
    return (0.5 * x) * ((1 + u * p / q) * on)


def gelu_tanh(x: mx.array) -> mx.array:
    """The tanh approximation of GELU (PyTorch ``gelu(approximate="tanh")``, ``nn.gelu_approx``), in x's
    dtype. On the CPU: two fused passes in float32, within 1.1e-6 of float64 (MLX's: 4.3e-7)."""
    if not on_cpu():
        return nn.gelu_approx(x)
    x32 = x.astype(mx.float32)
    return _gelu_from_argument(x32, _gelu_tanh_argument(x32)).astype(x.dtype)


@mx.compile
def _silu_from_half_exp(x: mx.array, h: mx.array) -> mx.array:
    """x * sigmoid(x) from h = exp(-|x| / 2), e = h * h: sigmoid is 1 / (1 + e) for x >= 0 and e / (1 + e)
    below."""
    e = h * h
    return x * (mx.where(x >= 0, 1.0, e) / (1 + e))


def silu(x: mx.array) -> mx.array:
    """``x * sigmoid(x)`` in x's dtype. On the CPU: three fused passes in float32, within 2e-7 of float64;
    NaN for an infinite x (PyTorch: NaN for -inf, inf for +inf), as a clamp that kept +inf would make a
    pass scalar, 2-3x slower."""
    if not on_cpu():
        return nn.silu(x)
    x32 = x.astype(mx.float32)
    return _silu_from_half_exp(x32, _exp_minus_half_abs(x32)).astype(x.dtype)


def on_two_streams(first: Callable[[], mx.array], second: Callable[[], mx.array]) -> tuple[mx.array, mx.array]:
    """The arrays two independent pieces of element-wise work build (``first()``, ``second()``), lazily.
    MLX's CPU element-wise kernels run on one thread each, so on the CPU each piece is queued on a stream of
    its own and the two run at once; the caller evaluates their inputs first, so that no matmul behind them
    (which uses every core) runs beside the pieces. On a GPU both are queued on the default stream."""
    if not on_cpu():
        return first(), second()
    out = []
    for stream, work in zip(two_streams(), (first, second)):
        with mx.stream(stream):
            out.append(work())
    return out[0], out[1]


# Bytes of pixels per piece of :func:`rows_on_two_streams`' work on the CPU (one piece per stream at a time).
PIECE_BYTES = 32 << 20


def rows_on_two_streams(fn: Callable[[mx.array], mx.array], x: mx.array) -> mx.array:
    """``fn(x)`` for a row-wise ``fn`` of (..., C) (each row's result depends on that row alone, e.g. a
    norm followed by a SiLU), evaluated. MLX's CPU element-wise kernels run on one thread, so on the CPU
    the rows are cut into pieces of about :data:`PIECE_BYTES`, two at a time on two streams that run at
    once. A pair is evaluated before the next is built, so its intermediates never outlive it. On a GPU,
    or for less than 2**20 elements, it is one call."""
    if not on_cpu() or x.size < 1 << 20:
        return fn(x)
    rows = x.reshape(-1, x.shape[-1])
    step = -(-rows.shape[0] // max(2, -(-x.nbytes // PIECE_BYTES)))
    parts = []
    for first in range(0, rows.shape[0], 2 * step):
        pair = []
        for stream, start in zip(two_streams(), range(first, min(first + 2 * step, rows.shape[0]), step)):
            with mx.stream(stream):
                pair.append(fn(rows[start : start + step]))
        mx.eval(pair)
        parts += pair
    return mx.concatenate(parts).reshape(*x.shape[:-1], parts[0].shape[-1])
