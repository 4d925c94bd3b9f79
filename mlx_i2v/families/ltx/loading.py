"""The LTX-Video family's loader: T5 encoder, transformer (with its LoRAs) and the VAE's halves, each
loaded lazily in its stage, gathered into the one pipeline (an optional ``latent_upsampler/`` is unused)."""

from __future__ import annotations

import logging

from ...errors import InvalidInputError
from ...experts import Experts
from ...load_options import LoadOptions
from ...models.ltx.transformer import load_ltx_transformer
from ...models.ltx.vae import load_ltx_vae
from ...models.tokenizer import T5Tokenizer
from ...models.umt5 import load_t5
from ...pipeline import Pipeline
from ...runtime import dtype_name
from ...weights import read_config
from .planner import LTXDims
from .variants import ltx_samplers, ltx_variant

log = logging.getLogger(__name__)


def load_ltx(opts: LoadOptions) -> Pipeline:
    """An LTX-Video pipeline for the checkpoint ``opts.model_dir`` (its variant told from ``_class_name``)."""
    if opts.parallel.size > 1:
        raise InvalidInputError("parallel ranks are not supported on LTX-Video models yet; run one process")
    model_dir, dtype, vae_dtype = opts.model_dir, opts.dtype, opts.vae_dtype
    variant = ltx_variant(opts.index(), model_dir)
    log.info("using %s from %s (%s, VAE %s)", variant.name, model_dir, dtype_name(dtype), dtype_name(vae_dtype))
    opts.check_components(("text_encoder", "vae", "transformer"))
    samplers = ltx_samplers(read_config(model_dir / "scheduler", "scheduler_config.json"), opts.scheduler, variant)
    text_q, transformer_q = opts.text_quantization, opts.transformer_quantization
    folder = model_dir / "transformer"
    loras = opts.transformer_loras([folder])
    return Pipeline(
        variant=variant,
        model_name=opts.name,
        dims=LTXDims.from_model_dir(model_dir),
        dtype=dtype,
        vae_dtype=vae_dtype,
        quantize_bits=opts.quantized_bits(),
        tokenizer=T5Tokenizer.from_folder(model_dir / "tokenizer"),
        text_encoder=opts.resident("text_encoder", lambda: load_t5(model_dir / "text_encoder", dtype, quantize=text_q)),
        experts=Experts(loaders=[lambda: loras.apply(0, load_ltx_transformer(folder, dtype, quantize=transformer_q))],
                        keep_between_calls=opts.keep_resident),  # fmt: skip
        loras=loras,
        vae_encoder=opts.resident("vae encoder", lambda: load_ltx_vae(model_dir / "vae", vae_dtype, "encoder")),
        vae_decoder=opts.resident("vae decoder", lambda: load_ltx_vae(model_dir / "vae", vae_dtype, "decoder")),
        samplers=samplers,
        parallel=opts.parallel,
    )
