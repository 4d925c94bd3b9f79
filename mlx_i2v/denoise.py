"""The denoising loop that every variant and every mode shares.

What differs between them enters as small strategies, so that there is one loop:

* the *sampler* (:mod:`mlx_i2v.schedulers`) advances the latents along its schedule;
* the *conditioning* (:mod:`mlx_i2v.conditioning`) builds each step's transformer input from the latents;
* the *experts* (:mod:`mlx_i2v.experts`) give the transformer for each timestep (two for Wan2.2-A14B);
* the *guidance* (:class:`Guidance`) decides which prompt branches a pass computes and combines their
  predictions into one velocity: the conditional branch alone, or classifier-free guidance's two;
* the *forward* (:class:`Forward`) runs the transformer on those branches; a step cache wraps it.

Latents are channels-last ``(1, T, h, w, C)`` float32, normalised with the VAE's statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence

import mlx.core as mx
import numpy as np

from .conditioning import Conditioning, ConditionState
from .experts import Experts

COND, UNCOND = "cond", "uncond"  # the prompt branches: the prompt, and the negative prompt


@dataclass(frozen=True)
class StepInfo:
    """Where the loop is. ``index`` counts from the start of the sampler's whole schedule (a restyle run
    starts partway through it); ``number`` counts the steps of this run from 1 to ``total``.
    ``expert_steps`` is the span ``[first, end)`` of schedule entries this run gives to the step's expert,
    and ``schedule_length`` the length of the sampler's whole schedule (what a step cache calibrated per
    step needs)."""

    index: int
    number: int
    total: int
    timestep: float
    sigma: float
    expert: int
    expert_steps: tuple[int, int]
    schedule_length: int


class Forward(Protocol):
    """One transformer pass over the rows of ``x``, one row per prompt branch in ``branches``."""

    def __call__(
        self, model: Any, x: mx.array, timestep: mx.array, context: list, branches: tuple[str, ...], step: StepInfo
    ) -> mx.array:
        """x (B, T, h, w, C_in) in the compute dtype, timestep (B,) or (B, tokens), context the
        cross-attention K/V of those rows -> velocity (B, T, h, w, C_out)."""
        ...


def plain_forward(
    model: Any, x: mx.array, timestep: mx.array, context: list, branches: tuple[str, ...], step: StepInfo
) -> mx.array:
    """The transformer as it is, every step."""
    return model(x, timestep, context=context)


class Guidance(Protocol):
    """How a guidance scale becomes transformer passes and one velocity."""

    def branches(self, scale: float) -> tuple[str, ...]:
        """The prompt branches this process computes at ``scale``, in batch order."""
        ...

    def combine(self, out: mx.array, scale: float) -> mx.array:
        """The guided velocity (1, ...) from the predictions of :meth:`branches` (rows in that order)."""
        ...


@dataclass(frozen=True)
class BatchedGuidance:
    """Classifier-free guidance in one process: above scale 1 the conditional and unconditional passes
    run as one batch of two, ``uncond + scale * (cond - uncond)``; at or below 1 the conditional pass
    alone (what guidance 1 computes, without the wasted pass)."""

    def branches(self, scale: float) -> tuple[str, ...]:
        return (COND, UNCOND) if scale > 1.0 else (COND,)

    def combine(self, out: mx.array, scale: float) -> mx.array:
        if out.shape[0] == 1:
            return out
        return out[1:] + scale * (out[:1] - out[1:])


StepObserver = Callable[[StepInfo, mx.array, mx.array], None]


@dataclass
class Denoiser:
    """Runs the sampler's schedule (or its tail) over initial latents.

    Args:
        experts: the transformer(s); which one runs is decided per timestep.
        conditioning: the variant's conditioning strategy.
        dtype: the transformer's compute dtype.
        guidance: how the scale becomes passes (default: batched classifier-free guidance).
        forward: how a pass runs (default: the plain transformer; a step cache wraps it).
    """

    experts: Experts
    conditioning: Conditioning
    dtype: mx.Dtype
    guidance: Guidance = BatchedGuidance()
    forward: Forward = plain_forward

    def branches_needed(self, scales: Sequence[float]) -> tuple[str, ...]:
        """Every prompt branch some expert's pass will compute (what the text encoder must encode)."""
        needed: list[str] = []
        for scale in scales:
            needed += [b for b in self.guidance.branches(scale) if b not in needed]
        return tuple(needed)

    def __call__(
        self,
        sampler: Any,
        latents: mx.array,
        state: ConditionState | None,
        text: Mapping[str, mx.array],
        image_tokens: mx.array | None,
        scales: Sequence[float],
        *,
        start: int = 0,
        observe: StepObserver | None = None,
    ) -> mx.array:
        """Denoise ``latents`` from schedule entry ``start`` to the end.

        Args:
            sampler: a scheduler whose ``set_timesteps`` has been called.
            latents: (1, T, h, w, C) float32, at the noise level of ``sampler.sigmas[start]``.
            state: what the conditioning prepared (None without an image).
            text: per branch, the (1, L, text_dim) prompt embeddings, or a tuple of arrays with one row
                (LTX-Video's :class:`~mlx_i2v.family.MaskedText`) (see :meth:`branches_needed`).
            image_tokens: (N, L_img, image_dim) CLIP tokens of one row, or None.
            scales: the guidance scale of each expert (one entry per expert).
            start: the first schedule entry to run (restyle starts partway).
            observe: called after each step with the step, the new latents and the predicted clean
                latents ``x0 = x_t - sigma * v`` (1, T, h, w, C); it may raise to stop the loop.

        Returns:
            The final latents (1, T, h, w, C) float32, after the conditioning's ``finalize``.
        """
        # Steps are counted from ``start``, not looked up by timestep: at high step counts the integer
        # timesteps repeat, so a timestep does not identify a step.
        sampler.set_begin_index(start)
        timesteps = np.asarray(sampler.timesteps)
        sigmas = np.asarray(sampler.sigmas)
        total = len(timesteps) - start
        experts = [self.experts.index_for(float(t)) for t in timesteps[start:]]
        spans = _expert_spans(experts, start)
        context: tuple[int, tuple[str, ...], list] | None = None  # (expert, branches, cross-attention K/V)
        latents = self.conditioning.start(latents, state)
        for number, index in enumerate(range(start, len(timesteps)), 1):
            t = timesteps[index]
            expert = experts[number - 1]
            model = self.experts.get(expert)
            scale = scales[expert]
            branches = self.guidance.branches(scale)
            if context is None or context[:2] != (expert, branches):
                # The text (and image) context and its cross-attention K/V, once per expert rather than per
                # step. Timesteps only decrease, so each expert runs one contiguous span: only the current
                # expert's K/V is kept, and the previous one's is dropped before this one's is built.
                context = None
                context = (expert, branches, self._context(model, text, image_tokens, branches))
            step = StepInfo(
                index, number, total, float(t), float(sigmas[index]), expert, spans[number - 1], len(timesteps)
            )
            x, timestep = self.conditioning.model_input(latents, state, float(t))
            rows = len(branches)
            x_rows = mx.broadcast_to(x, (rows, *x.shape[1:])).astype(self.dtype)
            t_rows = mx.broadcast_to(timestep, (rows, *timestep.shape[1:]))
            out = self.forward(model, x_rows, t_rows, context[2], branches, step).astype(mx.float32)
            velocity = self.guidance.combine(out, scale)
            x0 = latents - step.sigma * velocity
            latents = self.conditioning.step(sampler, velocity, t, latents, x, timestep, state)
            mx.eval(latents)
            if observe is not None:
                observe(step, latents, x0)
        return self.conditioning.finalize(latents, state)

    def _context(
        self, model: Any, text: Mapping[str, mx.array], image_tokens: mx.array | None, branches: tuple[str, ...]
    ) -> list:
        rows = stack_rows([text[b] for b in branches])
        # A tuple of text fields (LTX-Video's states and mask) is the model's embed_context arguments.
        args = tuple(rows) if isinstance(rows, tuple) else (rows,)
        if image_tokens is not None:
            args += (mx.concatenate([image_tokens] * len(branches), axis=0).astype(self.dtype),)
        kv = model.step_context(*args)
        mx.eval(kv)
        return kv


def take_rows(batch: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of a text batch: an array (B, ...) or a tuple of them (e.g.
    :class:`~mlx_i2v.family.MaskedText`), sliced alike."""
    if isinstance(batch, tuple):
        return type(batch)(*(field[start:stop] for field in batch))
    return batch[start:stop]


def stack_rows(rows: Sequence[Any]) -> Any:
    """Concatenate text rows (arrays, or tuples of arrays field by field) along the batch axis."""
    if isinstance(rows[0], tuple):
        return type(rows[0])(*(mx.concatenate(list(fields), axis=0) for fields in zip(*rows)))
    return mx.concatenate(list(rows), axis=0)


def _expert_spans(experts: list[int], start: int) -> list[tuple[int, int]]:
    """For each step of a run starting at schedule entry ``start``, the ``[first, end)`` entries of the
    contiguous run of steps its expert denoises."""
    spans: list[tuple[int, int]] = []
    first = 0
    for i in range(1, len(experts) + 1):
        if i == len(experts) or experts[i] != experts[first]:
            spans += [(start + first, start + i)] * (i - first)
            first = i
    return spans
