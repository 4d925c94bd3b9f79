"""The one attention entry point every model calls, so memory policy lives in one place."""

from __future__ import annotations

import mlx.core as mx


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
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
