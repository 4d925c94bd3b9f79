"""LoRA key names of every style, and how they map to our parameter names.

A key is ``<prefix><module>.<suffix>``:

* the prefix tells who wrote the file (lora.md §1.2): ``transformer.`` (diffusers/PEFT),
  ``diffusion_model.`` (original Wan names: Wan2.2-Lightning, LightX2V, diffusion-pipe), ``model.diffusion_model.``
  (ComfyUI), ``base_model.model.`` (PEFT internals), ``pipe.dit.`` (DiffSynth), ``lora_unet_`` (kohya/musubi,
  dots in module names written as ``_``), ``lora_unet__`` (VideoX-Fun), or none (bare ``blocks.``);
* the module is in the original Wan naming (``blocks.0.self_attn.q``) or in diffusers' (= ours,
  ``blocks.0.attn1.to_q``), decided once per file;
* the suffix is a low-rank factor (``lora_A``/``lora_down`` (rank, in), ``lora_B``/``lora_up`` (out, rank),
  optionally ``.default``), its ``alpha``, a PEFT ``lora_B.bias``, or one of LightX2V's full deltas
  (``diff`` on a weight, ``diff_b`` on a bias, ``diff_m`` on a block's or the head's modulation table).

Original names go through the transformer's own ``ORIGINAL_MAP`` and diffusers names through its
``DIFFUSERS_MAP``, the tables that load the checkpoints, so a delta lands exactly where the weight it
modifies was loaded, in the same MLX layout (the patch embedding's convolution re-laid out).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from ..models.wan.transformer import DIFFUSERS_MAP, ORIGINAL_MAP
from ..weights import Rule, Transform

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

# kohya/musubi module names: the original Wan module path with every '.' written as '_'.
KOHYA_MODULES: tuple[Rule, ...] = (
    Rule(r"blocks_(\d+)_(self_attn|cross_attn)_(q|k|v|o|k_img|v_img|norm_q|norm_k|norm_k_img)", r"blocks.\1.\2.\3"),
    Rule(r"blocks_(\d+)_ffn_([02])", r"blocks.\1.ffn.\2"),
    Rule(r"blocks_(\d+)_(norm3|modulation)", r"blocks.\1.\2"),
    Rule(r"blocks_(\d+)", r"blocks.\1"),
    Rule(r"(text_embedding|time_embedding)_([02])", r"\1.\2"),
    Rule(r"time_projection_1", "time_projection.1"),
    Rule(r"head_head", "head.head"),
    Rule(r"img_emb_proj_([0134])", r"img_emb.proj.\1"),
    Rule(r"patch_embedding", "patch_embedding"),
)

_ORIGINAL_HINT = re.compile(
    r"(^|\.)(self_attn|cross_attn|img_emb|text_embedding|time_embedding|time_projection|modulation|norm3)(\.|$)"
    r"|(^|\.)ffn\.[02]$|^head\.head$"
)
_DIFFUSERS_HINT = re.compile(r"(^|\.)(attn1|attn2|condition_embedder|proj_out|norm2)(\.|$)|\.ffn\.net\.")
# Parameters that are not a module's ``weight``: a ``.diff`` on them targets the name itself (ComfyUI writes
# ``blocks.N.modulation.diff``).
_BARE_PARAMETERS = ("modulation", "scale_shift_table", "emb_pos", "pos_embed")


@dataclass(frozen=True)
class Key:
    """One key of a LoRA file, split."""

    key: str
    style: str  # who writes this prefix (see PREFIXES), or "bare"
    module: str  # the module path, dots restored for kohya names; "" if the suffix is unknown
    suffix: str  # "down", "up", "alpha", "lora_bias", "diff", "diff_b", "diff_m", "dora", or "" (unknown)
    raw_suffix: str = ""  # as written, for reports ("lora_down.weight", ...)


def split_key(key: str) -> Key:
    """Strip the prefix, split off the suffix, restore a kohya module name's dots. An unknown suffix or
    kohya module leaves ``suffix`` or ``module`` empty."""
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
        module = next((t for rule in KOHYA_MODULES if (t := rule.match(module)) is not None), "")
    return Key(key, style, module, _SUFFIXES[m["suffix"]], m["suffix"])


def detect_naming(modules: list[str], forced: Naming | None = None) -> Naming | None:
    """The naming of a file's modules: "original" or "diffusers", None if they mix both. Modules that
    could be either (``patch_embedding``, ``blocks.N`` of a ``diff_m``) decide nothing; a file of only those
    reads as diffusers (the names are the same)."""
    if forced is not None:
        return forced
    original = any(_ORIGINAL_HINT.search(m) for m in modules)
    diffusers = any(_DIFFUSERS_HINT.search(m) for m in modules)
    if original and diffusers:
        return None
    return "original" if original else "diffusers"


def target_parameter(naming: Naming, parameter: str) -> tuple[str, Transform | None] | None:
    """Our parameter name for a source ``parameter`` name (``blocks.0.self_attn.q.weight``), and the
    re-layout its tensors need; None if the table has no rule for it."""
    table = ORIGINAL_MAP if naming == "original" else DIFFUSERS_MAP
    for rule in table.rules:
        target = rule.match(parameter)
        if target is not None:
            return target, rule.transform
    return None


def source_parameter(module: str, suffix: str) -> str:
    """The source parameter a suffix modifies: ``<module>.weight`` for the factors and ``diff`` (the
    module itself for a bare parameter such as ``modulation``), ``<module>.bias`` for ``diff_b`` and PEFT's
    ``lora_B.bias``, ``<module>.modulation`` for ``diff_m``."""
    if suffix == "diff_m":
        return f"{module}.modulation"
    if suffix in ("diff_b", "lora_bias"):
        return f"{module}.bias"
    if suffix == "diff" and module.rsplit(".", 1)[-1] in _BARE_PARAMETERS:
        return module
    return f"{module}.weight"
