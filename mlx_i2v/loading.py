"""``load_pipeline``: from a model name to a ready :class:`~mlx_i2v.pipeline.Pipeline`.

The family is told from the checkpoint (:data:`FAMILY_LOADERS`): a ``model_index.json`` whose
``_class_name`` starts with "LTX" is LTX-Video (:mod:`mlx_i2v.families.ltx.loading`), anything else Wan
(:mod:`mlx_i2v.families.wan.loading`). The family's loader gathers its components (loaded lazily, each in
its stage) into the one pipeline."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

from .families.ltx.loading import load_ltx
from .families.wan.loading import load_wan
from .load_options import LoadOptions
from .lora.formats import read_lora
from .lora.spec import LoRA, as_loras
from .parallel import Parallel, join
from .pipeline import Pipeline
from .quantize import QuantizationConfig
from .runtime import default_vae_dtype, dtype_name, keep_freed_memory, resolve_dtype

log = logging.getLogger(__name__)

# (whether a checkpoint's model_index.json is the family's, its loader): the first match loads it.
FAMILY_LOADERS: tuple[tuple[Callable[[dict[str, Any]], bool], Callable[[LoadOptions], Pipeline]], ...] = (
    (lambda index: str(index.get("_class_name", "")).startswith("LTX"), load_ltx),
    (lambda index: True, load_wan),
)


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
    opts = LoadOptions(model_dir, str(model), compute_dtype, image_dtype, quantization, scheduler, keep_resident,
                       keep_experts_resident, parallel, loras)  # fmt: skip
    index = opts.index()
    return next(load for is_family, load in FAMILY_LOADERS if is_family(index))(opts)
