"""``mlx-i2v info --lora FILE [--model M]``: what a LoRA file holds and what it would do to a model."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError
from ..weights import read_config
from .formats import Delta, LowRank, file_sha256, read_lora
from .manager import COMPONENTS, TransformerLoras
from .resolve import policy_deltas
from .spec import POLICIES, LoRA, Policy



def lora_info(path: str | Path, model: str | Path | None = None, policy: Policy = "full") -> dict[str, Any]:
    """Describe a LoRA file: its format, ranks, alphas and the layers it targets (our names, blocks folded
    into ``blocks.N`` / ``transformer_blocks.N``); with a local ``model`` directory, what would be applied
    to and ignored by each of its transformers under ``policy``.

    Returns:
        ``{"path", "format", "tensors", "low_rank_pairs", "full_deltas", "ranks", "alphas", "sha256",
        "targets": [{"layers", "count", "kind"}], "ignored_reasons", "model": {component: {"applied",
        "ignored", "ignored_reasons"}}}``.

    Raises:
        InvalidInputError: an unusable file (unknown keys, DoRA, ...) or one that does not fit the model;
            the message names the keys.
    """
    if policy not in POLICIES:
        raise InvalidInputError(f"LoRA policy must be one of {POLICIES}, got {policy!r}")
    lora = read_lora(path)
    deltas, ignored = policy_deltas(lora, policy)
    pairs = [d for d in deltas if isinstance(d, LowRank)]
    data: dict[str, Any] = {
        "path": str(lora.path),
        "format": lora.style.describe(),
        "tensors": lora.num_tensors,
        "low_rank_pairs": len(pairs),
        "full_deltas": len(deltas) - len(pairs),
        "ranks": sorted({d.rank for d in pairs}),
        "alphas": sorted({d.alpha for d in pairs if d.alpha is not None}),
        "sha256": file_sha256(lora.path),
        "targets": _targets(deltas, lora.arch.block),
        "ignored_reasons": [{"reason": i.reason, "keys": list(i.keys)} for i in ignored],
    }
    if model is not None:
        data["model"] = _on_model(Path(model), LoRA(path, policy=policy), lora.num_tensors)
    return data


def _targets(deltas: list[Delta], block: re.Pattern[str]) -> list[dict[str, Any]]:
    def folded(target: str) -> str:  # "blocks.7.attn1.to_q.weight" -> "blocks.N.attn1.to_q.weight"
        m = block.match(target)
        return target if m is None else re.sub(r"\d+$", "N", m[1]) + target[m.end(1) :]

    counts = Counter((folded(d.target), "low-rank" if isinstance(d, LowRank) else d.kind) for d in deltas)
    return [{"layers": layers, "count": n, "kind": kind} for (layers, kind), n in sorted(counts.items())]


def _on_model(model: Path, spec: LoRA, num_tensors: int) -> dict[str, Any]:
    folders = [model / c for c in COMPONENTS if (model / c / "config.json").is_file()]
    if not folders:
        raise InvalidInputError(f"{model}: no transformer/config.json (a diffusers or converted model directory)")
    state = TransformerLoras([read_config(f) for f in folders])
    active = state.validate([spec])[0]
    out = {}
    for index, folder in enumerate(folders):
        ignored = active.ignored[index]
        n_ignored = sum(len(i.keys) for i in ignored)
        out[folder.name] = {
            "applied": num_tensors - n_ignored,  # strict accounting: every tensor is applied or ignored
            "ignored": n_ignored,
            "ignored_reasons": [{"reason": i.reason, "keys": list(i.keys)} for i in ignored],
        }
    return out
