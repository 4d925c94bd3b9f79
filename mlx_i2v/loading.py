"""``load_pipeline``: from a model name to a ready :class:`~mlx_i2v.pipeline.WanPipeline`."""

from __future__ import annotations

import logging
from pathlib import Path

import mlx.core as mx

from .experts import Experts
from .models.clip import load_clip_vision
from .models.clip_preprocess import CLIPImageProcessor
from .models.tokenizer import UMT5Tokenizer
from .models.umt5 import load_umt5
from .models.wan_transformer import load_wan_transformer
from .models.wan_vae import load_wan_vae
from .pipeline import ImageEncoder, WanPipeline
from .planner import ModelDims
from .quantize import Quantization, QuantizationConfig
from .resident import Resident
from .runtime import dtype_name, keep_freed_memory, resolve_dtype
from .schedulers import Scheduler, load_scheduler, scheduler_by_name
from .variants import Variant, load_variant
from .weights import check_safetensors, read_config

log = logging.getLogger(__name__)


def load_pipeline(
    model: str | Path,
    *,
    dtype: str | None = None,
    quantize: int | QuantizationConfig | None = None,
    scheduler: str | None = None,
    keep_resident: bool = False,
    keep_experts_resident: bool = False,
) -> WanPipeline:
    """Load a Wan image-to-video pipeline.

    Nothing large is read yet: the configs are parsed and every weight file is checked to be complete;
    each model is loaded when its stage of a generation starts.

    Args:
        model: a local model directory, in diffusers layout (model_index.json + component folders) or
            converted by ``mlx-i2v convert``, or a Hub repo id such as "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
            downloaded once with ``huggingface_hub`` and converted once into the cache (see :mod:`mlx_i2v.cache`).
        dtype: "float32", "bfloat16" or "float16"; default bfloat16 on a GPU, float32 on the CPU.
        quantize: 4 or 8 to quantize the transformer(s) on load (the UMT5 encoder to 8 bits), or a
            :class:`~mlx_i2v.quantize.QuantizationConfig`. A directory already quantized loads as it is;
            asking it for other bits is an error.
        scheduler: "unipc" or "euler" to override the checkpoint's ``scheduler_config.json``.
        keep_resident: keep every model loaded between stages and generations (faster repeated runs on
            machines with memory to spare); by default each is released when its stage ends.
        keep_experts_resident: Wan2.2-A14B only: keep both experts in memory instead of swapping them at
            the boundary.
    """
    from .cache import cached_conversion
    from .hub import is_hub_id, resolve_model

    compute_dtype = resolve_dtype(dtype)
    keep_freed_memory()
    quantization = QuantizationConfig(bits=quantize) if isinstance(quantize, int) else quantize
    model_dir = resolve_model(model)
    if is_hub_id(model):
        model_dir = cached_conversion(str(model), model_dir, dtype_name(compute_dtype), quantization)
    variant = load_variant(model_dir, str(model))
    log.info("using %s from %s (%s)", variant.name, model_dir, dtype_name(compute_dtype))

    components = ["text_encoder", "vae", "transformer"] + ["transformer_2"] * variant.two_experts
    components += ["image_encoder"] * variant.uses_clip
    for name in components:
        read_config(model_dir / name)
        check_safetensors(model_dir / name)

    base_scheduler = load_scheduler(model_dir)
    if scheduler is not None:
        scheduler_by_name(scheduler, base_scheduler.shift)  # validate the name now, not mid-generation

    def make_scheduler() -> Scheduler:
        if scheduler is None:
            return load_scheduler(model_dir)
        return scheduler_by_name(scheduler, base_scheduler.shift, base_scheduler.num_train_timesteps)

    transformer_q = quantization.transformer if quantization is not None else None
    text_q = quantization.text_encoder if quantization is not None else None
    image_encoder = None
    if variant.uses_clip:
        processor = CLIPImageProcessor.from_folder(model_dir / "image_processor")
        image_encoder = Resident(
            "image_encoder",
            lambda: ImageEncoder(processor, load_clip_vision(model_dir / "image_encoder", compute_dtype)),
            keep_resident,
        )
    return WanPipeline(
        variant=variant,
        model_name=str(model),
        dims=ModelDims.from_model_dir(model_dir),
        dtype=compute_dtype,
        quantize_bits=_quantized_bits(model_dir, quantization),
        tokenizer=UMT5Tokenizer.from_folder(model_dir / "tokenizer"),
        text_encoder=Resident(
            "text_encoder", lambda: load_umt5(model_dir / "text_encoder", compute_dtype, quantize=text_q), keep_resident
        ),
        experts=_experts(model_dir, variant, compute_dtype, transformer_q, base_scheduler, keep_resident,
                         keep_experts_resident),  # fmt: skip
        vae_encoder=Resident(
            "vae encoder", lambda: load_wan_vae(model_dir / "vae", compute_dtype, half="encoder"), keep_resident
        ),
        vae_decoder=Resident(
            "vae decoder", lambda: load_wan_vae(model_dir / "vae", compute_dtype, half="decoder"), keep_resident
        ),
        make_scheduler=make_scheduler,
        image_encoder=image_encoder,
    )


def _quantized_bits(model_dir: Path, requested: QuantizationConfig | None) -> int | None:
    """The transformer's bits for planning: as stored in a converted directory, else as requested
    (a mismatch between the two is reported when the transformer loads)."""
    stored = read_config(model_dir / "transformer").get("quantization")
    return stored.get("bits") if isinstance(stored, dict) else (requested.bits if requested else None)


def _experts(
    model_dir: Path,
    variant: Variant,
    dtype: mx.Dtype,
    quantize: Quantization | None,
    scheduler: Scheduler,
    keep_between_calls: bool,
    keep_resident: bool,
) -> Experts:
    folders = [model_dir / "transformer"]
    boundary = None
    if variant.two_experts:
        folders.append(model_dir / "transformer_2")
        boundary = read_config(model_dir, "model_index.json")["boundary_ratio"] * scheduler.num_train_timesteps
    return Experts(
        loaders=[lambda f=f: load_wan_transformer(f, dtype, quantize=quantize) for f in folders],
        boundary=boundary,
        keep_resident=keep_resident,
        keep_between_calls=keep_between_calls,
    )
