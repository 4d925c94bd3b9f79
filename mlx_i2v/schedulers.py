"""Flow-matching samplers for the Wan pipelines, numerically equal to diffusers 0.42.1.

Two schedulers, both driven the same way::

    scheduler.set_timesteps(num_inference_steps)
    for t in scheduler.timesteps:
        velocity = model(latents, t)
        latents = scheduler.step(velocity, t, latents)

They step by index, as diffusers' Wan pipelines do after ``set_begin_index(0)``: at high step counts the
integer timesteps repeat (999, 999, 997, ... from 201 steps at shift 5), so a timestep does not identify a
step. Every step count runs, up to :data:`MAX_INFERENCE_STEPS`; UniPC also needs its float32 noise levels
to be distinct (diffusers' samples turn to NaN where two are equal), and refuses, naming the largest
count that works, where they are not.

* :class:`FlowUniPCMultistepScheduler` is diffusers' ``UniPCMultistepScheduler`` in the only mode the Wan
  repositories ship (``use_flow_sigmas=True``, ``prediction_type="flow_prediction"``, ``predict_x0=True``):
  the UniP predictor plus UniC corrector on data predictions ``x0 = x - sigma * v``.
* :class:`FlowMatchEulerDiscreteScheduler` is diffusers' ``FlowMatchEulerDiscreteScheduler``:
  ``x_next = x + (sigma_next - sigma) * v``, on its default grid or explicit sigma/timestep grids (the
  few-step distillations, LTX-Video), with static or dynamic shifting and per-token timesteps (LTX-Video's
  condition pipeline). The LTX pipelines' grid helpers are in :mod:`mlx_i2v.families.ltx.schedules`; the
  stochastic few-step DMD sampler, driven the same way, is :mod:`mlx_i2v.dmd`.

The noise schedule and every scalar coefficient are computed in numpy with the dtypes the torch reference
uses (float64 for the shifted linspace, float32 for everything derived from the stored sigmas); only the
element-wise updates of the latents run in MLX, on arrays of any shape. Config options the Wan models do not
use are rejected with :class:`~mlx_i2v.errors.InvalidInputError` instead of being ignored.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import mlx.core as mx
import numpy as np

from .errors import InvalidInputError
from .weights import read_config

log = logging.getLogger(__name__)

_F32 = np.float32

# The most steps a schedule may have: beyond it, the float32 noise levels of every shift >= 1 begin to
# repeat, and the schedule alone would take memory for nothing.
MAX_INFERENCE_STEPS = 1_000_000


# --- shared helpers ---------------------------------------------------------------------------------


def _check_count(name: str, value: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidInputError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise InvalidInputError(f"{name} must be >= 1, got {value}")
    if maximum is not None and value > maximum:
        raise InvalidInputError(f"{name} must be at most {maximum}, got {value}")
    return int(value)


def _check_steps(value: int) -> int:
    return _check_count("num_inference_steps", value, MAX_INFERENCE_STEPS)


def _check_shift(shift: float) -> float:
    numeric = isinstance(shift, (int, float, np.floating, np.integer)) and not isinstance(shift, bool)
    if not numeric or not np.isfinite(shift) or not shift > 0:
        raise InvalidInputError(f"shift must be a finite number > 0, got {shift!r}")
    return float(shift)


def _match_timestep(timesteps: np.ndarray, timestep: Any) -> np.ndarray:
    """Indices of ``timestep`` in the schedule (an ``mx.array``, numpy or Python scalar)."""
    value = np.asarray(timestep).reshape(())
    return np.flatnonzero(timesteps == value)


def _check_not_finished(timesteps: np.ndarray, index: int) -> None:
    if index >= len(timesteps):
        raise RuntimeError("the schedule is finished; call set_timesteps again")


def _distinct_levels(sigmas: np.ndarray) -> bool:
    """Whether UniPC's float32 noise levels ``lambda = log(1 - sigma) - log(sigma)`` of a schedule's sigmas
    all differ (an update divides by their difference)."""
    s = sigmas.astype(np.float32)
    lam = np.log((1 - s).astype(np.float64)).astype(np.float32) - np.log(s.astype(np.float64)).astype(np.float32)
    return bool(np.all(np.diff(lam) > 0))


def _largest(works, n: int) -> int:
    """The largest m < n for which ``works(m)`` holds, by bisection (``works(1)`` is assumed)."""
    lo, hi = 1, n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if works(mid) else (lo, mid)
    return lo


def _log(x: np.float32) -> np.float32:
    """float32 ``log``: torch's float32 ``log``/``expm1`` are within one ulp of the correctly rounded value,
    so rounding the float64 result is the closest reproducible match (bit-equal in most cases)."""
    return _F32(np.log(np.float64(x)))


def _expm1(x: np.float32) -> np.float32:
    """float32 ``expm1``, rounded from float64 like :func:`_log`."""
    return _F32(np.expm1(np.float64(x)))


def _read_options(
    config: Mapping[str, Any],
    kind: str,
    fixed: Mapping[str, tuple[Any, Any]],
    inert: frozenset[str],
    params: frozenset[str],
) -> dict[str, Any]:
    """Validate a diffusers scheduler config and return the keyword arguments we implement.

    ``fixed`` maps an option to ``(the value we implement, diffusers' default when absent)``; ``inert``
    options have no effect on a flow-sigma schedule, so any value is accepted. Unknown keys are ignored with
    a warning, as diffusers does.
    """
    for key, (wanted, default) in fixed.items():
        value = config.get(key, default)
        if value != wanted:
            raise InvalidInputError(f"{kind}: {key}={value!r} is not supported (only {wanted!r})")
    known = fixed.keys() | inert | params
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        log.warning("%s: ignoring unknown config keys %s", kind, ", ".join(unknown))
    return {k: config[k] for k in params if k in config}


# --- UniPC ------------------------------------------------------------------------------------------


_UNIPC_FIXED: dict[str, tuple[Any, Any]] = {
    "prediction_type": ("flow_prediction", "epsilon"),
    "use_flow_sigmas": (True, False),
    "predict_x0": (True, True),
    "thresholding": (False, False),
    "solver_p": (None, None),
    "use_karras_sigmas": (False, False),
    "use_exponential_sigmas": (False, False),
    "use_beta_sigmas": (False, False),
    "use_dynamic_shifting": (False, False),
    "shift_terminal": (None, None),
}
# With flow sigmas these only feed the (unused) beta/alpha tables, the non-flow timestep spacings, the
# Karras-style sigma conversions, thresholding or dynamic shifting, all excluded above.
_UNIPC_INERT = frozenset(
    {
        "beta_start",
        "beta_end",
        "beta_schedule",
        "trained_betas",
        "dynamic_thresholding_ratio",
        "sample_max_value",
        "timestep_spacing",
        "steps_offset",
        "rescale_betas_zero_snr",
        "time_shift_type",
        "sigma_min",
        "sigma_max",
    }
)
_UNIPC_PARAMS = frozenset(
    {
        "num_train_timesteps",
        "flow_shift",
        "solver_order",
        "solver_type",
        "lower_order_final",
        "final_sigmas_type",
        "disable_corrector",
    }
)


class FlowUniPCMultistepScheduler:
    """UniPC multistep sampler on flow-matching sigmas (diffusers ``UniPCMultistepScheduler`` with
    ``use_flow_sigmas=True, prediction_type="flow_prediction", predict_x0=True``).

    Args:
        num_train_timesteps: Training timesteps; model timesteps are ``int(sigma * num_train_timesteps)``.
        flow_shift: Default shift ``s`` of ``sigma -> s * sigma / (1 + (s - 1) * sigma)``.
        solver_order: UniP order (UniC adds one).
        solver_type: ``"bh2"`` (Wan) or ``"bh1"``: the ``B(h)`` of the UniPC paper.
        lower_order_final: Drop to lower orders in the last steps (needed with ``final_sigmas_type="zero"``).
        final_sigmas_type: ``"zero"`` ends the schedule at sigma 0; ``"sigma_min"`` repeats the last sigma.
        disable_corrector: Step indices after which the UniC corrector is skipped.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        flow_shift: float = 1.0,
        solver_order: int = 2,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        final_sigmas_type: str = "zero",
        disable_corrector: list[int] | tuple[int, ...] = (),
    ) -> None:
        solver_order = _check_count("solver_order", solver_order)
        if solver_type not in ("bh1", "bh2"):
            raise InvalidInputError(f"solver_type must be 'bh1' or 'bh2', got {solver_type!r}")
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise InvalidInputError(
                f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}"
            )
        if not isinstance(lower_order_final, bool):
            raise InvalidInputError(f"lower_order_final must be a boolean, got {lower_order_final!r}")
        # lambda is infinite at sigma = 0, so diffusers returns inf/nan for a multistep final update (it
        # divides by rk = 0) and for bh1 (B(h) = -inf times a zero residual).
        if final_sigmas_type == "zero":
            if solver_order > 1 and not lower_order_final:
                raise InvalidInputError(
                    "lower_order_final=False with final_sigmas_type='zero' gives non-finite samples"
                )
            if solver_type == "bh1":
                raise InvalidInputError(
                    "solver_type='bh1' with final_sigmas_type='zero' gives non-finite samples"
                )
        if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in disable_corrector):
            raise InvalidInputError(
                f"disable_corrector must be a list of step indices, got {disable_corrector!r}"
            )

        self.num_train_timesteps = _check_count("num_train_timesteps", num_train_timesteps)
        self.shift = _check_shift(flow_shift)
        self.solver_order = solver_order
        self.solver_type = solver_type
        self.lower_order_final = lower_order_final
        self.final_sigmas_type = final_sigmas_type
        self.disable_corrector = frozenset(int(i) for i in disable_corrector)

        self.timesteps: np.ndarray | None = None
        self.sigmas: np.ndarray | None = None
        self.num_inference_steps: int | None = None
        self._reset()

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FlowUniPCMultistepScheduler:
        """Build from a diffusers ``UniPCMultistepScheduler`` ``scheduler_config.json`` dict."""
        kwargs = _read_options(config, "UniPCMultistepScheduler", _UNIPC_FIXED, _UNIPC_INERT, _UNIPC_PARAMS)
        return cls(**kwargs)

    def _reset(self) -> None:
        self._step_index = 0
        self._model_outputs: list[mx.array] = []  # data predictions x0, oldest first, at most solver_order
        self._lower_order_nums = 0
        self._this_order = 0
        self._last_sample: mx.array | None = None

    def set_timesteps(self, num_inference_steps: int, shift: float | None = None) -> None:
        """Build the schedule and reset the multistep state.

        Sets ``timesteps`` (int64, shape ``(num_inference_steps,)``) and ``sigmas`` (float32, one longer,
        ending in the final sigma). ``shift`` overrides ``flow_shift`` for this schedule only.
        """
        n = _check_steps(num_inference_steps)
        s = self.shift if shift is None else _check_shift(shift)
        n_train = self.num_train_timesteps

        sigmas = self._flow_sigmas(n, s)
        if not _distinct_levels(sigmas):
            limit = _largest(lambda m: _distinct_levels(self._flow_sigmas(m, s)), n)
            raise InvalidInputError(
                f"{n} steps at shift {s:g} are too many for UniPC: its float32 noise levels repeat, which "
                f"makes the update undefined; use at most {limit} steps"
            )
        # Timesteps come from the float64 sigmas and are truncated, not rounded (999, 937, ...).
        self.timesteps = (sigmas * n_train).astype(np.int64)
        last = sigmas[-1] if self.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        self.num_inference_steps = n
        self._reset()

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next run at schedule entry ``begin_index`` (a restyle runs only the schedule's tail),
        with a fresh multistep history, as diffusers' run from that timestep starts."""
        if self.timesteps is None:
            raise RuntimeError("set_timesteps must be called before set_begin_index")
        if isinstance(begin_index, bool) or not isinstance(begin_index, (int, np.integer)):
            raise InvalidInputError(f"begin_index must be an integer, got {begin_index!r}")
        if not 0 <= begin_index < len(self.timesteps):
            raise InvalidInputError(f"begin_index must be in [0, {len(self.timesteps)}), got {begin_index}")
        self._reset()
        self._step_index = int(begin_index)

    def _flow_sigmas(self, n: int, shift: float) -> np.ndarray:
        """The n shifted float64 sigmas of the schedule, without the final one."""
        sigmas = np.linspace(1, 1 / self.num_train_timesteps, n + 1)[:-1]
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        # diffusers nudges a first sigma of 1 so that log(alpha = 1 - sigma) stays finite.
        eps = 1e-6
        if np.fabs(sigmas[0] - 1) < eps:
            sigmas[0] -= eps
        return sigmas

    def step(
        self, model_output: mx.array, timestep: int | np.integer | mx.array, sample: mx.array
    ) -> mx.array:
        """Advance ``sample`` by one step of the schedule.

        Args:
            model_output: Predicted velocity ``v`` (noise minus data), same shape as ``sample``.
            timestep: The current entry of ``timesteps``, for diffusers' calling convention; unused, since
                steps are counted (as diffusers does after ``set_begin_index(0)``), not looked up.
            sample: Current latents, any shape, e.g. ``(B, F, H, W, C)``.

        Returns:
            The latents at the next sigma, shape and dtype of ``sample``.
        """
        if self.sigmas is None or self.timesteps is None:
            raise RuntimeError("set_timesteps must be called before step")
        i = self._step_index
        _check_not_finished(self.timesteps, i)

        x0 = sample - float(self.sigmas[i]) * model_output
        if i > 0 and (i - 1) not in self.disable_corrector and self._last_sample is not None:
            sample = self._correct(x0, self._last_sample)

        self._model_outputs = (self._model_outputs + [x0])[-self.solver_order :]
        order = self.solver_order
        if self.lower_order_final:
            order = min(order, len(self.timesteps) - i)
        self._this_order = min(order, self._lower_order_nums + 1)  # warm up from first order
        self._last_sample = sample
        prev_sample = self._predict(sample)
        if self._lower_order_nums < self.solver_order:
            self._lower_order_nums += 1
        self._step_index += 1
        return prev_sample

    def _coefficients(self, t: int, s0: int, history: list[int]) -> _BhCoefficients:
        """Scalars of one UniPC B(h) update from sigma index ``s0`` to ``t``, in float32 like diffusers.

        ``history`` holds the sigma indices of the older data predictions, newest first; the update's
        order is ``len(history) + 1``.
        """
        sigmas = self.sigmas
        assert sigmas is not None

        def lam(sigma: np.float32) -> np.float32:  # log(alpha / sigma) with the flow alpha = 1 - sigma
            return _log(_F32(1) - sigma) - _log(sigma)

        # A final sigma of 0 makes lambda infinite, and "sigma_min" repeats the last sigma (h = 0): the
        # resulting inf/nan entries are the reference's too and multiply only zero residuals.
        with np.errstate(divide="ignore", invalid="ignore"):
            sigma_t, sigma_s0 = sigmas[t], sigmas[s0]
            alpha_t = _F32(1) - sigma_t
            lambda_s0 = lam(sigma_s0)
            h = lam(sigma_t) - lambda_s0
            rks = [(lam(sigmas[si]) - lambda_s0) / h for si in history]

            hh = -h  # predict_x0
            h_phi_1 = _expm1(hh)
            h_phi_k = h_phi_1 / hh - _F32(1)
            b_h = _expm1(hh) if self.solver_type == "bh2" else hh
            rks_all = np.array(rks + [_F32(1)], dtype=np.float32)
            rows, b = [], []
            factorial = 1
            for k in range(1, len(history) + 2):
                rows.append(rks_all ** (k - 1))
                b.append(h_phi_k * _F32(factorial) / b_h)
                factorial *= k + 1
                h_phi_k = h_phi_k / hh - _F32(1 / factorial)
        return _BhCoefficients(
            ratio=float(sigma_t / sigma_s0),
            alpha_phi_1=float(alpha_t * h_phi_1),
            alpha_b_h=float(alpha_t * b_h),
            rks=[float(r) for r in rks],
            R=np.stack(rows).astype(np.float32),
            b=np.array(b, dtype=np.float32),
        )

    def _predict(self, sample: mx.array) -> mx.array:
        """UniP: extrapolate from ``sigmas[i]`` to ``sigmas[i + 1]`` with the last ``this_order`` x0s."""
        i, order, m = self._step_index, self._this_order, self._model_outputs
        assert i is not None
        c = self._coefficients(i + 1, i, [i - k for k in range(1, order)])
        x_t = c.ratio * sample - c.alpha_phi_1 * m[-1]
        if order > 1:
            # diffusers hard-codes rho = 0.5 for order 2 instead of solving the 1x1 system.
            rhos = [0.5] if order == 2 else [float(r) for r in np.linalg.solve(c.R[:-1, :-1], c.b[:-1])]
            x_t = x_t - c.alpha_b_h * _weighted_differences(rhos, c.rks, m)
        return x_t.astype(sample.dtype)

    def _correct(self, x0: mx.array, last_sample: mx.array) -> mx.array:
        """UniC: redo the previous step ``sigmas[i - 1] -> sigmas[i]`` using the fresh prediction ``x0``."""
        i, order, m = self._step_index, self._this_order, self._model_outputs
        assert i is not None
        c = self._coefficients(i, i - 1, [i - 1 - k for k in range(1, order)])
        # diffusers hard-codes rho = 0.5 for order 1 instead of solving the 1x1 system.
        rhos = [0.5] if order == 1 else [float(r) for r in np.linalg.solve(c.R, c.b)]
        x_t = c.ratio * last_sample - c.alpha_phi_1 * m[-1]
        correction = rhos[-1] * (x0 - m[-1])
        if order > 1:
            correction = _weighted_differences(rhos[:-1], c.rks, m) + correction
        x_t = x_t - c.alpha_b_h * correction
        return x_t.astype(last_sample.dtype)


@dataclass(frozen=True)
class _BhCoefficients:
    """Scalars of one UniPC update (float32 values held as Python floats, so that they multiply MLX
    arrays without promoting them, like torch's 0-dim tensors)."""

    ratio: float  # sigma_t / sigma_s0
    alpha_phi_1: float  # alpha_t * (exp(-h) - 1)
    alpha_b_h: float  # alpha_t * B(h)
    rks: list[float]  # (lambda_si - lambda_s0) / h of the older steps, newest first
    R: np.ndarray  # (p, p) order conditions, rows rks**k
    b: np.ndarray  # (p,)


def _weighted_differences(rhos: list[float], rks: list[float], model_outputs: list[mx.array]) -> mx.array:
    """``sum_k rho_k * (m_k - m_0) / r_k`` over the older data predictions ``m_k`` (newest first)."""
    m0 = model_outputs[-1]
    terms = [rho * ((model_outputs[-(k + 2)] - m0) / rk) for k, (rho, rk) in enumerate(zip(rhos, rks))]
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


# --- Euler ------------------------------------------------------------------------------------------


class FlowSchedule:
    """What the samplers that step through an explicit schedule share, as diffusers does it.

    ``timesteps`` (float32, shape ``(N,)``) are what the model is given and ``sigmas`` (float32,
    ``(N + 1,)``) the noise level at each step and after the last. A run starts at :attr:`begin_index` if
    one is set, otherwise where the first :meth:`step`'s timestep sits in ``timesteps`` (its second
    occurrence when it is repeated, so that a restart mid-schedule skips no sigma); each step then advances
    the index by one. Arrays are channels-last and of any shape, e.g. latents ``(B, F, H, W, C)``.
    """

    num_train_timesteps: int
    timesteps: np.ndarray | None = None
    sigmas: np.ndarray | None = None
    num_inference_steps: int | None = None
    _step_index: int | None = None
    _begin_index: int | None = None

    @property
    def step_index(self) -> int | None:
        """Index of the next step, None before the first."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """The index the next run starts at, if set with :meth:`set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next run at ``begin_index`` instead of looking its first timestep up."""
        if self.timesteps is None:
            raise RuntimeError("set_timesteps must be called before set_begin_index")
        if isinstance(begin_index, bool) or not isinstance(begin_index, (int, np.integer)):
            raise InvalidInputError(f"begin_index must be an integer, got {begin_index!r}")
        if not 0 <= begin_index < len(self.timesteps):
            raise InvalidInputError(f"begin_index {begin_index} is outside the {len(self.timesteps)} steps")
        self._begin_index = int(begin_index)

    def _schedule(self, timesteps: np.ndarray, sigmas: np.ndarray) -> None:
        """Install a new schedule and forget the position in the old one."""
        self.timesteps, self.sigmas = timesteps, sigmas
        self.num_inference_steps = len(timesteps)
        self._step_index = self._begin_index = None

    def _index_of(self, timestep: Any) -> int:
        assert self.timesteps is not None
        matches = _match_timestep(self.timesteps, timestep)
        if len(matches) == 0:
            raise InvalidInputError(f"timestep {np.asarray(timestep).item()} is not in the schedule")
        return int(matches[1] if len(matches) > 1 else matches[0])

    def _current_index(self, timestep: Any) -> int:
        """The index of the step about to run (locating the start of a run)."""
        if self.sigmas is None or self.timesteps is None:
            raise RuntimeError("set_timesteps must be called before step")
        if self._step_index is None:
            start = self._begin_index
            self._step_index = start if start is not None else self._index_of(timestep)
        if self._step_index >= len(self.timesteps):
            raise RuntimeError("the schedule is finished; call set_timesteps again")
        return self._step_index

    def scale_noise(self, sample: mx.array, timestep: Any, noise: mx.array) -> mx.array:
        """Noise ``sample`` to the sigma of ``timestep``: ``sigma * noise + (1 - sigma) * sample``.

        As diffusers' ``scale_noise``: without a :attr:`begin_index` the sigma is that of ``timestep``
        looked up in ``timesteps``; with one, that of :attr:`step_index` once a run has started, else of
        the begin index. ``timestep`` is a scalar or one per batch row (shape ``(B,)``); sample and noise
        have the same shape ``(B, ...)``. Returns an array of ``sample``'s dtype (sigma is cast to it first).
        """
        if self.sigmas is None:
            raise RuntimeError("set_timesteps must be called before scale_noise")
        values = np.asarray(timestep)
        if self._begin_index is None:
            indices = np.array([self._index_of(t) for t in values.reshape(-1)]).reshape(values.shape)
        else:
            index = self._step_index if self._step_index is not None else self._begin_index
            indices = np.full(values.shape, index)
        sigma = mx.array(self.sigmas[indices]).astype(sample.dtype)
        sigma = sigma.reshape(sigma.shape + (1,) * (sample.ndim - sigma.ndim))
        return add_noise(sample, noise, sigma)


def add_noise(sample: mx.array, noise: mx.array, sigma: float | mx.array) -> mx.array:
    """The flow-matching forward process ``sigma * noise + (1 - sigma) * sample``: how LTX-Video's
    condition pipeline starts a restyle (``prepare_latents`` with ``denoise_strength < 1``) from the first
    sigma of its trimmed schedule. ``sigma`` is a scalar or broadcasts against ``sample``."""
    return sigma * noise + (1.0 - sigma) * sample


def training_sigmas(shift: float | None, num_train_timesteps: int) -> np.ndarray:
    """The float32 table diffusers' ``FlowMatchEulerDiscreteScheduler.__init__`` builds: the sigmas of
    timesteps ``N, N - 1, ..., 1`` (over ``N``), shifted by ``shift`` unless it is None (dynamic shifting
    shifts later). Its end points bound the default inference schedule; FastVideo's DMD sampler looks
    sigmas up in it."""
    sigmas = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1]
    sigmas = sigmas / _F32(num_train_timesteps)
    if shift is not None:
        sigmas = _F32(shift) * sigmas / (_F32(1) + _F32(shift - 1) * sigmas)
    return sigmas


def _check_schedule(name: str, values: Any, high: float) -> np.ndarray:
    """Explicit ``sigmas`` / ``timesteps`` as numpy (float64 from Python floats, as diffusers gets them)."""
    try:
        array = np.array(values)
        numeric = array.ndim == 1 and array.dtype.kind in "iuf"
    except (TypeError, ValueError):
        numeric = False
    if not numeric or len(array) == 0:
        raise InvalidInputError(f"{name} must be a non-empty list of numbers, got {values!r}")
    if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > high:
        raise InvalidInputError(f"{name} must lie in [0, {high:g}], got {array.tolist()}")
    return array


def _check_number(name: str, value: Any) -> float:
    numeric = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    if not numeric or not np.isfinite(value):
        raise InvalidInputError(f"{name} must be a finite number, got {value!r}")
    return float(value)


_EULER_FIXED: dict[str, tuple[Any, Any]] = {
    "invert_sigmas": (False, False),  # Mochi only
    "use_karras_sigmas": (False, False),
    "use_exponential_sigmas": (False, False),
    "use_beta_sigmas": (False, False),
    "stochastic_sampling": (False, False),  # the few-step re-noising samplers are mlx_i2v.dmd
}
_EULER_INERT: frozenset[str] = frozenset()
_EULER_PARAMS = frozenset(
    {
        "num_train_timesteps",
        "shift",
        "use_dynamic_shifting",
        "base_shift",
        "max_shift",
        "base_image_seq_len",
        "max_image_seq_len",
        "shift_terminal",
        "time_shift_type",
    }
)


class FlowMatchEulerDiscreteScheduler(FlowSchedule):
    """First-order Euler sampler for flow matching: diffusers' ``FlowMatchEulerDiscreteScheduler`` with
    the options the Wan and LTX-Video configs use (static or dynamic shifting, ``shift_terminal``, explicit
    sigma or timestep grids, per-token timesteps); the sigma conversions and stochastic sampling are not.

    Args:
        num_train_timesteps: Training timesteps ``N``; model timesteps are ``sigma * N`` unless given.
        shift: Static shift ``s`` of ``sigma -> s * sigma / (1 + (s - 1) * sigma)``.
        use_dynamic_shifting: Shift by ``mu`` (:meth:`set_timesteps`) instead of ``shift``.
        base_shift, max_shift, base_image_seq_len, max_image_seq_len: What the pipelines feed
            :func:`mlx_i2v.families.ltx.schedules.calculate_shift` to get ``mu``; the scheduler does not read them.
        shift_terminal: Stretch the shifted sigmas so that the last is this value (LTX 0.9.0/0.9.1: 0.1).
        time_shift_type: Dynamic shift ``"exponential"`` (``e^mu / (e^mu + 1/sigma - 1)``) or
            ``"linear"`` (``mu / (mu + 1/sigma - 1)``).
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        shift_terminal: float | None = None,
        time_shift_type: str = "exponential",
    ) -> None:
        if not isinstance(use_dynamic_shifting, bool):
            raise InvalidInputError(f"use_dynamic_shifting must be a boolean, got {use_dynamic_shifting!r}")
        if time_shift_type not in ("exponential", "linear"):
            raise InvalidInputError(
                f"time_shift_type must be 'exponential' or 'linear', got {time_shift_type!r}"
            )
        if shift_terminal is not None and shift_terminal != 0:  # diffusers treats 0 as unset
            if not 0 < _check_number("shift_terminal", shift_terminal) < 1:
                raise InvalidInputError(f"shift_terminal must lie in (0, 1), got {shift_terminal}")
        self.num_train_timesteps = _check_count("num_train_timesteps", num_train_timesteps)
        self.shift = _check_shift(shift)
        self.use_dynamic_shifting = use_dynamic_shifting
        self.base_shift, self.max_shift = base_shift, max_shift
        self.base_image_seq_len, self.max_image_seq_len = base_image_seq_len, max_image_seq_len
        self.shift_terminal = float(shift_terminal) if shift_terminal else None
        self.time_shift_type = time_shift_type

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FlowMatchEulerDiscreteScheduler:
        """Build from a diffusers ``FlowMatchEulerDiscreteScheduler`` ``scheduler_config.json`` dict."""
        kwargs = _read_options(
            config, "FlowMatchEulerDiscreteScheduler", _EULER_FIXED, _EULER_INERT, _EULER_PARAMS
        )
        return cls(**kwargs)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        shift: float | None = None,
        *,
        sigmas: Any = None,
        timesteps: Any = None,
        mu: float | None = None,
    ) -> None:
        """Build the schedule as diffusers' ``set_timesteps`` does.

        Args:
            num_inference_steps: Steps of the default grid (``linspace`` over the training range); with
                ``sigmas`` or ``timesteps`` it may be omitted and must otherwise equal their length.
            shift: Overrides the static shift for this schedule only, giving the schedule of a diffusers
                scheduler constructed with that shift.
            sigmas: Explicit sigmas in [0, 1]; they are shifted (and stretched) like the default grid.
            timesteps: Explicit model timesteps in [0, N], used as given (fractions such as 937.5 or 0.03
                stay); without ``sigmas`` the sigmas are ``timesteps / N``, shifted.
            mu: The dynamic shift; required with ``use_dynamic_shifting``, otherwise ignored.

        Sets ``timesteps`` (float32, ``(n,)``) and ``sigmas`` (float32, ``(n + 1,)`` ending in 0).
        """
        n = self._step_count(num_inference_steps, sigmas, timesteps)
        s = self.shift if shift is None else _check_shift(shift)
        N = self.num_train_timesteps
        given = None if timesteps is None else _check_schedule("timesteps", timesteps, N).astype(np.float32)
        if sigmas is not None:
            grid = _check_schedule("sigmas", sigmas, 1.0).astype(np.float32)
        elif given is not None:
            grid = given / N
        else:
            train = training_sigmas(None if self.use_dynamic_shifting else s, N)
            grid = np.linspace(float(train[0]) * N, float(train[-1]) * N, n) / N
        # Float64 for the default grid, float32 for given values: the dtypes diffusers computes in.
        if self.use_dynamic_shifting:
            if mu is None:
                raise InvalidInputError("mu is required with use_dynamic_shifting (see calculate_shift)")
            with np.errstate(divide="ignore"):  # sigma 0 shifts to 0 through 1/0 = inf
                grid = self._time_shift(_check_number("mu", mu), grid)
        else:
            grid = s * grid / (1 + (s - 1) * grid)
        if self.shift_terminal:
            grid = self._stretch_to_terminal(grid)
        grid = grid.astype(np.float32)
        self._schedule(
            given if given is not None else grid * _F32(N), np.concatenate([grid, np.zeros(1, np.float32)])
        )

    @staticmethod
    def _step_count(num_inference_steps: int | None, sigmas: Any, timesteps: Any) -> int:
        lengths = {len(v) for v in (sigmas, timesteps) if v is not None and hasattr(v, "__len__")}
        if len(lengths) > 1:
            raise InvalidInputError("sigmas and timesteps must have the same length")
        if num_inference_steps is None:
            if sigmas is None and timesteps is None:
                raise InvalidInputError("num_inference_steps, sigmas or timesteps is required")
            return lengths.pop() if lengths else 0  # a non-list is refused by _check_schedule
        n = _check_steps(num_inference_steps)
        if lengths and lengths != {n}:
            raise InvalidInputError(
                f"sigmas/timesteps have {lengths.pop()} entries, num_inference_steps is {n}"
            )
        return n

    def _time_shift(self, mu: float, sigmas: np.ndarray) -> np.ndarray:
        """Resolution-dependent shift by ``mu`` (diffusers' ``time_shift(mu, 1.0, sigmas)``)."""
        if self.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
        return mu / (mu + (1 / sigmas - 1) ** 1.0)

    def _stretch_to_terminal(self, sigmas: np.ndarray) -> np.ndarray:
        """Scale ``1 - sigma`` so the last sigma becomes ``shift_terminal`` (LTX-Video's ``rf.py``)."""
        assert self.shift_terminal is not None
        one_minus = 1 - sigmas
        if one_minus[-1] <= 0:
            raise InvalidInputError("shift_terminal needs a last sigma below 1")
        scale = one_minus[-1] / (1 - self.shift_terminal)
        return 1 - (one_minus / scale)

    def step(
        self,
        model_output: mx.array,
        timestep: float | np.floating | mx.array,
        sample: mx.array,
        per_token_timesteps: mx.array | np.ndarray | None = None,
    ) -> mx.array:
        """Advance ``sample`` by one Euler step.

        Args:
            model_output: Predicted velocity ``v`` (noise minus data), the shape of ``sample``.
            timestep: The current entry of ``timesteps``; it only locates the first step of a run.
            sample: Current latents, any channels-last shape: ``(B, F, H, W, C)``, tokens ``(B, L, C)``.
            per_token_timesteps: Optional timestep per token, shaped like ``sample`` without its channel
                axis (or broadcasting to it, e.g. ``(B, 1)``). Each token then steps from its own sigma
                ``t / N`` to the largest schedule sigma below it, with ``dt = sigma_token - sigma_next`` of
                the opposite sign to the plain step: the caller passes ``-v`` (diffusers'
                ``LTXConditionPipeline`` calls ``step(-noise_pred, t, latents, per_token_timesteps=...)``).

        Returns:
            ``sample + dt * model_output`` in float32 arithmetic: cast to ``model_output``'s dtype for the
            plain step, float32 for the per-token step (as diffusers).
        """
        i = self._current_index(timestep)
        assert self.sigmas is not None
        sample = sample.astype(mx.float32)
        if per_token_timesteps is None:
            dt = self.sigmas[i + 1] - self.sigmas[i]
            prev_sample = (sample + float(dt) * model_output).astype(model_output.dtype)
        else:
            prev_sample = sample + self._per_token_dt(per_token_timesteps)[..., None] * model_output
        self._step_index = i + 1
        return prev_sample

    def _per_token_dt(self, per_token_timesteps: mx.array | np.ndarray) -> mx.array:
        """``sigma_token - sigma_next`` per token, float32, the shape of ``per_token_timesteps``."""
        assert self.sigmas is not None
        token_sigmas = mx.array(per_token_timesteps).astype(mx.float32) / self.num_train_timesteps
        schedule = mx.array(self.sigmas).reshape((-1,) + (1,) * token_sigmas.ndim)
        below = schedule < token_sigmas[None] - 1e-6
        next_sigmas = mx.max(mx.where(below, schedule, 0.0), axis=0)
        return token_sigmas - next_sigmas


# --- construction -----------------------------------------------------------------------------------

Scheduler = FlowUniPCMultistepScheduler | FlowMatchEulerDiscreteScheduler

_BY_CLASS_NAME: dict[str, type[Scheduler]] = {
    "UniPCMultistepScheduler": FlowUniPCMultistepScheduler,
    "FlowMatchEulerDiscreteScheduler": FlowMatchEulerDiscreteScheduler,
}


def scheduler_from_config(config: Mapping[str, Any]) -> Scheduler:
    """Build the scheduler a diffusers ``scheduler_config.json`` describes (dispatch on ``_class_name``)."""
    name = config.get("_class_name")
    if name not in _BY_CLASS_NAME:
        expected = ", ".join(_BY_CLASS_NAME)
        raise InvalidInputError(f"unsupported scheduler {name!r} (expected one of {expected})")
    return _BY_CLASS_NAME[name].from_config(config)


def load_scheduler(folder: str | Path) -> Scheduler:
    """Read ``<folder>/scheduler/scheduler_config.json`` of a diffusers pipeline folder."""
    config = read_config(Path(folder) / "scheduler", "scheduler_config.json")
    scheduler = scheduler_from_config(config)
    log.info("scheduler: %s (shift %s)", type(scheduler).__name__, scheduler.shift)
    return scheduler


def scheduler_by_name(name: str, flow_shift: float, num_train_timesteps: int = 1000) -> Scheduler:
    """Build a scheduler with the Wan defaults: ``"unipc"`` (as shipped) or ``"euler"``."""
    if name == "unipc":
        return FlowUniPCMultistepScheduler(num_train_timesteps=num_train_timesteps, flow_shift=flow_shift)
    if name == "euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=flow_shift)
    raise InvalidInputError(f"unknown scheduler {name!r} (expected 'unipc' or 'euler')")
