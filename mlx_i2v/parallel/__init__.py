"""Several processes, one clip: guidance- and sequence-parallel generation over ``mx.distributed``.

Started with ``mlx.launch`` (or ``mpirun``), every process runs the same generation; :func:`join` finds
the group MLX's launcher set up and :class:`Parallel` gives the denoising loop its two strategies:

* the guidance (:class:`~mlx_i2v.parallel.guidance.SplitGuidance`): with CFG split over a pair of
  ranks, each computes one branch and the pair swaps predictions once per step;
* the forward (:class:`~mlx_i2v.parallel.sequence.SequenceParallel`): each rank of a sequence group
  runs the transformer on one shard of the tokens and gathers keys and values in self-attention.

Both keep the arithmetic of one process, so the ranks' clip equals the single-process clip (to float
rounding). Rank 0 decodes the video. Before any work the ranks compare what they were asked to do
(:mod:`~mlx_i2v.parallel.handshake`), and every wait for another rank has a deadline
(:mod:`~mlx_i2v.parallel.comm`, :mod:`~mlx_i2v.parallel.watchdog`). In a group of one, every method is
a no-op and the loop runs exactly as without this package.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import mlx.core as mx

from ..denoise import BatchedGuidance, Forward, Guidance, plain_forward
from ..errors import InvalidInputError, ParallelError
from ..seams import PatchedConfig
from .comm import DEFAULT_TIMEOUT, Comm, Subgroup, Traffic, partition
from .guidance import SplitGuidance
from .handshake import agree
from .layout import MODES, Layout, check_mode, choose_layout
from .sequence import SequenceParallel
from .traffic import step_bytes
from .watchdog import Watchdog

__all__ = ["MODES", "Layout", "Parallel", "join", "choose_layout"]

log = logging.getLogger(__name__)

TIMEOUT_ENV = "MLX_I2V_PARALLEL_TIMEOUT"
# Set by mlx.launch (ring, JACCL, NCCL) or by the MPI launchers: without one of them this process is alone
# and the distributed backends are not even initialised.
LAUNCHER_ENV = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


@dataclass
class Parallel:
    """This process's share of a generation. The default is a process on its own."""

    mode: str = "none"
    comm: Comm | None = None
    _subgroups: dict = field(default_factory=dict, repr=False)

    @property
    def rank(self) -> int:
        return 0 if self.comm is None else self.comm.rank

    @property
    def size(self) -> int:
        return 1 if self.comm is None else self.comm.size

    def layout(self, scales: Sequence[float]) -> Layout:
        """How the ranks share a generation with these per-expert guidance scales."""
        return choose_layout(self.mode, self.size, _guided(scales))

    def agree(self, fields: Mapping[str, Any], seed: int) -> int:
        """Check that every rank was asked for the same generation (``fields``: name -> value) and
        return the seed they all use (rank 0's). Starts a new count of the traffic.

        Raises:
            ParallelError: a rank differs (named, with the differing fields), or left.
        """
        if self.comm is None:
            return seed
        from .. import __version__

        self.comm.restart()
        versions = {"mlx-i2v": __version__, "mlx": mx.__version__}
        return agree(self.comm, {**fields, **versions, "parallel": self.mode}, seed)

    def strategies(self, scales: Sequence[float], forward: Forward = plain_forward) -> tuple[Guidance, Forward]:
        """The guidance and forward strategies of this rank for a generation with these scales;
        ``forward`` is the pass to run (on a token shard, when the layout shards tokens)."""
        if self.comm is None:
            return BatchedGuidance(), forward
        layout = self.layout(scales)
        branch, _ = layout.place(self.rank)
        sequence = self._subgroup(layout.sequence_groups())
        guidance: Guidance = BatchedGuidance()
        if layout.guidance > 1:
            guidance = SplitGuidance(branch, self._subgroup(layout.guidance_groups()), self.comm)
        return guidance, SequenceParallel(sequence, self.comm, forward)

    def decodes(self) -> bool:
        """Whether this rank decodes and returns the frames (rank 0 only)."""
        return self.rank == 0

    def describe(self, scales: Sequence[float]) -> dict[str, Any]:
        """For a video's metadata: the ranks and how they shared the work."""
        layout = self.layout(scales)
        return {"ranks": self.size, "mode": layout.name, "guidance_ranks": layout.guidance,
                "sequence_ranks": layout.sequence}  # fmt: skip

    def stats(self, scales: Sequence[float]) -> dict[str, Any]:
        """For a video's stats: :meth:`describe`, this rank, and its traffic since :meth:`agree`."""
        traffic = self.comm.traffic.as_dict() if self.comm is not None else Traffic().as_dict()
        return {**self.describe(scales), "rank": self.rank, **traffic}

    def summary(
        self, scales: Sequence[float], config: PatchedConfig, latent: tuple[int, int, int], dtype: mx.Dtype
    ) -> str:
        """One line for a plan: the layout, and what each rank receives per step (see
        :mod:`~mlx_i2v.parallel.traffic`) for a transformer ``config`` on a (T, h, w) ``latent`` grid."""
        layout = self.layout(scales)
        per_step = sum(step_bytes(config, latent, layout, _guided(scales), dtype).values())
        branches = "one guidance branch" if layout.guidance > 1 else "every guidance branch"
        tokens = f"1/{layout.sequence} of the tokens" if layout.sequence > 1 else "all the tokens"
        return (f"parallel: {self.size} ranks, {layout.name}; each rank computes {branches} on {tokens}, holds "
                f"the whole model, receives {per_step / 1e6:.3g} MB per step and needs this plan (rank 0 "
                "also decodes)")

    def _subgroup(self, groups: list[tuple[int, ...]]) -> Subgroup:
        key = tuple(groups)
        if key not in self._subgroups:
            self._subgroups[key] = partition(self.comm.world, groups, self.comm.can_split)
        return self._subgroups[key]


def join(mode: str = "auto", timeout: float | None = None) -> Parallel:
    """Join the group of processes ``mlx.launch`` (or ``mpirun``) started, if any.

    Args:
        mode: "auto", "cfg", "sequence" (see :mod:`~mlx_i2v.parallel.layout`) or "none" (generate alone
            even when launched with others).
        timeout: seconds any rank waits for the others beyond its own work, connecting included
            (default: env ``MLX_I2V_PARALLEL_TIMEOUT``, else 300).

    Returns:
        This process's :class:`Parallel`; a process on its own when not launched as one of several.

    Raises:
        InvalidInputError: an unknown mode, or "cfg" with other than 2 ranks.
        ParallelError: the group could not be formed.
    """
    check_mode(mode)
    if timeout is None:
        timeout = _env_timeout()
    if timeout <= 0:
        raise InvalidInputError(f"the parallel timeout must be > 0 seconds, got {timeout}")
    if mode == "none" or not any(v in os.environ for v in LAUNCHER_ENV):
        return Parallel()
    comm = _connect(timeout)
    comm.timeout = timeout
    check_mode(mode, comm.size)
    return Parallel(mode, comm) if comm.size > 1 else Parallel()


_COMM: Comm | None = None  # MLX initialises its distributed backend once per process


def _connect(timeout: float) -> Comm:
    global _COMM
    if _COMM is None:
        rank = next((os.environ[v] for v in LAUNCHER_ENV if v in os.environ), "?")
        watchdog = Watchdog()
        watchdog.arm(timeout, f"rank {rank}: the other ranks did not connect within {timeout:.0f} s; check that "
                              "every host runs the same command and that the hosts can reach each other")  # fmt: skip
        try:
            _COMM = Comm(mx.distributed.init(), watchdog, timeout)  # (its split probe is a collective too)
        except RuntimeError as e:
            raise ParallelError(f"rank {rank}: cannot join the other ranks: {str(e).strip().splitlines()[0]}") from None
        finally:
            watchdog.disarm()
        log.info("rank %d of %d", _COMM.rank, _COMM.size)
    return _COMM


def joined_rank() -> int | None:
    """This process's rank if it joined a group of several, else None."""
    return _COMM.rank if _COMM is not None and _COMM.size > 1 else None


def _env_timeout() -> float:
    value = os.environ.get(TIMEOUT_ENV)
    if value is None:
        return DEFAULT_TIMEOUT
    try:
        return float(value)
    except ValueError:
        raise InvalidInputError(f"{TIMEOUT_ENV} must be a number of seconds, got {value!r}") from None


def _guided(scales: Sequence[float]) -> bool:
    """Whether some expert's steps run classifier-free guidance (two branches)."""
    return any(len(BatchedGuidance().branches(s)) > 1 for s in scales)
