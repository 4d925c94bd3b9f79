"""The memory planner's view of an LTX-Video checkpoint: what :func:`~mlx_i2v.planner.plan_generation`
asks of a family's dims, from the three ``config.json`` files.

Weights come from the real modules' parameter shapes (built lazily, as for Wan); the VAE's activation
peaks from :mod:`mlx_i2v.models.ltx.vae_memory`; the transformer's from the shared
:func:`~mlx_i2v.planner.denoise_activations` (which counts Wan's 512 text tokens in the cross-attention
scores, more than LTX's 128 or 256: an over-estimate on the safe side), and the text encoder's likewise
from :func:`~mlx_i2v.planner.text_activations`. When the untiled decode does not fit, the plan picks the
largest of :data:`LTX_TILINGS` that does (diffusers' spatial and temporal tiling); the photo's encode
(one frame) is never tiled.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from ...flops import DiTShape, ltx_shape
from ...models.ltx.transformer import LTXTransformerConfig, LTXVideoTransformer3DModel
from ...models.ltx.vae import AutoencoderKLLTXVideo, LTXVAEConfig
from ...models.ltx.vae_memory import decode_activation_bytes, encode_activation_bytes
from ...models.ltx.vae_tiling import SpatialTiling, TemporalTiling
from ...models.umt5 import T5Encoder, UMT5Config
from ...planner import (
    TEXT_ENCODER_BITS,
    Plan,
    module_weight_bytes,
    plan_generation,
    read_component_configs,
    text_activations,
)


@dataclass(frozen=True)
class LTXTiling:
    """A tiled LTX decode: spatial tiles, temporal tiles, or both (None: not along that axis)."""

    spatial: SpatialTiling | None = None
    temporal: TemporalTiling | None = None

    def describe(self) -> str:
        """As a plan summary shows it."""
        parts = []
        if self.spatial is not None:
            s = self.spatial
            parts.append(f"tiles {s.width}x{s.height} px, stride {s.stride_width}x{s.stride_height} px")
        if self.temporal is not None:
            parts.append(f"{self.temporal.frames} frames, stride {self.temporal.stride}")
        return "; ".join(parts) or "untiled"


# Largest first: diffusers' default spatial tiles, then with its temporal tiles, then smaller tiles.
LTX_TILINGS = (
    LTXTiling(SpatialTiling()),
    LTXTiling(SpatialTiling(), TemporalTiling()),
    LTXTiling(SpatialTiling(256, 256, 224, 224), TemporalTiling()),
)


@dataclass(frozen=True)
class LTXDims:
    """The configs that decide an LTX-Video generation's memory: transformer, VAE and T5 encoder."""

    transformer: LTXTransformerConfig
    vae: LTXVAEConfig
    text_encoder: UMT5Config

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> LTXDims:
        """Read the three ``config.json`` files of an LTX checkpoint (no weights)."""
        configs = read_component_configs(model_dir, transformer=LTXTransformerConfig, vae=LTXVAEConfig,
                                         text_encoder=UMT5Config)  # fmt: skip
        return cls(**configs)

    @property
    def frame_stride(self) -> int:
        return self.vae.temporal_ratio

    tilings = LTX_TILINGS
    blocks_staged_on_cpu = False  # its blocks run as one chain (benchmarks/README.md: staging them gained nothing)

    @property
    def latent_channels(self) -> int:
        return self.vae.latent_channels

    def check_request(self, *, height: int, width: int, num_frames: int) -> None:
        """Nothing to check: the fractional RoPE positions have no table to run past."""

    def latent_shape(self, height: int, width: int, num_frames: int) -> tuple[int, int, int, int, int]:
        """The latents (1, T, h, w, C) of a ``8k+1``-frame video whose sides are multiples of 32."""
        s = self.vae.spatial_ratio
        return (1, (num_frames - 1) // self.frame_stride + 1, height // s, width // s, self.vae.latent_channels)

    def tokens(self, height: int, width: int, num_frames: int) -> int:
        _, t, h, w, _ = self.latent_shape(height, width, num_frames)
        p, pt = self.transformer.patch_size, self.transformer.patch_size_t
        return (t // pt) * (h // p) * (w // p)

    def flop_shape(self, text_tokens: int) -> DiTShape:
        """The transformer's cost dimensions (:mod:`mlx_i2v.flops`), attending to ``text_tokens`` caption
        tokens (the pipeline's ``max_sequence_length``: 128 or 256)."""
        return ltx_shape(self.transformer, context_tokens=text_tokens)

    def weights(self, dtype: mx.Dtype, quantize: int | None, vae_dtype: mx.Dtype) -> dict[str, int]:
        """Resident bytes of the transformer, the VAE's halves and the T5 encoder."""
        return _weight_bytes(self, dtype, quantize, vae_dtype)

    def text_activations(self, batch: int, dtype: mx.Dtype) -> int:
        return text_activations(self.text_encoder, batch, dtype)

    def decode_activations(self, height, width, num_frames, dtype, tiling: LTXTiling | None, budget) -> int:
        _, t, h, w, _ = self.latent_shape(height, width, num_frames)
        tiling = tiling or LTXTiling()
        return decode_activation_bytes(self.vae, (t, h, w), dtype, tiling.spatial, tiling.temporal, budget)

    def encode_activations(self, height, width, frames, dtype, tiling, budget) -> int:
        """The untiled encode (the pipeline encodes one photo frame, never tiled)."""
        return encode_activation_bytes(self.vae, (frames, height, width), dtype, budget=budget)

    def plan(self, **kwargs) -> Plan:
        """:func:`~mlx_i2v.planner.plan_generation` for these dims."""
        return plan_generation(self, **kwargs)


@functools.lru_cache(maxsize=16)
def _weight_bytes(dims: LTXDims, dtype: mx.Dtype, quantize: int | None, vae_dtype: mx.Dtype) -> dict[str, int]:
    # Built lazily: nothing here is evaluated, so the random initial weights never exist in memory.
    return {
        "transformer": module_weight_bytes(LTXVideoTransformer3DModel(dims.transformer), dtype, quantize),
        "vae_encoder": module_weight_bytes(AutoencoderKLLTXVideo(dims.vae).keep_only("encoder"), vae_dtype),
        "vae_decoder": module_weight_bytes(AutoencoderKLLTXVideo(dims.vae).keep_only("decoder"), vae_dtype),
        "text_encoder": module_weight_bytes(
            T5Encoder(dims.text_encoder), dtype, TEXT_ENCODER_BITS if quantize else None
        ),
    }
