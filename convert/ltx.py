"""Planning the conversion of a Lightricks single-file LTX-Video checkpoint (``ltxv-*.safetensors``).

The file holds the transformer (``model.diffusion_model.*``) and the VAE (``vae.*``) under LTX's own names,
and a ``config`` JSON in its safetensors metadata; it has no text encoder. What the output gets:

* ``transformer/`` and ``vae/``: the file's tensors through the ORIGINAL maps kept beside the models
  (:func:`~mlx_i2v.models.ltx.single_file.split_single_file`, ``transformer.ORIGINAL_MAP``,
  ``vae_original.original_map``), with configs read off the tensors (:mod:`mlx_i2v.convert.ltx_infer`);
* ``text_encoder/`` and ``tokenizer/``: T5 v1.1 XXL from another LTX-Video directory the user names
  (``--text-encoder``; every LTX-Video 0.9.x release uses the same google/t5-v1_1-xxl), converted and copied;
* ``scheduler/`` and ``model_index.json`` as diffusers' ``scripts/convert_ltx_to_diffusers.py`` writes
  them for the generation the VAE shows (:data:`SCHEDULER_CONFIGS`), with the pipeline class the
  generation is run with (:data:`PIPELINES`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import mlx.core as mx

from mlx_i2v.components import load_component
from mlx_i2v.errors import InvalidInputError, WeightLoadError
from mlx_i2v.models.ltx import transformer as ltx_transformer
from mlx_i2v.models.ltx.single_file import split_single_file
from mlx_i2v.models.ltx.vae_original import original_generation, original_map, original_vae_tensors
from mlx_i2v.quantize import QuantizationConfig
from mlx_i2v.weights import read_config, read_safetensors, safetensors_header

from . import ltx_infer
from .families import LTX, ltx_entries, model_name
from .original import load_mapped
from .plan import Plan, WeightJob, mlx_index, numel, source_entry
from .source import Source, read_index

log = logging.getLogger(__name__)

# The pipeline each generation runs with: 0.9.5+ conditions through LTXConditionPipeline (strength, frame
# index, keyframes); 0.9.0 and 0.9.1 have only the first-frame conditioning of LTXImageToVideoPipeline.
PIPELINES = {"0.9.0": "LTXImageToVideoPipeline", "0.9.1": "LTXImageToVideoPipeline", "0.9.5": "LTXConditionPipeline"}

# diffusers' FlowMatchEulerDiscreteScheduler defaults (schedulers/scheduling_flow_match_euler_discrete.py).
_FLOW_MATCH_EULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "time_shift_type": "exponential",
    "stochastic_sampling": False,
}
# convert_ltx_to_diffusers.py: 0.9.0/0.9.1 shift dynamically by resolution; 0.9.5+ take no shift.
_DYNAMIC_SHIFT = dict(
    use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024, max_image_seq_len=4096,
    shift_terminal=0.1,
)  # fmt: skip
SCHEDULER_CONFIGS = {
    "0.9.0": {**_FLOW_MATCH_EULER, **_DYNAMIC_SHIFT},
    "0.9.1": {**_FLOW_MATCH_EULER, **_DYNAMIC_SHIFT},
    "0.9.5": dict(_FLOW_MATCH_EULER),
}

# model_index.json entries of the components, as the diffusers LTX repos have them.
_INDEX_COMPONENTS = {
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "T5Tokenizer"],
    "transformer": ["diffusers", "LTXVideoTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLLTXVideo"],
}


def diffusers_index(generation: str, text_dir: Path) -> dict[str, Any]:
    """The model_index.json of a diffusers LTX-Video directory of ``generation``; the tokenizer's and text
    encoder's classes are those of ``text_dir``'s index where it has one."""
    theirs = read_index(text_dir) or {}
    index: dict[str, Any] = {"_class_name": PIPELINES[generation], **_INDEX_COMPONENTS}
    for name in ("text_encoder", "tokenizer"):
        if isinstance(theirs.get(name), list):
            index[name] = theirs[name]
    return index


def read_metadata_config(path: Path) -> dict[str, Any]:
    """The ``config`` JSON of a single file's safetensors metadata (LTX's configs of its components), or {}
    if it has none.

    Raises:
        WeightLoadError: an unreadable header or a ``config`` that is not a JSON object.
    """
    metadata = safetensors_header(path)[1].get("__metadata__") or {}
    if "config" not in metadata:
        return {}
    try:
        config = json.loads(metadata["config"])
    except ValueError as e:
        raise WeightLoadError(f"{path.name}: unreadable config in its metadata: {e}") from None
    if not isinstance(config, dict):
        raise WeightLoadError(f"{path.name}: the config in its metadata is not a JSON object")
    return config


def read_single_file(path: Path) -> dict[str, mx.array]:
    """Every tensor of the file, lazily (only shapes are read until a tensor is used).

    Raises:
        WeightLoadError: a file shorter than its header says (a truncated download), or unreadable.
        InvalidInputError: float8 tensors (the -fp8 releases), which are not supported.
    """
    try:
        header_len, header = safetensors_header(path)
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if path.stat().st_size < 8 + header_len + end:
            raise WeightLoadError(f"{path.name}: truncated or corrupt ({path.stat().st_size} of "
                                  f"{8 + header_len + end} bytes)")  # fmt: skip
        float8 = sorted(k for k, v in header.items() if k != "__metadata__" and str(v["dtype"]).startswith("F8"))
        if float8:  # mx.load would read them as uint8 bytes
            raise InvalidInputError(
                f"{path.name} is a float8 checkpoint ({float8[0]} and {len(float8) - 1} more); convert the "
                "bfloat16 release of the same model (the ltxv-*.safetensors without -fp8)"
            )
        return mx.load(str(path))
    except (WeightLoadError, InvalidInputError):
        raise
    except Exception as e:  # OSError, a malformed header entry, or mlx's RuntimeError with a C++ message
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightLoadError(f"{path.name}: cannot read it (truncated or corrupt?): {msg}") from None


def check_text_encoder_dir(folder: Path | None, checkpoint: Path) -> Path:
    """The ``--text-encoder`` directory, checked: it has a float T5 ``text_encoder/`` and a ``tokenizer/``.

    Raises:
        InvalidInputError: none given, or not such a directory (what is wrong, named).
    """
    if folder is None:
        raise InvalidInputError(
            f"{checkpoint.name} holds no text encoder: pass --text-encoder DIR (text_encoder= in Python), a "
            "diffusers LTX-Video directory with text_encoder/ (T5 v1.1 XXL) and tokenizer/, such as a download "
            "of Lightricks/LTX-Video-0.9.7-distilled"
        )
    folder = Path(folder).expanduser()
    for needed in ("text_encoder/config.json", "tokenizer"):
        if not (folder / needed).exists():
            raise InvalidInputError(f"--text-encoder {folder}: missing {needed}")
    config = read_config(folder / "text_encoder")
    if config.get("model_type", "t5") != "t5":
        raise InvalidInputError(
            f"--text-encoder {folder}: text_encoder/ is {config.get('model_type')!r}, LTX-Video needs T5 v1.1 ('t5')"
        )
    if config.get("quantization"):
        raise InvalidInputError(f"--text-encoder {folder}: its text encoder is quantized; name a float one")
    return folder


def _vae_generation(vae_tensors: Mapping[str, mx.array], path: Path) -> str:
    if not vae_tensors:
        raise WeightLoadError(
            f"{path.name}: no VAE tensors (vae.*), so the LTX-Video version is unknown; "
            "expected a Lightricks ltxv-*.safetensors file, which holds the transformer and the VAE"
        )
    return original_generation(vae_tensors)


def plan_single_file(
    source: Source, text_encoder: Path | None, dtype: mx.Dtype, quantization: QuantizationConfig | None
) -> Plan:
    """Plan converting a single-file checkpoint: the file's header, tensor names and configs are checked
    now; its tensors are read (and their shapes checked) when each component is converted."""
    path = source.path
    text_dir = check_text_encoder_dir(text_encoder, path)
    tensors = read_single_file(path)
    metadata = read_metadata_config(path)
    parts = split_single_file(tensors)
    if "patchify_proj.weight" not in parts["transformer"]:
        raise WeightLoadError(f"{path.name}: not an LTX-Video checkpoint (no transformer patchify_proj.weight)")
    ltx_transformer.ORIGINAL_MAP.apply(parts["transformer"])  # every name checked now (shapes when loaded)
    vae_tensors = original_vae_tensors(tensors)
    generation = _vae_generation(vae_tensors, path)
    transformer_config = ltx_infer.transformer_config(parts["transformer"], metadata.get("transformer"))
    vae_config = ltx_infer.vae_config(vae_tensors, generation)
    log.info("%s: %s single file (%d transformer blocks)", path.name, model_name(ltx_entries(generation)),
             transformer_config["num_layers"])  # fmt: skip

    transformer = LTX.weights["transformer"]
    vae = LTX.weights["vae"]
    text = LTX.weights["text_encoder"]
    transformer_q, text_q = transformer.quantization(quantization), text.quantization(quantization)

    def load_transformer():
        part = split_single_file(read_single_file(path))["transformer"]
        transformer_map = ltx_transformer.ORIGINAL_MAP
        model = load_mapped(transformer.kind, transformer_config, part, lambda m: transformer_map, dtype, transformer_q)
        return model, transformer_config

    def load_vae():
        part = original_vae_tensors(read_single_file(path))
        return load_mapped(vae.kind, vae_config, part, lambda m: original_map(m.config), dtype, None), vae_config

    def load_text_encoder():
        folder = text_dir / "text_encoder"
        return load_component(text.kind, folder, text.kind.stored_dtype(dtype), quantize=text_q), read_config(folder)

    jobs = [
        WeightJob("transformer", transformer.kind, numel(parts["transformer"]), transformer_q, load_transformer,
                  config=transformer_config),
        WeightJob("text_encoder", text.kind, numel(read_safetensors(text_dir / "text_encoder")), text_q,
                  load_text_encoder),
        WeightJob("vae", vae.kind, numel(vae_tensors), None, load_vae),
    ]  # fmt: skip
    index = diffusers_index(generation, text_dir)
    return Plan(
        index=mlx_index(index, ltx_entries(generation), dtype, quantization, source_entry(source)),
        weights=jobs,
        copies={"tokenizer": text_dir / "tokenizer"},
        files={"scheduler/scheduler_config.json": SCHEDULER_CONFIGS[generation]},
    )
