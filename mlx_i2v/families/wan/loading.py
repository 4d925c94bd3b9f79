"""The Wan family's loader: its components (UMT5 encoder, one or two transformer experts, the VAE's
halves, Wan2.1's CLIP image encoder), each loaded lazily in its stage, gathered into the one pipeline."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import mlx.core as mx
from PIL import Image

from ...experts import Experts
from ...load_options import LoadOptions
from ...lora.manager import TransformerLoras
from ...models.tokenizer import UMT5Tokenizer
from ...models.umt5 import load_umt5
from ...models.wan.clip import CLIPVisionTower, load_clip_vision
from ...models.wan.clip_preprocess import CLIPImageProcessor
from ...models.wan.transformer import load_wan_transformer
from ...models.wan.vae import load_wan_vae
from ...pipeline import Pipeline
from ...runtime import dtype_name
from ...sampling import Samplers
from ...weights import read_config
from .planner import ModelDims
from .variants import Variant, load_variant

log = logging.getLogger(__name__)


@dataclass
class ImageEncoder:
    """CLIP ViT-H/14 image tokens for Wan2.1 I2V/FLF2V: penultimate hidden states of the original photo(s)."""

    processor: CLIPImageProcessor
    tower: CLIPVisionTower

    def __call__(self, images: list[Image.Image]) -> mx.array:
        """N photos -> (N, 257, 1280) tokens (for ViT-H/14 at 224 px)."""
        return self.tower(mx.array(self.processor(images)))


def load_wan(opts: LoadOptions) -> Pipeline:
    """A Wan pipeline for the checkpoint ``opts.model_dir`` (its variant told from its configs)."""
    model_dir, dtype, vae_dtype = opts.model_dir, opts.dtype, opts.vae_dtype
    variant = load_variant(model_dir, opts.name)
    log.info("using %s from %s (%s, VAE %s)", variant.name, model_dir, dtype_name(dtype), dtype_name(vae_dtype))
    components = ["text_encoder", "vae", "transformer"] + ["transformer_2"] * variant.two_experts
    opts.check_components(components + ["image_encoder"] * variant.uses_clip)
    samplers = Samplers.from_config(read_config(model_dir / "scheduler", "scheduler_config.json"), opts.scheduler)
    folders = [model_dir / "transformer"] + [model_dir / "transformer_2"] * variant.two_experts
    loras = opts.transformer_loras(folders)
    image_encoder = None
    if variant.uses_clip:
        processor = CLIPImageProcessor.from_folder(model_dir / "image_processor")
        image_encoder = opts.resident(
            "image_encoder", lambda: ImageEncoder(processor, load_clip_vision(model_dir / "image_encoder", vae_dtype))
        )
    text_q = opts.text_quantization
    return Pipeline(
        variant=variant,
        model_name=opts.name,
        dims=ModelDims.from_model_dir(model_dir),
        dtype=dtype,
        vae_dtype=vae_dtype,
        quantize_bits=opts.quantized_bits(),
        tokenizer=UMT5Tokenizer.from_folder(model_dir / "tokenizer"),
        text_encoder=opts.resident("text_encoder", lambda: load_umt5(model_dir / "text_encoder", dtype, quantize=text_q)),
        experts=_experts(opts, variant, samplers.num_train_timesteps, loras),
        loras=loras,
        vae_encoder=opts.resident("vae encoder", lambda: load_wan_vae(model_dir / "vae", vae_dtype, half="encoder")),
        vae_decoder=opts.resident("vae decoder", lambda: load_wan_vae(model_dir / "vae", vae_dtype, half="decoder")),
        samplers=samplers,
        image_encoder=image_encoder,
        parallel=opts.parallel,
    )


def _experts(opts: LoadOptions, variant: Variant, num_train_timesteps: int, loras: TransformerLoras) -> Experts:
    """The transformer, or Wan2.2-A14B's two experts switched at ``boundary_ratio`` of the training timesteps."""
    folders = [opts.model_dir / "transformer"]
    boundary = None
    if variant.two_experts:
        folders.append(opts.model_dir / "transformer_2")
        boundary = opts.index()["boundary_ratio"] * num_train_timesteps
    quantize = opts.transformer_quantization
    return Experts(
        loaders=[
            lambda f=f, i=i: loras.apply(i, load_wan_transformer(f, opts.dtype, quantize=quantize))
            for i, f in enumerate(folders)
        ],
        boundary=boundary,
        keep_resident=opts.keep_experts_resident,
        keep_between_calls=opts.keep_resident,
    )
