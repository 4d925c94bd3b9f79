"""FlowMatchEulerDiscreteScheduler on explicit grids, dynamic shifting and per-token steps, and the LTX-Video
pipelines' grid helpers, against diffusers 0.42.1 (the scheduler alone, random tensors, no model)."""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler as RefEuler
from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift as ref_calculate_shift
from diffusers.pipelines.ltx.pipeline_ltx import retrieve_timesteps as ref_retrieve_timesteps
from diffusers.pipelines.ltx.pipeline_ltx_condition import linear_quadratic_schedule as ref_linear_quadratic

from mlx_i2v.errors import InvalidInputError
from mlx_i2v.families.ltx.schedules import (
    calculate_shift,
    default_sigmas,
    linear_quadratic_schedule,
    retrieve_timesteps,
)
from mlx_i2v.schedulers import FlowMatchEulerDiscreteScheduler, add_noise, load_scheduler

# Scheduler configs of the checkpoints (diffusers scripts/convert_ltx_to_diffusers.py; Wan's shift).
LTX_091 = dict(
    use_dynamic_shifting=True,
    base_shift=0.95,
    max_shift=2.05,
    base_image_seq_len=1024,
    max_image_seq_len=4096,
    shift_terminal=0.1,
)
LTX_095 = dict(use_dynamic_shifting=False)
WAN = dict(shift=5.0)
LINEAR_DYNAMIC = dict(use_dynamic_shifting=True, time_shift_type="linear")

DISTILLED_097 = [1000, 993, 987, 981, 975, 909, 725, 0.03]  # LTX 0.9.7-distilled base pass
DISTILLED_097_UPSCALE = [1000, 909, 725, 421, 0]
SHAPE = (2, 4, 3, 4, 6)  # torch layout (B, C, F, H, W); MLX gets it channels-last
TOLERANCE = 1e-6


def to_mlx(x: torch.Tensor) -> mx.array:
    return mx.array(np.moveaxis(x.float().numpy(), 1, -1))


def to_torch_layout(x: mx.array) -> np.ndarray:
    return np.moveaxis(np.array(x.astype(mx.float32)), -1, 1)


def rel_err(ours: np.ndarray, ref: torch.Tensor) -> float:
    want = ref.float().numpy()
    return float(np.abs(ours - want).max() / np.abs(want).max())


def schedulers(config: dict) -> tuple[RefEuler, FlowMatchEulerDiscreteScheduler]:
    return RefEuler(**config), FlowMatchEulerDiscreteScheduler(**config)


def assert_same_schedule(ref: RefEuler, ours: FlowMatchEulerDiscreteScheduler) -> None:
    assert ours.timesteps.dtype == np.float32 and ours.sigmas.dtype == np.float32
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())


def rollout(ref: RefEuler, ours: FlowMatchEulerDiscreteScheduler, seed: int = 0) -> None:
    """Step both through their (already set) schedules on the same random velocities; every step's output
    agrees within :data:`TOLERANCE` relative to its largest value."""
    gen = torch.Generator().manual_seed(seed)
    x_ref = torch.randn(SHAPE, generator=gen)
    x_ours = to_mlx(x_ref)
    for i, t in enumerate(ref.timesteps):
        v = torch.randn(SHAPE, generator=gen)
        x_ref = ref.step(v, t, x_ref).prev_sample
        x_ours = ours.step(to_mlx(v), ours.timesteps[i], x_ours)
        err = rel_err(to_torch_layout(x_ours), x_ref)
        assert err <= TOLERANCE, f"step {i} (t={float(t)}): {err:.3g}"


# --- grids and rollouts ------------------------------------------------------------------------------


GRIDS = [
    ("sigmas-shift5", WAN, dict(sigmas=[1.0, 0.75, 0.5, 0.25])),
    ("sigmas-shift1", LTX_095, dict(sigmas=[1.0, 0.75, 0.5, 0.25])),
    ("lightning", LTX_095, dict(sigmas=[1.0, 0.9375, 0.8333, 0.625])),
    ("sigmas-and-steps", WAN, dict(num_inference_steps=4, sigmas=[1.0, 0.75, 0.5, 0.25])),
    ("ltx091-dynamic-terminal", LTX_091, dict(sigmas=default_sigmas(8), mu=1.37)),
    ("ltx091-default-grid", LTX_091, dict(num_inference_steps=30, mu=0.8)),
    ("dynamic-linear", LINEAR_DYNAMIC, dict(sigmas=default_sigmas(6), mu=1.7)),
    ("terminal-static", dict(shift=3.0, shift_terminal=0.1), dict(num_inference_steps=12)),
    ("distilled-timesteps", LTX_095, dict(timesteps=DISTILLED_097)),
    ("distilled-timesteps-shift5", WAN, dict(timesteps=DISTILLED_097)),
    ("upscale-timesteps", LTX_095, dict(timesteps=DISTILLED_097_UPSCALE)),
    ("linear-quadratic", LTX_095, dict(timesteps=linear_quadratic_schedule(30) * 1000)),
    ("sigmas-and-timesteps", WAN, dict(sigmas=[1.0, 0.8, 0.3], timesteps=[999.5, 700, 12.25])),
    ("mu-ignored-when-static", WAN, dict(num_inference_steps=7, mu=3.0)),
]


@pytest.mark.parametrize("config,kwargs", [g[1:] for g in GRIDS], ids=[g[0] for g in GRIDS])
def test_grid_and_rollout_match_diffusers(config: dict, kwargs: dict) -> None:
    ref, ours = schedulers(config)
    ref.set_timesteps(**kwargs)
    ours.set_timesteps(**kwargs)
    assert_same_schedule(ref, ours)
    rollout(ref, ours)


def test_fractional_timesteps_are_kept() -> None:
    ours = FlowMatchEulerDiscreteScheduler()
    ours.set_timesteps(sigmas=[1.0, 0.9375, 0.8333, 0.625])  # the Lightning grid at shift 1
    assert ours.timesteps[1] == np.float32(937.5)
    ours.set_timesteps(timesteps=DISTILLED_097)
    assert ours.timesteps[-1] == np.float32(0.03) and ours.sigmas[-2] == np.float32(0.03) / 1000


def test_distilled_timesteps_with_the_shift_keep_timesteps_but_shift_sigmas() -> None:
    """diffusers' documented inconsistency: given timesteps stay, their sigmas go through the shift."""
    ours = FlowMatchEulerDiscreteScheduler(shift=5.0)
    ours.set_timesteps(timesteps=[1000, 500])
    np.testing.assert_array_equal(ours.timesteps, [1000, 500])
    assert ours.sigmas.tolist() == pytest.approx([1.0, 5 * 0.5 / (1 + 4 * 0.5), 0.0])


def test_bf16_velocity_step_keeps_its_dtype() -> None:
    """A plain step returns the velocity's dtype; torch computes ``dt * v`` in bfloat16 too."""
    ref, ours = schedulers(WAN)
    ref.set_timesteps(sigmas=[1.0, 0.5])
    ours.set_timesteps(sigmas=[1.0, 0.5])
    gen = torch.Generator().manual_seed(3)
    x, v = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen).bfloat16()
    want = ref.step(v, ref.timesteps[0], x).prev_sample
    got = ours.step(to_mlx(v).astype(mx.bfloat16), ours.timesteps[0], to_mlx(x))
    assert got.dtype == mx.bfloat16 and want.dtype == torch.bfloat16
    assert rel_err(to_torch_layout(got), want) <= TOLERANCE


def test_saved_ltx_config_loads(tmp_path: Path) -> None:
    """The 0.9.1 scheduler config as diffusers saves it loads with every option, and rolls out the same."""
    ref = RefEuler(**LTX_091)
    ref.save_config(tmp_path / "scheduler")
    ours = load_scheduler(tmp_path)
    assert isinstance(ours, FlowMatchEulerDiscreteScheduler)
    assert (ours.use_dynamic_shifting, ours.shift_terminal, ours.base_image_seq_len) == (True, 0.1, 1024)
    seq_lens, shifts = (ours.base_image_seq_len, ours.max_image_seq_len), (ours.base_shift, ours.max_shift)
    mu = calculate_shift(3 * 16 * 22, *seq_lens, *shifts)
    ref.set_timesteps(sigmas=default_sigmas(10), mu=mu)
    ours.set_timesteps(sigmas=default_sigmas(10), mu=mu)
    assert_same_schedule(ref, ours)
    rollout(ref, ours)


# --- per-token steps (LTXConditionPipeline) ------------------------------------------------------------


def condition_rollout(timesteps: list[float], mask: torch.Tensor, velocity_dtype: torch.dtype) -> None:
    """The loop of ``LTXConditionPipeline.__call__`` around the scheduler: per-token timesteps
    ``min(t, (1 - mask) * 1000)``, ``step(-v, ...)``, and the frozen tokens kept by ``torch.where``.
    Tokens are (B, L, C), the packed layout both sides use."""
    ref, ours = schedulers(LTX_095)
    ref_t, _ = ref_retrieve_timesteps(ref, None, "cpu", timesteps)
    ours_t, _ = retrieve_timesteps(ours, timesteps=timesteps)
    np.testing.assert_array_equal(ours_t, ref_t.numpy())
    gen = torch.Generator().manual_seed(7)
    B, L, C = mask.shape[0], mask.shape[1], 8
    x_ref = torch.randn(B, L, C, generator=gen)
    x_ours = mx.array(x_ref.numpy())
    for i, t in enumerate(ref_t):
        per_token = torch.min(t.expand(B).unsqueeze(-1).float(), (1 - mask) * 1000.0)
        v = torch.randn(B, L, C, generator=gen).to(velocity_dtype)
        want = ref.step(-v, t, x_ref, per_token_timesteps=per_token, return_dict=False)[0]
        v_ours = mx.array(v.float().numpy()).astype(_mx_dtype(velocity_dtype))
        got = ours.step(-v_ours, ours_t[i], x_ours, per_token_timesteps=mx.array(per_token.numpy()))
        assert got.dtype == mx.float32 and want.dtype == torch.float32
        err = rel_err(np.array(got), want)
        assert err <= TOLERANCE, f"step {i} (t={float(t)}): {err:.3g}"
        denoise = (t / 1000 - 1e-6 < (1.0 - mask)).unsqueeze(-1)
        x_ref = torch.where(denoise, want, x_ref)
        x_ours = mx.where(mx.array(denoise.numpy()), got, x_ours)


def _mx_dtype(dtype: torch.dtype) -> mx.Dtype:
    return mx.bfloat16 if dtype == torch.bfloat16 else mx.float32


@pytest.mark.parametrize(
    "timesteps",
    [DISTILLED_097, (linear_quadratic_schedule(12) * 1000).tolist()],
    ids=["distilled", "linear-quadratic"],
)
@pytest.mark.parametrize("velocity_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_per_token_steps_match_diffusers(timesteps: list[float], velocity_dtype: torch.dtype) -> None:
    """Hard-conditioned tokens (mask 1), soft ones (strength 0.6 and 0.05) and free tokens (mask 0)."""
    mask = torch.zeros(2, 10)
    mask[:, :3] = 1.0
    mask[0, 3:5] = 0.6
    mask[1, 3] = 0.05
    condition_rollout(timesteps, mask, velocity_dtype)


def test_per_token_without_conditioning_matches_diffusers() -> None:
    """No condition: the pipeline passes one timestep per batch row, shape (B, 1)."""
    condition_rollout(DISTILLED_097, torch.zeros(2, 6), torch.float32)


def test_per_token_step_starts_from_the_token_sigma() -> None:
    """Every token at the step's timestep: the per-token branch steps from ``t / N`` (not the shifted
    schedule sigma the plain step starts from) to the next schedule sigma, with ``-v``."""
    a, b = FlowMatchEulerDiscreteScheduler(shift=2.0), FlowMatchEulerDiscreteScheduler(shift=2.0)
    for s in (a, b):
        s.set_timesteps(timesteps=[800, 400])
    x = mx.random.normal((1, 5, 3), key=mx.random.key(0))
    v = mx.random.normal((1, 5, 3), key=mx.random.key(1))
    t = a.timesteps[0]
    plain = a.step(v, t, x)
    # t = 800 -> sigma 0.8 per token; the schedule's next sigma below it is shift(0.4).
    per_token = b.step(-v, t, x, per_token_timesteps=mx.full((1, 5), float(t)))
    expected_dt = 0.8 - 2 * 0.4 / (1 + 0.4)
    assert not np.allclose(np.array(plain), np.array(per_token))  # the current sigmas differ (0.8 vs shifted)
    np.testing.assert_allclose(np.array(per_token), np.array(x - expected_dt * v), rtol=1e-6, atol=1e-6)


# --- noising -----------------------------------------------------------------------------------------


def test_scale_noise_matches_diffusers() -> None:
    """Lookup by timestep, by begin index, and mid-run by step index; and the restyle start."""
    ref, ours = schedulers(LTX_095)
    ref.set_timesteps(timesteps=DISTILLED_097)
    ours.set_timesteps(timesteps=DISTILLED_097)
    gen = torch.Generator().manual_seed(5)
    x, noise = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)

    def check(timestep: torch.Tensor) -> None:
        want = ref.scale_noise(x, timestep, noise)
        got = ours.scale_noise(to_mlx(x), timestep.numpy(), to_mlx(noise))
        assert rel_err(to_torch_layout(got), want) <= TOLERANCE

    check(torch.tensor([975.0, 725.0]))  # one timestep per batch row
    v = torch.randn(SHAPE, generator=gen)
    ref.step(v, ref.timesteps[0], x)
    ours.step(to_mlx(v), ours.timesteps[0], to_mlx(x))
    check(torch.tensor([725.0, 0.03]))  # mid-run without a begin index: still looked up
    ref.set_timesteps(timesteps=DISTILLED_097)
    ours.set_timesteps(timesteps=DISTILLED_097)
    ref.set_begin_index(2)
    ours.set_begin_index(2)
    check(torch.tensor([1000.0, 1000.0]))  # the begin index wins
    v = torch.randn(SHAPE, generator=gen)
    ref.step(v, ref.timesteps[2], x)
    ours.step(to_mlx(v), ours.timesteps[2], to_mlx(x))
    check(torch.tensor([1000.0, 1000.0]))  # the step index wins

    # LTXConditionPipeline.prepare_latents with denoise_strength < 1: sigma * noise + (1 - sigma) * latents.
    sigma = ref.sigmas[3:4].repeat(2)
    want = sigma[:, None, None, None, None] * noise + (1 - sigma[:, None, None, None, None]) * x
    got = add_noise(to_mlx(x), to_mlx(noise), float(ours.sigmas[3]))
    assert rel_err(to_torch_layout(got), want) <= TOLERANCE


# --- LTX grid helpers --------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [0, 256, 1024, 1536, 4096, 6144, 33 * 22 * 13])
@pytest.mark.parametrize("config", [{}, LTX_091], ids=["defaults", "ltx091"])
def test_calculate_shift_matches_diffusers(seq_len: int, config: dict) -> None:
    names = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")
    args = [config[k] for k in names if k in config]
    assert calculate_shift(seq_len, *args) == ref_calculate_shift(seq_len, *args)


@pytest.mark.parametrize("num_steps", [1, 2, 3, 8, 30, 40, 50])
@pytest.mark.parametrize("threshold_noise,linear_steps", [(0.025, None), (0.1, None), (0.025, 1)])
def test_linear_quadratic_schedule_matches_diffusers(
    num_steps: int, threshold_noise: float, linear_steps: int | None
) -> None:
    ours = linear_quadratic_schedule(num_steps, threshold_noise, linear_steps)
    ref = ref_linear_quadratic(num_steps, threshold_noise, linear_steps)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref.numpy())
    np.testing.assert_array_equal(ours * 1000, (ref * 1000).numpy())


@pytest.mark.parametrize("steps", [2, 8, 50])
def test_ltx_i2v_timesteps_match_diffusers(steps: int) -> None:
    """``LTXImageToVideoPipeline``'s step 5 for the 0.9.1 scheduler at 512x768x97 (13x16x24 tokens)."""
    ref, ours = schedulers(LTX_091)
    mu = calculate_shift(13 * 16 * 24, 1024, 4096, 0.95, 2.05)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    ref_t, ref_n = ref_retrieve_timesteps(ref, steps, "cpu", None, sigmas=sigmas, mu=mu)
    ours_t, ours_n = retrieve_timesteps(ours, steps, sigmas=default_sigmas(steps), mu=mu)
    assert ours_n == ref_n == steps
    np.testing.assert_array_equal(ours_t, ref_t.numpy())
    np.testing.assert_array_equal(ours.sigmas, ref.sigmas.numpy())
    assert math.isclose(float(ours.sigmas[-2]), 0.1, rel_tol=1e-6)  # stretched to the terminal


def test_one_step_with_a_terminal_is_an_error_not_nan() -> None:
    """One step of the 0.9.1 scheduler: sigmas [1] cannot be stretched; diffusers divides 0 by 0."""
    ref, ours = schedulers(LTX_091)
    with np.errstate(invalid="ignore"):
        ref.set_timesteps(sigmas=default_sigmas(1), mu=1.0)
    assert torch.isnan(ref.sigmas[0])
    with pytest.raises(InvalidInputError, match="last sigma below 1"):
        ours.set_timesteps(sigmas=default_sigmas(1), mu=1.0)


# --- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config,kwargs,match",
    [
        ({}, {}, "num_inference_steps, sigmas or timesteps"),
        ({}, dict(num_inference_steps=3, sigmas=[1.0, 0.5]), "num_inference_steps is 3"),
        ({}, dict(sigmas=[1.0, 0.5], timesteps=[1000]), "same length"),
        ({}, dict(sigmas=[1.0, 1.5]), r"sigmas must lie in \[0, 1\]"),
        ({}, dict(sigmas=[]), "non-empty"),
        ({}, dict(sigmas=[[1.0]]), "non-empty list of numbers"),
        ({}, dict(timesteps=[1000, float("nan")]), "timesteps must lie"),
        ({}, dict(timesteps=[1001]), "timesteps must lie"),
        (LTX_091, dict(num_inference_steps=4), "mu is required"),
        (LTX_091, dict(num_inference_steps=4, mu=float("inf")), "mu must be a finite number"),
        (dict(shift_terminal=0.1), dict(sigmas=[1.0]), "last sigma below 1"),
        ({}, dict(num_inference_steps=0), "num_inference_steps"),
    ],
)
def test_bad_grids(config: dict, kwargs: dict, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        FlowMatchEulerDiscreteScheduler(**config).set_timesteps(**kwargs)


def test_bad_helper_arguments() -> None:
    with pytest.raises(InvalidInputError, match="only one of timesteps or sigmas"):
        retrieve_timesteps(FlowMatchEulerDiscreteScheduler(), timesteps=[1000], sigmas=[1.0])
    with pytest.raises(InvalidInputError, match="linear_steps"):
        linear_quadratic_schedule(8, linear_steps=8)
    with pytest.raises(InvalidInputError, match="num_steps"):
        linear_quadratic_schedule(0)
    with pytest.raises(InvalidInputError, match="begin_index"):
        scheduler = FlowMatchEulerDiscreteScheduler()
        scheduler.set_timesteps(4)
        scheduler.set_begin_index(4)
