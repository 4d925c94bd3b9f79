"""Sequence-parallel: each rank of a group runs the transformer blocks on one shard of the video tokens.

Where the shard lives: only inside a pass. Each rank keeps the whole latents (a few MB: 19 MB in float32
for Wan 14B at 720p/81 frames) and runs the loop as one process does; a pass patch-embeds all of them
(one small matmul per token), keeps its own contiguous shard of the tokens, RoPE table and per-token
timesteps (TI2V), runs the blocks on it, and runs the output head on it too. The only exchanges are the
keys and values of each self-attention (cross-attention and the feed-forward are per token) and, once
per pass, the head's output: pt*ph*pw*C_out features per token (64 for Wan 14B, 192 for TI2V-5B)
instead of the model width (5120 / 3072), i.e. the prediction itself. Keeping the latents whole costs
that one small gather per pass and spares the sampler, the conditioning, step observers and step caches
from ever seeing a shard.

A token count that does not divide by the group size is padded to a multiple of it: padded tokens are
zeros with an identity rotation, their keys and values are dropped after each gather (so no real token
attends to them) and their outputs are dropped after the head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from ..denoise import Forward, StepInfo, plain_forward
from ..seams import PassTokens, SeamedTransformer
from .comm import Comm, Subgroup


@dataclass(frozen=True)
class TokenShard:
    """Shard ``index`` of ``count`` equal shards of ``length`` tokens (the last padded)."""

    length: int
    count: int
    index: int

    @property
    def size(self) -> int:
        return math.ceil(self.length / self.count)

    def take(self, x: mx.array, axis: int, pad: float = 0.0) -> mx.array:
        """This shard of ``x`` along ``axis`` (``length`` long), padded with ``pad`` to :attr:`size`."""
        start = min(self.index * self.size, self.length)
        stop = min(start + self.size, self.length)
        part = x[(slice(None),) * axis + (slice(start, stop),)]
        missing = self.size - (stop - start)
        if missing:
            widths = [(0, 0)] * x.ndim
            widths[axis] = (0, missing)
            part = mx.pad(part, widths, constant_values=pad)
        return part


class ShardedTransformer:
    """A transformer that runs on one token shard: the model's own ``embed`` / ``run_blocks`` / ``head``
    seams (:class:`~mlx_i2v.seams.SeamedTransformer`) with the tokens cut after ``embed``, the keys and
    values gathered in every self-attention and the output gathered after the head. Everything else is
    the model's."""

    def __init__(self, model: SeamedTransformer, group: Subgroup, comm: Comm):
        self._model = model
        self._group = group
        self._comm = comm

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def __call__(self, hidden_states: mx.array, timestep: mx.array, *, context: Any) -> mx.array:
        """As the model's ``__call__`` with ``context=``: (B, F, H, W, C_in) -> (B, F, H, W, C_out)."""
        tokens = self.embed(hidden_states, timestep)
        return self.head(self.run_blocks(tokens.x, tokens, context), tokens)

    def embed(self, hidden_states: mx.array, timestep: mx.array) -> PassTokens:
        """The model's embedding, cut to this rank's shard: x (B, L_shard, dim), time_index and RoPE
        tables cut the same way, and ``gather_kv`` set."""
        tokens = self._model.embed(hidden_states, timestep)
        shard = TokenShard(tokens.x.shape[1], self._group.size, self._group.index)
        per_token = tokens.time_index.shape[1] > 1  # TI2V: one timestep per token
        cos, sin = tokens.rope
        return tokens._replace(
            x=shard.take(tokens.x, 1),
            time_index=shard.take(tokens.time_index, 1) if per_token else tokens.time_index,
            rope=(shard.take(cos, 0, pad=1.0), shard.take(sin, 0)),
            gather_kv=lambda k, v: self._gather_kv(k, v, shard.length),
        )

    def run_blocks(self, x: mx.array, tokens: PassTokens, context: Any, blocks: slice = slice(None)) -> mx.array:
        return self._model.run_blocks(x, tokens, context, blocks)

    def head(self, x: mx.array, tokens: PassTokens) -> mx.array:
        """The head on this shard, then every shard's output gathered: (B, L_shard, dim) -> the whole
        prediction (B, F, H, W, C_out)."""
        out = self._model.project_out(x, tokens)  # (B, L_shard, features)
        every = self._comm.gather(self._group, out.swapaxes(0, 1), "output")  # (L_padded, B, features)
        length = math.prod(tokens.grid)
        return self._model.unpatchify(every[:length].swapaxes(0, 1), tokens.grid)

    def _gather_kv(self, k: mx.array, v: mx.array, length: int) -> tuple[mx.array, mx.array]:
        """(B, heads, L_shard, D) each -> (B, heads, L, D) each: one gather of both, padding dropped."""
        both = mx.stack([k, v]).transpose(3, 0, 1, 2, 4)  # (L_shard, 2, B, heads, D): tokens first
        every = self._comm.gather(self._group, both, "keys/values")[:length]
        every = every.transpose(1, 2, 3, 0, 4)  # (2, B, heads, L, D)
        return every[0], every[1]


@dataclass(frozen=True)
class SequenceParallel:
    """A :class:`~mlx_i2v.denoise.Forward` that hands ``inner`` the transformer sharded over ``group``
    (any forward that uses the model's seams or calls it, a step cache included, runs on the shard).
    It also tells the exchanges which step they belong to, for error messages."""

    group: Subgroup
    comm: Comm
    inner: Forward = plain_forward

    def __call__(
        self, model: Any, x: mx.array, timestep: mx.array, context: list, branches: tuple[str, ...], step: StepInfo
    ) -> mx.array:
        self.comm.where = f"step {step.number}/{step.total}"
        if self.group.size > 1:
            model = ShardedTransformer(model, self.group, self.comm)
        return self.inner(model, x, timestep, context, branches, step)
