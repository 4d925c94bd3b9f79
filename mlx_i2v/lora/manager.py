"""The LoRAs of a pipeline's transformer(s): validated up front, applied to each expert as it loads,
swapped on loaded experts by ``set_loras``.

Validation reads each file's header (and hashes the file) and matches it against the shapes of a transformer built lazily from
its config, so a bad LoRA fails before any model weight is read. The validated set keeps no tensors: each
time an expert loads, its files are read again (memory-mapped) and applied, so a non-resident expert (the
default staged loading releases it after each generation) picks up the current set at its next load, and
memory holds only the base model and, for quantized linears, the factors.

``set_loras`` on a loaded expert takes the old set off (:func:`~mlx_i2v.lora.apply.remove_loras`: quantized
modules unwrapped, merged parameters re-read from the expert's own checkpoint) and applies the new one;
an empty list therefore restores the base weights bit for bit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import mlx.core as mx
import mlx.nn as nn

from ..components import load_parameters
from ..errors import InvalidInputError
from ..quantize import selected_layers
from .apply import apply_loras, remove_loras
from .architectures import architecture_of
from .baked import apply_factors
from .formats import Ignored, LoraFile, LowRank, file_sha256, read_lora
from .resolve import Resolved, resolve
from .spec import EXPERT_INDEX, LoRA, as_loras

log = logging.getLogger(__name__)

COMPONENTS = ("transformer", "transformer_2")


@dataclass(frozen=True)
class ActiveLora:
    """A validated LoRA: the request, the file's identity, the experts it applies to and what each ignores."""

    spec: LoRA
    sha256: str
    stamp: tuple[int, int]  # (size, mtime_ns) when validated: a file changed since is refused
    experts: tuple[int, ...]
    ignored: Mapping[int, tuple[Ignored, ...]]

    def record(self) -> dict[str, Any]:
        """What the video's metadata (and a converted model's index) records."""
        return {"name": self.spec.name, "sha256": self.sha256, "strength": self.spec.strength,
                "expert": self.spec.expert, "policy": self.spec.policy}  # fmt: skip


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


class TransformerLoras:
    """LoRAs for one transformer (index 0) or Wan2.2-A14B's two experts (0 high-noise, 1 low-noise), of
    any architecture (:mod:`mlx_i2v.lora.architectures`, told from the config).

    Args:
        configs: each transformer's config.json.
        dtype: the compute dtype restored parameters are cast to; None where nothing is restored.
        folders: each transformer's checkpoint folder, to restore merged parameters from and to read the
            factors a converted model was saved with; None where neither is needed (a conversion).
        baked: the records of LoRAs already baked into a converted model (for metadata).
    """

    def __init__(
        self,
        configs: Sequence[Mapping[str, Any]],
        dtype: mx.Dtype | None = None,
        folders: Sequence[Path] | None = None,
        baked: Sequence[Mapping[str, Any]] = (),
    ):
        self.archs = [architecture_of(c) for c in configs]
        self.configs = [arch.config(c) for arch, c in zip(self.archs, configs)]
        self.dtype = dtype
        self.folders = list(folders) if folders is not None else None
        self.baked = [dict(b) for b in baked]
        self.active: list[ActiveLora] = []
        self._shapes: dict[int, dict[str, tuple[int, ...]]] = {}

    def validate(self, loras: Iterable[Any] | None) -> list[ActiveLora]:
        """Check every LoRA against the transformer(s) it targets, without loading any model.

        Raises:
            InvalidInputError: a bad spec, file, key or shape, or an expert on a one-transformer model.
        """
        active = []
        for spec in as_loras(loras):
            experts = self._experts(spec)
            ignored = {i: self._read(spec, i).ignored for i in experts}
            active.append(ActiveLora(spec, file_sha256(spec.path), _stamp(spec.path), experts, ignored))
        return active

    def set(self, loras: Iterable[Any] | None, loaded: Mapping[int, nn.Module]) -> None:
        """Replace the set: validate it all first (nothing changes on error), then take the old set off the
        ``loaded`` experts and apply the new one to them."""
        active = self.validate(loras)
        for index, model in loaded.items():
            remove_loras(model, self._restore(index))
        self.active = active
        for index, model in loaded.items():
            self.apply(index, model)

    def apply(self, index: int, model: nn.Module) -> nn.Module:
        """Apply the current set (after a converted model's baked factors) to the just-loaded expert
        ``index``; returns ``model``."""
        if self.folders is not None:
            apply_factors(model, self.folders[index])
        items: list[tuple[Resolved, float]] = []
        for a in self.active:
            if index in a.experts:
                if _stamp(a.spec.path) != a.stamp:
                    raise InvalidInputError(f"LoRA file {a.spec.path} changed since it was loaded; set it again")
                items.append((self._read(a.spec, index), a.spec.strength))
        if items:
            apply_loras(model, items)
        return model

    def factor_bytes(self, dtype: mx.Dtype, group_size: int) -> int:
        """Bytes the current set keeps beside a quantized expert (the largest over experts: one is loaded
        at a time): the run-time factors of every delta on a weight the quantization recipe selects at
        ``group_size``, in ``dtype``. Float models merge instead and keep nothing."""
        per_expert = [0] * len(self.configs)
        quantized: dict[int, set[str]] = {}  # per expert: the weights the recipe quantizes
        for a in self.active:
            for index in a.experts:
                if index not in quantized:
                    model = self.archs[index].build(self.configs[index])  # lazy: nothing is allocated
                    quantized[index] = {f"{p}.weight" for p in selected_layers(model, group_size)}
                for d in self._read(a.spec, index).deltas:
                    if d.target not in quantized[index]:
                        continue
                    size = d.down.size + d.up.size if isinstance(d, LowRank) else d.tensor.size
                    per_expert[index] += size * dtype.size
        return max(per_expert, default=0)

    def records(self) -> list[dict[str, Any]]:
        """Baked LoRAs (``"baked": "merged"`` or ``"factors"``), then the current set."""
        return self.baked + [a.record() for a in self.active]

    # --- internals ----------------------------------------------------------------------------------

    def _experts(self, spec: LoRA) -> tuple[int, ...]:
        if spec.expert is None:
            return tuple(range(len(self.configs)))
        if len(self.configs) < 2:
            raise InvalidInputError(
                f"{spec.name}: expert={spec.expert!r} (--lora-{spec.expert}) needs a two-expert model (Wan2.2-A14B); "
                "this one has a single transformer"
            )
        return (EXPERT_INDEX[spec.expert],)

    def _read(self, spec: LoRA, index: int) -> Resolved:
        """``spec``'s file read with expert ``index``'s name tables and resolved against its shapes."""
        return self._resolve(read_lora(spec.path, self.archs[index]), index, spec)

    def _resolve(self, lora: LoraFile, index: int, spec: LoRA) -> Resolved:
        if index not in self._shapes:
            self._shapes[index] = self.archs[index].shapes(self.configs[index])
        what = COMPONENTS[index] if len(self.configs) > 1 else "transformer"
        return resolve(lora, self._shapes[index], spec.policy, what=what)

    def _restore(self, index: int):
        if self.folders is None:
            raise RuntimeError("no checkpoint to restore merged parameters from")
        folder = self.folders[index]
        kind = self.archs[index].kind
        return lambda names: load_parameters(kind, folder, self.dtype, names)
