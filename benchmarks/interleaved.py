"""Timing variants of one computation against each other on a noisy machine: each runs ``repeats`` times,
interleaved with the others, so that other load spreads over all of them; the minimum and the median are
reported (``attention_chunks.py``, ``feed_forward_chunks.py``)."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np


def time_interleaved(
    runs: dict[str, Callable[[], float]], repeats: int
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds of every call of each run, and what each run's last call returned (its peak memory in GB,
    0.0 where not measured)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    peaks: dict[str, float] = {}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            peaks[name] = run()
            times[name].append(time.perf_counter() - start)
    return times, peaks


def report(times: dict[str, list[float]], peaks: dict[str, float]) -> None:
    """One line per run: minimum and median seconds, and the peak where one was measured."""
    for name, ts in times.items():
        peak = f"peak {peaks[name]:.2f} GB" if name.startswith("mlx") else ""
        print(f"{name:>14}: min {min(ts):.3f} s, median {float(np.median(ts)):.3f} s {peak}")
