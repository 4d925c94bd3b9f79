"""``load_pipeline``: from a model name to a ready :class:`~mlx_i2v.pipeline.Pipeline`.

The family is told from the checkpoint: a ``model_index.json`` whose ``_class_name`` starts with "LTX" is
LTX-Video (:mod:`mlx_i2v.ltx_family`), anything else Wan (:mod:`mlx_i2v.variants`). Each family's loader
below gathers its components (loaded lazily, each in its stage) into the one pipeline."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import mlx.core as mx

from .errors import InvalidInputError
from .experts import Experts
from .families.wan.planner import ModelDims
from .lora.formats import read_lora
from .lora.manager import TransformerLoras
from .lora.spec import LoRA, as_loras
from .models.wan.clip import load_clip_vision
from .models.wan.clip_preprocess import CLIPImageProcessor
from .models.tokenizer import UMT5Tokenizer
from .models.umt5 import load_umt5
from .models.wan.transformer import load_wan_transformer
from .models.wan.vae import load_wan_vae
from .parallel import Parallel, join
from .ltx_family import ltx_samplers, ltx_variant
from .ltx_planner import LTXDims
from .models.ltx.transformer import load_ltx_transformer
from .models.ltx.vae import load_ltx_vae
from .models.tokenizer import T5Tokenizer
from .models.umt5 import load_t5
from .pipeline import ImageEncoder, Pipeline
from .quantize import Quantization, QuantizationConfig
from .resident import Resident
from .runtime import default_vae_dtype, dtype_name, keep_freed_memory, resolve_dtype
from .sampling import Samplers
from .variants import Variant, load_variant
from .weights import check_safetensors, read_config

log = logging.getLogger(__name__)


def load_pipeline(
    model: str | Path,
    *,
    dtype: str | None = None,
    vae_dtype: str | None = None,
    quantize: int | QuantizationConfig | None = None,
    scheduler: str | None = None,
    keep_resident: bool = False,
    keep_experts_resident: bool = False,
    parallel: str | Parallel = "auto",
    loras: Sequence[LoRA | tuple] | None = None,
) -> Pipeline:
    """Load an image-to-video pipeline: Wan or LTX-Video, as the checkpoint says.

    Nothing large is read yet: the configs are parsed and every weight file is checked to be complete;
    each model is loaded when its stage of a generation starts.

    Args:
        model: a local model directory, in diffusers layout (model_index.json + component folders) or
            converted by ``mlx-i2v convert``, or a Hub repo id such as "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
            downloaded once with ``huggingface_hub`` and converted once into the cache (see :mod:`mlx_i2v.cache`).
        dtype: "float32", "bfloat16" or "float16": the transformer's and the text encoder's compute dtype;
            default bfloat16 on a GPU, float32 on the CPU.
        vae_dtype: the same choices for the VAE and the CLIP image encoder; default float32, as diffusers'
            Wan docs run them beside a bfloat16 transformer. "bfloat16" halves their weights and the VAE's
            activations at a cost in fidelity (see README, "Precision").
        quantize: 4 or 8 to quantize the transformer(s) on load (the UMT5 encoder to 8 bits), or a
            :class:`~mlx_i2v.quantize.QuantizationConfig`. A directory already quantized loads as it is;
            asking it for other bits is an error.
        scheduler: the sampler of calls that name none: "unipc", "euler" or "dmd" (see
            :mod:`mlx_i2v.sampling`); default: the checkpoint's ``scheduler_config.json``.
        keep_resident: keep every model loaded between stages and generations (faster repeated runs on
            machines with memory to spare); by default each is released when its stage ends.
        keep_experts_resident: Wan2.2-A14B only: keep both experts in memory instead of swapping them at
            the boundary.
        parallel: under ``mlx.launch`` with several processes, how they share each generation: "auto",
            "cfg", "sequence" or "none" (see :mod:`mlx_i2v.parallel`), or a joined
            :class:`~mlx_i2v.parallel.Parallel`. A process on its own ignores it.
        loras: LoRAs to apply, each a :class:`~mlx_i2v.lora.LoRA` or ``(path, strength)`` or
            ``(path, strength, expert)`` with expert "high" or "low" (Wan2.2-A14B; omitted: both experts,
            or the only transformer). Every file is checked against the transformer's shapes now; change
            the set later with :meth:`Pipeline.set_loras`. (``parallel`` ranks are Wan only: LTX-Video
            refuses them.)
    """
    from .cache import cached_conversion
    from .convert.source import MLX_KEY
    from .hub import is_hub_id, resolve_model

    parallel = parallel if isinstance(parallel, Parallel) else join(parallel)
    compute_dtype = resolve_dtype(dtype)
    image_dtype = resolve_dtype(vae_dtype, what="vae_dtype", default=default_vae_dtype())
    keep_freed_memory()
    quantization = QuantizationConfig(bits=quantize) if isinstance(quantize, int) else quantize
    for spec in as_loras(loras):  # a missing or unreadable file fails before any download or conversion
        read_lora(spec.path)
    model_dir = resolve_model(model)
    if is_hub_id(model):
        model_dir = cached_conversion(str(model), model_dir, dtype_name(compute_dtype), quantization)
    if str(read_config(model_dir, "model_index.json").get("_class_name", "")).startswith("LTX"):
        if parallel.size > 1:
            raise InvalidInputError("parallel ranks are not supported on LTX-Video models yet; run one process")
        return _load_ltx(model_dir, str(model), compute_dtype, image_dtype, quantization, scheduler, keep_resident,
                         parallel, loras)  # fmt: skip
    variant = load_variant(model_dir, str(model))
    log.info("using %s from %s (%s, VAE %s)", variant.name, model_dir, dtype_name(compute_dtype), dtype_name(image_dtype))

    components = ["text_encoder", "vae", "transformer"] + ["transformer_2"] * variant.two_experts
    components += ["image_encoder"] * variant.uses_clip
    for name in components:
        read_config(model_dir / name)
        check_safetensors(model_dir / name)

    samplers = Samplers.from_config(read_config(model_dir / "scheduler", "scheduler_config.json"), scheduler)

    folders = [model_dir / "transformer"] + [model_dir / "transformer_2"] * variant.two_experts
    index = read_config(model_dir, "model_index.json")
    lora_state = TransformerLoras([read_config(f) for f in folders], compute_dtype, folders,
                                  baked=index.get(MLX_KEY, {}).get("loras", []))  # fmt: skip
    lora_state.set(loras, {})
    transformer_q = quantization.transformer if quantization is not None else None
    text_q = quantization.text_encoder if quantization is not None else None
    image_encoder = None
    if variant.uses_clip:
        processor = CLIPImageProcessor.from_folder(model_dir / "image_processor")
        image_encoder = Resident(
            "image_encoder",
            lambda: ImageEncoder(processor, load_clip_vision(model_dir / "image_encoder", image_dtype)),
            keep_resident,
        )
    return Pipeline(
        variant=variant,
        model_name=str(model),
        dims=ModelDims.from_model_dir(model_dir),
        dtype=compute_dtype,
        vae_dtype=image_dtype,
        quantize_bits=_quantized_bits(model_dir, quantization),
        tokenizer=UMT5Tokenizer.from_folder(model_dir / "tokenizer"),
        text_encoder=Resident(
            "text_encoder", lambda: load_umt5(model_dir / "text_encoder", compute_dtype, quantize=text_q), keep_resident
        ),
        experts=_experts(model_dir, variant, compute_dtype, transformer_q, samplers.num_train_timesteps, keep_resident,
                         keep_experts_resident, lora_state),  # fmt: skip
        loras=lora_state,
        vae_encoder=Resident(
            "vae encoder", lambda: load_wan_vae(model_dir / "vae", image_dtype, half="encoder"), keep_resident
        ),
        vae_decoder=Resident(
            "vae decoder", lambda: load_wan_vae(model_dir / "vae", image_dtype, half="decoder"), keep_resident
        ),
        samplers=samplers,
        image_encoder=image_encoder,
        parallel=parallel,
    )


def _load_ltx(
    model_dir: Path,
    name: str,
    dtype: mx.Dtype,
    vae_dtype: mx.Dtype,
    quantization: QuantizationConfig | None,
    scheduler: str | None,
    keep_resident: bool,
    parallel: Parallel,
    loras: Sequence[LoRA | tuple] | None,
) -> Pipeline:
    """An LTX-Video pipeline: T5 encoder, transformer (with its LoRAs), VAE halves (optional
    ``latent_upsampler/`` unused)."""
    variant = ltx_variant(read_config(model_dir, "model_index.json"), model_dir)
    log.info("using %s from %s (%s, VAE %s)", variant.name, model_dir, dtype_name(dtype), dtype_name(vae_dtype))
    for component in ("text_encoder", "vae", "transformer"):
        read_config(model_dir / component)
        check_safetensors(model_dir / component)
    samplers = ltx_samplers(read_config(model_dir / "scheduler", "scheduler_config.json"), scheduler, variant)
    transformer_q = quantization.transformer if quantization is not None else None
    text_q = quantization.text_encoder if quantization is not None else None
    from .convert.source import MLX_KEY

    folder = model_dir / "transformer"
    index = read_config(model_dir, "model_index.json")
    lora_state = TransformerLoras([read_config(folder)], dtype, [folder], baked=index.get(MLX_KEY, {}).get("loras", []))
    lora_state.set(loras, {})
    return Pipeline(
        variant=variant,
        model_name=name,
        dims=LTXDims.from_model_dir(model_dir),
        dtype=dtype,
        vae_dtype=vae_dtype,
        quantize_bits=_quantized_bits(model_dir, quantization),
        tokenizer=T5Tokenizer.from_folder(model_dir / "tokenizer"),
        text_encoder=Resident("text_encoder", lambda: load_t5(model_dir / "text_encoder", dtype, quantize=text_q),
                              keep_resident),  # fmt: skip
        experts=Experts(loaders=[lambda: lora_state.apply(0, load_ltx_transformer(folder, dtype, quantize=transformer_q))],
                        keep_between_calls=keep_resident),  # fmt: skip
        loras=lora_state,
        vae_encoder=Resident("vae encoder", lambda: load_ltx_vae(model_dir / "vae", vae_dtype, "encoder"),
                             keep_resident),  # fmt: skip
        vae_decoder=Resident("vae decoder", lambda: load_ltx_vae(model_dir / "vae", vae_dtype, "decoder"),
                             keep_resident),  # fmt: skip
        samplers=samplers,
        parallel=parallel,
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
    num_train_timesteps: int,
    keep_between_calls: bool,
    keep_resident: bool,
    loras: TransformerLoras,
) -> Experts:
    folders = [model_dir / "transformer"]
    boundary = None
    if variant.two_experts:
        folders.append(model_dir / "transformer_2")
        boundary = read_config(model_dir, "model_index.json")["boundary_ratio"] * num_train_timesteps
    return Experts(
        loaders=[
            lambda f=f, i=i: loras.apply(i, load_wan_transformer(f, dtype, quantize=quantize))
            for i, f in enumerate(folders)
        ],
        boundary=boundary,
        keep_resident=keep_resident,
        keep_between_calls=keep_between_calls,
    )
