"""The sampler choice and the few-step presets: what fills what, what is refused, and the grids against
diffusers' ``FlowMatchEulerDiscreteScheduler`` (no models needed)."""

from __future__ import annotations

import logging

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from mlx_i2v.dmd import FASTWAN_TI2V_5B, TURBO_TI2V_5B, DMDScheduler
from mlx_i2v.errors import InvalidInputError
from mlx_i2v.experts import Experts
from mlx_i2v.sampling import Samplers, choose_sampling
from mlx_i2v.schedulers import FlowMatchEulerDiscreteScheduler as OurEuler
from mlx_i2v.schedulers import FlowUniPCMultistepScheduler
from mlx_i2v.families.wan.variants import I2V_14B_480P, I2V_A14B, TI2V_5B

UNIPC_CONFIG = {"_class_name": "UniPCMultistepScheduler", "prediction_type": "flow_prediction",
                "use_flow_sigmas": True, "flow_shift": 3.0, "solver_order": 3}  # fmt: skip
LIGHTNING_SHIFTED = [1.0, 0.9375, 5 * 0.5 / 3, 0.625]  # 5s / (1 + 4s) of [1, .75, .5, .25]


def build(choice, samplers: Samplers | None = None, seed: int = 0):
    samplers = samplers or Samplers.from_config(UNIPC_CONFIG)
    return samplers.build(choice.scheduler, num_inference_steps=choice.num_inference_steps,
                          flow_shift=choice.flow_shift if choice.flow_shift is not None else 5.0,
                          sigmas=choice.sigmas, preset=choice.preset, seed=seed)  # fmt: skip


def test_lightning_grid_is_diffusers_euler_on_the_shifted_sigmas():
    """The preset's sampler equals ``FlowMatchEulerDiscreteScheduler(shift=1).set_timesteps(sigmas=shifted)``
    and ``(shift=5).set_timesteps(sigmas=[1, .75, .5, .25])``; its timesteps are fractional."""
    ours = build(choose_sampling(I2V_A14B, "unipc", preset="lightning"))
    assert isinstance(ours, OurEuler)
    unshifted = FlowMatchEulerDiscreteScheduler(shift=5.0)
    unshifted.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])
    np.testing.assert_array_equal(ours.timesteps, unshifted.timesteps.numpy())
    np.testing.assert_array_equal(ours.sigmas, unshifted.sigmas.numpy())
    shifted = FlowMatchEulerDiscreteScheduler(shift=1.0)
    shifted.set_timesteps(sigmas=LIGHTNING_SHIFTED)
    np.testing.assert_allclose(ours.sigmas, shifted.sigmas.numpy(), rtol=1e-7, atol=0)
    np.testing.assert_allclose(ours.timesteps, [1000, 937.5, 833.3333, 625], rtol=1e-7)
    # and the steps: the same update on the same input
    x = torch.randn(1, 4, 2, 3, 5, generator=torch.Generator().manual_seed(0))
    ours_x, theirs_x = mx.array(x.numpy()), x
    for t_ours, t_theirs in zip(ours.timesteps, shifted.timesteps):
        v = 0.3 * theirs_x + 1.0
        theirs_x = shifted.step(v, t_theirs, theirs_x, return_dict=False)[0]
        ours_x = ours.step(0.3 * ours_x + 1.0, t_ours, ours_x)
    np.testing.assert_allclose(np.array(ours_x), theirs_x.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("boundary_ratio", [0.875, 0.9])
def test_a14b_switches_experts_at_step_two_as_diffusers(boundary_ratio):
    """Wan2.2-Lightning's T2V (0.875) and I2V (0.9) boundaries both give two high-noise steps on the grid."""
    ours = build(choose_sampling(I2V_A14B, "unipc", preset="lightning"))
    reference = FlowMatchEulerDiscreteScheduler(shift=5.0)
    reference.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])
    boundary = boundary_ratio * reference.config.num_train_timesteps
    theirs = [0 if t >= boundary else 1 for t in reference.timesteps]  # WanImageToVideoPipeline's test
    experts = Experts(loaders=[lambda: None, lambda: None], boundary=boundary)
    assert [experts.index_for(float(t)) for t in ours.timesteps] == theirs == [0, 0, 1, 1]


@pytest.mark.parametrize("preset, recipe", [("dmd", FASTWAN_TI2V_5B), ("turbo", TURBO_TI2V_5B)])
def test_dmd_presets_are_the_released_recipes(preset, recipe):
    choice = choose_sampling(TI2V_5B, "unipc", preset=preset)
    assert (choice.scheduler, choice.num_inference_steps, choice.guidance_scale, choice.flow_shift) == (
        "dmd", len(recipe.timesteps), 1.0, recipe.shift)  # fmt: skip
    ours = build(choice)
    reference = DMDScheduler.from_recipe(recipe)
    reference.set_timesteps()
    assert isinstance(ours, DMDScheduler) and ours.table == recipe.table
    np.testing.assert_array_equal(ours.timesteps, reference.timesteps)
    np.testing.assert_array_equal(ours.sigmas, reference.sigmas)


def test_explicit_arguments_override_a_preset():
    c = choose_sampling(I2V_A14B, "unipc", preset="lightning", guidance_scale=3.5, flow_shift=8.0)
    assert (c.guidance_scale, c.guidance_scale_2, c.flow_shift) == (3.5, 1.0, 8.0)  # high at 3.5, low without
    c = choose_sampling(I2V_A14B, "unipc", preset="lightning", sigmas=[1.0, 0.5])
    assert (c.scheduler, c.sigmas, c.num_inference_steps) == ("euler", (1.0, 0.5), 2)
    # the solver alone: UniPC on its own 4-step grid, the preset's shift and guidance
    c = choose_sampling(I2V_14B_480P, "euler", preset="lightning", scheduler="unipc")
    assert (c.scheduler, c.sigmas, c.num_inference_steps, c.flow_shift, c.guidance_scale_2) == ("unipc", None, 4, 5.0, None)
    assert isinstance(build(c), FlowUniPCMultistepScheduler)


def test_the_sampler_follows_the_call_then_the_grid_then_the_pipeline():
    assert choose_sampling(TI2V_5B, "unipc").scheduler == "unipc"
    plain = choose_sampling(TI2V_5B, "unipc")
    assert plain.num_inference_steps is None and plain.guidance_scale is None and plain.sigmas is None
    assert choose_sampling(TI2V_5B, "unipc", sigmas=[1, 0.5]).scheduler == "euler"  # a grid implies Euler
    assert choose_sampling(TI2V_5B, "dmd", sigmas=[1, 0.5]).scheduler == "dmd"  # unless the loaded one takes it
    dmd = choose_sampling(TI2V_5B, "unipc", scheduler="dmd")
    assert (dmd.sigmas, dmd.num_inference_steps, dmd.guidance_scale) == ((1.0, 0.757, 0.522), 3, None)
    euler = choose_sampling(TI2V_5B, "unipc", scheduler="euler", num_inference_steps=7)
    assert (euler.sigmas, euler.num_inference_steps) == (None, 7)


def test_the_checkpoint_scheduler_is_used_as_configured():
    samplers = Samplers.from_config(UNIPC_CONFIG)
    assert samplers.default == "unipc"
    unipc = build(choose_sampling(TI2V_5B, samplers.default, num_inference_steps=3), samplers)
    assert isinstance(unipc, FlowUniPCMultistepScheduler) and unipc.solver_order == 3
    assert Samplers.from_config(UNIPC_CONFIG, "dmd").default == "dmd"
    euler = Samplers.from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})
    assert euler.default == "euler"
    with pytest.raises(InvalidInputError, match="unknown scheduler"):
        Samplers.from_config(UNIPC_CONFIG, "lcm")


def test_dmd_noise_comes_from_the_seed():
    choice = choose_sampling(TI2V_5B, "unipc", preset="turbo")
    draws = [build(choice, seed=s).draw_noise((2, 3)) for s in (5, 5, 6)]
    np.testing.assert_array_equal(np.array(draws[0]), np.array(draws[1]))
    assert not np.array_equal(np.array(draws[0]), np.array(draws[2]))


def test_lightning_without_a_known_distillation_is_allowed_with_a_notice(caplog):
    with caplog.at_level(logging.WARNING, logger="mlx_i2v.sampling"):
        choice = choose_sampling(TI2V_5B, "unipc", preset="lightning")
    assert choice.scheduler == "euler" and "no lightning distillation of wan2.2-ti2v-5b" in caplog.text


@pytest.mark.parametrize(
    "variant, kwargs, message",
    [
        (I2V_A14B, dict(preset="dmd"), "the dmd preset is for distilled wan2.2-ti2v-5b checkpoints"),
        (I2V_14B_480P, dict(preset="turbo"), "not wan2.1-i2v-14b-480p"),
        (TI2V_5B, dict(preset="fast"), "unknown preset 'fast'"),
        (TI2V_5B, dict(scheduler="ddim"), "unknown scheduler 'ddim'"),
        (TI2V_5B, dict(scheduler="unipc", sigmas=[1, 0.5]), "the unipc sampler takes no sigmas"),
        (TI2V_5B, dict(preset="dmd", flow_shift=5.0), "the dmd sampler takes no flow_shift"),
        (TI2V_5B, dict(sigmas=[1, 0.5], num_inference_steps=4), "num_inference_steps is 4 but the euler grid has 2"),
        (TI2V_5B, dict(preset="lightning", num_inference_steps=8), "grid has 4 sigmas"),
        (TI2V_5B, dict(sigmas=[0.5, 1.0]), "decrease strictly"),
        (TI2V_5B, dict(sigmas=[1.0, 0.0]), "within \\(0, 1\\]"),
        (TI2V_5B, dict(sigmas=[]), "decrease strictly"),
        (TI2V_5B, dict(sigmas=["a"]), "list of numbers"),
        (TI2V_5B, dict(sigmas=1.0), "list of numbers"),
    ],
)
def test_refused(variant, kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        choose_sampling(variant, "unipc", **kwargs)
