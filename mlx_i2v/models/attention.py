"""The one attention entry point every model calls, so memory policy lives in one place.

``mx.fast.scaled_dot_product_attention`` is memory-efficient only where the backend runs a fused kernel:
on Metal the "vector" kernel (at most 8 queries, head dim 64/96/128/256) and the tiled "steel" kernel
(more than 8 queries, head dim 64/80/128), neither of which forms the (Lq, Lk) score matrix. Everywhere
else (the CPU, other head dims such as the VAE's 384/1024-channel single head, CUDA) MLX falls back to
matmul -> softmax -> matmul and materialises every score. There the queries are split into chunks so
that one chunk's scores fit a share of the memory budget; each query row's softmax is independent of
the others, so the result equals the unchunked one. Chunks are evaluated one after another, so this path
cannot run inside ``mx.compile``.

Precision: the fused kernels keep the scores and probabilities in float32 whatever the input dtype; the
fallback computes them in the input dtype, and bfloat16 scores lose 2-6x more than PyTorch's attention
(which keeps its scores in float32; benchmarks/README.md, "bfloat16 parity"). So where the fallback
runs (the CPU, and shapes Metal has no kernel for) half-precision attention is computed in float32 and
only its output rounded, as the fused kernels do. CUDA is left to MLX: its cuDNN kernel takes half
precision only, and an upcast would lose it.

On the CPU that fallback's softmax costs more than its two matmuls (MLX's CPU ``exp`` is scalar code), so
there float32 attention is computed here, the same three steps with the exponentials from
:mod:`~mlx_i2v.models.elementwise` and the normalisation applied to the (Lq, D) result instead of the
(Lq, Lk) weights. Its row sums come out of the second matmul and its row maxima are taken in two
vectorised steps (:func:`softmax_attention`, :func:`~.rows.row_max`), since MLX's CPU reductions along a row go
one element at a time. Its work is cut in two halves on two streams. Where the process has at most two
cores and OpenBLAS can be held to one thread, each half runs its matmuls as well, on a core of its own
(:func:`halves_on_own_cores`: 9-35 % less time for the same results).
"""

from __future__ import annotations

import functools
from typing import Callable

import mlx.core as mx

from ..memory import memory_budget
from . import blas
from .blas import cpu_cores
from .elementwise import LOG2E, exp2_kernel, on_cpu, two_streams
from .rows import row_max

# Share of the memory budget one attention call may spend on its score matrix.
ATTENTION_FRACTION = 1 / 8
# On the CPU at most this much, whatever the budget: chunks this small are no slower there (a TI2V-5B
# pass of 2 x 24 heads x 1056 tokens: 2.0 s in 64 MB chunks, 2.5 s unchunked, on 2 EPYC cores) and cut
# the scores' 0.72 GB to 0.13 GB (benchmarks/README.md, "Attention chunks on the CPU").
CPU_WORKSPACE = 64 * 2**20
# Bytes reserved per score: the fallback keeps the scores and, when it cannot reuse their buffer for the
# softmax, a second copy; counted in float32, the dtype the mask or a precise softmax may promote to.
SCORE_BYTES = 2 * 4

_STEEL_HEAD_DIMS = (64, 80, 128)
_VECTOR_HEAD_DIMS = (64, 96, 128, 256)
_VECTOR_MAX_QUERIES = 8


def fused_is_memory_efficient(q_len: int, k_len: int, head_dim: int, value_dim: int) -> bool:
    """True when MLX will run a fused kernel that never materialises the (Lq, Lk) scores."""
    if not (mx.metal.is_available() and mx.default_device().type == mx.DeviceType.gpu):
        return False
    if head_dim != value_dim:
        return False
    if q_len <= _VECTOR_MAX_QUERIES:
        return q_len <= k_len and head_dim in _VECTOR_HEAD_DIMS
    return head_dim in _STEEL_HEAD_DIMS


def adds_mask_in_float32(dtype: mx.Dtype) -> bool:
    """Whether :func:`attention` adds a float32 mask to the scores of ``dtype`` queries in float32: for
    float32, and on the CPU for every dtype (half precision is computed in float32 there). MLX's fused GPU
    kernels take the mask in the queries' dtype."""
    return dtype == mx.float32 or on_cpu()


def _on_cuda() -> bool:
    return mx.default_device().type == mx.DeviceType.gpu and mx.cuda.is_available()


def attention_workspace(budget: int | None = None, *, cpu: bool | None = None) -> int:
    """Bytes one attention call may spend on scores: :data:`ATTENTION_FRACTION` of the budget (default:
    this process's), and on the CPU (``cpu``, default: whether MLX computes there) at most
    :data:`CPU_WORKSPACE`."""
    workspace = int((memory_budget() if budget is None else budget) * ATTENTION_FRACTION)
    return min(workspace, CPU_WORKSPACE) if (on_cpu() if cpu is None else cpu) else workspace


def query_chunk_size(batch: int, heads: int, q_len: int, k_len: int, workspace: int) -> int:
    """Queries per chunk so that ``batch * heads * chunk * k_len * SCORE_BYTES <= workspace`` (at least
    one query, at most ``q_len``)."""
    per_query = batch * heads * k_len * SCORE_BYTES
    return max(1, min(q_len, workspace // per_query))


def attention(
    q: mx.array, k: mx.array, v: mx.array, *, scale: float | None = None, mask: mx.array | None = None
) -> mx.array:
    """Scaled dot-product attention.

    Args:
        q: (B, heads, Lq, D); k, v: (B, heads, Lk, D).
        scale: multiplies q·k; default 1/sqrt(D).
        mask: optional additive bias broadcastable to (B, heads, Lq, Lk), in q's dtype or float32.

    Returns:
        (B, heads, Lq, D) in q's dtype.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    B, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    if fused_is_memory_efficient(q_len, k_len, head_dim, v.shape[-1]):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    if q.dtype in (mx.float16, mx.bfloat16) and not _on_cuda():
        f32 = mx.float32
        out = attention(q.astype(f32), k.astype(f32), v.astype(f32), scale=scale, mask=mask)
        return out.astype(q.dtype)
    sdpa = mx.fast.scaled_dot_product_attention
    own_cores = False
    if on_cpu() and q.dtype == mx.float32:
        own_cores = halves_on_own_cores()
        sdpa = functools.partial(softmax_attention, own_cores=own_cores)
        # Keys and values are often head views of (B, L, heads * D) projections. MLX's CPU matmul copies an
        # operand whose rows are not packed, for every query chunk; once is enough. The values' copy takes
        # the column of ones softmax_attention sums its rows with.
        k, v = mx.contiguous(k), with_ones_column(v)
    chunk = query_chunk_size(B, heads, q_len, k_len, attention_workspace())
    if not own_cores:
        if chunk >= q_len:
            return sdpa(q, k, v, scale=scale, mask=mask)
        return _by_query_chunks(sdpa, q, k, v, scale, mask, chunk)
    # With the halves' matmuls on their own cores, every chunk (even a single one) is evaluated while the
    # BLAS is held to one thread; the projections behind q, k and v are evaluated before, on every core.
    mx.eval(q, k, v)
    with blas.one_thread():
        return _by_query_chunks(sdpa, q, k, v, scale, mask, chunk)


def _by_query_chunks(
    sdpa: Callable[..., mx.array], q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None,
    chunk: int,
) -> mx.array:  # fmt: skip
    """``sdpa`` over ``chunk`` queries at a time, each chunk evaluated before the next is queued."""
    # MLX allocates the outputs of every queued operation before the first one finishes, so the first
    # chunk's evaluation would also hold every intermediate of the projections behind q, k and v (a TI2V-5B
    # self-attention peaked at 16 hidden-state copies, 11 with this).
    mx.eval(q, k, v)
    # A mask with a real query axis is cut with the queries; one broadcast over queries is shared.
    split_mask = mask is not None and mask.ndim >= 2 and mask.shape[-2] != 1
    outputs = []
    for start in range(0, q.shape[2], chunk):
        chunk_mask = mask[..., start : start + chunk, :] if split_mask else mask
        out = sdpa(q[:, :, start : start + chunk], k, v, scale=scale, mask=chunk_mask)
        # Evaluated chunk by chunk, for the same reason: a lazily built list of chunks would hold all their
        # scores at once anyway.
        mx.eval(out)
        outputs.append(out)
    return mx.concatenate(outputs, axis=2)


def halves_on_own_cores() -> bool:
    """Whether :func:`softmax_attention`'s two halves can each run their matmuls on a core of their own: the
    process may use at most two cores and the BLAS can be held to one thread (:mod:`.blas`). With more
    cores each half would need several BLAS threads, and two callers of OpenBLAS contend for its one
    thread pool; that could not be measured here, so those machines keep the matmuls on every core."""
    return cpu_cores() <= 2 and blas.can_hold_to_one_thread()


# exp(s - max) = 2**((s - max) log2 e) from the max-subtracted scores. The subtraction is MLX's own
# broadcasting op: a compiled kernel with a broadcast input runs a strided, unvectorised loop (1.7x slower).
# Without a mask the scores are finite, and so is the argument; a mask may hold -inf (or the most
# negative float, which the scaling by log2 e takes to -inf).
_exp_of_shifted = exp2_kernel(lambda shifted: shifted * LOG2E)
_exp_of_finite_shifted = exp2_kernel(lambda shifted: shifted * LOG2E, finite=True)


def with_ones_column(v: mx.array) -> mx.array:
    """Values (..., Lk, D) followed by a column of ones: (..., Lk, D + 1), contiguous, as
    :func:`softmax_attention` takes them."""
    return mx.concatenate([v, mx.ones((*v.shape[:-1], 1), v.dtype)], axis=-1)


def softmax_attention(
    q: mx.array,
    k: mx.array,
    v_ones: mx.array,
    *,
    scale: float,
    mask: mx.array | None = None,
    own_cores: bool = False,
) -> mx.array:
    """``softmax(scale * q k^T + mask) v`` for float32 (B, heads, Lq, D) queries, (B, heads, Lk, D) keys and
    values given with a column of ones (B, heads, Lk, D + 1) (:func:`with_ones_column`), as MLX's CPU
    fallback computes it (scaled queries, max-subtracted exponentials), except that each row is divided by
    its sum after the second matmul. The ones column makes that matmul return the sums too, where a
    separate sum was a pass of its own over the (Lq, Lk) exponentials (6.7 ms of a (2, 24, 165, 1056) chunk;
    the wider matmul costs 0.6 ms more): a whole self-attention over 2 x 24 heads x 1056 tokens took
    346-350 ms against 364-374 ms with the separate sum (alternately, three times each; 2-core EPYC).

    The work is cut in two halves that run at once on two streams: on the batch, else the heads, else the
    queries, whichever is the first axis longer than 1, so that each half is a contiguous block of the
    scores. With ``own_cores`` (:func:`halves_on_own_cores`; the caller holds the BLAS to one thread and
    evaluates the result) each half runs its two matmuls too, on its own core: that whole self-attention
    took 230-250 ms against 263-363 ms, a cross-attention over 512 keys 115-140 ms against 129-194 ms
    (five times each, alternately, in two sessions an hour apart; bit-identical). The BLAS's two threads
    meet at the end of every small product, so a core that this VM slows holds both; two one-thread
    products do not wait for each other. Otherwise the matmuls run on the default stream, where
    the BLAS uses every core, and only the element-wise work between them (one thread per MLX kernel) is
    halved: a (2, 24, 165, 1056) chunk took 55 ms so, where halves whose matmuls each used every core took
    80 ms. Either way the halves hold two (Lq, Lk) float32 buffers per head at a time, as the fallback does.

    Returns:
        (B, heads, Lq, D) float32.
    """
    halves = half_cuts(q.shape)
    if halves is None:  # a single query row
        return _normalised(_numerators(_scores(q, k, scale), mask) @ v_ones)
    axis, cuts = halves
    mask = None if mask is None else mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    scores = None if own_cores else _scores(q, k, scale)
    outputs = []
    for stream, cut in zip(two_streams(), cuts):
        part_mask = mask[cut] if mask is not None and mask.shape[axis] > 1 else mask
        # A half of the queries attends to every key.
        k_part, v_part = (k[cut], v_ones[cut]) if axis < 2 else (k, v_ones)
        with mx.stream(stream):
            weighted = _numerators(_scores(q[cut], k_part, scale) if own_cores else scores[cut], part_mask)
        # the values matmul on the half's own core, or with every core on the default stream
        with mx.stream(stream if own_cores else mx.default_stream(mx.default_device())):
            weighted = weighted @ v_part
        outputs.append(_normalised(weighted))
    return mx.concatenate(outputs, axis=axis)


def half_cuts(shape: tuple[int, ...]) -> tuple[int, list[tuple[slice, ...]]] | None:
    """How :func:`softmax_attention` cuts the work for queries of ``shape`` (B, heads, Lq, ...) in two: on
    the batch, else the heads, else the queries, whichever is the first axis longer than 1. Returns that
    axis and the index of each half, or None for a single query row."""
    axis = next((i for i in range(3) if shape[i] > 1), None)
    if axis is None:
        return None
    half = shape[axis] // 2
    return axis, [(slice(None),) * axis + (part,) for part in (slice(0, half), slice(half, None))]


def _scores(q: mx.array, k: mx.array, scale: float) -> mx.array:
    """(..., Lq, D) queries, (..., Lk, D) keys -> (..., Lq, Lk) scaled scores."""
    return (q * scale) @ k.swapaxes(-1, -2)


def _normalised(weighted: mx.array) -> mx.array:
    """(..., D + 1) exponential-weighted values and their weights' sum -> (..., D) weighted mean."""
    return weighted[..., :-1] / weighted[..., -1:]


def _numerators(scores: mx.array, mask: mx.array | None) -> mx.array:
    """exp(scores + mask - row max)."""
    exp = _exp_of_finite_shifted if mask is None else _exp_of_shifted
    if mask is not None:
        scores = scores + mask
    return exp(scores - row_max(scores))
