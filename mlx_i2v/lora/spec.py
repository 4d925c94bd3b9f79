"""What the user asks for: a LoRA file, its strength, the expert it goes to and how its keys are read."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

from ..errors import InvalidInputError

Expert = Literal["high", "low"]
Policy = Literal["full", "diffusers"]
EXPERTS: tuple[str, ...] = ("high", "low")
POLICIES: tuple[str, ...] = ("full", "diffusers")
EXPERT_INDEX = {"high": 0, "low": 1}  # Experts index 0 = transformer (high noise), 1 = transformer_2 (low)


@dataclass(frozen=True)
class LoRA:
    """One LoRA to apply.

    Attributes:
        path: a ``.safetensors`` file, or a ``.pth`` / ``.pt`` / ``.ckpt`` / ``.bin`` pickle (read by the
            restricted unpickler of :mod:`mlx_i2v.pth`).
        strength: multiplies the file's deltas; any finite number, negative included.
        expert: Wan2.2-A14B only: "high" (``transformer``, timesteps >= the boundary) or "low"
            (``transformer_2``); None applies it to both experts, or to the only transformer.
        policy: "full" applies every delta in the file (what LightX2V and ComfyUI/kijai, who write these
            files, do); "diffusers" reproduces diffusers 0.42.1's ``load_lora_weights``, which drops the
            modulation (``diff_m``), norm and patch-embedding deltas and raises where it raises.
    """

    path: str | Path
    strength: float = 1.0
    expert: Expert | None = None
    policy: Policy = "full"

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, Path)) or not str(self.path):
            raise InvalidInputError(f"a LoRA path must be a file name, got {self.path!r}")
        object.__setattr__(self, "path", Path(self.path).expanduser())
        strength = self.strength
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
            raise InvalidInputError(f"LoRA strength must be a finite number, got {strength!r} for {self.path}")
        object.__setattr__(self, "strength", float(strength))
        if self.expert is not None and self.expert not in EXPERTS:
            raise InvalidInputError(f"LoRA expert must be 'high', 'low' or None, got {self.expert!r}")
        if self.policy not in POLICIES:
            raise InvalidInputError(f"LoRA policy must be one of {POLICIES}, got {self.policy!r}")

    @property
    def name(self) -> str:
        return Path(self.path).name


def as_lora(spec: Any) -> LoRA:
    """A :class:`LoRA` from a ``LoRA``, a path (strength 1), ``(path, strength)`` or
    ``(path, strength, expert)``.

    Raises:
        InvalidInputError: anything else, or bad values.
    """
    if isinstance(spec, LoRA):
        return spec
    if isinstance(spec, (str, Path)):
        return LoRA(spec)
    if isinstance(spec, (tuple, list)) and len(spec) in (2, 3):
        return LoRA(*spec)
    raise InvalidInputError(f"a LoRA is LoRA(...), a path, (path, strength) or (path, strength, expert); got {spec!r}")


def as_loras(specs: Iterable[Any] | None) -> list[LoRA]:
    """:func:`as_lora` over a list (None is no LoRAs)."""
    if specs is None:
        return []
    if isinstance(specs, (str, Path, LoRA)):
        raise InvalidInputError("loras must be a list, e.g. loras=[('file.safetensors', 1.0)]")
    return [as_lora(s) for s in specs]


def parse_lora_argument(text: str, expert: Expert | None = None, policy: Policy = "full") -> LoRA:
    """``FILE[:STRENGTH]`` as the CLI takes it. Paths may contain ':' themselves: the strength is the part
    after the last ':' only if it reads as a number (``a:b.safetensors`` is a path, ``a.safetensors:-0.5``
    a path at strength -0.5).

    Raises:
        InvalidInputError: an empty file name, or a strength that is not finite.
    """
    path, strength = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep:
        try:
            strength = float(tail)
            path = head
        except ValueError:
            pass
    if not path:
        raise InvalidInputError(f"--lora {text!r}: no file name")
    return LoRA(path, strength, expert, policy)
