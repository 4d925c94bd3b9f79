"""The LoRA options shared by ``generate`` and ``convert``, and ``info --lora``'s report."""

from __future__ import annotations

from typing import Any, Callable

import click

from mlx_i2v.lora.spec import LoRA, parse_lora_argument

_HELP = {
    "--lora": "LoRA file (.safetensors/.pth) and strength, FILE[:STRENGTH] (default 1; may be negative); repeatable. "
    "On Wan2.2-A14B it applies to both experts.",
    "--lora-high": "A LoRA for Wan2.2-A14B's high-noise expert only, FILE[:STRENGTH]; repeatable.",
    "--lora-low": "A LoRA for Wan2.2-A14B's low-noise expert only, FILE[:STRENGTH]; repeatable.",
}


def lora_options(command: Callable) -> Callable:
    """Add --lora, --lora-high and --lora-low (each repeatable) to a click command."""
    for flag in reversed(_HELP):
        command = click.option(flag, flag.lstrip("-").replace("-", "_"), multiple=True, metavar="FILE[:S]",
                               help=_HELP[flag])(command)  # fmt: skip
    return command


def collect_loras(lora: tuple[str, ...], lora_high: tuple[str, ...], lora_low: tuple[str, ...]) -> list[LoRA]:
    """The LoRAs the three options ask for, in that order."""
    flags = ((lora, None), (lora_high, "high"), (lora_low, "low"))
    return [parse_lora_argument(text, expert) for texts, expert in flags for text in texts]


def lora_summary(data: dict[str, Any]) -> list[str]:
    """Lines of ``mlx-i2v info --lora`` from :func:`mlx_i2v.lora.info.lora_info`'s result."""
    lines = [
        f"lora:         {data['path']}",
        f"format:       {data['format']}",
        f"tensors:      {data['tensors']} ({data['low_rank_pairs']} low-rank pairs, {data['full_deltas']} full deltas)",
        f"rank:         {_values(data['ranks'])}",
        f"alpha:        {_values(data['alphas']) if data['alphas'] else 'none (scale 1)'}",
        f"sha256:       {data['sha256']}",
        "targets:",
    ]
    lines += [f"  {t['layers']:<52} x{t['count']:<4} {t['kind']}" for t in data["targets"]]
    for name, part in data.get("model", {}).items():
        lines.append(f"on {name}: {part['applied']} tensors applied, {part['ignored']} ignored")
        lines += [f"  ignored {len(i['keys'])}: {i['reason']}" for i in part["ignored_reasons"]]
    return lines


def _values(values: list) -> str:
    return ", ".join(f"{v:g}" for v in values)
