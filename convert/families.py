"""The model families the converter knows, as data: which component folders hold weights (and of what
kind), which are copied, how each is quantized, and what a converted directory records about the model.

A diffusers directory tells its family by its pipeline class (``model_index.json`` ``_class_name``):
``Wan*Pipeline`` or ``LTX*Pipeline``. Everything else in the converter is shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

from mlx_i2v.components import ComponentType
from mlx_i2v.errors import InvalidInputError
from mlx_i2v.families.wan.variants import detect_variant
from mlx_i2v.models import umt5
from mlx_i2v.models.ltx import latent_upsampler as ltx_upsampler
from mlx_i2v.models.ltx import transformer as ltx_transformer
from mlx_i2v.models.ltx import vae as ltx_vae
from mlx_i2v.models.wan import clip as wan_clip
from mlx_i2v.models.wan import transformer as wan_transformer
from mlx_i2v.models.wan import vae as wan_vae
from mlx_i2v.quantize import Quantization, QuantizationConfig
from mlx_i2v.variants import Variant
from mlx_i2v.weights import config_from_dict, read_config

from .plan import defaults_dict

Role = Literal["transformer", "text_encoder"]


@dataclass(frozen=True)
class Weights:
    """A component folder with weights: its kind and which quantization setting applies to it (None:
    never quantized, as CLIP, the VAEs and the latent upsampler)."""

    kind: ComponentType
    quantized_as: Role | None = None

    def quantization(self, config: QuantizationConfig | None) -> Quantization | None:
        """What ``config`` does to this component: transformers at its bits, text encoders at its
        text encoder bits, the rest never."""
        if config is None or self.quantized_as is None:
            return None
        return config.transformer if self.quantized_as == "transformer" else config.text_encoder


@dataclass(frozen=True)
class Family:
    """One model family.

    Attributes:
        name: recorded as ``_mlx_i2v.family`` in a converted directory ("wan", "ltx").
        pipeline_prefix: the start of its diffusers pipeline class names.
        weights: component folder -> :class:`Weights`.
        copied: component folders copied as they are (tokenizer, scheduler, ...).
        describe: (directory, model_index.json, name the user gave) -> the family's entries of
            ``_mlx_i2v`` (Wan: its variant and default settings; LTX: its generation).
    """

    name: str
    pipeline_prefix: str
    weights: Mapping[str, Weights]
    copied: tuple[str, ...]
    describe: Callable[[Path, Mapping[str, Any], str], dict[str, Any]]


def wan_entries(variant: Variant) -> dict[str, Any]:
    """``_mlx_i2v`` entries of a Wan model: its variant and default generation settings."""
    return {"family": "wan", "variant": variant.name, "defaults": defaults_dict(variant)}


def ltx_entries(generation: str) -> dict[str, Any]:
    """``_mlx_i2v`` entries of an LTX-Video model: its generation, "0.9.0", "0.9.1" or "0.9.5" (which
    stands for 0.9.5 and later: the VAE, scheduler and pipeline of 0.9.5 to 0.9.8 are the same)."""
    return {"family": "ltx", "generation": generation}


def model_name(entries: Mapping[str, Any]) -> str:
    """What logs and the CLI call a model, from its family's entries: the Wan variant, or "LTX-Video
    0.9.5+" and the like."""
    if entries.get("family", "wan") == "wan":
        return entries["variant"]
    generation = entries["generation"]
    return f"LTX-Video {generation}{'+' if generation == '0.9.5' else ''}"


def _describe_wan(folder: Path, index: Mapping[str, Any], label: str) -> dict[str, Any]:
    return wan_entries(detect_variant(folder, label))


def _describe_ltx(folder: Path, index: Mapping[str, Any], label: str) -> dict[str, Any]:
    """The generation of an LTX directory is its VAE's (:func:`~mlx_i2v.models.ltx.vae.generation`)."""
    config = config_from_dict(ltx_vae.LTXVAEConfig, read_config(folder / "vae"))
    return ltx_entries(ltx_vae.generation(config))


WAN = Family(
    name="wan",
    pipeline_prefix="Wan",
    weights={
        "transformer": Weights(wan_transformer.TRANSFORMER, "transformer"),
        "transformer_2": Weights(wan_transformer.TRANSFORMER, "transformer"),
        "text_encoder": Weights(umt5.TEXT_ENCODER, "text_encoder"),
        "vae": Weights(wan_vae.VAE),
        "image_encoder": Weights(wan_clip.IMAGE_ENCODER),
    },
    copied=("tokenizer", "scheduler", "image_processor"),
    describe=_describe_wan,
)

LTX = Family(
    name="ltx",
    pipeline_prefix="LTX",
    weights={
        "transformer": Weights(ltx_transformer.TRANSFORMER, "transformer"),
        "text_encoder": Weights(umt5.T5_TEXT_ENCODER, "text_encoder"),
        "vae": Weights(ltx_vae.VAE),
        "latent_upsampler": Weights(ltx_upsampler.LATENT_UPSAMPLER),
    },
    copied=("tokenizer", "scheduler"),
    describe=_describe_ltx,
)

FAMILIES = {family.name: family for family in (WAN, LTX)}


def family_of(index: Mapping[str, Any], folder: Path | str = "") -> Family:
    """The family of a diffusers or converted directory, from its pipeline class.

    Raises:
        InvalidInputError: a pipeline of no known family (named).
    """
    pipeline = index.get("_class_name")
    for family in FAMILIES.values():
        if isinstance(pipeline, str) and pipeline.startswith(family.pipeline_prefix):
            return family
    raise InvalidInputError(
        f"{folder}: unsupported pipeline {pipeline!r} in model_index.json (expected a Wan* or LTX* pipeline)"
    )
