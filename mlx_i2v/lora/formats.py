"""Reading a LoRA file of any Wan or LTX-Video style into one canonical form keyed by our parameter names.

:func:`read_lora` turns every tensor of a file into a :class:`LowRank` pair (``up @ down`` added to a
linear's weight, times ``alpha / rank``), a :class:`FullDelta` (added to a parameter as it is), or an
:class:`Unusable` group of keys with the reason; it knows nothing of the model yet (that is
:mod:`mlx_i2v.lora.resolve`). Tensors are read lazily (safetensors are memory-mapped), so reading a file
to validate it costs its header, not its size.

Scale of a pair: ``alpha / rank`` with ``alpha`` from the pair's ``.alpha`` tensor (kohya, Wan2.2-Lightning),
or for diffusers/PEFT files from the safetensors metadata ``lora_adapter_metadata`` (``lora_alpha``,
``alpha_pattern``, ``r``, ``rank_pattern``, ``use_rslora``) as PEFT computes it; 1 when neither is given
(LightX2V folds it into the factors). A PEFT ``lora_B.bias`` is scaled like its pair, as PEFT does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import mlx.core as mx

from ..errors import InvalidInputError, WeightLoadError
from ..pth import read_pth
from .architectures import Architecture, guess_architecture
from .names import KOHYA_STYLES, Key, Naming, detect_naming, source_parameter, split_key, target_parameter

log = logging.getLogger(__name__)

SAFETENSORS = (".safetensors",)
PICKLES = (".pth", ".pt", ".ckpt", ".bin")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY


@dataclass(frozen=True)
class LowRank:
    """``W += strength * scale * up @ down`` on the linear weight ``target`` (out, in).

    Attributes:
        target: our parameter name, e.g. "blocks.0.attn1.to_q.weight".
        down: (rank, in) ``lora_A`` / ``lora_down``.
        up: (out, rank) ``lora_B`` / ``lora_up``.
        alpha: as the file gives it (None when it gives none).
        scale: ``alpha / rank`` (PEFT's ``alpha / sqrt(rank)`` with ``use_rslora``), 1 without an alpha.
        module: the file's module name (prefix stripped, e.g. "blocks.0.self_attn.q").
        keys: the file's keys this pair consumed.
    """

    target: str
    down: mx.array
    up: mx.array
    alpha: float | None
    scale: float
    module: str
    keys: tuple[str, ...]

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass(frozen=True)
class FullDelta:
    """``P += strength * tensor`` on the parameter ``target``; ``tensor`` is in its MLX layout.

    ``kind`` is the file's suffix: "diff" (a weight or a bare parameter), "diff_b" (a bias), "diff_m" (a
    modulation table) or "lora_bias" (PEFT's ``lora_B.bias``, its pair's scale folded in).
    """

    target: str
    tensor: mx.array
    kind: str
    module: str
    keys: tuple[str, ...]


Delta = LowRank | FullDelta


@dataclass(frozen=True)
class Unusable:
    """Keys the reader could not turn into a delta, and why. ``kind`` is "unknown" (names or suffixes it
    does not know, a lone factor) or "dora" (DoRA magnitudes, which diffusers drops and we do not support)."""

    keys: tuple[str, ...]
    reason: str
    kind: str = "unknown"


@dataclass(frozen=True)
class Ignored:
    """Keys deliberately left unapplied, and why (every such key is reported and logged)."""

    keys: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class Style:
    """How a file is written, for reports: prefixes (who wrote it), module naming, factor names, whether it
    has alphas, which full-delta suffixes it holds."""

    prefixes: tuple[str, ...]
    naming: Naming | None
    factors: tuple[str, ...]
    has_alpha: bool
    full_deltas: tuple[str, ...]
    peft_metadata: bool

    def describe(self) -> str:
        parts = ["/".join(self.prefixes)]
        if self.naming:
            parts.append(f"{self.naming} names")
        if self.factors:
            parts.append(" + ".join(self.factors) + (" + alpha" if self.has_alpha else ""))
        if self.peft_metadata:
            parts.append("PEFT metadata")
        if self.full_deltas:
            parts.append("full deltas (" + ", ".join(self.full_deltas) + ")")
        return ", ".join(parts)


@dataclass
class LoraFile:
    """Everything in one LoRA file, in canonical form.

    ``deltas`` and ``unusable`` together account for every tensor in the file (``num_tensors``).
    """

    path: Path
    style: Style
    deltas: list[Delta]
    unusable: list[Unusable]
    num_tensors: int
    keys: tuple[str, ...]  # every key of the file, as written
    arch: Architecture  # whose names the deltas' targets are
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (what the video's metadata records)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_tensors(path: str | Path) -> tuple[dict[str, mx.array], dict[str, str]]:
    """A LoRA file's tensors (lazily, for safetensors) and its safetensors metadata.

    Raises:
        InvalidInputError: no such file, or an extension that is neither safetensors nor a torch pickle.
        WeightLoadError: an unreadable or truncated file; UnsafeCheckpointError for a pickle that asks for
            anything besides tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"LoRA file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in PICKLES:
        return read_pth(path), {}
    if suffix not in SAFETENSORS:
        raise InvalidInputError(f"{path}: a LoRA must be .safetensors or a torch pickle ({', '.join(PICKLES)})")
    try:
        tensors, metadata = mx.load(str(path), return_metadata=True)
    except Exception as e:  # mlx raises RuntimeError/ValueError with a C++ message
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightLoadError(f"{path}: cannot read LoRA file (truncated or corrupt?): {msg}") from None
    return tensors, dict(metadata or {})


def read_lora(path: str | Path, arch: Architecture | None = None) -> LoraFile:
    """Read ``path`` into a :class:`LoraFile` (see the module docstring) for a transformer of ``arch``
    (its name tables); None guesses it from the file's module names
    (:func:`~mlx_i2v.lora.architectures.guess_architecture`).

    Raises:
        InvalidInputError: missing file, no tensors, a file mixing original and diffusers module names.
        WeightLoadError: unreadable file.
    """
    path = Path(path)
    tensors, metadata = read_tensors(path)
    if not tensors:
        raise InvalidInputError(f"{path}: the LoRA file holds no tensors")
    if arch is None:
        arch = guess_architecture([split_key(k).module for k in tensors])
    keys = [split_key(k, arch) for k in tensors]
    known = [k for k in keys if k.module and k.suffix]
    kohya = any(k.style in KOHYA_STYLES for k in known)  # kohya names are original names with '_' for '.'
    modules = [k.module for k in known if k.suffix != "diff_m"]
    naming = detect_naming(modules, "original" if kohya else None, arch)
    if naming is None:
        raise InvalidInputError(f"{path}: the LoRA mixes original {arch.name} and diffusers module names")
    peft = _peft_config(metadata, path)

    groups: dict[tuple[str, str], dict[str, Key]] = defaultdict(dict)
    unusable = [Unusable((k.key,), "unknown key name") for k in keys if not (k.module and k.suffix)]
    for k in known:
        if k.suffix == "dora":
            unusable.append(Unusable((k.key,), "DoRA magnitude (not supported)", "dora"))
            continue
        group = groups[(k.style, k.module)]
        if k.suffix in group:
            unusable.append(Unusable((k.key, group[k.suffix].key), "two keys for the same tensor"))
            continue
        group[k.suffix] = k

    deltas: list[Delta] = []
    for (style, module), group in groups.items():
        found, bad = _group_deltas(module, group, tensors, naming, peft if style == "diffusers" else None, arch)
        deltas += found
        unusable += bad
    _check_distinct_targets(deltas, path)
    return LoraFile(
        path=path,
        style=_style(keys, naming, peft is not None, deltas),
        deltas=deltas,
        unusable=unusable,
        num_tensors=len(tensors),
        keys=tuple(tensors),
        arch=arch,
        metadata=metadata,
    )


def _group_deltas(
    module: str,
    group: Mapping[str, Key],
    tensors: Mapping[str, mx.array],
    naming: Naming,
    peft: Mapping[str, Any] | None,
    arch: Architecture,
) -> tuple[list[Delta], list[Unusable]]:
    """The deltas of one module's keys (a pair and its alpha, PEFT bias, full deltas)."""
    deltas: list[Delta] = []
    unusable: list[Unusable] = []

    def target(suffix: str, keys: tuple[str, ...]) -> tuple[str, Any] | None:
        table = "original" if suffix == "diff_m" else naming  # diff_m is LightX2V's, in original names
        mapped = target_parameter(table, source_parameter(module, suffix, arch), arch)
        if mapped is None:
            unusable.append(Unusable(keys, f"no {naming} {arch.name} module {module!r}"))
        return mapped

    pair = [group[s] for s in ("down", "up", "alpha") if s in group]
    scale = 1.0
    if "down" in group and "up" in group:
        mapped = target("down", tuple(k.key for k in pair))
        if mapped is not None:
            down, up = tensors[group["down"].key], tensors[group["up"].key]
            alpha = float(tensors[group["alpha"].key].item()) if "alpha" in group else None
            scale, problem = _scale(mapped[0].removesuffix(".weight"), int(down.shape[0]), alpha, peft)
            if problem or mapped[1] is not None or down.ndim != 2 or up.ndim != 2:
                why = problem or "a low-rank pair must be two matrices on a linear layer's weight"
                unusable.append(Unusable(tuple(k.key for k in pair), why))
            else:
                alpha = alpha if peft is None else _peft_alpha(mapped[0].removesuffix(".weight"), peft)
                deltas.append(LowRank(mapped[0], down, up, alpha, scale, module, tuple(k.key for k in pair)))
    elif pair:
        unusable.append(Unusable(tuple(k.key for k in pair), "a LoRA factor without its partner"))

    for suffix in ("lora_bias", "diff", "diff_b", "diff_m"):
        if suffix not in group:
            continue
        mapped = target(suffix, (group[suffix].key,))
        if mapped is not None:
            name, transform = mapped
            tensor = tensors[group[suffix].key]
            tensor = transform(tensor) if transform is not None else tensor
            if suffix == "lora_bias":
                tensor = tensor * scale  # PEFT adds scaling * lora_B.bias
            deltas.append(FullDelta(name, tensor, suffix, module, (group[suffix].key,)))
    return deltas, unusable


def _check_distinct_targets(deltas: list[Delta], path: Path) -> None:
    """Two entries of the same kind on one parameter (``blocks.0.diff_m`` and ``blocks.0.modulation.diff``,
    say) mean the file is ambiguous."""
    seen: dict[tuple[str, type], tuple[str, ...]] = {}
    for d in deltas:
        slot = (d.target, type(d))
        if slot in seen:
            raise InvalidInputError(f"{path}: keys {seen[slot][0]} and {d.keys[0]} both target {d.target}")
        seen[slot] = d.keys


def _style(keys: list[Key], naming: Naming, peft: bool, deltas: list[Delta]) -> Style:
    raw = {k.raw_suffix.split(".")[0] for k in keys if k.suffix in ("down", "up")}
    factors = tuple(f for f in ("lora_A", "lora_B", "lora_down", "lora_up") if f in raw)
    full = sorted({d.kind for d in deltas if isinstance(d, FullDelta) and d.kind != "lora_bias"})
    return Style(
        prefixes=tuple(sorted({k.style for k in keys})),
        naming=naming,
        factors=factors,
        has_alpha=any(k.suffix == "alpha" for k in keys),
        full_deltas=tuple(full),
        peft_metadata=peft,
    )


# --- PEFT metadata ---------------------------------------------------------------------------------


def _peft_config(metadata: Mapping[str, str], path: Path) -> dict[str, Any] | None:
    """The transformer's ``LoraConfig`` entries from ``lora_adapter_metadata`` (keys ``transformer.r``,
    ``transformer.lora_alpha``, ...), None if the file has none."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise InvalidInputError(f"{path}: unreadable {METADATA_KEY}: {e}") from None
    config = {k.removeprefix("transformer."): v for k, v in data.items() if k.startswith("transformer.")}
    if config.get("use_dora"):
        raise InvalidInputError(f"{path}: DoRA LoRAs (use_dora in {METADATA_KEY}) are not supported")
    return config or None


def _pattern_value(patterns: Mapping[str, Any], module: str) -> Any | None:
    """PEFT's ``get_pattern_key``: the first pattern whose regex matches the end of the module name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return None


def _peft_alpha(module: str, peft: Mapping[str, Any]) -> float:
    alpha = _pattern_value(peft.get("alpha_pattern") or {}, module)
    return float(peft.get("lora_alpha", 8) if alpha is None else alpha)


def _scale(module: str, rank: int, alpha: float | None, peft: Mapping[str, Any] | None) -> tuple[float, str]:
    """(scale, problem) of a pair: ``alpha / rank``; with PEFT metadata the module's ``r`` must be the
    factors' rank (PEFT refuses the file otherwise)."""
    if peft is None:
        return (1.0 if alpha is None else alpha / rank), ""
    r = _pattern_value(peft.get("rank_pattern") or {}, module)
    r = int(peft.get("r", 8) if r is None else r)
    if r != rank:
        return 1.0, f"rank {rank} but r={r} in {METADATA_KEY}"
    alpha = _peft_alpha(module, peft)
    return (alpha / math.sqrt(r) if peft.get("use_rslora") else alpha / r), ""
