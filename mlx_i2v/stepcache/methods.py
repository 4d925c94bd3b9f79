"""The step-cache decision rules: First-Block-Cache, MagCache and TeaCache.

Each is a small strategy on the residual cache of :mod:`mlx_i2v.stepcache.core`: how many blocks always
run (the *probe*), the per-branch state, and the rule that reads them. The first two follow diffusers
0.42.1's hooks (``hooks/first_block_cache.py``, ``hooks/mag_cache.py``) on ``WanTransformer3DModel``; the
third follows TeaCache4Wan2.1 (ali-vilab/TeaCache), which diffusers does not ship.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import mlx.core as mx
import numpy as np

from ..denoise import StepInfo
from .core import Probe


@dataclass(frozen=True)
class FirstBlockCache:
    """First-Block-Cache (diffusers ``FirstBlockCacheConfig``): block 0 always runs; the rest run iff
    ``mean|r0 - r0_prev| / mean|r0_prev| > threshold``, where ``r0`` is block 0's residual and
    ``r0_prev`` the one of the branch's last computed pass. A skipped pass adds the residual of blocks
    1..L-1 from that pass to this step's block-0 output. No calibration: it measures the model itself.

    ``threshold=0`` never skips (the comparison is strict), which gives the uncached result exactly.
    """

    threshold: float = 0.05
    name: ClassVar[str] = "first-block"
    probe_blocks: ClassVar[int] = 1
    state_bytes: ClassVar[int] = 4  # r0_prev, float32

    def new_state(self, step: StepInfo) -> dict[str, mx.array | None]:
        return {"r0": None}

    def decide(self, state: dict[str, mx.array | None], probe: Probe) -> tuple[bool, float | None]:
        r0 = (probe.probe_output - probe.block_input).astype(mx.float32)
        previous = state["r0"]
        diff = None
        if previous is not None:
            diff = (mx.abs(r0 - previous).mean() / mx.abs(previous).mean()).item()
        computed = diff is None or diff > self.threshold
        if computed:  # compared with the last *computed* pass's r0, as diffusers does
            mx.eval(r0)
            state["r0"] = r0
        return computed, diff

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "threshold": self.threshold}


def nearest_interp(values: np.ndarray, length: int) -> np.ndarray:
    """diffusers' ``hooks.mag_cache.nearest_interp``: resample a per-step curve to ``length`` steps by
    nearest neighbour, computing the positions in float32 and rounding half to even as torch does."""
    if length == 1:
        return values[-1:]
    scale = np.float32((len(values) - 1) / (length - 1))
    return values[np.round(np.arange(length, dtype=np.float32) * scale).astype(np.int64)]


@dataclass(frozen=True)
class MagCache:
    """MagCache (diffusers ``MagCacheConfig``): decisions from a calibrated curve of the blocks' residual
    magnitude ratio between consecutive steps, never from the data.

    Per branch and step ``k`` of an expert's span of ``n`` steps, once ``k >= int(retention_ratio * n +
    0.5)``: ``acc_ratio *= ratio[k]``, ``acc_steps += 1``, ``acc_err += |1 - acc_ratio|``; the blocks are
    skipped iff a residual is kept, ``acc_err <= threshold`` and ``acc_steps <= max_skip_steps``, else
    they run and the three accumulators reset. A skipped pass adds the last computed residual of the
    whole block stack to its input. The accumulators are float32, as diffusers' tensors are.

    ``ratios`` is the calibrated curve over a whole schedule (one value per step, the first 1.0); it is
    resampled to this run's schedule with :func:`nearest_interp`, and each expert uses its own span of it
    with its own counters (diffusers: one ``MagCacheConfig`` per transformer, with that expert's part of
    the curve). ``experts`` limits caching to those experts (None: all). ``threshold < 0`` never skips;
    ``threshold = 0`` still can (``0 <= 0``).
    """

    ratios: tuple[float, ...]
    threshold: float = 0.06
    max_skip_steps: int = 3
    retention_ratio: float = 0.2
    experts: tuple[int, ...] | None = None
    calibration: str = "custom"  # where the ratios come from, for the metadata
    name: ClassVar[str] = "magcache"
    probe_blocks: ClassVar[int] = 0
    state_bytes: ClassVar[int] = 0

    def new_state(self, step: StepInfo) -> dict[str, Any]:
        first, end = step.expert_steps
        curve = nearest_interp(np.asarray(self.ratios, np.float32), step.schedule_length)[first:end]
        return {
            "active": self.experts is None or step.expert in self.experts,
            "ratios": curve,
            "retention": int(self.retention_ratio * (end - first) + 0.5),
            "step": 0,
            "ratio": np.float32(1.0),
            "err": np.float32(0.0),
            "skips": 0,
        }

    def decide(self, state: dict[str, Any], probe: Probe) -> tuple[bool, float | None]:
        if not state["active"]:
            return True, None
        k = state["step"]
        state["step"] += 1
        if k < state["retention"]:
            return True, None
        state["ratio"] = np.float32(state["ratio"] * state["ratios"][k])
        state["skips"] += 1
        state["err"] = np.float32(state["err"] + abs(np.float32(1.0) - state["ratio"]))
        err = state["err"]
        if probe.has_residual and err <= np.float32(self.threshold) and state["skips"] <= self.max_skip_steps:
            return False, float(err)
        state.update(ratio=np.float32(1.0), err=np.float32(0.0), skips=0)
        return True, float(err)

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "threshold": self.threshold,
            "max_skip_steps": self.max_skip_steps,
            "retention_ratio": self.retention_ratio,
            "experts": None if self.experts is None else list(self.experts),
            "calibration": self.calibration,
        }


@dataclass(frozen=True)
class TeaCache:
    """TeaCache as TeaCache4Wan2.1 (ali-vilab/TeaCache ``teacache_generate.py`` ``teacache_forward``)
    and LightX2V's Wan port define it.

    The indicator is the timestep embedding: ``e0`` (the 6-way modulation projection) with
    ``use_ret_steps``, else ``e`` (the time MLP's output), in float32. Per branch and step ``k`` of an
    expert's span of ``n`` steps: the first ``5`` steps with ``use_ret_steps`` (else ``1``) and the steps
    from ``n`` (else ``n - 1``) on run and reset the accumulator; otherwise ``acc += poly(mean|m -
    m_prev| / mean|m_prev|)`` with the calibrated polynomial (highest power first) and the blocks are
    skipped iff ``acc < threshold`` (else they run and ``acc = 0``); ``m_prev = m`` every step. Means are
    over every token's embedding, so with per-token timesteps (TI2V's clean first frame) the unchanged
    tokens count, as in LightX2V. A skipped pass adds the last computed residual of the whole block stack.
    """

    coefficients: tuple[float, ...]
    threshold: float
    use_ret_steps: bool
    calibration: str = "custom"
    name: ClassVar[str] = "teacache"
    probe_blocks: ClassVar[int] = 0
    state_bytes: ClassVar[int] = 0

    def new_state(self, step: StepInfo) -> dict[str, Any]:
        first, end = step.expert_steps
        n = end - first
        return {
            "step": 0,
            "retention": 5 if self.use_ret_steps else 1,
            "cutoff": n if self.use_ret_steps else n - 1,
            "acc": 0.0,
            "previous": None,
        }

    def decide(self, state: dict[str, Any], probe: Probe) -> tuple[bool, float | None]:
        k = state["step"]
        state["step"] += 1
        counts, embedding = self._indicator(probe)
        previous, state["previous"] = state["previous"], (counts, embedding)
        if k < state["retention"] or k >= state["cutoff"]:
            state["acc"] = 0.0
            return True, None
        if previous is None or not np.array_equal(previous[0], counts):
            raise ValueError("TeaCache: the timestep layout changed between steps")
        weights = counts.reshape(-1, *[1] * (embedding.ndim - 1))
        change = (weights * np.abs(embedding - previous[1])).sum() / (weights * np.abs(previous[1])).sum()
        state["acc"] += float(np.polyval(self.coefficients, change))
        if state["acc"] < self.threshold:
            return False, state["acc"]
        acc, state["acc"] = state["acc"], 0.0
        return True, acc

    def _indicator(self, probe: Probe) -> tuple[np.ndarray, np.ndarray]:
        """The distinct timesteps' embeddings (U, dim) or (U, 6, dim), float32, and how many tokens use
        each: the token-wise mean without building an embedding per token."""
        values, counts = np.unique(probe.timestep, return_counts=True)
        e, e0 = probe.model.condition_embedder.embed_time(mx.array(values), mx.float32)
        return counts.astype(np.float64), np.asarray(e0 if self.use_ret_steps else e, dtype=np.float64)

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "threshold": self.threshold,
            "use_ret_steps": self.use_ret_steps,
            "coefficients": list(self.coefficients),
            "calibration": self.calibration,
        }
