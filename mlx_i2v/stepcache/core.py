"""The residual step cache: a :class:`~mlx_i2v.denoise.Forward` that lets a pass skip its transformer blocks.

A pass runs ``embed`` -> blocks -> ``head`` (the transformer's seams, :class:`~mlx_i2v.seams.SeamedTransformer`).
A *method* (:mod:`mlx_i2v.stepcache.methods`) may ask for its first ``probe_blocks`` blocks to run always
and then decides, per prompt branch, whether the remaining blocks run. When they do, the cache keeps what
they added (``out - probe_out``, the residual); when they do not, it adds the last residual kept to this
step's probe output instead. The embedding and the head always run.

State is per prompt branch ("cond" / "uncond"), as diffusers keeps one cache context per branch on Wan:
the branches decide independently, and in a batch where some skip and some compute, only the computing
rows run the remaining blocks. A family whose diffusers pipelines run both branches in one call under one
cache context (LTX-Video's "cond_uncond") says so (``decide_branches_together`` on its forward): there the
batch decides as one, on all its rows. A family's forward may also bind what the transformer's seams need
besides the latents (LTX-Video's positions: ``seamed(model)``); otherwise the model opens them itself.

State is also per expert: at Wan2.2-A14B's switch every state is dropped, because a residual of one expert
is not a residual of the other (diffusers' hooks live on each transformer separately, to the same effect).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import mlx.core as mx
import numpy as np

from ..denoise import Forward, StepInfo, plain_forward
from ..seams import PassTokens, Rows, SeamedTransformer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Probe:
    """What a method may look at to decide one branch's pass.

    Attributes:
        step: where the loop is.
        branch: the prompt branch ("cond" or "uncond"), or the branches deciding together ("cond+uncond").
        model: the transformer running this step.
        timestep: (1,) or (L,) the branch's timestep(s), as the transformer receives them; (G, 1) or (G, L)
            for G branches deciding together.
        block_input: (G, L, dim) the branch's (G = 1) or branches' tokens entering the blocks.
        probe_output: (G, L, dim) the same after the method's probe blocks (``block_input`` if none).
        has_residual: whether a residual is kept for this branch (skipping needs one).
    """

    step: StepInfo
    branch: str
    model: SeamedTransformer
    timestep: np.ndarray
    block_input: mx.array
    probe_output: mx.array
    has_residual: bool


class CacheMethod(Protocol):
    """A decision rule on the residual cache (the same shape as the conditioning strategies)."""

    name: str
    probe_blocks: int  # leading blocks every pass runs; the decision may look at their output
    state_bytes: int  # bytes per hidden-state element a branch's decision state keeps

    def new_state(self, step: StepInfo) -> Any:
        """A branch's fresh decision state, at the first step of an expert's span."""
        ...

    def decide(self, state: Any, probe: Probe) -> tuple[bool, float | None]:
        """Whether the branch runs its remaining blocks this step, and the indicator the rule compared
        with its threshold (None where it compared none). Updates ``state``."""
        ...

    def describe(self) -> dict[str, Any]:
        """The settings, JSON-serialisable, for the video's metadata."""
        ...


class Decision(NamedTuple):
    """One branch's pass at one step: whether its blocks ran, and the method's indicator."""

    step: int  # schedule index
    branch: str
    computed: bool
    indicator: float | None = None


@dataclass
class _Branch:
    state: Any
    residual: mx.array | None = None  # (1, L, dim): blocks' output minus the probe output, last computed pass


@dataclass
class StepCache:
    """A transformer pass with a residual step cache; without a ``method`` every pass runs whole (the
    plain transformer), and passes are still counted.

    Create one per generation: its state starts empty.
    """

    method: CacheMethod | None = None
    plain: Forward = plain_forward  # the family's pass, run whole when there is no method
    decisions: list[Decision] = field(default_factory=list)
    _branches: dict[str, _Branch] = field(default_factory=dict, repr=False)
    _expert: int | None = field(default=None, repr=False)

    def __call__(
        self, model: Any, x: mx.array, timestep: mx.array, context: list, branches: tuple[str, ...], step: StepInfo
    ) -> mx.array:
        """x (B, T, h, w, C_in), one row per branch; timestep (B,) or (B, L); context the rows'
        cross-attention K/V -> velocity (B, T, h, w, C_out). With a ``method`` the model must open the
        seams of a pass (:class:`~mlx_i2v.seams.SeamedTransformer`); without one, any family's runs."""
        if self.method is None:
            self.decisions += [Decision(step.index, b, True) for b in branches]
            return self.plain(model, x, timestep, context, branches, step)
        if step.expert != self._expert:
            self._branches.clear()
            self._expert = step.expert

        seamed = _seams(self.plain, model)
        tokens = seamed.embed(x, timestep)
        k = self.method.probe_blocks
        probed = seamed.run_blocks(tokens.x, tokens, context, blocks=slice(0, k))
        times = np.asarray(timestep.astype(mx.float32)).reshape(len(branches), -1)
        together = getattr(self.plain, "decide_branches_together", False)
        groups = [slice(0, len(branches))] if together else [slice(row, row + 1) for row in range(len(branches))]
        compute = [False] * len(branches)
        for rows in groups:
            name = "+".join(branches[rows])
            computed = self._decide(seamed, tokens.x[rows], probed[rows], times[rows], name, step)
            compute[rows] = [computed] * (rows.stop - rows.start)
        ran = _remaining_blocks(seamed, probed, tokens, context, compute, k)
        out = []
        for rows in groups:
            cached = self._branches["+".join(branches[rows])]
            if compute[rows.start]:
                computed_rows = mx.concatenate(ran[rows], axis=0)
                cached.residual = computed_rows - probed[rows]
                out.append(computed_rows)
            else:
                out.append(probed[rows] + cached.residual)
        mx.eval([b.residual for b in self._branches.values()])  # keep the residuals, not the graphs behind them
        return seamed.head(mx.concatenate(out, axis=0), tokens)

    def _decide(
        self, model: SeamedTransformer, block_input: mx.array, probed: mx.array, times: np.ndarray, branch: str,
        step: StepInfo,
    ) -> bool:  # fmt: skip
        cached = self._branches.get(branch)
        if cached is None:
            cached = self._branches[branch] = _Branch(self.method.new_state(step))
        kept = cached.residual is not None
        timestep = times[0] if len(times) == 1 else times
        probe = Probe(step, branch, model, timestep, block_input, probed, kept)
        computed, indicator = self.method.decide(cached.state, probe)
        if not computed and not kept:
            raise RuntimeError(f"{self.method.name}: skipped the {branch} pass with no residual kept")
        self.decisions.append(Decision(step.index, branch, computed, indicator))
        log.debug("step %d %s: %s (indicator %s)", step.index, branch, "computed" if computed else "skipped", indicator)
        return computed

    def passes(self) -> dict[str, Any]:
        """Transformer passes computed and skipped, in total and per branch; ``probe_blocks`` is the
        number of blocks a skipped pass still ran."""
        by_branch: dict[str, dict[str, int]] = {}
        for d in self.decisions:
            counts = by_branch.setdefault(d.branch, {"computed": 0, "skipped": 0})
            counts["computed" if d.computed else "skipped"] += 1
        return {
            "computed": sum(c["computed"] for c in by_branch.values()),
            "skipped": sum(c["skipped"] for c in by_branch.values()),
            "probe_blocks": self.method.probe_blocks if self.method is not None else 0,
            "by_branch": by_branch,
        }


def _seams(forward: Forward, model: Any) -> SeamedTransformer:
    """The seams of a pass: the family forward's view of the model where it binds more than the latents
    (LTX-Video's positions), else the model itself (Wan)."""
    seamed = getattr(forward, "seamed", None)
    return model if seamed is None else seamed(model)


def kept_bytes(method: CacheMethod | None, dtype: mx.Dtype) -> int:
    """Bytes a step cache with ``method`` keeps across steps per hidden-state element and branch: the
    residual in the compute ``dtype`` and the method's own state (for memory planning)."""
    return 0 if method is None else dtype.size + method.state_bytes


def _remaining_blocks(
    model: SeamedTransformer, probed: mx.array, tokens: PassTokens, context: list, compute: list[bool], first: int
) -> list[mx.array | None]:
    """Blocks ``first``.. on the rows that compute, each (1, L, dim) (None for a row that skips). When all
    compute they run as the whole batch, which is the plain pass's arithmetic exactly."""
    rows = [i for i, c in enumerate(compute) if c]
    if not rows:
        return [None] * len(compute)
    if len(rows) == len(compute):
        out = model.run_blocks(probed, tokens, context, blocks=slice(first, None))
    else:
        picked = mx.array(rows)
        out = model.run_blocks(probed[picked], _rows(tokens, picked), _rows(context, picked), slice(first, None))
    ran: list[mx.array | None] = [None] * len(compute)
    for j, row in enumerate(rows):
        ran[row] = out[j : j + 1]
    return ran


def _rows(value: Any, picked: mx.array) -> Any:
    """The rows ``picked`` of a pass's per-row inputs: its tokens or its cross-attention context."""
    if isinstance(value, Rows):
        return value.take_rows(picked)
    if isinstance(value, list):
        return [_rows(v, picked) for v in value]
    return value[picked]  # a context array (B, L_ctx, dim)
