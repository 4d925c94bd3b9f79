"""The few-step DMD sampler (FastWan2.2-TI2V-5B, Wan2.2-TI2V-5B-Turbo) against torch transcriptions of the
reference loops; diffusers has no pipeline for it."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler as RefEuler

from mlx_i2v.dmd import FASTWAN_TI2V_5B, TURBO_TI2V_5B, DMDRecipe, DMDScheduler, lookup_table
from mlx_i2v.errors import InvalidInputError
from mlx_i2v.schedulers import FlowMatchEulerDiscreteScheduler

SHAPE = (1, 6, 3, 4, 8)  # torch layout (B, C, T, H, W); MLX gets it channels-last
TOLERANCE = 1e-6


def fastvideo_table(shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FastVideo's DMD stage table: its ``FlowMatchEulerDiscreteScheduler(shift=8.0)`` right after
    ``__init__`` (``fastvideo/models/schedulers/scheduling_flow_match_euler_discrete.py``), whose table
    code is diffusers'."""
    table = RefEuler(shift=shift)
    return table.timesteps, table.sigmas


def self_forcing_table(shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-Forcing's ``FlowMatchScheduler(shift=shift, sigma_min=0.0, extra_one_step=True)`` after
    ``set_timesteps(1000)`` (quanhaol/Wan2.2-TI2V-5B-Turbo ``utils/scheduler.py``,
    ``utils/wan_wrapper.py``)."""
    sigmas = torch.linspace(1.0, 0.0, 1001)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return sigmas * 1000, sigmas


TABLES = {"fastvideo": fastvideo_table, "self_forcing": self_forcing_table}


def reference_dmd(recipe: DMDRecipe, latents: torch.Tensor, velocity, noises: list[torch.Tensor]) -> list:
    """The sampling loop of FastVideo's ``DmdDenoisingStage.forward`` (= Turbo's
    ``Wan22FewstepInferencePipeline.inference`` on a text-to-video latent), transcribed:

    * ``pred_noise_to_pred_video`` / ``_convert_flow_pred_to_x0``: the nearest table timestep in float64,
      ``x0 = x - sigma_t * v`` in float64, cast back;
    * ``scheduler.add_noise(x0, noise, next_timestep)``: the nearest table timestep (float32 table minus the
      long timestep), ``(1 - sigma) * x0 + sigma * noise``;
    * the last step keeps ``x0``.

    ``velocity(i, x)`` stands in for the transformer; returns every step's output.
    """
    table_t, table_sigmas = TABLES[recipe.table](recipe.shift)
    timesteps = torch.tensor(recipe.timesteps, dtype=torch.long)
    outputs = []
    for i, t in enumerate(timesteps):
        noise_latents = latents.clone()
        pred_noise = velocity(i, latents)
        distance = table_t.double().unsqueeze(0) - t.reshape(1).double().unsqueeze(1)
        index = torch.argmin(distance.abs(), dim=1)
        sigma_t = table_sigmas.double()[index]
        pred_video = (noise_latents.double() - sigma_t * pred_noise.double()).to(pred_noise.dtype)
        if i < len(timesteps) - 1:
            next_timestep = timesteps[i + 1] * torch.ones([1], dtype=torch.long)
            index = torch.argmin((table_t.unsqueeze(0) - next_timestep.unsqueeze(1)).abs(), dim=1)
            sigma = table_sigmas[index]
            latents = ((1 - sigma) * pred_video + sigma * noises[i]).type_as(noises[i])
        else:
            latents = pred_video
        outputs.append(latents)
    return outputs


def to_mlx(x: torch.Tensor) -> mx.array:
    return mx.array(np.moveaxis(x.numpy(), 1, -1))


def to_torch_layout(x: mx.array) -> np.ndarray:
    return np.moveaxis(np.array(x), -1, 1)


@pytest.mark.parametrize("recipe", [FASTWAN_TI2V_5B, TURBO_TI2V_5B], ids=["fastwan", "turbo"])
def test_sampler_matches_reference(recipe: DMDRecipe) -> None:
    """Same initial noise, same re-noising noise, a velocity that depends on the input: every step agrees."""
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(SHAPE, generator=gen)
    drift = [torch.randn(SHAPE, generator=gen) for _ in recipe.timesteps]
    noises = [torch.randn(SHAPE, generator=gen) for _ in recipe.timesteps[1:]]
    want = reference_dmd(recipe, latents, lambda i, x: 0.5 * x + drift[i], noises)

    ours = DMDScheduler.from_recipe(recipe)
    ours.set_timesteps(len(recipe.timesteps))
    np.testing.assert_array_equal(ours.timesteps, np.array(recipe.timesteps, np.float32))
    x = to_mlx(latents)
    for i, t in enumerate(ours.timesteps):
        v = 0.5 * x + to_mlx(drift[i])
        x = ours.step(v, t, x, noise=to_mlx(noises[i]) if i < len(noises) else None)
        err = float(np.abs(to_torch_layout(x) - want[i].numpy()).max() / np.abs(want[i].numpy()).max())
        assert err <= TOLERANCE, f"step {i} (t={t}): {err:.3g}"


@pytest.mark.parametrize("recipe", [FASTWAN_TI2V_5B, TURBO_TI2V_5B], ids=["fastwan", "turbo"])
def test_sigmas_are_the_looked_up_ones(recipe: DMDRecipe) -> None:
    """The tables equal the references bit for bit, and each sigma is that of the nearest entry: t / 1000
    to within half a step of the shift-8 table."""
    table_t, table_sigmas = TABLES[recipe.table](recipe.shift)
    ours_t, ours_sigmas = lookup_table(recipe.table, recipe.shift)
    np.testing.assert_array_equal(ours_t, table_t.numpy())
    np.testing.assert_array_equal(ours_sigmas, table_sigmas.numpy())
    scheduler = DMDScheduler.from_recipe(recipe)
    scheduler.set_timesteps()
    want = [table_sigmas[torch.argmin((table_t.double() - t).abs())].item() for t in recipe.timesteps]
    np.testing.assert_array_equal(scheduler.sigmas, np.array(want + [0.0], np.float32))
    np.testing.assert_allclose(scheduler.sigmas[:-1], np.array(recipe.timesteps) / 1000, atol=1e-3)


def test_the_two_tables_differ_only_in_rounding() -> None:
    a, b = lookup_table("fastvideo", 8.0)[1], lookup_table("self_forcing", 8.0)[1]
    assert (a != b).any() and np.abs(a - b).max() <= 1.2e-7


def test_last_step_is_the_data_estimate() -> None:
    scheduler = DMDScheduler(timesteps=(1000, 500), shift=8.0)
    scheduler.set_timesteps(seed=0)
    x = mx.random.normal((1, 2, 4, 4, 3), key=mx.random.key(1))
    v = mx.random.normal(x.shape, key=mx.random.key(2))
    x = scheduler.step(v, 1000.0, x)
    out = scheduler.step(v, 500.0, x)
    sigma = float(scheduler.sigmas[1])
    np.testing.assert_allclose(np.array(out), np.array(x - sigma * v), rtol=1e-6, atol=1e-6)
    assert scheduler.sigmas[-1] == 0


def test_seeded_noise_is_reproducible() -> None:
    """Fresh noise drawn by the sampler: the same seed gives the same run, another seed another one."""

    def run(seed: int | None) -> np.ndarray:
        scheduler = DMDScheduler.from_recipe(TURBO_TI2V_5B)
        scheduler.set_timesteps(4, seed=seed)
        x = mx.zeros((1, 2, 3, 3, 4))
        for t in scheduler.timesteps:
            x = scheduler.step(mx.ones_like(x), t, x)
        return np.array(x)

    assert np.array_equal(run(3), run(3)) and not np.array_equal(run(3), run(4))
    mx.random.seed(11)
    first = run(None)
    mx.random.seed(11)
    assert np.array_equal(first, run(None))
    # Velocity 1 from zeros is the straight path to x0 = -sigma; the result is x0 of the last step.
    assert np.isfinite(first).all() and first.std() > 0


def test_interchangeable_with_euler() -> None:
    """The pipeline's loop drives either sampler the same way; dtypes follow the velocity."""
    for scheduler in (FlowMatchEulerDiscreteScheduler(shift=5.0), DMDScheduler.from_recipe(FASTWAN_TI2V_5B)):
        scheduler.set_timesteps(3, shift=None)
        x = mx.zeros((1, 2, 2, 2, 4), dtype=mx.float32)
        for t in scheduler.timesteps:
            x = scheduler.step(mx.ones_like(x).astype(mx.bfloat16), t, x)
        assert x.dtype == mx.bfloat16 and x.shape == (1, 2, 2, 2, 4)
        assert len(scheduler.sigmas) == 4 and scheduler.sigmas[-1] == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_inference_steps=50), "has 3 steps"),
        (dict(timesteps=[1000, 1200]), "timesteps must lie"),
        (dict(shift=0.0), "shift"),
    ],
)
def test_bad_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        DMDScheduler.from_recipe(FASTWAN_TI2V_5B).set_timesteps(**kwargs)


def test_bad_construction_and_misuse() -> None:
    with pytest.raises(InvalidInputError, match="unknown DMD table"):
        DMDScheduler(table="lcm")
    x = mx.zeros((1, 4))
    scheduler = DMDScheduler(timesteps=(1000,))
    with pytest.raises(RuntimeError, match="set_timesteps"):
        scheduler.step(x, 1000.0, x)
    scheduler.set_timesteps()
    with pytest.raises(InvalidInputError, match="not in the schedule"):
        scheduler.step(x, 999.0, x)
    scheduler.step(x, 1000.0, x)
    with pytest.raises(RuntimeError, match="finished"):
        scheduler.step(x, 1000.0, x)
