"""Parity of mlx_i2v.schedulers with diffusers 0.42.1: schedules, rollouts, config dispatch, errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_i2v.errors import InvalidInputError, WeightLoadError
from mlx_i2v.schedulers import (
    FlowMatchEulerDiscreteScheduler,
    FlowUniPCMultistepScheduler,
    load_scheduler,
    scheduler_by_name,
    scheduler_from_config,
)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SCHEDULES = [(2, 3.0), (4, 5.0), (50, 5.0), (40, 16.0), (1, 5.0), (30, 1.0)]
SHAPE = (1, 3, 4, 8, 8)  # torch layout (B, C, F, H, W); MLX gets it channels-last
REL_TOL = 1e-5

# Wan-AI/Wan2.1-I2V-14B-480P-Diffusers scheduler/scheduler_config.json
WAN21_I2V_CONFIG = {
    "_class_name": "UniPCMultistepScheduler",
    "_diffusers_version": "0.33.0.dev0",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_x0": True,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_p": None,
    "solver_type": "bh2",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}


def ref_unipc(shift: float, **kwargs):
    return diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        num_train_timesteps=1000,
        flow_shift=shift,
        **kwargs,
    )


def to_mlx(x: torch.Tensor) -> mx.array:
    """(B, C, F, H, W) torch -> (B, F, H, W, C) MLX, the pipeline's layout."""
    return mx.array(np.moveaxis(x.numpy(), 1, -1))


def to_numpy(x: mx.array) -> np.ndarray:
    return np.moveaxis(np.array(x), -1, 1)


def rollout(
    ref, ours, steps: int, shift: float | None = None, seed: int = 0, velocity_dtype=torch.float32
) -> float:
    """Run both schedulers on the same fake velocity sequence (float32 latents, velocities in
    ``velocity_dtype``); return the worst relative step difference."""
    ref.set_timesteps(steps)
    if shift is None:
        ours.set_timesteps(steps)
    else:
        ours.set_timesteps(steps, shift=shift)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())

    gen = torch.Generator().manual_seed(seed)
    x_ref = torch.randn(SHAPE, generator=gen)
    x_ours = to_mlx(x_ref)
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        v = (torch.randn(SHAPE, generator=gen) + 0.3 * i).to(velocity_dtype)
        x_ref = ref.step(v, t, x_ref).prev_sample
        v_ours = to_mlx(v.float()).astype(mx.bfloat16 if velocity_dtype == torch.bfloat16 else mx.float32)
        x_ours = ours.step(v_ours, ours.timesteps[i], x_ours)
        assert x_ours.dtype == mx.float32 and x_ours.shape == (1, 4, 8, 8, 3)
        want = x_ref.numpy()
        err = float(np.abs(to_numpy(x_ours) - want).max() / np.abs(want).max())
        assert err <= REL_TOL, f"step {i} (t={int(t)}): relative difference {err:.3g}"
        worst = max(worst, err)
    return worst


# --- schedules --------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps,shift", SCHEDULES)
def test_unipc_schedule_matches_diffusers(steps: int, shift: float) -> None:
    ref = ref_unipc(shift)
    ref.set_timesteps(steps)
    ours = FlowUniPCMultistepScheduler(flow_shift=shift)
    ours.set_timesteps(steps)
    assert ours.timesteps.dtype == np.int64 and ours.sigmas.dtype == np.float32
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())

    overridden = FlowUniPCMultistepScheduler(flow_shift=1.0)
    overridden.set_timesteps(steps, shift=shift)
    np.testing.assert_array_equal(overridden.timesteps, ref.timesteps.numpy())
    np.testing.assert_array_equal(overridden.sigmas, ref.sigmas.numpy())


def test_unipc_known_timesteps() -> None:
    s = FlowUniPCMultistepScheduler(flow_shift=3.0)
    s.set_timesteps(2)
    assert s.timesteps.tolist() == [999, 750]
    s.set_timesteps(4, shift=5.0)
    assert s.timesteps.tolist() == [999, 937, 833, 625]
    assert s.sigmas[0] < 1.0 and s.sigmas[-1] == 0.0


@pytest.mark.parametrize("steps,shift", SCHEDULES)
def test_euler_schedule_matches_diffusers(steps: int, shift: float) -> None:
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(steps)
    ours = FlowMatchEulerDiscreteScheduler(shift=shift)
    ours.set_timesteps(steps)
    assert ours.timesteps.dtype == np.float32 and ours.sigmas.dtype == np.float32
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())

    overridden = FlowMatchEulerDiscreteScheduler(shift=2.0)
    overridden.set_timesteps(steps, shift=shift)
    np.testing.assert_array_equal(overridden.timesteps, ref.timesteps.numpy())
    np.testing.assert_array_equal(overridden.sigmas, ref.sigmas.numpy())


# --- rollouts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 6, 50])
@pytest.mark.parametrize("shift", [5.0, 16.0])
def test_unipc_rollout_matches_diffusers(steps: int, shift: float) -> None:
    worst = rollout(ref_unipc(shift), FlowUniPCMultistepScheduler(flow_shift=shift), steps)
    logging.getLogger(__name__).info("unipc steps=%d shift=%s max rel diff %.3g", steps, shift, worst)


@pytest.mark.parametrize(
    "options,steps",
    [
        ({"solver_order": 1}, (6, 50)),
        # Orders >= 3 solve an ill-conditioned float32 system: torch's float32 log differs from the correctly
        # rounded one by an ulp now and then, and that grows with the step count (1.3e-5 at 50 steps for
        # order 3, 3e-4 for order 4). With torch's log both agree to 4e-7, so the arithmetic is the same.
        ({"solver_order": 3}, (6, 25)),
        ({"solver_order": 4}, (6, 10)),
        ({"solver_type": "bh1", "final_sigmas_type": "sigma_min"}, (6, 50)),
        ({"disable_corrector": [0, 1, 5]}, (6, 50)),
        ({"final_sigmas_type": "sigma_min"}, (6, 50)),
        ({"final_sigmas_type": "sigma_min", "lower_order_final": False}, (6, 50)),
    ],
)
def test_unipc_options_rollout_match_diffusers(options: dict, steps: tuple[int, ...]) -> None:
    for n in steps:
        rollout(ref_unipc(3.0, **options), FlowUniPCMultistepScheduler(flow_shift=3.0, **options), n)


def test_unipc_bf16_velocity_rollout() -> None:
    # The diffusers pipeline steps float32 latents with the transformer's bfloat16 output.
    rollout(ref_unipc(5.0), FlowUniPCMultistepScheduler(flow_shift=5.0), 50, velocity_dtype=torch.bfloat16)


def test_unipc_shift_override_rollout() -> None:
    rollout(ref_unipc(5.0), FlowUniPCMultistepScheduler(flow_shift=3.0), 8, shift=5.0)


def test_unipc_state_machine_resets() -> None:
    ours = FlowUniPCMultistepScheduler(flow_shift=5.0)
    first = rollout(ref_unipc(5.0), ours, 6, seed=1)
    # A second run on the same object must not see the first run's history.
    assert rollout(ref_unipc(5.0), ours, 6, seed=1) == first


@pytest.mark.parametrize("steps", [1, 6, 50])
@pytest.mark.parametrize("shift", [5.0, 7.0])
def test_euler_rollout_matches_diffusers(steps: int, shift: float) -> None:
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    worst = rollout(ref, FlowMatchEulerDiscreteScheduler(shift=shift), steps)
    logging.getLogger(__name__).info("euler steps=%d shift=%s max rel diff %.3g", steps, shift, worst)


def test_step_keeps_dtype_and_accepts_mx_timestep() -> None:
    s = FlowUniPCMultistepScheduler(flow_shift=5.0)
    s.set_timesteps(3)
    x = mx.zeros((2, 3, 4, 4, 16), dtype=mx.bfloat16)
    for t in s.timesteps:
        x = s.step(mx.ones_like(x), mx.array(t), x)
    assert x.dtype == mx.bfloat16 and x.shape == (2, 3, 4, 4, 16)
    # A constant velocity is a straight path to the data point x - sigma * v = -sigma_0; UniPC follows it.
    np.testing.assert_allclose(np.array(x.astype(mx.float32)), -s.sigmas[0], atol=1e-2)


# --- configs ----------------------------------------------------------------------------------------


def test_load_scheduler_from_diffusers_saved_config(tmp_path: Path) -> None:
    ref = ref_unipc(5.0)
    ref.save_config(tmp_path / "scheduler")
    ours = load_scheduler(tmp_path)
    assert isinstance(ours, FlowUniPCMultistepScheduler) and ours.shift == 5.0
    rollout(ref, ours, 6)

    euler = diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0)
    euler.save_config(tmp_path / "euler" / "scheduler")
    ours_euler = load_scheduler(tmp_path / "euler")
    assert isinstance(ours_euler, FlowMatchEulerDiscreteScheduler) and ours_euler.shift == 7.0
    rollout(euler, ours_euler, 6)


def test_from_config_real_wan_config(tmp_path: Path) -> None:
    ours = scheduler_from_config(WAN21_I2V_CONFIG)
    assert isinstance(ours, FlowUniPCMultistepScheduler)
    assert (ours.shift, ours.solver_order, ours.solver_type) == (3.0, 2, "bh2")
    assert ours.num_train_timesteps == 1000
    ref = diffusers.UniPCMultistepScheduler.from_config(WAN21_I2V_CONFIG)
    rollout(ref, ours, 6)

    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(WAN21_I2V_CONFIG))
    assert isinstance(load_scheduler(tmp_path), FlowUniPCMultistepScheduler)


def test_unknown_config_keys_warn(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mlx_i2v.schedulers"):
        scheduler_from_config({**WAN21_I2V_CONFIG, "brand_new_option": 1})
    assert "brand_new_option" in caplog.text


def test_scheduler_by_name() -> None:
    unipc = scheduler_by_name("unipc", 3.0)
    euler = scheduler_by_name("euler", 7.0, num_train_timesteps=1000)
    assert isinstance(unipc, FlowUniPCMultistepScheduler) and unipc.shift == 3.0
    assert isinstance(euler, FlowMatchEulerDiscreteScheduler) and euler.shift == 7.0
    rollout(ref_unipc(3.0), unipc, 4)
    rollout(diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0), euler, 4)


# --- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"prediction_type": "epsilon"},
        {"use_flow_sigmas": False},
        {"predict_x0": False},
        {"thresholding": True},
        {"use_karras_sigmas": True},
        {"use_exponential_sigmas": True},
        {"use_beta_sigmas": True},
        {"use_dynamic_shifting": True},
        {"shift_terminal": 0.1},
        {"solver_type": "midpoint"},
        {"solver_order": 0},
        {"final_sigmas_type": "sigma_max"},
        {"lower_order_final": False},
        {"solver_type": "bh1"},
        {"flow_shift": 0.0},
        {"num_train_timesteps": 0},
        {"disable_corrector": ["first"]},
    ],
)
def test_unsupported_unipc_config(change: dict) -> None:
    with pytest.raises(InvalidInputError):
        scheduler_from_config({**WAN21_I2V_CONFIG, **change})


@pytest.mark.parametrize("missing", ["prediction_type", "use_flow_sigmas"])
def test_unipc_config_defaults_are_diffusers_defaults(missing: str) -> None:
    config = {k: v for k, v in WAN21_I2V_CONFIG.items() if k != missing}
    with pytest.raises(InvalidInputError, match=missing):
        scheduler_from_config(config)


@pytest.mark.parametrize(
    "change",
    [
        {"invert_sigmas": True},
        {"shift_terminal": 1.5},
        {"time_shift_type": "cubic"},
        {"use_karras_sigmas": True},
        {"use_exponential_sigmas": True},
        {"use_beta_sigmas": True},
        {"stochastic_sampling": True},
        {"shift": -1.0},
    ],
)
def test_unsupported_euler_config(change: dict) -> None:
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 5.0, **change}
    with pytest.raises(InvalidInputError):
        scheduler_from_config(config)


@pytest.mark.parametrize("config", [{"_class_name": "DDIMScheduler"}, {"flow_shift": 3.0}])
def test_unsupported_scheduler_class(config: dict) -> None:
    with pytest.raises(InvalidInputError, match="unsupported scheduler"):
        scheduler_from_config(config)


@pytest.mark.parametrize("cls", [FlowUniPCMultistepScheduler, FlowMatchEulerDiscreteScheduler])
@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "4"])
def test_bad_step_counts(cls: type, steps: object) -> None:
    with pytest.raises(InvalidInputError, match="num_inference_steps"):
        cls().set_timesteps(steps)


@pytest.mark.parametrize("cls", [FlowUniPCMultistepScheduler, FlowMatchEulerDiscreteScheduler])
@pytest.mark.parametrize("shift", [0.0, -2.0, float("nan")])
def test_bad_shift_override(cls: type, shift: float) -> None:
    with pytest.raises(InvalidInputError, match="shift"):
        cls().set_timesteps(4, shift=shift)


def test_bad_names_and_folders(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="unknown scheduler"):
        scheduler_by_name("ddim", 3.0)
    with pytest.raises(WeightLoadError):
        load_scheduler(tmp_path)


def test_step_misuse() -> None:
    x = mx.zeros((1, 2))
    with pytest.raises(RuntimeError):
        FlowUniPCMultistepScheduler().step(x, 999, x)
    euler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    euler.set_timesteps(2)
    with pytest.raises(InvalidInputError, match="not in the schedule"):
        euler.step(x, 123.5, x)
    for t in euler.timesteps:
        x = euler.step(x, t, x)
    with pytest.raises(RuntimeError, match="finished"):
        euler.step(x, euler.timesteps[-1], x)
