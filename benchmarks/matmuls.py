"""The matrix products of a Wan transformer's denoise stage, and how long they alone take.

``compare_diffusers.py`` divides each framework's denoise time by this figure: the time of the same
sequence of matmuls, at the job's shapes, run back to back by that framework (``mx.addmm`` / ``@`` in
MLX, ``F.linear`` / ``torch.matmul`` in PyTorch) on random operands. The quotient says how much of the
stage is something else (element-wise work, copies, waiting); for a transformer this size a good
implementation stays within ~15 % of its matmuls.

What is counted, per denoising step and pass (``rows`` = 2 with classifier-free guidance) and per block:
the self-attention q, k, v and output projections, the cross-attention q and output projections, the
attention scores and weighted values of both attentions (in query chunks of at most
:data:`SCORE_BYTES_PER_CHUNK` of float32 scores, as mlx-i2v's CPU attention computes them, on a 2-core
CPU in two halves on two streams with a one-thread BLAS, as it runs them there; the values as D columns,
though that attention multiplies by D + 1, a column of ones that returns the softmax's sums: 1/128 more
of those products, left out to the ratio's disfavour), the FFN's
two linears; per pass the patch embedding (as the matmul it is) and the output projection; the text projection and every
block's cross-attention keys and values once per generation (mlx-i2v) or once per pass (diffusers
recomputes them in every forward). Left out, because they are tiny (a few distinct timesteps, not
tokens): the time MLP and its modulation projection.

Each distinct product is timed ``repeats`` times after a warm-up (the minimum is kept: other programs
only ever add time) and multiplied by how often the stage runs it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

TEXT_TOKENS = 512
# mlx_i2v.models.attention.CPU_WORKSPACE (64 MiB) holds two float32 copies of a chunk's scores.
SCORE_BYTES_PER_CHUNK = 32 * 2**20


@dataclass(frozen=True)
class Matmul:
    """``a @ b (+ bias)`` with ``a`` (..., M, K) and ``b`` (..., K, N), run ``count`` times per stage."""

    name: str
    a: tuple[int, ...]
    b: tuple[int, ...]
    bias: bool
    count: int
    once: bool = False  # run once per generation, not in every pass (mlx-i2v's text context and its K/V)

    @property
    def flop(self) -> float:
        """FLOP of one product (2 per multiply-add)."""
        return 2.0 * math.prod(self.a) * self.b[-1]


def denoise_matmuls(
    config: Mapping[str, Any], *, latent_shape: tuple[int, int, int], rows: int, steps: int, context_once: bool = True,
    text_tokens: int = TEXT_TOKENS,
) -> list[Matmul]:
    """The denoise stage's matmuls for a diffusers ``WanTransformer3DModel`` config.

    Args:
        config: the transformer's config.json.
        latent_shape: (frames, height, width) of the latent video.
        rows: batch rows per pass (2 with classifier-free guidance, 1 without).
        steps: denoising steps (one pass each).
        context_once: the text context and its cross-attention K/V are projected once per generation
            (mlx-i2v), not in every pass (diffusers).
        text_tokens: rows of the text context: 512 (diffusers), or fewer where mlx-i2v folds the padding
            after the longest prompt into one key (``WanTransformer3DModel.step_context``).
    """
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    d, ffn = heads * head_dim, config["ffn_dim"]
    pt, ph, pw = config["patch_size"]
    f, h, w = latent_shape
    tokens = (f // pt) * (h // ph) * (w // pw)
    layers, passes = config["num_layers"], steps
    context = 1 if context_once else passes
    n = rows * tokens
    out = [
        Matmul("patch embedding", (n, config["in_channels"] * pt * ph * pw), (config["in_channels"] * pt * ph * pw, d), True, passes),
        Matmul("q, k, v, out, cross q, cross out", (n, d), (d, d), True, 6 * layers * passes),
        Matmul("FFN up", (n, d), (d, ffn), True, layers * passes),
        Matmul("FFN down", (n, ffn), (ffn, d), True, layers * passes),
        Matmul("output projection", (n, d), (d, (config.get("out_channels") or config["in_channels"]) * pt * ph * pw), True, passes),
        Matmul("text projection 1", (rows * text_tokens, config["text_dim"]), (config["text_dim"], d), True, context, context_once),
        Matmul("text projection 2, cross k, v", (rows * text_tokens, d), (d, d), True, context * (1 + 2 * layers), context_once),
    ]  # fmt: skip
    for keys, label in ((tokens, "self-attention"), (text_tokens, "cross-attention")):
        chunk = max(1, min(tokens, SCORE_BYTES_PER_CHUNK // (rows * heads * keys * 4)))
        full, rest = divmod(tokens, chunk)
        for q_len, count in ((chunk, full), (rest, 1 if rest else 0)):
            if count:
                out.append(Matmul(f"{label} scores", (rows, heads, q_len, head_dim), (rows, heads, head_dim, keys), False, count * layers * passes))
                out.append(Matmul(f"{label} values", (rows, heads, q_len, keys), (rows, heads, keys, head_dim), False, count * layers * passes))  # fmt: skip
    return out


def _time(run: Callable[[], None], repeats: int) -> float:
    run()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def time_mlx(matmuls: list[Matmul], repeats: int = 3) -> dict[str, Any]:
    """Seconds of the whole list in MLX (each product evaluated on its own, as in a real pass). The
    attention products (batched over rows and heads) run as mlx-i2v's CPU attention runs them: where its
    two halves each have a core (``attention.halves_on_own_cores``), in two halves on two streams with the
    BLAS held to one thread."""
    import mlx.core as mx

    from mlx_i2v.models import attention, blas
    from mlx_i2v.models.elementwise import two_streams

    halves = attention.halves_on_own_cores()

    def in_halves(a: mx.array, b: mx.array) -> None:
        # As softmax_attention cuts its work; keys and values are cut only on the batch or the heads.
        axis, cuts = attention.half_cuts(a.shape)
        outputs = []
        with blas.one_thread():
            for stream, cut in zip(two_streams(), cuts):
                with mx.stream(stream):
                    outputs.append(a[cut] @ (b[cut] if axis < 2 else b))
            mx.eval(outputs)

    def product(m: Matmul) -> Callable[[], None]:
        a = mx.random.normal(m.a)
        w = mx.random.normal((*m.b[:-2], m.b[-1], m.b[-2]))  # stored (N, K) and transposed, as nn.Linear
        bias = mx.random.normal((m.b[-1],)) if m.bias else None
        mx.eval(a, w, bias)
        b = w.swapaxes(-1, -2)
        if halves and len(m.a) == 4:
            return lambda: in_halves(a, b)
        return lambda: mx.eval(mx.addmm(bias, a, b) if m.bias else a @ b)

    return _report(matmuls, lambda m: _time(product(m), repeats))


def time_torch(matmuls: list[Matmul], repeats: int = 3, device: str = "cpu") -> dict[str, Any]:
    """Seconds of the whole list in PyTorch (``F.linear`` for the linears, ``torch.matmul`` otherwise)."""
    import torch
    import torch.nn.functional as F

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()
        elif device == "mps":
            torch.mps.synchronize()

    def product(m: Matmul) -> Callable[[], None]:
        a = torch.randn(m.a, device=device)
        if m.bias:
            w, bias = torch.randn(m.b[-1], m.b[-2], device=device), torch.randn(m.b[-1], device=device)
            call = lambda: F.linear(a, w, bias)  # noqa: E731
        else:
            b = torch.randn(m.b, device=device)
            call = lambda: torch.matmul(a, b)  # noqa: E731

        def run() -> None:
            with torch.no_grad():
                call()
            sync()

        return run

    return _report(matmuls, lambda m: _time(product(m), repeats))


def _report(matmuls: list[Matmul], seconds_of: Callable[[Matmul], float]) -> dict[str, Any]:
    per_call = {m: seconds_of(m) for m in matmuls}
    total = sum(per_call[m] * m.count for m in matmuls)
    flop = sum(m.flop * m.count for m in matmuls)
    return {
        "seconds": total,
        "tflop": flop / 1e12,
        "gflops": flop / total / 1e9,
        "products": [
            {"name": m.name, "a": list(m.a), "b": list(m.b), "count": m.count, "once": m.once,
             "seconds_each": per_call[m]}
            for m in matmuls
        ],
    }


def seconds_per_step(report: Mapping[str, Any], steps: int) -> float:
    """One denoising step's share of a timed list (:func:`time_mlx`, :func:`time_torch`): every product but
    those run once per generation, divided by the ``steps`` the list was made for."""
    return sum(p["seconds_each"] * p["count"] for p in report["products"] if not p.get("once")) / steps
