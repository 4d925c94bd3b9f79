"""Matching a LoRA file against one concrete transformer: what applies, what is ignored and why, or an error.

Strict accounting: every tensor of the file ends up in :attr:`Resolved.deltas` or in :attr:`Resolved.ignored`
with a reason. The only deltas ignored under the default "full" policy are those for an architecture's
optional branch on a transformer without one: Wan2.1's image branch (``k_img``/``v_img``, ``norm_k_img``,
``img_emb``) on Wan2.2-A14B and TI2V-5B, which Wan2.1-I2V LoRAs and LightX2V's Wan2.2 I2V LoRAs carry and
every tool skips there.
Anything else that does not fit (an unknown key, a shape from another model, a file that changes
nothing) is an :class:`~mlx_i2v.errors.InvalidInputError` naming the keys. The "diffusers" policy first
reduces the file to what diffusers 0.42.1 applies (:mod:`mlx_i2v.lora.diffusers_policy`).

Shapes come from a transformer built lazily from its config (no weights), so a LoRA is checked before
any weight is read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from ..errors import InvalidInputError
from .architectures import architecture_of_config
from .diffusers_policy import diffusers_deltas
from .formats import Delta, FullDelta, Ignored, LoraFile, LowRank, Unusable
from .spec import Policy

log = logging.getLogger(__name__)

Shapes = Mapping[str, tuple[int, ...]]


def transformer_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Every parameter's float shape (MLX layout) of a transformer with ``config`` (a Wan or LTX-Video
    config dataclass); builds the model lazily, so nothing is allocated even at 14B."""
    return architecture_of_config(config).shapes(config)


@dataclass(frozen=True)
class Resolved:
    """A LoRA file matched against one transformer.

    Attributes:
        file: the file (its tensors are lazy; applying reads them).
        deltas: what is applied, each target present with a fitting shape.
        ignored: what is deliberately not applied, with reasons.
    """

    file: LoraFile
    deltas: tuple[Delta, ...]
    ignored: tuple[Ignored, ...]

    @property
    def num_applied_keys(self) -> int:
        return sum(len(d.keys) for d in self.deltas)

    @property
    def num_ignored_keys(self) -> int:
        return sum(len(i.keys) for i in self.ignored)


def policy_deltas(lora: LoraFile, policy: Policy) -> tuple[list[Delta], list[Ignored]]:
    """What ``policy`` applies of a file, before the model is consulted, and what it ignores.

    Raises:
        InvalidInputError: "full": any unusable key (unknown, DoRA, a lone factor); "diffusers": see
            :func:`~mlx_i2v.lora.diffusers_policy.diffusers_deltas`.
    """
    if policy == "diffusers":
        return diffusers_deltas(lora)
    if lora.unusable:
        groups = _by_reason(lora.unusable)
        raise InvalidInputError(f"{lora.path}: " + "; ".join(f"{u.reason}: {_names(u.keys)}" for u in groups))
    return list(lora.deltas), []


def resolve(lora: LoraFile, shapes: Shapes, policy: Policy = "full", *, what: str = "transformer") -> Resolved:
    """Match ``lora`` against a transformer's parameter ``shapes`` (:func:`transformer_shapes`).

    Raises:
        InvalidInputError: unknown keys, DoRA, mis-shaped deltas, or nothing left to apply; under the
            "diffusers" policy also every case where diffusers 0.42.1 raises or would load nothing.
    """
    deltas, ignored = policy_deltas(lora, policy)

    applied: list[Delta] = []
    absent: list[str] = []
    unknown: list[str] = []
    misshaped: list[str] = []
    branch = lora.arch.optional_branch
    has_branch = branch is not None and any(branch.pattern.search(k) for k in shapes)
    for d in deltas:
        if d.target not in shapes:
            optional = branch is not None and not has_branch and branch.pattern.search(d.target)
            (absent if optional else unknown).extend(d.keys)
            continue
        problem = _shape_problem(d, shapes[d.target])
        if problem:
            misshaped.append(f"{d.keys[0]} ({problem})")
        else:
            applied.append(d)
    if unknown or misshaped:
        problems = [f"keys for parameters the {what} does not have: {_names(unknown)}"] * bool(unknown)
        problems += [f"shapes that do not fit the {what}: {_names(misshaped)}"] * bool(misshaped)
        raise InvalidInputError(f"{lora.path}: " + "; ".join(problems))
    if absent:
        ignored.append(Ignored(tuple(absent), f"the {what} {branch.reason}"))
        log.warning("%s: ignoring %d keys for %s the %s does not have", lora.name, len(absent), branch.name, what)
    if not applied:
        reasons = "; ".join(f"{i.reason} ({len(i.keys)} keys)" for i in ignored) or "it holds no deltas"
        raise InvalidInputError(f"{lora.path}: the LoRA changes nothing in the {what}: {reasons}")
    for i in ignored:
        log.info("%s: ignoring %d keys: %s", lora.name, len(i.keys), i.reason)
    return Resolved(lora, tuple(applied), tuple(ignored))


def _shape_problem(d: Delta, shape: tuple[int, ...]) -> str:
    if isinstance(d, FullDelta):
        return "" if tuple(d.tensor.shape) == shape else f"{tuple(d.tensor.shape)} != {shape}"
    assert isinstance(d, LowRank)
    if len(shape) != 2:
        return f"a low-rank pair on a {len(shape)}-D parameter"
    out, inp = shape
    got = (tuple(d.up.shape), tuple(d.down.shape))
    if d.up.shape[0] != out or d.down.shape[1] != inp or d.up.shape[1] != d.down.shape[0]:
        return f"up {got[0]} @ down {got[1]} does not make {shape}"
    return ""


def _by_reason(groups: Iterable[Unusable]) -> list[Ignored]:
    merged: dict[str, list[str]] = {}
    for g in groups:
        merged.setdefault(g.reason, []).extend(g.keys)
    return [Ignored(tuple(keys), reason) for reason, keys in merged.items()]


def _names(keys: Iterable[str], limit: int = 6) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
