"""The memory budget: how many bytes of MLX allocations a generation may reach at its peak.

Order of precedence: :func:`set_memory_limit` (the CLI's ``--memory-limit GB``), then the
``MLX_I2V_MEMORY_LIMIT`` environment variable (GB), then the device:

- Metal: ``mx.device_info()["max_recommended_working_set_size"]``, the most the GPU may keep wired
  (about 65-85 % of RAM; beyond it macOS pages or kills the process).
- CPU (and any other backend): the machine's available RAM (``MemAvailable`` on Linux, which already
  leaves out what other processes keep resident) plus what MLX itself already holds, since the budget
  covers this process's whole peak. Without ``/proc/meminfo`` (macOS without Metal) three quarters of
  physical RAM, because the OS gives no portable "available" figure.

GB here means 10**9 bytes, the unit ``stats["peak_memory_gb"]`` reports.
"""

from __future__ import annotations

import os

import mlx.core as mx

from .errors import InvalidInputError
from .models.elementwise import on_cpu

ENV_VAR = "MLX_I2V_MEMORY_LIMIT"
GB = 10**9
# Share of physical RAM assumed usable when the OS cannot say how much is available.
FALLBACK_RAM_FRACTION = 0.75

_limit_override: int | None = None


def set_memory_limit(gb: float | None) -> None:
    """Override the budget with ``gb`` gigabytes (10**9 bytes); None returns to the environment/device.

    Raises:
        InvalidInputError: ``gb`` is not a positive finite number.
    """
    global _limit_override
    _limit_override = None if gb is None else _to_bytes(gb, "memory limit")


def memory_budget() -> int:
    """The budget in bytes: the override, else ``$MLX_I2V_MEMORY_LIMIT`` (GB), else the device's."""
    if _limit_override is not None:
        return _limit_override
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        try:
            value = float(env)
        except ValueError:
            raise InvalidInputError(f"{ENV_VAR}={env!r} is not a number of GB") from None
        return _to_bytes(value, ENV_VAR)
    return device_memory()


def device_memory() -> int:
    """What the device can give this process, in bytes (see the module docstring)."""
    if mx.metal.is_available():
        return int(mx.device_info()["max_recommended_working_set_size"])
    held = mx.get_active_memory() + mx.get_cache_memory()
    available = _linux_available_ram()
    if available is None:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return int(total * FALLBACK_RAM_FRACTION)
    return available + held


def evaluate_on_cpu(*arrays: mx.array) -> None:
    """Evaluate ``arrays`` now when MLX computes on the CPU; elsewhere leave them lazy.

    MLX allocates the output of every queued operation when it queues it, before the first one finishes,
    so one evaluation of a long chain holds every intermediate of the chain at once. An evaluation point
    bounds that, in about the same time on the CPU: a TI2V-5B block (2 x 1056 tokens) peaked at 21.3
    hidden-state copies as one chain, 14.1 with its evaluation points (benchmarks/README.md, "The
    denoise block's peak on the CPU"). On a GPU an evaluation also stops the host from encoding ahead of
    the device, which could not be measured here, so the graph there stays as it was.
    """
    if on_cpu():
        mx.eval(*arrays)


def _linux_available_ram() -> int | None:
    """``MemAvailable`` from /proc/meminfo in bytes, or None where there is no such file."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        return None
    return None


def _to_bytes(gb: float, what: str) -> int:
    try:
        value = float(gb)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{what} must be a number of GB, got {gb!r}") from None
    if not (value > 0 and value != float("inf")):
        raise InvalidInputError(f"{what} must be a positive number of GB, got {gb!r}")
    return int(value * GB)
