"""Every exchange between ranks goes through :class:`Comm`: evaluated eagerly, under a deadline, counted.

An exchange first evaluates its input (this rank's own work, which has no deadline), then arms the
watchdog and evaluates the collective. The wait that remains is the other ranks' lag plus the transfer,
so its deadline can be tight even when a step takes an hour: ``timeout`` seconds plus
:data:`LAG_FACTOR` times the time this rank itself worked since its previous exchange (a peer several
times slower than this one, or one still loading an expert, is not mistaken for a dead one).

Exchanges go over :class:`Subgroup` s of the ranks. MLX's ring and JACCL backends cannot ``split`` a
group, so a subgroup is one of: the whole group (``all_gather``); a real split group where the backend
has one (NCCL, MPI); a pair of ring neighbours (``send``/``recv``: the 4-rank CFG x sequence layout is
arranged so that every pair is one); or, failing those, an ``all_gather`` of the whole group from which
the members' pieces are kept (correct on any backend, with more traffic).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import mlx.core as mx

from ..errors import ParallelError
from .watchdog import Watchdog

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 300.0  # seconds a rank waits for the others beyond its own work (env MLX_I2V_PARALLEL_TIMEOUT)
LAG_FACTOR = 3.0  # a peer may take this many times as long as this rank for the same work


@dataclass(frozen=True)
class Subgroup:
    """Ranks that exchange one kind of data.

    Attributes:
        members: world ranks, in the order their pieces are concatenated.
        index: this rank's position in ``members``.
        gather: (n, ...) -> (len(members) * n, ...), every member's piece in ``members`` order.
        received: pieces of the input's size this rank receives per gather (len(members) - 1, or
            world size - 1 when the whole group is gathered to keep the members' pieces).
    """

    members: tuple[int, ...]
    index: int
    gather: Callable[[mx.array], mx.array]
    received: int

    @property
    def size(self) -> int:
        return len(self.members)


def solo(rank: int) -> Subgroup:
    """A subgroup of this rank alone: gathering is the identity."""
    return Subgroup((rank,), 0, lambda x: x, 0)


def can_split(world: mx.distributed.Group) -> bool:
    """Whether the backend splits groups (NCCL, MPI; not ring or JACCL). Every rank must call it at the
    same point: where it works, a split is a collective."""
    try:
        world.split(0, world.rank())
    except RuntimeError:  # "[ring] Group split not supported."
        return False
    return True


def partition(world: mx.distributed.Group, groups: Sequence[tuple[int, ...]], split: bool) -> Subgroup:
    """This rank's subgroup in a partition of the world into ``groups`` (each in gather order);
    ``split``: the backend can split groups (:func:`can_split`).

    A split group is made at the subgroup's first gather, so that it happens at the same point of the
    generation on every rank, after the ranks checked they run the same one.
    """
    rank, size = world.rank(), world.size()
    mine = next(g for g in groups if rank in g)
    index = mine.index(rank)
    if len(mine) == 1:
        return solo(rank)
    if mine == tuple(range(size)):
        return Subgroup(mine, index, lambda x: mx.distributed.all_gather(x, group=world), size - 1)
    if split:
        color, made = groups.index(mine), []

        def gather(x: mx.array) -> mx.array:
            if not made:
                made.append(world.split(color, index))
            return mx.distributed.all_gather(x, group=made[0])

        return Subgroup(mine, index, gather, len(mine) - 1)
    if all(len(g) == 2 and _neighbours(*g, size) for g in groups):
        partner = mine[1 - index]
        return Subgroup(mine, index, lambda x: _pair_exchange(world, x, partner, index), 1)
    members = mx.array(mine)

    def pick(x: mx.array) -> mx.array:
        every = mx.distributed.all_gather(x, group=world).reshape(size, *x.shape)
        return every[members].reshape(-1, *x.shape[1:])

    return Subgroup(mine, index, pick, size - 1)


def _neighbours(a: int, b: int, size: int) -> bool:
    """Whether ranks a and b are adjacent on the ring (the only pairs ring ``send``/``recv`` reach)."""
    return (a - b) % size in (1, size - 1)


def _pair_exchange(world: mx.distributed.Group, x: mx.array, partner: int, index: int) -> mx.array:
    """Swap x with ``partner``; (2n, ...) with the pieces in pair order. The first of the pair sends
    then receives, the second receives then sends: a blocking send on both sides at once would wait
    for a receive that never starts once the socket buffers are full."""
    if index == 0:
        mx.eval(mx.distributed.send(x, partner, group=world))
        other = mx.distributed.recv_like(x, partner, group=world)
        mx.eval(other)
        return mx.concatenate([x, other])
    other = mx.distributed.recv_like(x, partner, group=world)
    mx.eval(other)
    mx.eval(mx.distributed.send(x, partner, group=world))
    return mx.concatenate([other, x])


@dataclass
class Traffic:
    """What this rank exchanged: bytes received per kind of exchange, exchanges, seconds waited."""

    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    exchanges: int = 0
    wait_seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"bytes_received": dict(self.bytes), "total_bytes_received": sum(self.bytes.values()),
                "exchanges": self.exchanges, "wait_seconds": self.wait_seconds}  # fmt: skip


class Comm:
    """This rank's exchanges with the others, each under the watchdog's deadline.

    Args:
        world: the group of every rank.
        watchdog: kills this process with one line when a wait passes its deadline.
        timeout: seconds to wait beyond this rank's own work (see the module docstring).
    """

    def __init__(self, world: mx.distributed.Group, watchdog: Watchdog, timeout: float = DEFAULT_TIMEOUT):
        self.world = world
        self.rank = world.rank()
        self.size = world.size()
        self.can_split = self.size > 1 and can_split(world)
        self.watchdog = watchdog
        self.timeout = timeout
        self.where = "start-up"  # what the generation is doing, for messages
        self.traffic = Traffic()
        self._last = time.monotonic()

    def restart(self) -> None:
        """A new generation: count its traffic from zero, and its own work from now (not the idle time
        since the previous one)."""
        self.traffic = Traffic()
        self._last = time.monotonic()

    def gather(self, group: Subgroup, x: mx.array, kind: str) -> mx.array:
        """``group.gather(x)``, evaluated: x first (no deadline), then the exchange (under one)."""
        x = mx.contiguous(x)
        mx.eval(x)
        peers = [r for r in group.members if r != self.rank] if group.received < self.size - 1 else self.others()
        start = time.monotonic()
        seconds = self.timeout + LAG_FACTOR * (start - self._last)
        who = describe_ranks(peers)
        self.watchdog.arm(seconds, f"rank {self.rank}: no answer from {who} within {seconds:.0f} s during "
                                   f"{self.where} ({kind}); it stopped, hangs, or its host is unreachable")  # fmt: skip
        try:
            out = group.gather(x)
            mx.eval(out)
        except RuntimeError as e:  # the backend saw a peer's connection close
            log.debug("exchange failed: %s", e)
            raise ParallelError(f"rank {self.rank}: lost the connection to {who} during {self.where} ({kind}); "
                                "it exited (see its error) or its host is unreachable") from None  # fmt: skip
        finally:
            self.watchdog.disarm()
        self._last = time.monotonic()
        self.traffic.bytes[kind] += group.received * x.nbytes
        self.traffic.exchanges += 1
        self.traffic.wait_seconds += self._last - start
        return out

    def everyone(self) -> Subgroup:
        """Every rank, in rank order."""
        return partition(self.world, [tuple(range(self.size))], self.can_split)

    def others(self) -> list[int]:
        return [r for r in range(self.size) if r != self.rank]


def describe_ranks(ranks: Sequence[int]) -> str:
    """"rank 1" / "ranks 1, 2, 3"."""
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
