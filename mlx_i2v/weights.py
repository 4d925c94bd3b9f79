"""Declarative, strict weight maps and the loader that applies them.

A :class:`WeightMap` is an ordered table of :class:`Rule` rows, one table per source layout, kept beside
the model it describes (``models/wan/transformer.py`` has ``DIFFUSERS_MAP``, and so on). Each source
tensor must be claimed by exactly one rule (the first whose regex matches the whole key) or by an
``ignore`` pattern; each model parameter must be filled exactly once with the right shape. Anything else
is a :class:`~mlx_i2v.errors.WeightLoadError` that names the offending keys.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import WeightLoadError

log = logging.getLogger(__name__)

Transform = Callable[[mx.array], mx.array]


# --- layout transforms (PyTorch channels-first -> MLX channels-last) -------------------------------


def conv_weight(w: mx.array) -> mx.array:
    """PyTorch conv weight (O, I, *kernel) -> MLX (O, *kernel, I); works for 1D, 2D and 3D."""
    return mx.moveaxis(w, 1, -1)


def flatten(w: mx.array) -> mx.array:
    """Squeeze broadcast-shaped parameters such as the VAE's RMS gamma (C, 1, 1[, 1]) -> (C,)."""
    return w.reshape(-1)


# --- the table --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """Map source keys matching ``source`` (a full-match regex) to ``target`` (an ``re`` template).

    ``transform`` re-lays the tensor out (e.g. :func:`conv_weight`); None keeps it as it is.
    """

    source: str
    target: str = r"\g<0>"
    transform: Transform | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "_regex", re.compile(self.source))

    def match(self, key: str) -> str | None:
        m = self._regex.fullmatch(key)  # type: ignore[attr-defined]
        return m.expand(self.target) if m else None


@dataclass(frozen=True)
class WeightMap:
    """An ordered rule table for one source layout, plus the source keys deliberately left unused
    (full-match regexes, checked before the rules)."""

    name: str
    rules: tuple[Rule, ...]
    ignore: tuple[str, ...] = ()

    def apply(self, tensors: Mapping[str, mx.array]) -> dict[str, mx.array]:
        """Rename and re-lay out every source tensor; raise if one is claimed by no rule.

        Returns a dict keyed by model parameter names (dotted, as ``tree_flatten`` spells them).
        """
        ignore = [re.compile(p) for p in self.ignore]
        out: dict[str, mx.array] = {}
        unclaimed: list[str] = []
        duplicates: list[str] = []
        for key, value in tensors.items():
            # Declared ignores win over catch-all rules such as IDENTITY.
            if any(p.fullmatch(key) for p in ignore):
                log.debug("%s: ignoring %s", self.name, key)
                continue
            for rule in self.rules:
                target = rule.match(key)
                if target is not None:
                    if target in out:
                        duplicates.append(target)
                    out[target] = rule.transform(value) if rule.transform else value
                    break
            else:
                unclaimed.append(key)
        if unclaimed:
            raise WeightLoadError(f"{self.name}: {_describe(unclaimed)} not used by any rule")
        if duplicates:
            raise WeightLoadError(f"{self.name}: several source tensors map to {_describe(duplicates)}")
        return out


IDENTITY = Rule(r".*")


def _describe(keys: Iterable[str], limit: int = 6) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)} tensor{'s' if len(keys) != 1 else ''} ({shown}{more})"


# --- strict loading ---------------------------------------------------------------------------------


def load_strict(
    model: nn.Module,
    weights: Mapping[str, mx.array],
    *,
    dtype: mx.Dtype,
    keep_float32: Iterable[str] = (),
    what: str = "model",
    evaluate: bool = True,
) -> None:
    """Fill every parameter of ``model`` from ``weights`` (already mapped to parameter names).

    Floating tensors are cast to ``dtype`` except those whose name matches a ``keep_float32`` regex
    (search semantics), which stay float32 as the reference keeps them. Missing, unexpected and
    mis-shaped tensors raise :class:`WeightLoadError` naming them. Quantized models are supported: the
    expected names come from the model itself, so ``scales``/``biases`` must be present. With
    ``evaluate=False`` the parameters stay lazy (``mx.load`` reads a tensor only when it is evaluated).
    """
    expected = dict(tree_flatten(model.parameters()))
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    misshaped = [
        f"{k} {tuple(weights[k].shape)} != {tuple(expected[k].shape)}"
        for k in expected
        if k in weights and tuple(weights[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected {_describe(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped {_describe(misshaped)}")
    if problems:
        raise WeightLoadError(f"{what}: " + "; ".join(problems))
    keep = [re.compile(p) for p in keep_float32]
    cast = [(k, cast_loaded(k, v, dtype, keep) if expected[k].dtype != mx.uint32 else v) for k, v in weights.items()]
    model.load_weights(cast, strict=True)
    if evaluate:
        mx.eval(model.parameters())


def cast_loaded(name: str, value: mx.array, dtype: mx.Dtype, keep_float32: Iterable[re.Pattern[str]]) -> mx.array:
    """A loaded floating tensor in ``dtype``, or float32 if ``name`` matches a ``keep_float32`` pattern
    (search semantics); other tensors as they are. The one cast every load goes through."""
    if not mx.issubdtype(value.dtype, mx.floating):
        return value
    return value.astype(mx.float32 if any(p.search(name) for p in keep_float32) else dtype)


# --- reading checkpoints ----------------------------------------------------------------------------


def _safetensors_files(folder: Path, what: str) -> list[Path]:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise WeightLoadError(f"{what}: unreadable index {indexes[0].name}: {e}") from None
        files = sorted({folder / f for f in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightLoadError(f"{what}: no .safetensors weights in {folder}")
    for f in files:
        if not f.is_file():
            raise WeightLoadError(f"{what}: shard {f.name} listed in the index is missing")
    return files


# The safetensors format's own limit on the JSON header (its Rust reader refuses larger ones).
MAX_HEADER_BYTES = 100 * 1024**2


def safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """The length and parsed JSON of a safetensors file's header (tensor offsets and ``__metadata__``),
    without reading any tensor data.

    Raises:
        WeightLoadError: the file is too short, or its header length is absurd (beyond the file or the
            format's 100 MB limit) or not a JSON object; named, as "corrupt safetensors header".
        OSError: the file cannot be opened.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise WeightLoadError(f"corrupt safetensors header in {path}: the file has only {size} bytes")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise WeightLoadError(
                f"corrupt safetensors header in {path}: it claims {header_len} bytes, the file has {size}"
            )
        try:
            header = json.loads(fh.read(header_len))
        except ValueError as e:
            raise WeightLoadError(f"corrupt safetensors header in {path}: {e}") from None
    if not isinstance(header, dict):
        raise WeightLoadError(f"corrupt safetensors header in {path}: not a JSON object")
    return header_len, header


def check_safetensors(folder: str | Path, *, what: str | None = None) -> None:
    """Cheaply check that a component's weights are all there: every file exists and is as long as its
    header says (a truncated download fails here, at load time, instead of mid-generation). Reads only
    the headers."""
    folder = Path(folder)
    what = what or folder.name
    for f in _safetensors_files(folder, what):
        try:
            header_len, header = safetensors_header(f)
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except WeightLoadError as e:
            raise WeightLoadError(f"{what}: {e}") from None
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            raise WeightLoadError(f"{what}: cannot read {f.name} (truncated or corrupt?): {e}") from None
        if f.stat().st_size < 8 + header_len + end:
            raise WeightLoadError(f"{what}: {f.name} is truncated ({f.stat().st_size} of {8 + header_len + end} bytes)")


def read_safetensors(folder: str | Path, *, what: str | None = None) -> dict[str, mx.array]:
    """Read every tensor of a component folder: a sharded checkpoint through its
    ``*.safetensors.index.json``, otherwise all ``*.safetensors`` files in it.

    Truncated or unreadable files raise :class:`WeightLoadError` naming the file.
    """
    folder = Path(folder)
    what = what or folder.name
    tensors: dict[str, mx.array] = {}
    for f in _safetensors_files(folder, what):
        try:
            tensors.update(mx.load(str(f)))
        except Exception as e:  # mlx raises RuntimeError/ValueError with a C++ message
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise WeightLoadError(f"{what}: cannot read {f.name} (truncated or corrupt?): {msg}") from None
    return tensors


C = TypeVar("C")


def read_config(folder: str | Path, filename: str = "config.json") -> dict[str, Any]:
    """Read a component's JSON config, raising :class:`WeightLoadError` if absent or malformed."""
    path = Path(folder) / filename
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightLoadError(f"missing {path}") from None
    except (OSError, ValueError) as e:
        raise WeightLoadError(f"unreadable {path}: {e}") from None


def config_from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
    """Build a config dataclass from a checkpoint's ``config.json``, ignoring fields it does not model
    (``_class_name``, ``_diffusers_version``, ...). Lists become tuples for hashable, frozen configs."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
    return cls(**kwargs)
