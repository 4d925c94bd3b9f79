"""How the ranks of a generation share its work: guidance ranks times sequence ranks.

Guidance-parallel (``cfg``) gives the two branches of classifier-free guidance (the prompt and the
negative prompt) to two halves of the ranks; sequence-parallel gives each rank of a half one contiguous
shard of the video tokens. With ``N`` ranks:

* ``auto``: with guidance, CFG-2 x sequence-N/2 when N is even (2 ranks: CFG alone), else sequence-N
  with both branches batched on every rank; without guidance, sequence-N.
* ``cfg``: 2 ranks, one branch each; without guidance it falls through to sequence-2.
* ``sequence``: sequence-N, both branches batched on every rank.

Ranks are placed so that on a ring of 4 every exchange is between neighbours (distributed.md §5): the
first half holds the conditional branch, shards 0..K-1 on ranks 0..K-1; the second half the
unconditional one, shards 0..K-1 on ranks N-1..K. So ranks r and N-1-r hold the same shard of the two
branches (the CFG pairs 0-3 and 1-2 of a 4-ring), and shard pairs 0-1 and 3-2 are neighbours too.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidInputError

MODES = ("auto", "cfg", "sequence", "none")


@dataclass(frozen=True)
class Layout:
    """``guidance`` ranks (1, or 2 when the CFG branches are split) times ``sequence`` ranks."""

    guidance: int
    sequence: int

    @property
    def ranks(self) -> int:
        return self.guidance * self.sequence

    @property
    def name(self) -> str:
        """"cfg", "sequence", "cfg+sequence" or "none"."""
        parts = [n for n, k in (("cfg", self.guidance), ("sequence", self.sequence)) if k > 1]
        return "+".join(parts) or "none"

    def rank_of(self, branch: int, shard: int) -> int:
        """The world rank that computes shard ``shard`` of guidance branch ``branch``."""
        return shard if branch == 0 else self.ranks - 1 - shard

    def place(self, rank: int) -> tuple[int, int]:
        """(branch, shard) of a world rank: the inverse of :meth:`rank_of`."""
        branch = rank // self.sequence
        return branch, rank if branch == 0 else self.ranks - 1 - rank

    def guidance_groups(self) -> list[tuple[int, ...]]:
        """The ranks that exchange predictions: one group per shard, in branch order."""
        return [tuple(self.rank_of(b, s) for b in range(self.guidance)) for s in range(self.sequence)]

    def sequence_groups(self) -> list[tuple[int, ...]]:
        """The ranks that share one branch's tokens: one group per branch, in shard order."""
        return [tuple(self.rank_of(b, s) for s in range(self.sequence)) for b in range(self.guidance)]


def check_mode(mode: str, ranks: int | None = None) -> None:
    """Raise InvalidInputError for an unknown mode, or ``cfg`` with a number of ranks other than 2."""
    if mode not in MODES:
        raise InvalidInputError(f"parallel must be one of {', '.join(MODES)}; got {mode!r}")
    if mode == "cfg" and ranks not in (None, 2):
        raise InvalidInputError(f"--parallel cfg splits the two guidance branches over 2 ranks, not {ranks}; "
                                "use auto (CFG x sequence) or sequence")  # fmt: skip


def choose_layout(mode: str, ranks: int, guided: bool) -> Layout:
    """The layout for ``ranks`` processes; ``guided``: some step runs classifier-free guidance."""
    check_mode(mode, ranks)
    if mode == "none" or ranks == 1:
        return Layout(1, 1)
    if guided and mode in ("auto", "cfg") and ranks % 2 == 0:
        return Layout(2, ranks // 2)
    return Layout(1, ranks)
