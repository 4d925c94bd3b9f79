"""Peak-memory planning for a generation, before any weight is loaded.

:func:`plan_generation` estimates, per stage, the bytes of resident weights and the activation peak:

- weights from the parameter shapes of the real modules (built lazily: MLX never materialises their
  random initial values, so counting costs nothing), by dtype and, when quantizing, by bits (MLX's
  affine quantization of every Linear/Embedding whose input width is a multiple of the group size:
  ``bits`` per weight plus a scale and a bias per group in the compute dtype);
- activations from the token count, the attention chunk :mod:`~mlx_i2v.models.attention` will use
  for this budget, and the VAE frame (or tile) size.

Activation formulas are first-principles terms (hidden-state-sized tensors, score matrices, FFN
intermediates, the VAE's Winograd workspaces) with multiplicities measured on MLX 0.32. Those
multiplicities include MLX's scheduling: it allocates the buffers of several queued operations before
the first one completes. They were measured on the CPU backend; Metal has the fused attention kernel,
so there the attention terms are exact or over-estimate (the plan errs on the safe side).

Residency follows the pipeline: by default (``staged``) each model is in memory for its own stage only
(text encoder; VAE encoder; transformer; VAE decoder); with ``staged=False`` (``keep_resident``) all of
them stay resident throughout.

What differs between families is their memory model, a :class:`FamilyDims` built from a checkpoint's
configs: Wan's in :mod:`mlx_i2v.families.wan.planner`, LTX-Video's in
:mod:`mlx_i2v.families.ltx.planner`. This module is the shared core: the plan, the weight count, the
transformer's and the text encoder's activations, and the search for a VAE tiling that fits.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import InvalidInputError
from .flops import DiTShape
from .memory import GB, memory_budget
from .models.attention import SCORE_BYTES, attention_workspace, query_chunk_size
from .models.conv import conv_plan, conv_workspace
from .models.layers import FEED_FORWARD_COPIES, feed_forward_chunk, feed_forward_workspace
from .models.umt5 import UMT5Config
from .weights import config_from_dict, read_config

log = logging.getLogger(__name__)

TEXT_TOKENS = 512
GROUP_SIZE = 64  # MLX's default quantization group
TEXT_ENCODER_BITS = 8  # the text encoder is kept at 8 bits whenever the transformer is quantized

# --- measured multiplicities (MLX 0.32, CPU; see the module docstring) ----------------------------------
# Denoising: float32 hidden-state-sized (B, L, dim) tensors alive at a block's peak (the float32 islands:
# residual, LayerNorm, per-token modulation, RoPE), and compute-dtype ones (q, k, v, projections).
HIDDEN_F32_COPIES = 8
HIDDEN_COPIES = 4
# A fixed working set of a denoising step independent of the token count (tables, queue; the held context K/V
# is counted apart).
DENOISE_FIXED = 150 * 10**6
# A block that evaluates its sub-layers and its output one at a time (Wan's, on the CPU) peaks in its
# largest sub-layer: the feed-forward, its two (tokens, ffn) tensors beside this many float32 hidden-state
# copies, or the self-attention, a chunk's two score buffers beside this many. Measured on one-block passes
# (2 x 1056 and 2 x 2016 tokens at TI2V-5B widths, 2 x 1056 at 14B widths: the model gives 368, 680 and
# 569 MB against 356, 680 and 567 measured).
STAGED_FFN_HIDDEN_COPIES = 4.4
STAGED_ATTENTION_HIDDEN_COPIES = 11.6


class VAETiling(Protocol):
    """A family's tiled VAE pass, as a plan records it."""

    def describe(self) -> str:
        """As a plan summary shows it."""
        ...


class TransformerDims(Protocol):
    """What :func:`denoise_activations` reads of a transformer's config."""

    num_attention_heads: int
    attention_head_dim: int

    @property
    def inner_dim(self) -> int: ...

    @property
    def ffn_dim(self) -> int: ...


class FamilyDims(Protocol):
    """A family's memory model of one checkpoint (Wan: :class:`~mlx_i2v.families.wan.planner.ModelDims`,
    LTX-Video: :class:`~mlx_i2v.families.ltx.planner.LTXDims`): what :func:`plan_generation` asks of it.
    Sizes are the (rounded) request's; ``tiling`` is one of ``tilings`` or None (untiled); byte counts."""

    transformer: TransformerDims
    frame_stride: int  # video frames per latent frame after the first
    blocks_staged_on_cpu: bool  # the transformer's blocks evaluate their sub-layers one at a time on the CPU
    tilings: tuple[VAETiling, ...]  # the VAE tilings to try, largest first

    @property
    def latent_channels(self) -> int: ...

    def check_request(self, *, height: int, width: int, num_frames: int) -> None:
        """Raise :class:`InvalidInputError` for a request this model cannot take."""
        ...

    def latent_shape(self, height: int, width: int, num_frames: int) -> tuple[int, int, int, int, int]:
        """The latents (1, T, h, w, C) of a video."""
        ...

    def tokens(self, height: int, width: int, num_frames: int) -> int:
        """Transformer tokens of a video."""
        ...

    def flop_shape(self, text_tokens: int) -> DiTShape:
        """The transformer's cost dimensions (:mod:`mlx_i2v.flops`) with prompts of ``text_tokens``."""
        ...

    def weights(self, dtype: mx.Dtype, quantize: int | None, vae_dtype: mx.Dtype) -> dict[str, int]:
        """Resident bytes of ``transformer``, ``vae_encoder``, ``vae_decoder`` and ``text_encoder``."""
        ...

    def text_activations(self, batch: int, dtype: mx.Dtype) -> int: ...

    def decode_activations(self, height: int, width: int, num_frames: int, dtype: mx.Dtype,
                           tiling: VAETiling | None, budget: int) -> int: ...  # fmt: skip

    def encode_activations(self, height: int, width: int, frames: int, dtype: mx.Dtype, tiling: VAETiling | None,
                           budget: int) -> int: ...  # fmt: skip

    def plan(self, **kwargs) -> Plan:
        """:func:`plan_generation` for these dims."""
        ...


@dataclass(frozen=True)
class Stage:
    """One stage's resident weights and activation peak, in bytes."""

    name: str
    weights: int
    activations: int

    @property
    def peak(self) -> int:
        return self.weights + self.activations


@dataclass
class Plan:
    """The estimate for one request. ``peak`` is the largest stage peak."""

    height: int
    width: int
    num_frames: int
    guidance: bool
    dtype: mx.Dtype
    vae_dtype: mx.Dtype
    quantize: int | None
    backend: str
    budget: int
    tokens: int
    attention_chunk: int | None  # queries per chunk; None: fused kernel or unchunked
    vae_tiling: VAETiling | None  # None: untiled decode
    vae_encode_tiling: VAETiling | None  # None: untiled encode
    stages: list[Stage] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)
    cache_bytes: int = 0  # bytes a step cache keeps per hidden-state element and branch
    shards: int = 1  # token shards of a sequence-parallel run: the plan is then one rank's
    parallel: str = ""  # how the ranks of a parallel run share the work, for the summary
    lora_bytes: int = 0  # LoRA factors kept beside quantized transformer weights (in its stage's weights)

    @property
    def peak(self) -> int:
        return max(s.peak for s in self.stages)

    def fits(self, budget: int | None = None) -> bool:
        """Whether the peak stays within ``budget`` bytes (default: the budget planned for)."""
        return self.peak <= (self.budget if budget is None else budget)

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def summary(self) -> str:
        """Human-readable plan, as ``--dry-run`` prints it."""
        lines = [
            f"plan: {self.width}x{self.height}, {self.num_frames} frames, {self.tokens} tokens, "
            f"{'CFG (batch 2)' if self.guidance else 'no CFG'}, {_dtype_name(self.dtype)}"
            f"{f', {self.quantize}-bit' if self.quantize else ''}, VAE {_dtype_name(self.vae_dtype)}, {self.backend}"
            f"{f', this rank holds 1/{self.shards} of the tokens' if self.shards > 1 else ''}",
            f"  attention: {'fused kernel / whole' if self.attention_chunk is None else f'{self.attention_chunk} queries per chunk'}",
            f"  VAE decode: {_tiling_text(self.vae_tiling)}; VAE encode: {_tiling_text(self.vae_encode_tiling)}",
        ]
        if self.parallel:
            lines.append(f"  {self.parallel}")
        for s in self.stages:
            lines.append(
                f"  {s.name:<12} weights {s.weights / GB:6.2f} GB + activations {s.activations / GB:6.2f} GB"
                f" = {s.peak / GB:6.2f} GB"
            )
        verdict = "fits" if self.fits() else "does NOT fit"
        lines.append(f"  peak {self.peak / GB:.2f} GB, budget {self.budget / GB:.2f} GB: {verdict}")
        lines += [f"  to fit: {s}" for s in self.suggestions]
        return "\n".join(lines)


class PlanDoesNotFitError(InvalidInputError):
    """The request's estimated peak exceeds the memory budget; the message says what would fit."""


def check_fits(plan: Plan) -> None:
    """Raise :class:`PlanDoesNotFitError` (estimate + suggestions) unless ``plan`` fits its budget."""
    if not plan.fits():
        hint = "; ".join(plan.suggestions) or "no smaller setting fits either"
        raise PlanDoesNotFitError(
            f"estimated peak {plan.peak / GB:.1f} GB exceeds the {plan.budget / GB:.1f} GB memory budget "
            f"(override with --memory-limit); try: {hint}"
        )


# --- weights ------------------------------------------------------------------------------------------


def _tiling_text(tiling: VAETiling | None) -> str:
    return "untiled" if tiling is None else tiling.describe()


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def read_component_configs(model_dir: str | Path, **config_classes: type) -> dict[str, Any]:
    """Each component folder's ``config.json`` of a checkpoint as its config dataclass (no weights):
    ``read_component_configs(d, vae=WanVAEConfig)`` -> ``{"vae": WanVAEConfig(...)}`` from ``d/vae``."""
    d = Path(model_dir)
    return {name: config_from_dict(cls, read_config(d / name)) for name, cls in config_classes.items()}


def module_weight_bytes(
    module: nn.Module, dtype: mx.Dtype, bits: int | None = None, keep_float32: tuple[str, ...] = ()
) -> int:
    """Bytes of ``module``'s parameters once loaded in ``dtype`` (``keep_float32`` regexes stay float32),
    with Linear/Embedding weights quantized to ``bits`` where their input width allows."""
    keep = [re.compile(p) for p in keep_float32]
    quantizable: set[str] = set()
    if bits is not None:
        for name, leaf in module.named_modules():
            if isinstance(leaf, (nn.Linear, nn.Embedding)) and leaf.weight.shape[-1] % GROUP_SIZE == 0:
                quantizable.add(f"{name}.weight" if name else "weight")
    total = 0
    for name, p in tree_flatten(module.parameters()):
        if any(k.search(name) for k in keep):
            total += p.size * 4
        elif name in quantizable:
            total += p.size * bits // 8 + 2 * (p.size // GROUP_SIZE) * dtype.size
        else:
            total += p.size * dtype.size
    return total


# --- activations --------------------------------------------------------------------------------------


def largest_conv_workspace(
    convs: list[tuple[int, int, int, int, int]], itemsize: int, budget: int, time_taps: int = 3
) -> int:
    """The largest transient workspace among (time_taps, 3, 3) convolutions given as (frames, h, w, c_in,
    c_out), each computed as :func:`~mlx_i2v.models.conv.conv3d` would for this budget."""
    workspace = conv_workspace(budget)
    return max(
        conv_plan(frames, time_taps, h, w, c_in, c_out, itemsize, workspace, h % 2 == 0 and w % 2 == 0)[2]
        for frames, h, w, c_in, c_out in convs
    )


def denoise_activations(
    cfg: TransformerDims, tokens: int, batch: int, dtype: mx.Dtype, fused: bool, budget: int, shards: int = 1,
    cpu: bool = True, staged: bool = False,
) -> tuple[int, int | None]:
    """Activation peak of one transformer forward and the attention chunk it uses (None: unchunked).

    Terms: hidden-state-sized tensors (float32 islands and compute-dtype ones), the self-attention scores
    (none with a fused kernel; else one chunk), the text cross-attention scores, the FFN intermediate
    and activation of one token chunk, and a fixed part. With ``shards`` > 1 (sequence parallel) every
    per-token term covers this rank's shard, the attention keys span every token, and the gathered keys
    and values of the whole sequence are held twice (as gathered, and in the attention's layout).
    ``cpu``: chunked as on the CPU (see :func:`~mlx_i2v.models.attention.attention_workspace`).
    ``staged``: the blocks evaluate their sub-layers one at a time (Wan's on the CPU), so a block's terms
    are those of its largest sub-layer (:data:`STAGED_FFN_HIDDEN_COPIES`,
    :data:`STAGED_ATTENTION_HIDDEN_COPIES`) instead of their sum.
    """
    dim, heads = cfg.inner_dim, cfg.num_attention_heads
    local = math.ceil(tokens / shards)
    hidden = batch * local * dim
    chunk = None
    scores = 0  # self-attention scores of one query chunk
    cross_scores = 0
    if not fused:
        rows = query_chunk_size(batch, heads, local, tokens, attention_workspace(budget, cpu=cpu))
        chunk = rows if rows < local else None
        scores = batch * heads * rows * tokens
        cross_scores = batch * heads * local * TEXT_TOKENS * dtype.size
    gathered_kv = 2 * (2 * batch * tokens * dim * dtype.size) if shards > 1 else 0
    # the feed-forward runs on token chunks that fit its workspace (models.layers.by_token_chunks); chunked,
    # the chunks' outputs and their concatenation are both held once
    ffn_tokens = feed_forward_chunk(batch, local, cfg.ffn_dim, dtype.size, feed_forward_workspace(budget))
    ffn = FEED_FORWARD_COPIES * batch * ffn_tokens * cfg.ffn_dim * dtype.size
    if ffn_tokens < local:
        ffn += hidden * dtype.size
    if staged:
        # the CPU attention holds two float32 buffers per score (SCORE_BYTES), whatever the compute dtype
        per_block = max(
            ffn + hidden * 4 * STAGED_FFN_HIDDEN_COPIES,
            scores * SCORE_BYTES + hidden * 4 * STAGED_ATTENTION_HIDDEN_COPIES,
        )
    else:
        per_block = hidden * (HIDDEN_F32_COPIES * 4 + HIDDEN_COPIES * dtype.size)
        per_block += max(scores * dtype.size, ffn) + cross_scores
        if not fused and dtype.size < 4:
            per_block += 3 * hidden * 4  # the unfused fallback runs half precision on float32 q, k, v
    return int(per_block) + gathered_kv + DENOISE_FIXED, chunk


def context_kv_bytes(shape: DiTShape, batch: int, dtype: mx.Dtype) -> int:
    """Every block's cross-attention keys and values (text and image tokens), which the loop computes once
    per generation and holds throughout (``Denoiser._context``): 755 MB for TI2V-5B's 30 blocks in float32
    with guidance."""
    return shape.num_layers * 2 * batch * shape.context_tokens * shape.dim * dtype.size


def text_activations(cfg: UMT5Config, batch: int, dtype: mx.Dtype) -> int:
    """UMT5 over ``batch`` prompts of 512 tokens: hidden states, gated FFN, scores and position bias."""
    n = batch * TEXT_TOKENS
    inner = cfg.num_heads * cfg.d_kv
    scores = (batch + 1) * cfg.num_heads * TEXT_TOKENS**2 * 4  # scores + the shared float32 bias
    return n * (6 * cfg.d_model * 4 + 3 * inner * dtype.size + 3 * cfg.d_ff * dtype.size) + 2 * scores


# --- the plan -----------------------------------------------------------------------------------------


def plan_generation(
    dims: FamilyDims,
    *,
    height: int,
    width: int,
    num_frames: int,
    guidance: bool = True,
    dtype: mx.Dtype = mx.bfloat16,
    vae_dtype: mx.Dtype = mx.float32,
    quantize: int | None = None,
    backend: str | None = None,
    budget: int | None = None,
    encode_frames: int = 1,
    staged: bool = True,
    suggest: bool = True,
    cache_bytes: int = 0,
    shards: int = 1,
    lora_bytes: int = 0,
) -> Plan:
    """Estimate the peak memory of one generation.

    Args:
        dims: the family's memory model of the checkpoint (e.g. :data:`~mlx_i2v.families.wan.planner.TI2V_5B`,
            :meth:`~mlx_i2v.families.wan.planner.ModelDims.from_model_dir`).
        height, width, num_frames: the (already rounded) request.
        guidance: classifier-free guidance, which doubles the transformer batch and the prompts.
        dtype: compute dtype; quantize: transformer bits (the text encoder then uses 8) or None.
        vae_dtype: the VAE's dtype, for its weights and activations (the pipeline's default: float32).
        backend: "metal" (fused attention) or "cpu"; default: this machine's.
        budget: bytes; default :func:`~mlx_i2v.memory.memory_budget`.
        encode_frames: video frames the VAE encodes for conditioning (1 for a photo; the whole clip for
            channel-concat conditioning).
        staged: each model is loaded for its stage only, as the pipeline does unless ``keep_resident``.
        suggest: fill ``Plan.suggestions`` when the plan does not fit.
        cache_bytes: what a step cache keeps across steps, in bytes per hidden-state element and branch
            (:func:`mlx_i2v.stepcache.kept_bytes`).
        shards: token shards of a sequence-parallel run (the plan is one rank's; weights are whole).
        lora_bytes: LoRA factors kept beside a quantized transformer
            (:meth:`~mlx_i2v.lora.manager.TransformerLoras.factor_bytes`), counted as its weights.

    Returns:
        A :class:`Plan` with stages "text", "vae_encode", "denoise" and "vae_decode", the attention chunk
        and the VAE decode/encode tilings (each the largest of the family's ``tilings`` that fits when the untiled
        pass does not).
    """
    if backend is None:
        backend = "metal" if mx.metal.is_available() else "cpu"
    if backend not in ("metal", "cpu"):
        raise InvalidInputError(f"backend must be 'metal' or 'cpu', got {backend!r}")
    dims.check_request(height=height, width=width, num_frames=num_frames)
    budget = memory_budget() if budget is None else budget
    batch = 2 if guidance else 1
    weights = dict(dims.weights(dtype, quantize, vae_dtype))  # a copy: the weights are cached
    weights["transformer"] += lora_bytes
    everything = weights["text_encoder"] + weights["transformer"] + weights["vae_encoder"] + weights["vae_decoder"]
    resident = {
        name: weights[name] if staged else everything
        for name in ("text_encoder", "vae_encoder", "transformer", "vae_decoder")
    }

    tokens = dims.tokens(height, width, num_frames)
    # The steel kernel serves head dims 64/80/128 (those of every Wan and LTX-Video transformer).
    fused = backend == "metal" and dims.transformer.attention_head_dim in (64, 80, 128)
    cpu = backend == "cpu"
    blocks_staged = cpu and dims.blocks_staged_on_cpu  # not ``staged``, which is the models' residency
    denoise, chunk = denoise_activations(
        dims.transformer, tokens, batch, dtype, fused, budget, shards, cpu=cpu, staged=blocks_staged
    )
    denoise += batch * -(-tokens // shards) * dims.transformer.inner_dim * cache_bytes
    denoise += context_kv_bytes(dims.flop_shape(TEXT_TOKENS), batch, dtype)

    def vae_pass(stage: str, activations) -> tuple[VAETiling | None, int]:
        """The untiled pass, else the largest tiling whose peak fits (the smallest if none does)."""
        tiling, peak = None, activations(None)
        if resident[stage] + peak > budget:
            for tiling in dims.tilings:
                peak = activations(tiling)
                if resident[stage] + peak <= budget:
                    break
        return tiling, peak

    tiling, decode = vae_pass(
        "vae_decoder", lambda t: dims.decode_activations(height, width, num_frames, vae_dtype, t, budget)
    )
    encode_tiling, encode = vae_pass(
        "vae_encoder", lambda t: dims.encode_activations(height, width, encode_frames, vae_dtype, t, budget)
    )

    stages = [
        Stage("text", resident["text_encoder"], dims.text_activations(batch, dtype)),
        Stage("vae_encode", resident["vae_encoder"], encode),
        Stage("denoise", resident["transformer"], denoise),
        Stage("vae_decode", resident["vae_decoder"], decode),
    ]
    plan = Plan(
        height, width, num_frames, guidance, dtype, vae_dtype, quantize, backend, budget, tokens, chunk, tiling,
        encode_tiling, stages, cache_bytes=cache_bytes, shards=shards, lora_bytes=lora_bytes,
    )  # fmt: skip
    if suggest and not plan.fits():
        plan.suggestions = _suggestions(dims, plan, encode_frames, staged)
    log.info("planned peak %.2f GB (budget %.2f GB)", plan.peak / GB, budget / GB)
    return plan


def _suggestions(dims: FamilyDims, plan: Plan, encode_frames: int, staged: bool) -> list[str]:
    """Single changes that make ``plan`` fit: 4-bit weights, a half-precision VAE, fewer frames, a smaller
    frame."""

    def replan(**changes: object) -> Plan:
        args = dict(
            height=plan.height, width=plan.width, num_frames=plan.num_frames, guidance=plan.guidance,
            dtype=plan.dtype, vae_dtype=plan.vae_dtype, quantize=plan.quantize, backend=plan.backend, budget=plan.budget,
            encode_frames=encode_frames, staged=staged, suggest=False, cache_bytes=plan.cache_bytes,
            shards=plan.shards, lora_bytes=plan.lora_bytes,
        )  # fmt: skip
        args.update(changes)
        return dims.plan(**args)

    out = []
    if plan.quantize != 4 and replan(quantize=4).fits():
        out.append("--quantize 4")
    if plan.vae_dtype.size > plan.dtype.size and replan(vae_dtype=plan.dtype).fits():
        out.append(f"--vae-dtype {_dtype_name(plan.dtype)}")
    for frames in range(plan.num_frames - dims.frame_stride, 0, -dims.frame_stride):
        if replan(num_frames=frames, encode_frames=min(encode_frames, frames)).fits():
            out.append(f"--frames {frames}")
            break
    multiple = 32
    for scale in (0.875, 0.75, 0.625, 0.5, 0.375, 0.25):
        h = max(multiple, int(plan.height * scale) // multiple * multiple)
        w = max(multiple, int(plan.width * scale) // multiple * multiple)
        if replan(height=h, width=w).fits():
            out.append(f"--width {w} --height {h}")
            break
    return out
