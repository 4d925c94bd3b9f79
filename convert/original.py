"""Planning the conversion of a Wan-AI original-layout repo (wan.md §4.0).

What the repos hold, and what each becomes:

* ``config.json`` + ``diffusion_pytorch_model*.safetensors`` (``WanModel``; a ComfyUI single file with
  ``model.diffusion_model.`` keys works too) -> ``transformer/``; for A14B, ``high_noise_model/`` ->
  ``transformer/`` and ``low_noise_model/`` -> ``transformer_2/``;
* ``Wan2.1_VAE.pth`` / ``Wan2.2_VAE.pth`` -> ``vae/``;
* ``models_t5_umt5-xxl-enc-bf16.pth`` -> ``text_encoder/``, ``google/umt5-xxl/`` -> ``tokenizer/`` (copied);
* ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` (Wan2.1 I2V/FLF2V) -> ``image_encoder/`` (the
  visual tower; its XLM-RoBERTa text tower is ignored) and ``image_processor/``;

plus the ``scheduler/`` and ``model_index.json`` the diffusers repos ship. Tensors are renamed by the
ORIGINAL maps kept beside the models; configs are read off the tensors (:mod:`mlx_i2v.convert.infer`).
Which Wan model a repo is follows from its files: two experts is Wan2.2-I2V-A14B, the Wan2.2 VAE is
TI2V-5B, an image branch in the DiT is Wan2.1 I2V, with a position table FLF2V.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import mlx.core as mx
import mlx.nn as nn

from mlx_i2v.components import ComponentType
from mlx_i2v.errors import WeightLoadError
from mlx_i2v.families.wan.variants import detect_variant
from mlx_i2v.models import umt5
from mlx_i2v.models.wan import clip
from mlx_i2v.models.wan import transformer as wan_transformer
from mlx_i2v.models.wan import vae as wan_vae
from mlx_i2v.models.wan.clip_preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from mlx_i2v.pth import read_pth
from mlx_i2v.quantize import Quantization, QuantizationConfig
from mlx_i2v.variants import Variant
from mlx_i2v.weights import WeightMap, load_strict, read_config, read_safetensors

from . import infer
from .families import wan_entries
from .plan import Plan, WeightJob, mlx_index, numel, pth_numel, source_entry
from .source import CLIP_FILE, EXPERTS, T5_FILE, TOKENIZER_DIR, VAE_FILES, Source

log = logging.getLogger(__name__)

Tensors = Mapping[str, mx.array]


@dataclass(frozen=True)
class RepoKind:
    """What the diffusers repo of one original checkpoint looks like (convert_wan_to_diffusers.py)."""

    pipeline: str
    flow_shift: float  # the shift diffusers' converter gives the scheduler
    uses_clip: bool
    expand_timesteps: bool = False  # TI2V: per-token timesteps
    boundary_ratio: float | None = None  # A14B: where the low-noise expert takes over


KINDS = {
    "ti2v": RepoKind("WanPipeline", 5.0, uses_clip=False, expand_timesteps=True),  # Wan2.2-TI2V-5B
    "i2v": RepoKind("WanImageToVideoPipeline", 3.0, uses_clip=True),  # Wan2.1-I2V-14B-480P/720P
    "flf2v": RepoKind("WanImageToVideoPipeline", 16.0, uses_clip=True),  # Wan2.1-FLF2V-14B-720P
    "a14b": RepoKind("WanImageToVideoPipeline", 3.0, uses_clip=False, boundary_ratio=0.9),  # Wan2.2-I2V-A14B
}

# diffusers' UniPCMultistepScheduler as its converter configures it for Wan; the shift is per kind.
SCHEDULER_CONFIG = {
    "_class_name": "UniPCMultistepScheduler",
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "num_train_timesteps": 1000,
    "solver_order": 2,
    "solver_type": "bh2",
    "predict_x0": True,
    "lower_order_final": True,
    "final_sigmas_type": "zero",
}


def image_processor_config(image_size: int) -> dict[str, Any]:
    """transformers' CLIPImageProcessor defaults at the tower's resolution (224 for ViT-H/14): bicubic
    shortest-edge resize, centre crop, OpenAI CLIP mean/std, as the diffusers repos ship it."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "do_convert_rgb": True,
    }


def diffusers_index(kind: str) -> dict[str, Any]:
    """The model_index.json diffusers' converter writes for ``kind``."""
    k = KINDS[kind]
    absent = [None, None]
    index: dict[str, Any] = {
        "_class_name": k.pipeline,
        "boundary_ratio": k.boundary_ratio,
        "expand_timesteps": k.expand_timesteps,
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"] if kind == "a14b" else absent,
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    if k.pipeline == "WanImageToVideoPipeline":
        index["image_encoder"] = ["transformers", "CLIPVisionModelWithProjection"] if k.uses_clip else absent
        index["image_processor"] = ["transformers", "CLIPImageProcessor"] if k.uses_clip else absent
    return index


@dataclass(frozen=True)
class OriginalRepo:
    """The files of an original-layout repo."""

    root: Path
    transformers: dict[str, Path]  # output component -> folder of WanModel safetensors (+ config.json)
    vae_file: Path
    vae_version: str
    t5_file: Path
    tokenizer_dir: Path
    clip_file: Path | None

    @classmethod
    def scan(cls, root: Path) -> OriginalRepo:
        """Find the files; raise :class:`WeightLoadError` naming what is missing."""
        experts = {component: root / folder for folder, component in EXPERTS.items() if (root / folder).is_dir()}
        if experts and len(experts) != len(EXPERTS):
            raise WeightLoadError(f"{root}: an A14B repo needs both {' and '.join(EXPERTS)}/")
        vaes = {v: root / f for v, f in VAE_FILES.items() if (root / f).is_file()}
        if len(vaes) != 1:
            found = "both " + " and ".join(VAE_FILES.values()) if vaes else "no " + " or ".join(VAE_FILES.values())
            raise WeightLoadError(f"{root}: expected one VAE checkpoint, found {found}")
        ((vae_version, vae_file),) = vaes.items()
        for needed in (root / T5_FILE, root / TOKENIZER_DIR / "tokenizer.json"):
            if not needed.is_file():
                raise WeightLoadError(f"{root}: missing {needed.relative_to(root)}")
        clip_file = root / CLIP_FILE
        return cls(
            root=root,
            transformers=experts or {"transformer": root},
            vae_file=vae_file,
            vae_version=vae_version,
            t5_file=root / T5_FILE,
            tokenizer_dir=root / TOKENIZER_DIR,
            clip_file=clip_file if clip_file.is_file() else None,
        )

    def kind(self, transformer_config: Mapping[str, Any]) -> str:
        """Which Wan model this is (see the module docstring)."""
        if len(self.transformers) == 2:
            return "a14b"
        if self.vae_version == "2.2":
            return "ti2v"
        if transformer_config["image_dim"] is not None:
            return "flf2v" if transformer_config["pos_embed_seq_len"] else "i2v"
        raise WeightLoadError(
            f"{self.root}: a text-to-video checkpoint (no image conditioning); only image-to-video Wan models "
            "are supported"
        )


def _wan_config(folder: Path) -> dict[str, Any] | None:
    """The folder's WanModel config.json, None for a bare (ComfyUI) checkpoint."""
    return read_config(folder) if (folder / "config.json").is_file() else None


def _read_transformer(folder: Path) -> dict[str, mx.array]:
    """Every tensor of a WanModel folder (lazily), ComfyUI's ``model.diffusion_model.`` prefix dropped."""
    return wan_transformer.strip_prefix(read_safetensors(folder, what="transformer"))


def load_mapped(
    kind: ComponentType,
    config: Mapping[str, Any],
    tensors: Tensors,
    weight_map: Callable[[nn.Module], WeightMap],
    dtype: mx.Dtype,
    quantization: Quantization | None,
) -> nn.Module:
    """Build ``kind`` from ``config``, fill it strictly from original-named ``tensors`` through
    ``weight_map`` in the dtype ``kind`` stores for ``dtype`` (the float32 islands kept), and quantize it
    if asked."""
    model = kind.build(config)
    dtype = kind.stored_dtype(dtype)
    load_strict(
        model, weight_map(model).apply(tensors), dtype=dtype, keep_float32=kind.keep_float32(dtype), what=kind.name
    )
    if quantization is not None:
        kind.quantize(model, quantization.bits, quantization.group_size)
    return model


def _detect_variant(index: Mapping[str, Any], transformer_config: Mapping[str, Any], name: str) -> Variant:
    """The variant by the loader's own rules (:func:`~mlx_i2v.families.wan.variants.detect_variant`), which read a
    directory: give it the two files it looks at."""
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        (folder / "model_index.json").write_text(json.dumps(index))
        (folder / "transformer").mkdir()
        (folder / "transformer" / "config.json").write_text(json.dumps(transformer_config))
        return detect_variant(folder, name)


def plan_original(source: Source, dtype: mx.Dtype, quantization: QuantizationConfig | None) -> Plan:
    """Plan converting an original-layout repo; transformer configs are read now (from safetensors
    headers), the ``.pth`` files only when their component is converted."""
    repo = OriginalRepo.scan(source.path)
    transformer_q = quantization.transformer if quantization else None
    text_q = quantization.text_encoder if quantization else None

    jobs: list[WeightJob] = []
    configs: dict[str, dict[str, Any]] = {}
    for component, folder in repo.transformers.items():
        tensors = _read_transformer(folder)
        configs[component] = infer.transformer_config(tensors, _wan_config(folder))

        def load_transformer(folder: Path = folder, config: dict[str, Any] = configs[component]):
            model = load_mapped(
                wan_transformer.TRANSFORMER,
                config,
                _read_transformer(folder),
                lambda m: wan_transformer.ORIGINAL_MAP,
                dtype,
                transformer_q,
            )
            return model, config

        jobs.append(WeightJob(component, wan_transformer.TRANSFORMER, numel(tensors), transformer_q, load_transformer,
                              config=configs[component]))  # fmt: skip

    def load_text_encoder():
        tensors = read_pth(repo.t5_file)
        config = infer.umt5_config(tensors)
        return load_mapped(umt5.TEXT_ENCODER, config, tensors, lambda m: umt5.ORIGINAL_MAP, dtype, text_q), config

    def load_vae():
        tensors = read_pth(repo.vae_file)
        config = infer.vae_config(tensors, repo.vae_version)
        vae_map = wan_vae.ORIGINAL_MAP_22 if repo.vae_version == "2.2" else wan_vae.ORIGINAL_MAP_21
        return load_mapped(wan_vae.VAE, config, tensors, lambda m: vae_map, dtype, None), config

    jobs.append(WeightJob("text_encoder", umt5.TEXT_ENCODER, pth_numel(repo.t5_file), text_q, load_text_encoder))
    jobs.append(WeightJob("vae", wan_vae.VAE, pth_numel(repo.vae_file), None, load_vae))

    kind = repo.kind(configs["transformer"])
    files: dict[str, dict[str, Any]] = {
        "scheduler/scheduler_config.json": {**SCHEDULER_CONFIG, "flow_shift": KINDS[kind].flow_shift}
    }
    if KINDS[kind].uses_clip:
        if repo.clip_file is None:
            raise WeightLoadError(f"{repo.root}: missing {CLIP_FILE} (Wan2.1 I2V/FLF2V attend to CLIP image tokens)")
        clip_file = repo.clip_file

        def load_image_encoder():
            tensors = clip.split_fused_qkv(read_pth(clip_file))
            config = infer.clip_config(tensors)
            model = load_mapped(clip.IMAGE_ENCODER, config, tensors, lambda m: clip.original_map(m.config), dtype, None)
            return model, config

        def processor(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
            return {"image_processor/preprocessor_config.json": image_processor_config(config["image_size"])}

        jobs.append(
            WeightJob("image_encoder", clip.IMAGE_ENCODER, pth_numel(clip_file), None, load_image_encoder, processor)
        )
    elif repo.clip_file is not None:
        log.info("%s: ignoring %s (this model does not use CLIP)", repo.root, CLIP_FILE)

    index = diffusers_index(kind)
    variant = _detect_variant(index, configs["transformer"], source.label)
    log.info("%s: Wan-AI original layout of %s", source.path, variant.name)
    return Plan(
        index=mlx_index(index, wan_entries(variant), dtype, quantization, source_entry(source)),
        weights=jobs,
        copies={"tokenizer": repo.tokenizer_dir},
        files=files,
    )
