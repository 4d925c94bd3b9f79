"""The Lightricks single-file layout of the LTX-Video VAE (the ``vae.*`` tensors of ``ltxv-*.safetensors``),
mapped as diffusers' ``convert_ltx_vae_checkpoint_to_diffusers`` (``loaders/single_file_utils.py``,
0.42.1) maps it: to diffusers' names by :data:`ORIGINAL_RENAMES`, then to this model's layout by
:data:`~mlx_i2v.models.ltx.vae.DIFFUSERS_MAP`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import mlx.core as mx

from ...errors import WeightLoadError
from ...weights import Rule, WeightMap, load_strict
from .vae import DIFFUSERS_MAP, GENERATION_CONFIGS, AutoencoderKLLTXVideo, LTXVAEConfig, generation


@dataclass(frozen=True)
class RenamedMap:
    """A source layout whose key names differ from diffusers': ``rename`` maps them to diffusers' names
    (strictly: unknown keys are errors naming them), then ``then`` re-lays the tensors out."""

    rename: WeightMap
    then: WeightMap

    @property
    def name(self) -> str:
        return self.rename.name

    def apply(self, tensors: Mapping[str, mx.array]) -> dict[str, mx.array]:
        return self.then.apply(self.rename.apply(tensors))


# The VAE part of the single file is prefixed ``vae.``. Its blocks form flat lists (``up_blocks.N`` /
# ``down_blocks.N``) whose entries are diffusers' blocks, upsamplers, downsamplers and width-changing
# resnets in execution order; the tables below give, per original index, the diffusers module, exactly
# as diffusers' ``convert_ltx_vae_checkpoint_to_diffusers`` (loaders/single_file_utils.py) renames them.
# Inside, resnet groups are ``res_blocks`` (diffusers ``resnets``), shortcut convs are plain convs
# (``conv_shortcut.conv``) and shortcut LayerNorms are nested (``norm3.norm``).

_DECODER_090 = (
    "mid_block", "up_blocks.0", "up_blocks.1.upsamplers.0", "up_blocks.1", "up_blocks.2.conv_in",
    "up_blocks.2.upsamplers.0", "up_blocks.2", "up_blocks.3.conv_in", "up_blocks.3.upsamplers.0", "up_blocks.3",
)  # fmt: skip
_DECODER_091 = (  # 0.9.1 and 0.9.5+: every stage is an upsampler then resnets
    "mid_block", "up_blocks.0.upsamplers.0", "up_blocks.0", "up_blocks.1.upsamplers.0", "up_blocks.1",
    "up_blocks.2.upsamplers.0", "up_blocks.2", "up_blocks.3.upsamplers.0", "up_blocks.3",
)  # fmt: skip
_ENCODER_090 = (  # 0.9.0 and 0.9.1
    "down_blocks.0", "down_blocks.0.downsamplers.0", "down_blocks.0.conv_out", "down_blocks.1",
    "down_blocks.1.downsamplers.0", "down_blocks.1.conv_out", "down_blocks.2", "down_blocks.2.downsamplers.0",
    "down_blocks.3", "mid_block",
)  # fmt: skip
_ENCODER_095 = (
    "down_blocks.0", "down_blocks.0.downsamplers.0", "down_blocks.1", "down_blocks.1.downsamplers.0",
    "down_blocks.2", "down_blocks.2.downsamplers.0", "down_blocks.3", "down_blocks.3.downsamplers.0", "mid_block",
)  # fmt: skip
_ORIGINAL_LAYOUTS = {
    "0.9.0": (_ENCODER_090, _DECODER_090),
    "0.9.1": (_ENCODER_090, _DECODER_091),
    "0.9.5": (_ENCODER_095, _DECODER_091),
}


# The tensors a flat-list entry may hold, by their name inside it: resnet convs, noise scales and
# modulation table, an upsampler's or 0.9.5 downsampler's conv (``conv.conv``), a 0.9.0 stride-2 conv
# (``conv``) and a stage's time embedder. Spelt out so that an unknown name is an error naming it.
_MEMBER = (
    r"(?P<m>(conv[12]\.conv|conv\.conv|conv)\.(weight|bias)|per_channel_scale[12]|scale_shift_table"
    r"|time_embedder\.timestep_embedder\.linear_[12]\.(weight|bias))"
)


def _entry_rules(source: str, target: str) -> tuple[Rule, ...]:
    """Rules renaming everything under one flat-list entry ``source`` (a key regex) to ``target``: the
    members of its resnet group (``res_blocks.I.*``) first, then those of a single resnet, upsampler,
    downsampler or time embedder."""
    members = (
        (r"conv_shortcut\.(?P<leaf>weight|bias)", r"conv_shortcut.conv.\g<leaf>"),
        (r"norm3\.norm\.(?P<leaf>weight|bias)", r"norm3.\g<leaf>"),
        (_MEMBER, r"\g<m>"),
    )
    groups = ((r"res_blocks\.(?P<i>\d+)\.", r"resnets.\g<i>."), ("", ""))
    return tuple(
        Rule(rf"vae\.{source}\.{group}{member}", f"{target}.{group_target}{leaf}")
        for group, group_target in groups
        for member, leaf in members
    )


def _original_rules(encoder: tuple[str, ...], decoder: tuple[str, ...]) -> tuple[Rule, ...]:
    return (
        Rule(r"vae\.(encoder|decoder)\.(conv_in|conv_out)\.conv\.(weight|bias)", r"\1.\2.conv.\3"),
        Rule(r"vae\.decoder\.last_time_embedder\.(.+)", r"decoder.time_embedder.\1"),
        Rule(r"vae\.decoder\.last_scale_shift_table", "decoder.scale_shift_table"),
        Rule(r"vae\.decoder\.timestep_scale_multiplier", "decoder.timestep_scale_multiplier"),
        Rule(r"vae\.per_channel_statistics\.mean-of-means", "latents_mean"),
        Rule(r"vae\.per_channel_statistics\.std-of-means", "latents_std"),
        *(rule for i, t in enumerate(encoder) for rule in _entry_rules(rf"encoder\.down_blocks\.{i}", f"encoder.{t}")),
        *(rule for i, t in enumerate(decoder) for rule in _entry_rules(rf"decoder\.up_blocks\.{i}", f"decoder.{t}")),
    )


# Statistics the original PerChannelStatistics module carries that neither diffusers nor the original
# normalize/un_normalize read (both use only mean-of-means and std-of-means): the channel index 0..127,
# the mean posterior std per channel and its ratio to std-of-means. diffusers' converter drops them too.
ORIGINAL_IGNORED = (r"vae\.per_channel_statistics\.(channel|mean-of-stds|mean-of-stds_over_std-of-means)",)

ORIGINAL_RENAMES: dict[str, WeightMap] = {
    version: WeightMap(
        name=f"LTX-Video {version} VAE (Lightricks single file)",
        rules=_original_rules(*layout),
        ignore=ORIGINAL_IGNORED,
    )
    for version, layout in _ORIGINAL_LAYOUTS.items()
}


def original_map(cfg: LTXVAEConfig) -> RenamedMap:
    """The map from a single file's ``vae.*`` tensors to this model, for the config's generation."""
    return RenamedMap(ORIGINAL_RENAMES[generation(cfg)], DIFFUSERS_MAP)


def original_vae_tensors(tensors: Mapping[str, mx.array]) -> dict[str, mx.array]:
    """The VAE part (``vae.*``) of a single-file checkpoint; the transformer's keys are left to it."""
    return {k: v for k, v in tensors.items() if k.startswith("vae.")}


def original_generation(tensors: Mapping[str, mx.array]) -> str:
    """The VAE generation of a single file, from the layout of its flat block lists: the 0.9.5+ encoder
    has 9 entries (``vae.encoder.down_blocks.0`` to ``.8``; 0.9.0 and 0.9.1 have 10), and a decoder time
    embedder (``vae.decoder.last_time_embedder``) tells 0.9.1 from 0.9.0.

    On every released file this agrees with diffusers' rule (``infer_diffusers_model_type``: a 2048-wide
    encoder head is 0.9.5+), which reads a width instead of the layout and so misses narrower models.

    Raises:
        WeightLoadError: no ``vae.encoder.down_blocks`` tensors, or a list of another length.
    """
    entries = {int(m[1]) for k in tensors if (m := re.match(r"vae\.encoder\.down_blocks\.(\d+)\.", k))}
    if not entries:
        raise WeightLoadError("LTX VAE: the single file has no vae.encoder.down_blocks tensors")
    count = max(entries) + 1
    if count == len(_ENCODER_095):
        return "0.9.5"
    if count != len(_ENCODER_090):
        raise WeightLoadError(f"LTX VAE: an encoder of {count} blocks is none of the released layouts")
    return "0.9.1" if "vae.decoder.last_time_embedder.timestep_embedder.linear_1.weight" in tensors else "0.9.0"


def load_original_ltx_vae(
    tensors: Mapping[str, mx.array], dtype: mx.Dtype = mx.float32, config: LTXVAEConfig | None = None
) -> AutoencoderKLLTXVideo:
    """Build and strictly load the VAE of a single-file checkpoint (all its tensors, as ``mx.load`` reads
    them; only the ``vae.*`` ones are used). ``config`` defaults to the released configuration of the
    generation :func:`original_generation` detects.

    Raises:
        WeightLoadError: an unknown ``vae.*`` tensor, or a missing or mis-shaped one (named).
    """
    vae_tensors = original_vae_tensors(tensors)
    if config is None:
        config = LTXVAEConfig(**GENERATION_CONFIGS[original_generation(vae_tensors)])
    model = AutoencoderKLLTXVideo(config)
    load_strict(model, original_map(config).apply(vae_tensors), dtype=dtype, what="LTX VAE (single file)")
    return model
