"""The memory planner's view of a Wan checkpoint: what :func:`~mlx_i2v.planner.plan_generation` asks of a
family's dims, from the three ``config.json`` files, with the Wan VAEs' activation model.

Weights come from the real modules' parameter shapes (built lazily); the transformer's and the text
encoder's activations from the shared :func:`~mlx_i2v.planner.denoise_activations` and
:func:`~mlx_i2v.planner.text_activations`; the VAE's from the formulas below (multiplicities measured on
MLX 0.32, see :mod:`mlx_i2v.planner`). When the untiled decode or encode does not fit, the plan picks the
largest of :data:`TILINGS` that does.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from ...errors import InvalidInputError
from ...flops import DiTShape
from ...models.conv import compute_dtype
from ...models.umt5 import UMT5Config, UMT5Encoder
from ...models.wan.transformer import KEEP_FLOAT32, WanTransformer3DModel, WanTransformerConfig
from ...models.wan.vae import AutoencoderKLWan, WanVAEConfig
from ...models.wan.vae_tiling import Tiling
from ...planner import (
    TEXT_ENCODER_BITS,
    Plan,
    largest_conv_workspace,
    module_weight_bytes,
    plan_generation,
    read_component_configs,
    text_activations,
)

LATENT_FRAME_STRIDE = 4  # video frames per latent frame after the first
# VAE: activation peak as a multiple of one 4-frame activation of the largest stage (decoder: the last
# up stage; encoder: the first), plus the workspace of the largest convolution as
# :func:`~mlx_i2v.models.conv.conv_plan` computes it for the budget. Fitted on the CPU (MLX 0.32) at
# 192x320 (tiny Wan2.1 and Wan2.2 VAEs) and 256x384 (the real Wan2.2 VAE), after F(4x4) Winograd and
# per-tap matmuls for narrow one-frame convolutions shrank the workspaces: decode estimates 0.93-0.99 of
# the measured peaks, encode 0.95-0.97. The encoder's first stage keeps ~10 activations (each causal
# conv caches its one-frame input).
VAE_DECODE_ACTIVATION_COPIES = 14.0
VAE_ENCODE_ACTIVATION_COPIES = 10.0
# Candidate VAE tilings, largest first (video pixels; diffusers' default is 256/192).
TILINGS = (Tiling(512, 384), Tiling(256, 192), Tiling(128, 96))

# Wan2.2-TI2V-5B, for planning without a checkout (wan.md §1.1, §1.2, §1.5).
TI2V_5B_TRANSFORMER = WanTransformerConfig(
    num_attention_heads=24, attention_head_dim=128, in_channels=48, out_channels=48, ffn_dim=14336,
    num_layers=30,
)  # fmt: skip
WAN22_VAE = WanVAEConfig(
    base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
    patch_size=2, scale_factor_spatial=16, latents_mean=(0.0,) * 48, latents_std=(1.0,) * 48,
)  # fmt: skip
UMT5_XXL = UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)


@dataclass(frozen=True)
class ModelDims:
    """The configs that decide a Wan generation's memory: transformer, VAE and UMT5 encoder."""

    transformer: WanTransformerConfig
    vae: WanVAEConfig
    text_encoder: UMT5Config

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> ModelDims:
        """Read the three ``config.json`` files of a diffusers-layout checkpoint (no weights)."""
        configs = read_component_configs(model_dir, transformer=WanTransformerConfig, vae=WanVAEConfig,
                                         text_encoder=UMT5Config)  # fmt: skip
        return cls(**configs)


    def limits(self) -> Limits:
        """The largest frame count and frame size this model can take: its rotary position tables
        cover ``rope_max_seq_len`` positions on each axis of the token grid (latent frames / pt, latent
        rows / ph, latent columns / pw)."""
        positions = self.transformer.rope_max_seq_len
        pt, ph, pw = self.transformer.patch_size
        stride = self.vae.scale_factor_spatial
        return Limits(
            positions=positions,
            num_frames=(positions * pt - 1) * LATENT_FRAME_STRIDE + 1,
            height=positions * ph * stride,
            width=positions * pw * stride,
        )

    def check_request(self, *, height: int, width: int, num_frames: int) -> None:
        """Raise :class:`InvalidInputError` naming the limit when a (rounded) request exceeds
        :meth:`limits`; the pipeline's settings and :func:`plan_generation` both call this."""
        limits = self.limits()
        for name, value, limit in (
            ("num_frames", num_frames, limits.num_frames),
            ("height", height, limits.height),
            ("width", width, limits.width),
        ):
            if value > limit:
                raise InvalidInputError(
                    f"{name} {value} is more than this model can take: at most {limit} (its rotary position "
                    f"table has {limits.positions} positions per axis of the token grid)"
                )

    # --- what the planner asks of a family's dims (see :func:`plan_generation`) ---

    frame_stride = LATENT_FRAME_STRIDE
    blocks_staged_on_cpu = True  # WanTransformer3DModel: memory.evaluate_on_cpu after each sub-layer and block

    @property
    def latent_channels(self) -> int:
        return self.vae.z_dim

    @property
    def tilings(self) -> tuple[Tiling, ...]:
        """The VAE decode/encode tilings to try, largest first, when the untiled pass does not fit."""
        return TILINGS

    def latent_shape(self, height: int, width: int, num_frames: int) -> tuple[int, int, int, int, int]:
        """The latents (1, T, h, w, C) of a video."""
        return (1, *latent_grid(self.vae, height, width, num_frames), self.vae.z_dim)

    def tokens(self, height: int, width: int, num_frames: int) -> int:
        """Transformer tokens of a video."""
        frames, h, w = latent_grid(self.vae, height, width, num_frames)
        pt, ph, pw = self.transformer.patch_size
        return (frames // pt) * (h // ph) * (w // pw)

    def flop_shape(self, text_tokens: int) -> DiTShape:
        """The transformer's cost dimensions (:mod:`mlx_i2v.flops`); Wan attends to all ``text_tokens``
        (its 512) and to the CLIP tokens of the I2V models."""
        return DiTShape.from_config(self.transformer)

    def weights(self, dtype: mx.Dtype, quantize: int | None, vae_dtype: mx.Dtype) -> dict[str, int]:
        """See :func:`weight_bytes`."""
        return weight_bytes(self, dtype, quantize, vae_dtype)

    def text_activations(self, batch: int, dtype: mx.Dtype) -> int:
        return text_activations(self.text_encoder, batch, dtype)

    def decode_activations(self, height: int, width: int, num_frames: int, dtype: mx.Dtype, tiling: Tiling | None,
                           budget: int) -> int:  # fmt: skip
        _, h, w = latent_grid(self.vae, height, width, num_frames)
        return vae_decode_activations(self.vae, (h, w), dtype, tiling, budget)

    def encode_activations(self, height: int, width: int, frames: int, dtype: mx.Dtype, tiling: Tiling | None,
                           budget: int) -> int:  # fmt: skip
        return vae_encode_activations(self.vae, height, width, frames, dtype, tiling, budget)

    def plan(self, **kwargs) -> Plan:
        """:func:`plan_generation` for these dims."""
        return plan_generation(self, **kwargs)


@dataclass(frozen=True)
class Limits:
    """The largest request of a model (see :meth:`ModelDims.limits`)."""

    positions: int  # rope_max_seq_len: token positions per axis
    num_frames: int
    height: int
    width: int


TI2V_5B = ModelDims(TI2V_5B_TRANSFORMER, WAN22_VAE, UMT5_XXL)


@functools.lru_cache(maxsize=16)
def weight_bytes(
    dims: ModelDims, dtype: mx.Dtype, quantize: int | None, vae_dtype: mx.Dtype = mx.float32
) -> dict[str, int]:
    """Resident bytes of each component: ``transformer``, ``vae_encoder``, ``vae_decoder`` (the VAE's
    halves, as the pipeline loads them, in ``vae_dtype``) and ``text_encoder``."""
    # Built lazily: nothing here is evaluated, so the random initial weights never exist in memory.
    return {
        "transformer": module_weight_bytes(WanTransformer3DModel(dims.transformer), dtype, quantize, KEEP_FLOAT32),
        "vae_encoder": module_weight_bytes(AutoencoderKLWan(dims.vae).keep_only("encoder"), vae_dtype),
        "vae_decoder": module_weight_bytes(AutoencoderKLWan(dims.vae).keep_only("decoder"), vae_dtype),
        "text_encoder": module_weight_bytes(
            UMT5Encoder(dims.text_encoder), dtype, TEXT_ENCODER_BITS if quantize else None
        ),
    }


def latent_grid(vae: WanVAEConfig, height: int, width: int, num_frames: int) -> tuple[int, int, int]:
    """Latent (frames, height, width) of a video."""
    s = vae.scale_factor_spatial
    return 1 + (num_frames - 1) // LATENT_FRAME_STRIDE, height // s, width // s


def _vae_cache_bytes(cfg: WanVAEConfig, latent_hw: tuple[int, int], itemsize: int) -> int:
    """Causal cache of the decoder: two frames of each cached convolution's input."""
    dims = _decoder_dims(cfg)
    area = latent_hw[0] * latent_hw[1]
    total = cfg.z_dim + 4 * dims[0]  # conv_in, mid block
    for i, d in enumerate(dims[1:]):
        total += 4**i * (2 * (cfg.num_res_blocks + 1) * d + d)  # res blocks, time_conv
    total += 4 ** (len(dims) - 2) * dims[-1]  # conv_out
    return 2 * area * total * itemsize


def _decoder_dims(cfg: WanVAEConfig) -> list[int]:
    base = cfg.decoder_base_dim or cfg.base_dim
    return [base * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]


def vae_decode_activations(
    cfg: WanVAEConfig, latent_hw: tuple[int, int], dtype: mx.Dtype, tiling: Tiling | None, budget: int
) -> int:
    """Peak of decoding one latent frame (four video frames), untiled or per tile plus all tiles' caches."""
    s, p = cfg.scale_factor_spatial, cfg.patch_size or 1
    h, w = latent_hw
    if tiling is not None:
        t = tiling.size // s
        ny, nx = math.ceil(h / (tiling.stride // s)), math.ceil(w / (tiling.stride // s))
        h, w = min(t, h), min(t, w)
        caches = _vae_cache_bytes(cfg, (h, w), dtype.size) * (ny * nx - 1)
    else:
        caches = 0
    dims = _decoder_dims(cfg)
    # Each stage's first convolution (the widest input), at its size and frame count.
    convs, frames = [], 1
    for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
        c_in = c_in // 2 if i > 0 and not cfg.is_residual else c_in  # Wan2.1 upsamplers halve the width
        convs.append((frames, h << i, w << i, c_in, c_out))
        frames *= 2 if i < len(cfg.temperal_downsample) and cfg.temperal_downsample[::-1][i] else 1
    last = 4 * (h * s // p) * (w * s // p) * dims[-1] * dtype.size
    frames_out = 4 * h * w * s * s * 3 * 4  # the yielded chunk, float32 after the pipeline's cast
    workspace = largest_conv_workspace(convs, compute_dtype(dtype).size, budget)
    return int(VAE_DECODE_ACTIVATION_COPIES * last) + workspace + caches + frames_out


def vae_encode_activations(
    cfg: WanVAEConfig, height: int, width: int, frames: int, dtype: mx.Dtype, tiling: Tiling | None, budget: int
) -> int:
    """Peak of encoding ``frames`` video frames (chunks of at most four), untiled or per tile (tiles are
    measured on the patchified video, as in :func:`~mlx_i2v.models.wan.vae_tiling.tiled_encode`). The
    causal cache of multi-chunk encodes is not modelled: TI2V encodes a single frame."""
    p = cfg.patch_size or 1
    h, w = height // p, width // p
    if tiling is not None:
        h, w = min(h, tiling.size), min(w, tiling.size)
    frames = min(frames, 4)
    dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
    convs = [(frames, h >> i, w >> i, c, c) for i, c in enumerate(dims[1:])]
    first = frames * h * w * cfg.base_dim * dtype.size
    # A single frame is one causal chunk: its convolutions skip the time taps over zero padding.
    workspace = largest_conv_workspace(convs, compute_dtype(dtype).size, budget, time_taps=1 if frames == 1 else 3)
    return int(VAE_ENCODE_ACTIVATION_COPIES * first) + workspace
