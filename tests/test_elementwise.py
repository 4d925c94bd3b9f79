"""The CPU's rebuilt transcendental functions (exp, tanh-GELU, SiLU, softmax attention) and row reductions
(max, sum, LayerNorm, RMSNorm) against float64 NumPy and against the MLX functions they replace."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_i2v.models import rows
from mlx_i2v.models.attention import attention, softmax_attention, with_ones_column
from mlx_i2v.models.elementwise import exp2_kernel, exp2_nonpositive, gelu_tanh, on_two_streams, silu
from mlx_i2v.models.layers import apply_rope
from mlx_i2v.models.rows import _row_split, row_max


def wide_range(seed: int, n: int = 200_000) -> np.ndarray:
    """float32 values from -20 to 20, denser near 0, plus the edges of float32."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n) * rng.choice([0.01, 1.0, 5.0], n)
    edges = [0.0, -0.0, 1e-30, -1e-30, 20.0, -20.0, 100.0, -100.0, 3e38, -3e38]
    return np.concatenate([x, edges]).astype(np.float32)


def test_exp2_nonpositive_matches_float64():
    y = -np.abs(wide_range(0)[:-2]) * 6  # down to exponent -120 and beyond
    y = np.concatenate([y, np.linspace(-127.5, -125.5, 101, dtype=np.float32)])
    got = np.array(exp2_nonpositive(mx.array(y)))
    want = np.exp2(y.astype(np.float64))
    normal = want >= 2.0**-126
    assert np.all(np.abs(got[normal] - want[normal]) <= 3e-7 * want[normal])
    # below the normal range: 0, or the subnormal of 2**n times the polynomial
    assert np.all(np.abs(got[~normal] - want[~normal]) <= 2.0**-126)
    assert got[y < -127].max() == 0.0


def test_exp2_nonpositive_edge_values():
    y = mx.array([0.0, -0.5, -1.0, -1.5, -2.5, -float("inf"), -3.4e38, float("nan")])
    got = np.array(exp2_nonpositive(y))
    assert got[:5].tolist() == pytest.approx([1.0, 2**-0.5, 0.5, 2**-1.5, 2**-2.5], rel=3e-7)
    assert got[5] == 0.0 and got[6] == 0.0 and np.isnan(got[7])


def test_exp2_of_a_finite_argument_is_the_same_without_the_clamp():
    y = -np.abs(wide_range(5)[:-2]) * 6
    y = mx.array(np.concatenate([y, np.array([-3.4e38, -1e30, -2.0**23 - 0.5], np.float32)]))
    finite = exp2_kernel(lambda x: x, finite=True)
    assert np.array_equal(np.array(finite(y)), np.array(exp2_nonpositive(y)))


def test_gelu_tanh_matches_float64_and_mlx():
    x = wide_range(1)
    x64 = x.astype(np.float64)
    want = 0.5 * x64 * (1 + np.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64**3)))
    got = np.array(gelu_tanh(mx.array(x)))
    assert np.all(np.abs(got - want) <= 3e-7 * np.maximum(1.0, np.abs(x64)))
    # far below zero the result is 0 (to float32 tanh's -1), not a tiny fraction of x
    assert np.all(np.abs(got[x < -6]) <= 1e-7) and got[-1] == 0.0
    assert np.isnan(np.array(gelu_tanh(mx.array([float("nan")])))).all()


def test_silu_matches_float64():
    x = wide_range(2)
    x64 = x.astype(np.float64)
    with np.errstate(over="ignore"):
        want = x64 / (1 + np.exp(-x64))
    got = np.array(silu(mx.array(x)))
    assert np.all(np.abs(got - want) <= 3e-7 * np.maximum(1.0, np.abs(x64)))
    assert np.isnan(np.array(silu(mx.array([float("nan")])))).all()


def test_silu_of_an_infinite_input_is_nan():
    """The exponential skips its clamp (a finite x keeps its argument finite), so infinities give NaN,
    as PyTorch's silu does for -inf; finite extremes are still exact."""
    got = np.array(silu(mx.array([float("inf"), -float("inf"), 3.4e38, -3.4e38])))
    assert np.isnan(got[:2]).all() and got[2] == np.float32(3.4e38) and got[3] == 0.0


def test_half_precision_round_trips():
    x = mx.array(wide_range(3)[:1000]).astype(mx.bfloat16)
    assert gelu_tanh(x).dtype == mx.bfloat16 and silu(x).dtype == mx.bfloat16
    want = nn.gelu_approx(x.astype(mx.float32)).astype(mx.bfloat16)
    assert mx.allclose(gelu_tanh(x).astype(mx.float32), want.astype(mx.float32), rtol=1e-2, atol=1e-3).item()


def test_on_two_streams_gives_each_function_its_own_input():
    x, y = mx.random.normal((64, 48)), mx.random.normal((8, 48))
    a, b = on_two_streams(lambda: silu(x), lambda: gelu_tanh(y) * 2)
    assert mx.array_equal(a, silu(x)).item() and mx.array_equal(b, gelu_tanh(y) * 2).item()


@pytest.mark.parametrize("family", ["wan", "ltx"])
def test_self_attention_with_norms_on_two_streams_is_bit_identical(family):
    """The q and k norms and rotations run on two streams (``_self_attention_qkv``); the result is the
    sub-layer computed in one chain, exactly, with each norm on its own projection."""
    mx.random.seed(3)
    if family == "wan":
        from mlx_i2v.models.wan.transformer import WanAttention, WanRotaryPosEmbed

        attn, rope = WanAttention(64, 4, 1e-6), WanRotaryPosEmbed(16, 64)((2, 3, 4))
        rotate = lambda t: apply_rope(attn._heads(t), *rope)  # noqa: E731
    else:
        from mlx_i2v.models.ltx.transformer import LTXAttention, LTXTransformerConfig

        config = LTXTransformerConfig(num_attention_heads=4, attention_head_dim=16, cross_attention_dim=64)
        attn = LTXAttention(config, 64)
        rope = (mx.random.normal((1, 24, 32)), mx.random.normal((1, 24, 32)))
        rotate = lambda t: attn._heads(apply_rope(t, *rope))  # noqa: E731
    attn.update(nn.utils.tree_map(lambda p: mx.random.normal(p.shape), attn.parameters()))
    x = mx.random.normal((2, 24, 64))
    q, k = rotate(attn.norm_q(attn.to_q(x))), rotate(attn.norm_k(attn.to_k(x)))
    out = attention(q, k, attn._heads(attn.to_v(x)))
    want = attn.to_out[0](out.transpose(0, 2, 1, 3).reshape(2, 24, 64))
    assert mx.array_equal(attn(x, rope=rope), want).item()


# The element-wise work is split on the first axis longer than 1: batch, heads, queries, or not at all.
# With own_cores each half runs its matmuls too, on its own stream.
@pytest.mark.parametrize("batch, heads, queries", [(2, 3, 40), (1, 3, 40), (1, 1, 40), (1, 1, 1), (3, 1, 5)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("own_cores", [False, True])
def test_softmax_attention_equals_mlx_sdpa(own_cores, masked, batch, heads, queries):
    key = mx.random.key(4)
    shapes = [(batch, heads, n, 16) for n in (queries, 24, 24)]
    q, k, v = (mx.random.normal(shape, key=mx.random.split(key, 3)[i]) * 2 for i, shape in enumerate(shapes))
    mask = None
    if masked:  # UMT5's padding mask (the most negative float on the padded keys) over a position bias
        keep = mx.arange(24)[None, None, None, :] < mx.array([24, 9, 17])[:batch, None, None, None]
        mask = mx.where(keep, mx.random.normal((1, heads, queries, 24)), mx.finfo(mx.float32).min)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=mask)
    got = softmax_attention(q, k, with_ones_column(v), scale=0.3, mask=mask, own_cores=own_cores)
    assert mx.allclose(got, want, rtol=1e-5, atol=1e-6).item()
    # the chunked path (queries split to a small workspace) gives the same on the CPU
    assert mx.allclose(attention(q, k, v, scale=0.3, mask=mask), want, rtol=1e-5, atol=1e-6).item()


@pytest.mark.parametrize("n", [1056, 512, 27280, 1021, 96, 40, 17, 1])
def test_row_max_equals_the_plain_max(n):
    """The max in two steps (over rows of a split of the last axis, then the rest) is the plain max: the
    same values, whatever n's divisors, including -inf rows and NaN."""
    x = mx.random.normal((2, 3, 5, n), key=mx.random.key(n)) * 10
    x[0, 0, 0] = -mx.inf
    x[1, 2, 4, n // 2] = mx.nan
    assert mx.array_equal(row_max(x), mx.max(x, axis=-1, keepdims=True), equal_nan=True).item()


def test_row_split_is_a_divisor_in_the_vectorised_range():
    assert _row_split(1056) == 32 and _row_split(512) == 32 and _row_split(27280) == 40
    assert _row_split(1021) is None and _row_split(17) is None  # prime: the plain max
    assert _row_split(40) == 20  # below 32 only: the greatest


@pytest.mark.parametrize("shape", [(2, 33, 3072), (1, 7, 2048), (3, 40), (2, 5, 17), (4, 96)])
def test_row_norms_match_mlx_fast(shape):
    """The CPU's LayerNorm and RMSNorm from two-step row sums equal mx.fast's to float32 rounding, with and
    without weights, on rows that split and (17: prime) on the fallback, which is mx.fast itself."""
    mx.random.seed(3)
    x = mx.random.normal(shape) * 3 + 1.5
    w, b = mx.random.normal(shape[-1:]), mx.random.normal(shape[-1:])
    for weight, bias in ((None, None), (w, None), (w, b)):
        got, want = rows.layer_norm(x, weight, bias, 1e-6), mx.fast.layer_norm(x, weight, bias, 1e-6)
        assert mx.allclose(got, want, rtol=1e-5, atol=1e-5).item()
    for weight in (None, w):
        got, want = rows.rms_norm(x, weight, 1e-6), mx.fast.rms_norm(x, weight, 1e-6)
        assert mx.allclose(got, want, rtol=1e-5, atol=1e-5).item()
    assert mx.allclose(rows.row_sum(x), mx.sum(x, axis=-1, keepdims=True), rtol=1e-5, atol=1e-4).item()
