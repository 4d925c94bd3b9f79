"""Guidance-parallel: each rank of a pair computes one branch of classifier-free guidance."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ..denoise import BatchedGuidance
from .comm import Comm, Subgroup

_ONE_PROCESS = BatchedGuidance()  # which branches a scale needs, and how they combine


@dataclass(frozen=True)
class SplitGuidance:
    """The conditional branch on branch index 0, the unconditional one on 1. After the pass the pair
    swaps predictions (one gather of the (1, T, h, w, C) velocity per step) and every rank combines
    them exactly as one process does, so every rank takes the same sampler step.

    A step without guidance (scale <= 1, e.g. one A14B expert's) needs the conditional branch only:
    both ranks compute it and nothing is exchanged.
    """

    index: int
    pair: Subgroup
    comm: Comm

    def branches(self, scale: float) -> tuple[str, ...]:
        both = _ONE_PROCESS.branches(scale)
        return both if len(both) == 1 else (both[self.index],)

    def combine(self, out: mx.array, scale: float) -> mx.array:
        if len(_ONE_PROCESS.branches(scale)) == 1:
            return out
        rows = self.comm.gather(self.pair, out, "guidance")  # (2, ...): conditional, unconditional
        return _ONE_PROCESS.combine(rows, scale)
