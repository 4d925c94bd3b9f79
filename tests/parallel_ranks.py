"""Start several local ranks of one command over MLX's ring backend, as ``mlx.launch -n N`` does.

Each rank is a subprocess with ``MLX_RANK`` and ``MLX_HOSTFILE`` (a hostfile of free 127.0.0.1 ports);
each one's exit code and output are returned separately (``mlx.launch`` exits 0 even when a rank fails).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class RankResult:
    rank: int
    returncode: int
    stdout: str
    stderr: str


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_ranks(n: int, argv: list[str], workdir: Path, env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """Start ``argv`` as ranks 0..n-1 (not waited for)."""
    hostfile = workdir / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(n)]))
    procs = []
    for rank in range(n):
        rank_env = {**os.environ, **(env or {}), "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)}
        procs.append(subprocess.Popen(argv, cwd=workdir, env=rank_env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def wait_ranks(procs: list[subprocess.Popen], timeout: float) -> list[RankResult]:
    """Wait for every rank (killing all of them at ``timeout``) and collect what each printed."""
    results = []
    for rank, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            out, err = proc.communicate()
        results.append(RankResult(rank, proc.returncode, out, err))
    return results


def run_ranks(n: int, argv: list[str], workdir: Path, env: dict[str, str] | None = None,
              timeout: float = 240) -> list[RankResult]:
    return wait_ranks(start_ranks(n, argv, workdir, env), timeout)


def python(*args: str) -> list[str]:
    return [sys.executable, *args]
