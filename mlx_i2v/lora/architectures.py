"""What reading and applying a LoRA needs to know of a transformer architecture, as data.

A LoRA key names a module of the transformer it was trained on, in that model's original naming or in
diffusers' (:mod:`mlx_i2v.lora.names`). Everything that differs between the Wan and LTX-Video transformers
is one :class:`Architecture` row: the weight maps that load its checkpoints (so a delta lands where the
weight it modifies was loaded, in the same layout), the module names that tell the two namings apart,
kohya's module renames, the parameters that are not a module's ``weight``, a branch a LoRA may carry that
some models of the family lack, and the component type that builds it (for its shapes, quantized layers
and restoring merged parameters). The architecture of a transformer is read from its config.json
(``_class_name``), or from the config class of a built one.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Mapping

import mlx.nn as nn
from mlx.utils import tree_flatten

from ..components import ComponentType
from ..errors import InvalidInputError
from ..models.ltx import transformer as ltx
from ..models.wan import transformer as wan
from ..weights import Rule, WeightMap, config_from_dict


@dataclass(frozen=True)
class OptionalBranch:
    """Parameters a LoRA may target that some models of the family lack (Wan2.1's image K/V branch on
    Wan2.2 models): deltas for them are ignored, with ``reason``, on a model without any."""

    pattern: re.Pattern[str]
    name: str  # for logs: "ignoring N keys for <name> the transformer does not have"
    reason: str  # "the transformer <reason>"


@dataclass(frozen=True)
class Architecture:
    """One transformer architecture, for LoRAs.

    Attributes:
        name: for messages ("Wan", "LTX-Video").
        class_name: its diffusers class, as config.json's ``_class_name`` spells it.
        config_class: the config dataclass its model is built from.
        kind: its component type (build, source map, quantization, restore).
        original_map, diffusers_map: the weight maps of its two namings.
        original_hint, diffusers_hint: module names only that naming has (searched in a module path).
        kohya_modules: kohya/musubi module names (dots written as ``_``) -> original module paths.
        bare_parameters: parameters that are not a module's ``weight`` (a ``.diff`` on them targets the
            name itself).
        optional_branch: see :class:`OptionalBranch`; None if every model of the family has every module.
        block: full-match regex of a module inside a repeated block, with the block path as its group
            (``info --lora`` folds blocks into one line).
    """

    name: str
    class_name: str
    config_class: type
    kind: ComponentType
    original_map: WeightMap
    diffusers_map: WeightMap
    original_hint: re.Pattern[str]
    diffusers_hint: re.Pattern[str]
    block: re.Pattern[str]
    kohya_modules: tuple[Rule, ...] = ()
    bare_parameters: tuple[str, ...] = ()
    optional_branch: OptionalBranch | None = None

    def config(self, config: Mapping[str, Any]) -> Any:
        """A config.json as this architecture's config dataclass."""
        return config_from_dict(self.config_class, config)

    def build(self, config: Any) -> nn.Module:
        """A model with ``config`` (the dataclass), built lazily: its parameters are never evaluated, so
        nothing is allocated even at 14B; for its shapes and module paths."""
        return self.kind.build(dataclasses.asdict(config))

    def shapes(self, config: Any) -> dict[str, tuple[int, ...]]:
        """Every parameter's float shape (MLX layout) of a model with ``config`` (the dataclass)."""
        return {k: tuple(v.shape) for k, v in tree_flatten(self.build(config).parameters())}


WAN = Architecture(
    name="Wan",
    class_name="WanTransformer3DModel",
    config_class=wan.WanTransformerConfig,
    kind=wan.TRANSFORMER,
    original_map=wan.ORIGINAL_MAP,
    diffusers_map=wan.DIFFUSERS_MAP,
    original_hint=re.compile(
        r"(^|\.)(self_attn|cross_attn|img_emb|text_embedding|time_embedding|time_projection|modulation|norm3)(\.|$)"
        r"|(^|\.)ffn\.[02]$|^head\.head$"
    ),
    diffusers_hint=re.compile(r"(^|\.)(attn1|attn2|condition_embedder|proj_out|norm2)(\.|$)|\.ffn\.net\."),
    block=re.compile(r"^(blocks\.\d+)\."),
    # kohya/musubi module names: the original Wan module path with every '.' written as '_'.
    kohya_modules=(
        Rule(r"blocks_(\d+)_(self_attn|cross_attn)_(q|k|v|o|k_img|v_img|norm_q|norm_k|norm_k_img)", r"blocks.\1.\2.\3"),
        Rule(r"blocks_(\d+)_ffn_([02])", r"blocks.\1.ffn.\2"),
        Rule(r"blocks_(\d+)_(norm3|modulation)", r"blocks.\1.\2"),
        Rule(r"blocks_(\d+)", r"blocks.\1"),
        Rule(r"(text_embedding|time_embedding)_([02])", r"\1.\2"),
        Rule(r"time_projection_1", "time_projection.1"),
        Rule(r"head_head", "head.head"),
        Rule(r"img_emb_proj_([0134])", r"img_emb.proj.\1"),
        Rule(r"patch_embedding", "patch_embedding"),
    ),
    bare_parameters=("modulation", "scale_shift_table", "emb_pos", "pos_embed"),
    optional_branch=OptionalBranch(
        re.compile(r"(^|\.)attn2\.(add_k_proj|add_v_proj|norm_added_k)\.|^condition_embedder\.image_embedder\."),
        "the image branch",
        "has no image branch (k_img/v_img, img_emb)",
    ),
)

# LTX-Video: the original names (Lightricks' and ComfyUI's LoRAs, under ``diffusion_model.``) differ from
# diffusers' only in the four renames of its ORIGINAL_MAP; block linears are named alike in both.
LTX = Architecture(
    name="LTX-Video",
    class_name="LTXVideoTransformer3DModel",
    config_class=ltx.LTXTransformerConfig,
    kind=ltx.TRANSFORMER,
    original_map=ltx.ORIGINAL_MAP,
    diffusers_map=ltx.DIFFUSERS_MAP,
    original_hint=re.compile(r"(^|\.)(patchify_proj|adaln_single|[qk]_norm)(\.|$)"),
    diffusers_hint=re.compile(r"(^|\.)(proj_in|time_embed|norm_[qk])(\.|$)"),
    block=re.compile(r"^(transformer_blocks\.\d+)\."),
    bare_parameters=("scale_shift_table",),
)

ARCHITECTURES = (WAN, LTX)


def architecture_of(config: Mapping[str, Any]) -> Architecture:
    """The architecture of a transformer config.json, by its ``_class_name`` (Wan when it has none: the
    configs the Wan tests and older conversions write).

    Raises:
        InvalidInputError: a transformer class no architecture is for.
    """
    name = config.get("_class_name", WAN.class_name)
    for arch in ARCHITECTURES:
        if arch.class_name == name:
            return arch
    raise InvalidInputError(f"LoRAs are not supported on a {name} transformer")


def architecture_of_config(config: Any) -> Architecture:
    """The architecture whose config dataclass ``config`` is."""
    for arch in ARCHITECTURES:
        if isinstance(config, arch.config_class):
            return arch
    raise TypeError(f"not a transformer config: {type(config).__name__}")


def guess_architecture(modules: list[str]) -> Architecture:
    """The architecture a LoRA file's module names (prefixes stripped) are of, for reading a file without a
    model: the one whose repeated blocks they name (LTX-Video ``transformer_blocks.N``, Wan ``blocks.N``),
    Wan if they name neither."""
    for arch in ARCHITECTURES:
        if any(arch.block.match(m) for m in modules):
            return arch
    return WAN

