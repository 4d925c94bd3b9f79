"""Before any work, the ranks check that they run the same generation and agree on its seed.

Every rank sends one row: an 8-byte digest per named field (library versions, model, settings, prompts,
photo, parallel mode, ...) and the seed it would use. A rank whose row differs from rank 0's is named
with the fields that differ, on every rank, so all of them stop with the same line instead of computing
different things and waiting on each other forever. The seed of rank 0 is the one every rank uses: when
the seed is random, each rank draws one and rank 0's wins.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import mlx.core as mx
import numpy as np

from ..errors import ParallelError
from .comm import Comm

MAX_FIELDS = 31  # fixed row length, so that even ranks running different versions can compare rows


def digest(value: Any) -> int:
    """A stable 63-bit digest of bytes, a string, or anything JSON can write (sorted keys)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    else:
        data = json.dumps(value, sort_keys=True, default=str, ensure_ascii=False).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def agree(comm: Comm, fields: Mapping[str, Any], seed: int) -> int:
    """Compare ``fields`` across ranks and return rank 0's ``seed``.

    Raises:
        ParallelError: some rank's fields differ from rank 0's (the message names the rank and fields).
    """
    names = sorted(fields)
    if len(names) > MAX_FIELDS:
        raise ValueError(f"at most {MAX_FIELDS} fields, got {len(names)}")
    row = np.zeros(MAX_FIELDS + 2, np.int64)
    row[0] = digest(names)
    row[1 : 1 + len(names)] = [digest(fields[n]) for n in names]
    row[-1] = seed
    comm.where = "the start-up check"
    rows = comm.gather(comm.everyone(), mx.array(row.view(np.uint8)), "start-up")
    rows = np.array(rows).view(np.int64).reshape(comm.size, -1)
    for rank in range(1, comm.size):
        if rows[rank, 0] != rows[0, 0]:
            differ = "the set of settings it checks (another mlx-i2v version?)"
        else:
            differ = ", ".join(n for i, n in enumerate(names, 1) if rows[rank, i] != rows[0, i])
        if differ:
            raise ParallelError(f"rank {comm.rank}: the ranks were not started the same way: rank {rank} differs "
                                f"from rank 0 in {differ}")  # fmt: skip
    return int(rows[0, -1])
