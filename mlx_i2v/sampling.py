"""Which sampler a generation runs, on which grid: the sampler names, the few-step presets, and how the
caller's arguments, a preset, the load-time choice and the checkpoint's scheduler combine.

Three samplers (:mod:`mlx_i2v.schedulers`, :mod:`mlx_i2v.dmd`):

* ``"unipc"``: what the Wan repositories ship; its own grid of ``num_inference_steps`` steps.
* ``"euler"``: flow-matching Euler, on its default grid or on explicit ``sigmas``; the sigmas are given
  unshifted and shifted by ``flow_shift`` like any schedule, as diffusers'
  ``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=...)``. The model sees ``sigma * 1000`` as it is
  (937.5, not 937).
* ``"dmd"``: the stochastic few-step sampler of the DMD-distilled TI2V-5B checkpoints. Its ``sigmas`` are
  the recipe's timesteps over 1000 (FastWan ``[1000, 757, 522]`` is ``[1, .757, .522]``); it does not shift
  them (its sigmas are looked up in a fixed shift-8 table, see :mod:`mlx_i2v.dmd`), so ``flow_shift`` does
  not apply. The re-noising draws come from the generation's seed.

A preset is a row of defaults (:data:`PRESETS`); every argument the caller gives overrides it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .dmd import FASTWAN_TI2V_5B, TURBO_TI2V_5B, DMDRecipe, DMDScheduler
from .errors import InvalidInputError
from .schedulers import FlowMatchEulerDiscreteScheduler, FlowUniPCMultistepScheduler, scheduler_by_name
from .schedulers import scheduler_from_config
from .families.wan.variants import FLF2V_14B, I2V_14B_480P, I2V_14B_720P, I2V_A14B, TI2V_5B
from .variants import Variant

log = logging.getLogger(__name__)

Sampler = FlowUniPCMultistepScheduler | FlowMatchEulerDiscreteScheduler | DMDScheduler


@dataclass(frozen=True)
class SamplerKind:
    """What a sampler name accepts. ``default_grid``: the sigmas it runs when given none (None: a grid of
    ``num_inference_steps`` of its own)."""

    takes_sigmas: bool
    takes_shift: bool
    default_grid: tuple[float, ...] | None = None


def _grid(recipe: DMDRecipe, num_train_timesteps: int = 1000) -> tuple[float, ...]:
    return tuple(t / num_train_timesteps for t in recipe.timesteps)


SAMPLERS: dict[str, SamplerKind] = {
    "unipc": SamplerKind(takes_sigmas=False, takes_shift=True),
    "euler": SamplerKind(takes_sigmas=True, takes_shift=True),
    "dmd": SamplerKind(takes_sigmas=True, takes_shift=False, default_grid=_grid(FASTWAN_TI2V_5B)),
}

# Both released DMD recipes look their sigmas up in a shift-8 table, whatever the checkpoint's flow_shift.
DMD_TABLE_SHIFT = FASTWAN_TI2V_5B.shift
LIGHTNING_VARIANTS = tuple(v.name for v in (I2V_14B_480P, I2V_14B_720P, FLF2V_14B, I2V_A14B))


LTX_DISTILLED_SIGMAS = tuple(t / 1000 for t in (1000, 993, 987, 981, 975, 909, 725, 0.03))


@dataclass(frozen=True)
class Preset:
    """A released few-step recipe as defaults.

    Args:
        name: what ``preset=`` / ``--preset`` takes.
        scheduler: the sampler name.
        sigmas: the unshifted grid (its length is the step count).
        guidance_scale: for every expert (1: one conditional pass per step).
        flow_shift: the Euler shift; None for a sampler that takes none.
        distilled_for: the variants with a released checkpoint or LoRA for the recipe.
        only_those: refuse the preset on other variants (else a logged notice).
        dmd_table: the DMD sampler's lookup table (see :mod:`mlx_i2v.dmd`).
        family: the model family it is made for (refused on the others).
    """

    name: str
    scheduler: str
    sigmas: tuple[float, ...]
    guidance_scale: float
    flow_shift: float | None
    distilled_for: tuple[str, ...]
    only_those: bool
    dmd_table: str | None = None
    family: str = "Wan"


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        # lightx2v step/CFG-distilled LoRAs and Wan2.2-Lightning: 4 Euler steps on [1000, 750, 500, 250]
        # shifted by 5 (model timesteps 1000, 937.5, 833.3, 625), no guidance (lora.md section 2.1).
        Preset(name="lightning", scheduler="euler", sigmas=(1.0, 0.75, 0.5, 0.25), guidance_scale=1.0,
               flow_shift=5.0, distilled_for=LIGHTNING_VARIANTS, only_those=False),
        # FastWan2.2-TI2V-5B (FastVideo dmd_denoising_steps) and Wan2.2-TI2V-5B-Turbo (denoising_step_list).
        Preset(name="dmd", scheduler="dmd", sigmas=_grid(FASTWAN_TI2V_5B), guidance_scale=1.0, flow_shift=None,
               distilled_for=(TI2V_5B.name,), only_those=True, dmd_table=FASTWAN_TI2V_5B.table),
        Preset(name="turbo", scheduler="dmd", sigmas=_grid(TURBO_TI2V_5B), guidance_scale=1.0, flow_shift=None,
               distilled_for=(TI2V_5B.name,), only_those=True, dmd_table=TURBO_TI2V_5B.table),
        # LTX-Video 0.9.7/0.9.8 distilled (diffusers' LTX docs): timesteps [1000, 993, 987, 981, 975, 909, 725,
        # 0.03] as LTXConditionPipeline takes them, no guidance; the decode timestep 0.05 is the LTX default.
        Preset(name="distilled", scheduler="euler", sigmas=LTX_DISTILLED_SIGMAS, guidance_scale=1.0, flow_shift=None,
               distilled_for=("ltx-video-condition",), only_those=False, family="LTX-Video"),
    )
}  # fmt: skip


@dataclass(frozen=True)
class SamplingChoice:
    """The sampler, its grid and the values a preset filled in; what is still None takes the variant's
    default."""

    scheduler: str
    sigmas: tuple[float, ...] | None
    preset: str | None
    num_inference_steps: int | None
    guidance_scale: float | None
    guidance_scale_2: float | None
    flow_shift: float | None


def choose_sampling(
    variant: Variant,
    default_scheduler: str,
    *,
    preset: str | None = None,
    scheduler: str | None = None,
    sigmas: Sequence[float] | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    guidance_scale_2: float | None = None,
    flow_shift: float | None = None,
) -> SamplingChoice:
    """Combine the caller's arguments (first), a preset, and the pipeline's sampler (last).

    The sampler is ``scheduler`` if given, else the preset's, else the pipeline's; explicit ``sigmas``
    choose Euler unless the sampler named or loaded takes a grid. Raises :class:`InvalidInputError` for an
    unknown name, a preset made for other checkpoints (DMD), sigmas or a shift the sampler cannot use, or a
    step count that disagrees with the grid.
    """
    p = _preset(preset, variant)
    name = scheduler if scheduler is not None else (p.scheduler if p else None)
    if name is None:
        name = default_scheduler if sigmas is None or SAMPLERS[default_scheduler].takes_sigmas else "euler"
    kind = sampler_kind(name)
    if sigmas is not None:
        if not kind.takes_sigmas:
            raise InvalidInputError(f"the {name} sampler takes no sigmas; use scheduler='euler' with them")
        grid = check_sigmas(sigmas)
    else:
        grid = p.sigmas if p is not None and kind.takes_sigmas else kind.default_grid
    steps = num_inference_steps
    if steps is None:
        steps = len(grid) if grid is not None else (len(p.sigmas) if p is not None else None)
    elif grid is not None and _is_count(steps) and steps != len(grid):
        raise InvalidInputError(
            f"num_inference_steps is {steps} but the {name} grid has {len(grid)} sigmas; pass sigmas for another grid"
        )
    if not kind.takes_shift:
        if flow_shift is not None:
            raise InvalidInputError(f"the {name} sampler takes no flow_shift (its sigmas are the timesteps / 1000)")
        flow_shift = DMD_TABLE_SHIFT  # recorded as what was used
    elif flow_shift is None and p is not None:
        flow_shift = p.flow_shift
    if p is not None:
        guidance_scale = p.guidance_scale if guidance_scale is None else guidance_scale
        if variant.two_experts and guidance_scale_2 is None:
            guidance_scale_2 = p.guidance_scale
    return SamplingChoice(name, grid, p.name if p else None, steps, guidance_scale, guidance_scale_2, flow_shift)


def sampler_kind(name: Any) -> SamplerKind:
    """The :class:`SamplerKind` of a sampler name; an unknown name is an :class:`InvalidInputError`."""
    if name not in SAMPLERS:
        raise InvalidInputError(f"unknown scheduler {name!r} (expected one of {', '.join(SAMPLERS)})")
    return SAMPLERS[name]


def check_sigmas(sigmas: Any) -> tuple[float, ...]:
    """A grid as floats: strictly decreasing, in (0, 1]."""
    try:
        grid = tuple(float(s) for s in sigmas)
    except (TypeError, ValueError):
        raise InvalidInputError(f"sigmas must be a list of numbers, got {sigmas!r}") from None
    values = np.array(grid)
    if not grid or not np.isfinite(values).all() or values.max() > 1 or values.min() <= 0 or (np.diff(values) >= 0).any():
        raise InvalidInputError(f"sigmas must decrease strictly within (0, 1], got {list(grid)}")
    return grid


def _preset(name: str | None, model: Variant) -> Preset | None:
    if name is None:
        return None
    if name not in PRESETS:
        raise InvalidInputError(f"unknown preset {name!r} (expected one of {', '.join(PRESETS)})")
    p = PRESETS[name]
    variant = model.name
    if model.family.name != p.family:
        raise InvalidInputError(f"the {name} preset is for {p.family} models, not {variant}")
    if variant not in p.distilled_for:
        made_for = ", ".join(p.distilled_for)
        if p.only_those:
            raise InvalidInputError(f"the {name} preset is for distilled {made_for} checkpoints, not {variant}")
        log.warning("no %s distillation of %s is known (the preset is for %s); sampling with its recipe anyway",
                    name, variant, made_for)  # fmt: skip
    return p


def _is_count(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Samplers:
    """Builds a generation's sampler. ``config``: the checkpoint's ``scheduler_config.json`` (used as it is
    when the sampler asked for is the checkpoint's own); ``default``: the sampler of a call that names none
    (the load-time choice, else the checkpoint's)."""

    config: Mapping[str, Any]
    default: str

    @classmethod
    def from_config(cls, config: Mapping[str, Any], default: str | None = None) -> Samplers:
        """``default`` None takes the checkpoint's kind of sampler."""
        own = _kind_of(scheduler_from_config(config))
        if default is not None:
            sampler_kind(default)
        log.info("sampler: %s (the checkpoint's: %s)", default or own, own)
        return cls(config, default or own)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.config.get("num_train_timesteps", 1000))

    def build(
        self,
        name: str,
        *,
        num_inference_steps: int,
        flow_shift: float,
        sigmas: tuple[float, ...] | None,
        preset: str | None,
        seed: int,
        image_seq_len: int = 0,
    ) -> Sampler:
        """The sampler ``name`` with its schedule set: ``num_inference_steps`` steps, or the ``sigmas`` grid,
        shifted by ``flow_shift`` (for DMD, the lookup table's shift); DMD's re-noising is seeded with ``seed``.
        ``image_seq_len`` (the transformer's tokens) is for schedules that shift with it (LTX-Video's
        :class:`~mlx_i2v.families.ltx.variants.LTXSamplers`); Wan's do not."""
        n_train = self.num_train_timesteps
        if name == "dmd":
            table = PRESETS[preset].dmd_table if preset and PRESETS[preset].dmd_table else FASTWAN_TI2V_5B.table
            timesteps = tuple(np.asarray(sigmas, np.float64) * n_train)
            sampler = DMDScheduler(timesteps, shift=flow_shift, table=table, num_train_timesteps=n_train)
            sampler.set_timesteps(num_inference_steps, seed=seed)
            return sampler
        own = scheduler_from_config(self.config)
        sampler = own if _kind_of(own) == name else scheduler_by_name(name, flow_shift, n_train)
        grid = {} if sigmas is None else {"sigmas": list(sigmas)}
        sampler.set_timesteps(num_inference_steps, shift=flow_shift, **grid)
        return sampler


def _kind_of(scheduler: Any) -> str:
    return "unipc" if isinstance(scheduler, FlowUniPCMultistepScheduler) else "euler"
