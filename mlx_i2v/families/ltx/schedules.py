"""The sigma and timestep grids of diffusers' LTX-Video pipelines (``pipelines/ltx/pipeline_ltx*.py``), for
:class:`~mlx_i2v.schedulers.FlowMatchEulerDiscreteScheduler`.

* ``LTXPipeline`` / ``LTXImageToVideoPipeline``: sigmas :func:`default_sigmas` plus
  ``mu = calculate_shift(latent tokens, scheduler.base_image_seq_len, scheduler.max_image_seq_len,
  scheduler.base_shift, scheduler.max_shift)``, which only the dynamically shifted 0.9.0/0.9.1 schedulers
  use. Because they always pass sigmas, explicit ``timesteps`` make diffusers raise there.
* ``LTXConditionPipeline``: ``timesteps`` only, the caller's (e.g. 0.9.7-distilled's
  ``[1000, 993, 987, 981, 975, 909, 725, 0.03]``) or ``linear_quadratic_schedule(N) * 1000``; the
  scheduler derives the sigmas from them (``t / 1000``, shifted).

All grids are numpy; :func:`retrieve_timesteps` hands them to the scheduler as diffusers' does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import InvalidInputError
from ...schedulers import FlowMatchEulerDiscreteScheduler, _check_count, _check_number


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """The dynamic shift ``mu`` for ``image_seq_len`` latent tokens: linear from ``base_shift`` at
    ``base_seq_len`` tokens to ``max_shift`` at ``max_seq_len`` (diffusers' ``calculate_shift``, in its
    order of operations so the float is the same)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def default_sigmas(num_inference_steps: int) -> np.ndarray:
    """The sigmas ``LTXPipeline`` / ``LTXImageToVideoPipeline`` pass: ``linspace(1, 1/N, N)``, float64."""
    n = _check_count("num_inference_steps", num_inference_steps)
    return np.linspace(1.0, 1 / n, n)


def linear_quadratic_schedule(
    num_steps: int, threshold_noise: float = 0.025, linear_steps: int | None = None
) -> np.ndarray:
    """``LTXConditionPipeline``'s default sigmas (from LTX-Video ``ltx_video/schedulers/rf.py``), float32
    ``(num_steps,)``: ``1 - s`` where ``s`` rises linearly to ``threshold_noise`` over ``linear_steps``
    (default half) steps, then quadratically towards 1. The pipeline passes ``sigmas * 1000`` as timesteps.
    """
    num_steps = _check_count("num_steps", num_steps)
    threshold_noise = _check_number("threshold_noise", threshold_noise)
    if linear_steps is None:
        linear_steps = num_steps // 2
    if num_steps < 2:
        return np.array([1.0], dtype=np.float32)
    if isinstance(linear_steps, bool) or not isinstance(linear_steps, (int, np.integer)):
        raise InvalidInputError(f"linear_steps must be an integer, got {linear_steps!r}")
    if not 0 < linear_steps < num_steps:
        raise InvalidInputError(f"linear_steps must lie in [1, {num_steps - 1}], got {linear_steps}")
    # Python floats in the reference's order, then float32 as torch.tensor makes them.
    linear = [i * threshold_noise / linear_steps for i in range(linear_steps)]
    step_diff = linear_steps - threshold_noise * num_steps
    quadratic_steps = num_steps - linear_steps
    quadratic_coef = step_diff / (linear_steps * quadratic_steps**2)
    linear_coef = threshold_noise / linear_steps - 2 * step_diff / (quadratic_steps**2)
    const = quadratic_coef * (linear_steps**2)
    quadratic = [quadratic_coef * (i**2) + linear_coef * i + const for i in range(linear_steps, num_steps)]
    return np.array([1.0 - x for x in linear + quadratic], dtype=np.float32)


def retrieve_timesteps(
    scheduler: FlowMatchEulerDiscreteScheduler,
    num_inference_steps: int | None = None,
    *,
    timesteps: Any = None,
    sigmas: Any = None,
    mu: float | None = None,
) -> tuple[np.ndarray, int]:
    """Set ``scheduler``'s schedule from explicit ``timesteps``, explicit ``sigmas`` or a step count, and
    return ``(scheduler.timesteps, number of steps)`` (diffusers' ``retrieve_timesteps``; ``mu`` is passed
    in every case, a scheduler without dynamic shifting ignores it).

    Raises:
        InvalidInputError: both ``timesteps`` and ``sigmas`` (as diffusers), or a bad grid.
    """
    if timesteps is not None and sigmas is not None:
        raise InvalidInputError("only one of timesteps or sigmas can be given")
    if timesteps is not None:
        scheduler.set_timesteps(timesteps=timesteps, mu=mu)
    elif sigmas is not None:
        scheduler.set_timesteps(sigmas=sigmas, mu=mu)
    else:
        scheduler.set_timesteps(num_inference_steps, mu=mu)
    assert scheduler.timesteps is not None
    return scheduler.timesteps, len(scheduler.timesteps)
