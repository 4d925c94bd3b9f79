"""The seams a transformer opens for the features that reach inside a pass: step caching
(:mod:`mlx_i2v.stepcache`) and sequence parallelism (:mod:`mlx_i2v.parallel`).

A pass is ``embed`` -> blocks -> ``head``: the features run some blocks, skip others, or cut the tokens
into shards between the seams. Wan's transformer
(:class:`~mlx_i2v.models.wan.transformer.WanTransformer3DModel`) opens them itself; LTX-Video's opens them
through its family's forward, which binds a generation's positions
(:class:`~mlx_i2v.families.ltx.variants.PositionedLTX`; step caching only). A family whose transformer
does not refuses those features before loading (``Family.unsupported``: "cache", "parallel").
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import mlx.core as mx

# Self-attention over a token shard: this shard's keys and values (B, heads, L_shard, D) -> the whole
# sequence's (B, heads, L, D), in token order.
GatherKV = Callable[[mx.array, mx.array], tuple[mx.array, mx.array]]


@runtime_checkable
class Rows(Protocol):
    """A per-row input of a pass (its tokens, a cross-attention context) that can be cut to some rows."""

    def take_rows(self, picked: mx.array) -> Any:
        """The same input for the rows ``picked`` (indices into the batch) only."""
        ...


class PassTokens(Rows, Protocol):
    """What ``embed`` returns: a pass's embedded input, everything every block needs besides the context.

    Attributes:
        x: (B, L, dim) patch tokens.
        grid: the token grid, L = its product.
        time_index: (B, 1) or (B, L): each row's or token's timestep.
        rope: cos, sin (L, head_dim / 2).
        gather_kv: None when ``x`` holds every token; for a shard of them, how self-attention gets the keys
            and values of the whole sequence.
    """

    x: mx.array
    grid: tuple[int, ...]
    time_index: mx.array
    rope: tuple[mx.array, mx.array]
    gather_kv: GatherKV | None

    def _replace(self, **changes: Any) -> PassTokens: ...


class SeamedTransformer(Protocol):
    """A transformer with the seams of a pass (``model(x, t, context=...)`` is ``head(run_blocks(embed))``)."""

    def embed(self, hidden_states: mx.array, timestep: mx.array) -> PassTokens:
        """Latents (B, F, H, W, C_in) and timesteps (B,) or (B, L) -> the blocks' input."""
        ...

    def run_blocks(self, x: mx.array, tokens: PassTokens, context: Any, blocks: slice = slice(None)) -> mx.array:
        """The ``blocks`` on ``x`` (B, L, dim), the rest of the input in ``tokens`` and ``context``."""
        ...

    def project_out(self, x: mx.array, tokens: PassTokens) -> mx.array:
        """The output norm and projection: (B, L, dim) -> (B, L, features per token)."""
        ...

    def unpatchify(self, x: mx.array, grid: tuple[int, ...]) -> mx.array:
        """(B, L, features per token) -> the prediction (B, F, H, W, C_out)."""
        ...

    def head(self, x: mx.array, tokens: PassTokens) -> mx.array:
        """``unpatchify(project_out(x))``."""
        ...


class PatchedConfig(Protocol):
    """What a parallel run's traffic estimate reads of a transformer's config."""

    patch_size: tuple[int, int, int]  # (pt, ph, pw)
    num_layers: int
    out_channels: int

    @property
    def inner_dim(self) -> int: ...

    @property
    def patch_volume(self) -> int: ...
