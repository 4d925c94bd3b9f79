"""The stochastic few-step sampler of the DMD-distilled Wan2.2-TI2V-5B checkpoints (no diffusers pipeline).

FastWan2.2-TI2V-5B (FastVideo ``DmdDenoisingStage.forward`` in ``fastvideo/pipelines/stages/denoising.py``,
with ``pred_noise_to_pred_video`` from ``fastvideo/models/utils.py``) and Wan2.2-TI2V-5B-Turbo (quanhaol,
``Wan22FewstepInferencePipeline`` in ``pipeline/wan22_fewstep_inference.py``) sample alike. At each listed
timestep ``t`` (given to the model as it is) the velocity ``v`` gives the data estimate
``x0 = x - sigma(t) * v``; before every step but the last, ``x0`` is noised afresh to the next timestep,
``sigma(t') * noise + (1 - sigma(t')) * x0`` with new Gaussian noise. The last step returns ``x0``.

``sigma(t)`` is looked up, not computed: it is the sigma of the entry whose timestep is nearest to ``t`` in
a dense shifted table of ``N = 1000`` entries, so ``sigma(t)`` is ``t / N`` to within half a table step
(the ``[1000, 750, 500, 250]`` list is not warped to the Lightning grid). Both codes build that table with
shift 8, whatever the checkpoint's ``flow_shift`` (5 for both): FastVideo's DMD stage hard-codes
``FlowMatchEulerDiscreteScheduler(shift=8.0)`` and the Turbo wrapper's ``timestep_shift`` defaults to 8.0.
They differ, by a float32 rounding here and there, in the unshifted grid:

* ``"fastvideo"``: diffusers' ``FlowMatchEulerDiscreteScheduler.__init__`` table, ``(N, ..., 1) / N``;
* ``"self_forcing"``: Self-Forcing's ``FlowMatchScheduler(sigma_min=0, extra_one_step=True)``,
  ``torch.linspace(1, 0, N + 1)[:-1]`` in float32.

The sampler has the ``set_timesteps`` / ``step`` shape of :mod:`mlx_i2v.schedulers`, so a pipeline can
use it in place of the Euler or UniPC sampler; arrays are channels-last, of any shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from .errors import InvalidInputError
from .schedulers import _F32, FlowSchedule, _check_count, _check_schedule, _check_shift, training_sigmas

TABLES = ("fastvideo", "self_forcing")


@dataclass(frozen=True)
class DMDRecipe:
    """A released few-step recipe: the timesteps the model sees and the table that gives their sigmas."""

    timesteps: tuple[float, ...]
    shift: float = 8.0
    table: str = "fastvideo"


# FastVideo configs/pipelines/wan.py FastWan2_2_TI2V_5B_Config.dmd_denoising_steps.
FASTWAN_TI2V_5B = DMDRecipe(timesteps=(1000, 757, 522), shift=8.0, table="fastvideo")
# quanhaol/Wan2.2-TI2V-5B-Turbo configs/inference/wan22.yaml denoising_step_list.
TURBO_TI2V_5B = DMDRecipe(timesteps=(1000, 750, 500, 250), shift=8.0, table="self_forcing")


def lookup_table(table: str, shift: float, num_train_timesteps: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """``(timesteps, sigmas)`` of the ``table`` kind (see the module docstring), float32, ``N`` entries
    from sigma 1 down."""
    if table == "fastvideo":
        sigmas = training_sigmas(shift, num_train_timesteps)
    elif table == "self_forcing":
        # torch's float32 linspace: start + i * step up to halfway, end - (n - 1 - i) * step after, each
        # rounded once (a fused multiply-add); float64 arithmetic rounded to float32 gives the same.
        n = num_train_timesteps + 1
        step = float(_F32(-1.0) / _F32(num_train_timesteps))
        i = np.arange(n, dtype=np.float64)
        grid = np.where(i < n // 2, 1.0 + step * i, 0.0 - step * (n - 1 - i)).astype(np.float32)[:-1]
        sigmas = _F32(shift) * grid / (_F32(1) + _F32(shift - 1) * grid)
    else:
        raise InvalidInputError(f"unknown DMD table {table!r} (expected one of {', '.join(TABLES)})")
    return sigmas * _F32(num_train_timesteps), sigmas


class DMDScheduler(FlowSchedule):
    """Few-step DMD sampling: data estimate at each timestep, fresh noise up to the next (module docstring).

    Args:
        timesteps: The model timesteps of the recipe, from the noisiest (1000) down.
        shift: Shift of the lookup table (8 in both released recipes).
        table: ``"fastvideo"`` or ``"self_forcing"``: how the table's unshifted grid is built.
        num_train_timesteps: Training timesteps ``N``, the table's length.
    """

    def __init__(
        self,
        timesteps: tuple[float, ...] = FASTWAN_TI2V_5B.timesteps,
        shift: float = 8.0,
        table: str = "fastvideo",
        num_train_timesteps: int = 1000,
    ) -> None:
        if table not in TABLES:
            raise InvalidInputError(f"unknown DMD table {table!r} (expected one of {', '.join(TABLES)})")
        self.num_train_timesteps = _check_count("num_train_timesteps", num_train_timesteps)
        self.recipe_timesteps = _check_schedule("timesteps", timesteps, self.num_train_timesteps)
        self.shift = _check_shift(shift)
        self.table = table
        self._key: mx.array | None = None

    @classmethod
    def from_recipe(cls, recipe: DMDRecipe) -> DMDScheduler:
        """The sampler of a released recipe (:data:`FASTWAN_TI2V_5B`, :data:`TURBO_TI2V_5B`)."""
        return cls(timesteps=recipe.timesteps, shift=recipe.shift, table=recipe.table)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        shift: float | None = None,
        *,
        timesteps: Any = None,
        seed: int | None = None,
    ) -> None:
        """Look the sigmas of the timesteps up and reset the run.

        Args:
            num_inference_steps: None, or the number of timesteps (a check: the recipe fixes the steps).
            shift: Overrides the table's shift. Pass None to keep the recipe's; the released recipes use 8
                whatever the checkpoint's ``flow_shift`` is.
            timesteps: Overrides the recipe's timesteps (in [0, N], from the noisiest down).
            seed: Seeds the fresh noise of every re-noising step; None draws from MLX's global generator.

        Sets ``timesteps`` (float32, ``(n,)``) and ``sigmas`` (float32, ``(n + 1,)``): the looked-up sigma
        of each timestep, then 0.
        """
        steps = self.recipe_timesteps if timesteps is None else _check_schedule(
            "timesteps", timesteps, self.num_train_timesteps
        )
        if num_inference_steps is not None:
            count = _check_count("num_inference_steps", num_inference_steps)
            if count != len(steps):
                raise InvalidInputError(
                    f"this DMD sampler has {len(steps)} steps (timesteps {steps.tolist()}), not {count}"
                )
        s = self.shift if shift is None else _check_shift(shift)
        table_timesteps, table_sigmas = lookup_table(self.table, s, self.num_train_timesteps)
        nearest = np.abs(table_timesteps.astype(np.float64)[None, :] - steps.astype(np.float64)[:, None])
        sigmas = table_sigmas[np.argmin(nearest, axis=1)]  # the first of equally near entries, as torch
        self._schedule(steps.astype(np.float32), np.concatenate([sigmas, np.zeros(1, np.float32)]))
        self._key = None if seed is None else mx.random.key(seed)

    def step(
        self,
        model_output: mx.array,
        timestep: float | np.floating | mx.array,
        sample: mx.array,
        noise: mx.array | None = None,
    ) -> mx.array:
        """One DMD step.

        Args:
            model_output: Predicted velocity ``v``, the shape of ``sample``.
            timestep: The current entry of ``timesteps``; it only locates the first step of a run.
            sample: Current latents ``x`` (any channels-last shape).
            noise: The fresh noise for the re-noising, the shape of ``sample``; None draws it (seeded by
                :meth:`set_timesteps`). Unused on the last step.

        Returns:
            ``x0 = x - sigma * v`` on the last step, else ``sigma' * noise + (1 - sigma') * x0``; float32
            arithmetic, cast to ``model_output``'s dtype.
        """
        i = self._current_index(timestep)
        assert self.sigmas is not None and self.timesteps is not None
        x0 = sample.astype(mx.float32) - float(self.sigmas[i]) * model_output.astype(mx.float32)
        if i + 1 < len(self.timesteps):
            if noise is None:
                noise = self._draw(sample.shape)
            sigma_next = float(self.sigmas[i + 1])
            x0 = (1.0 - sigma_next) * x0 + sigma_next * noise.astype(mx.float32)
        self._step_index = i + 1
        return x0.astype(model_output.dtype)

    def _draw(self, shape: tuple[int, ...]) -> mx.array:
        if self._key is None:
            return mx.random.normal(shape)
        self._key, key = mx.random.split(self._key)
        return mx.random.normal(shape, key=key)
