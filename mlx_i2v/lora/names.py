"""LoRA key names of every style, and how they map to our parameter names.

A key is ``<prefix><module>.<suffix>``:

* the prefix tells who wrote the file (lora.md §1.2): ``transformer.`` (diffusers/PEFT),
  ``diffusion_model.`` (original Wan names: Wan2.2-Lightning, LightX2V, diffusion-pipe), ``model.diffusion_model.``
  (ComfyUI), ``base_model.model.`` (PEFT internals), ``pipe.dit.`` (DiffSynth), ``lora_unet_`` (kohya/musubi,
  dots in module names written as ``_``), ``lora_unet__`` (VideoX-Fun), or none (bare ``blocks.``);
* the module is in the transformer's original naming (Wan: ``blocks.0.self_attn.q``; LTX-Video:
  ``patchify_proj``, ``adaln_single.linear``) or in diffusers' (= ours, ``blocks.0.attn1.to_q``,
  ``proj_in``), decided once per file;
* the suffix is a low-rank factor (``lora_A``/``lora_down`` (rank, in), ``lora_B``/``lora_up`` (out, rank),
  optionally ``.default``), its ``alpha``, a PEFT ``lora_B.bias``, or one of LightX2V's full deltas
  (``diff`` on a weight, ``diff_b`` on a bias, ``diff_m`` on a block's or the head's modulation table).

Original names go through the transformer's own ``ORIGINAL_MAP`` and diffusers names through its
``DIFFUSERS_MAP``, the tables that load the checkpoints, so a delta lands exactly where the weight it
modifies was loaded, in the same MLX layout (the patch embedding's convolution re-laid out). Which
transformer's tables, hints and kohya names apply is an :class:`~mlx_i2v.lora.architectures.Architecture`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from ..weights import Transform
from .architectures import WAN, Architecture

Naming = Literal["original", "diffusers"]

# (prefix, who writes it), longest first where one prefix contains another.
PREFIXES: tuple[tuple[str, str], ...] = (
    ("transformer.", "diffusers"),
    ("model.diffusion_model.", "comfyui"),
    ("diffusion_model.", "wan"),
    ("base_model.model.", "peft"),
    ("pipe.dit.", "diffsynth"),
    ("lora_unet__", "wan-fun"),
    ("lora_unet_", "kohya"),
)
BARE = "bare"
KOHYA_STYLES = ("kohya", "wan-fun")

_SUFFIXES = {
    "lora_A.weight": "down", "lora_down.weight": "down", "lora_A.default.weight": "down",
    "lora_B.weight": "up", "lora_up.weight": "up", "lora_B.default.weight": "up",
    "lora_B.bias": "lora_bias", "lora_B.default.bias": "lora_bias",
    "alpha": "alpha", "diff": "diff", "diff_b": "diff_b", "diff_m": "diff_m",
    "dora_scale": "dora", "lora_magnitude_vector": "dora", "lora_magnitude_vector.default.weight": "dora",
}  # fmt: skip
_KEY = re.compile(r"(?P<module>.+?)\.(?P<suffix>" + "|".join(re.escape(s) for s in _SUFFIXES) + ")")

@dataclass(frozen=True)
class Key:
    """One key of a LoRA file, split."""

    key: str
    style: str  # who writes this prefix (see PREFIXES), or "bare"
    module: str  # the module path, dots restored for kohya names; "" if the suffix is unknown
    suffix: str  # "down", "up", "alpha", "lora_bias", "diff", "diff_b", "diff_m", "dora", or "" (unknown)
    raw_suffix: str = ""  # as written, for reports ("lora_down.weight", ...)


def split_key(key: str, arch: Architecture = WAN) -> Key:
    """Strip the prefix, split off the suffix, restore a kohya module name's dots (by ``arch``'s kohya
    names). An unknown suffix or kohya module leaves ``suffix`` or ``module`` empty."""
    style, rest = BARE, key
    for prefix, who in PREFIXES:
        if key.startswith(prefix):
            style, rest = who, key[len(prefix) :]
            break
    m = _KEY.fullmatch(rest)
    if m is None:
        return Key(key, style, "", "")
    module = m["module"]
    if style in KOHYA_STYLES:
        module = next((t for rule in arch.kohya_modules if (t := rule.match(module)) is not None), "")
    return Key(key, style, module, _SUFFIXES[m["suffix"]], m["suffix"])


def detect_naming(modules: list[str], forced: Naming | None = None, arch: Architecture = WAN) -> Naming | None:
    """The naming of a file's modules: "original" or "diffusers", None if they mix both. Modules that
    could be either (``patch_embedding``, ``blocks.N`` of a ``diff_m``, LTX-Video's block linears) decide
    nothing; a file of only those reads as diffusers (the names are the same)."""
    if forced is not None:
        return forced
    original = any(arch.original_hint.search(m) for m in modules)
    diffusers = any(arch.diffusers_hint.search(m) for m in modules)
    if original and diffusers:
        return None
    return "original" if original else "diffusers"


def target_parameter(
    naming: Naming, parameter: str, arch: Architecture = WAN
) -> tuple[str, Transform | None] | None:
    """Our parameter name for a source ``parameter`` name (``blocks.0.self_attn.q.weight``), and the
    re-layout its tensors need; None if ``arch``'s table has no rule for it."""
    table = arch.original_map if naming == "original" else arch.diffusers_map
    for rule in table.rules:
        target = rule.match(parameter)
        if target is not None:
            return target, rule.transform
    return None


def source_parameter(module: str, suffix: str, arch: Architecture = WAN) -> str:
    """The source parameter a suffix modifies: ``<module>.weight`` for the factors and ``diff`` (the
    module itself for a bare parameter such as ``modulation``), ``<module>.bias`` for ``diff_b`` and PEFT's
    ``lora_B.bias``, ``<module>.modulation`` for ``diff_m``."""
    if suffix == "diff_m":
        return f"{module}.modulation"
    if suffix in ("diff_b", "lora_bias"):
        return f"{module}.bias"
    if suffix == "diff" and module.rsplit(".", 1)[-1] in arch.bare_parameters:
        return module
    return f"{module}.weight"
