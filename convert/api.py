"""``convert_model`` and ``quantize_model``: diffusers, Wan-AI original or LTX-Video single-file checkpoints
-> MLX directories."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import mlx.core as mx

from mlx_i2v.components import load_component
from mlx_i2v.errors import InvalidInputError
from mlx_i2v.quantize import DEFAULT_GROUP_SIZE, DEFAULT_TEXT_ENCODER_BITS, QuantizationConfig
from mlx_i2v.runtime import resolve_dtype
from mlx_i2v.weights import read_config, read_safetensors

from .families import Family, family_of, model_name
from .loras import bake_loras
from .ltx import plan_single_file
from .original import plan_original
from .plan import Plan, WeightJob, mlx_index, numel, source_entry
from .source import MLX_KEY, Source, read_index, resolve_source
from .writer import write_plan

log = logging.getLogger(__name__)


def components(index: Mapping[str, Any]) -> list[str]:
    """The components a model_index.json lists as present (``[library, class]`` with a class)."""
    return [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v and v[-1] is not None]


def _component_jobs(
    folder: Path, index: Mapping[str, Any], dtype: mx.Dtype, quantization: QuantizationConfig | None
) -> tuple[list[WeightJob], dict[str, Path]]:
    """A job per weight component of a diffusers or MLX directory of either family (loaded through
    :func:`~mlx_i2v.components.load_component`, which maps and checks every tensor) and the folders to
    copy."""
    family = family_of(index, folder)
    jobs: list[WeightJob] = []
    copies: dict[str, Path] = {}
    for name in components(index):
        if name in family.copied:
            copies[name] = folder / name
            continue
        if name not in family.weights:
            raise InvalidInputError(f"{folder}: unsupported component {name!r} in model_index.json")
        weights = family.weights[name]
        q = weights.quantization(quantization)

        def load(name: str = name, kind=weights.kind, q=q):
            model = load_component(kind, folder / name, kind.stored_dtype(dtype), quantize=q)
            return model, read_config(folder / name)

        jobs.append(WeightJob(name, weights.kind, numel(read_safetensors(folder / name)), q, load,
                              config=read_config(folder / name)))  # fmt: skip
    # Transformers first: the biggest, and the likeliest to fail on a broken download.
    jobs.sort(key=lambda job: not job.name.startswith("transformer"))
    return jobs, copies


def _plan_diffusers(source: Source, dtype: mx.Dtype, quantization: QuantizationConfig | None) -> Plan:
    index = read_index(source.path) or {}
    family: Family = family_of(index, source.path)
    entries = family.describe(source.path, index, source.label)
    jobs, copies = _component_jobs(source.path, index, dtype, quantization)
    log.info("%s: diffusers layout of %s", source.path, model_name(entries))
    return Plan(mlx_index(index, entries, dtype, quantization, source_entry(source)), jobs, copies)


def _check_output(source: Path, output: Path) -> None:
    """Refuse an output that is, contains or lies inside the source (``force`` would delete it)."""
    source, output = source.resolve(), output.resolve()
    if output == source or source in output.parents or output in source.parents:
        raise InvalidInputError(f"the output {output} overlaps the source {source}; choose another directory")


def convert_model(
    source: str | Path,
    output: str | Path,
    *,
    dtype: str = "bfloat16",
    quantize: int | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
    text_encoder_bits: int | None = DEFAULT_TEXT_ENCODER_BITS,
    force: bool = False,
    loras: Sequence[Any] | None = None,
    text_encoder: str | Path | None = None,
) -> Path:
    """Convert a Wan or LTX-Video checkpoint into an MLX model directory that
    :func:`~mlx_i2v.load_pipeline` loads without PyTorch and without converting again.

    Args:
        source: a diffusers directory (Wan or LTX-Video), a Wan-AI original-layout directory, a Hub id of
            either, or a Lightricks single-file ``ltxv-*.safetensors`` (which needs ``text_encoder``).
        output: the directory to write (it must not exist unless ``force``).
        dtype: "bfloat16", "float16" or "float32" for the weights (the reference's float32 islands stay;
            the VAE and CLIP are written in float32, the dtype they run in by default).
        quantize: 4 or 8 to quantize the transformer(s); None keeps every component float.
        group_size: quantization group size (32, 64 or 128).
        text_encoder_bits: bits of the UMT5 encoder when quantizing (None keeps it float).
        force: replace an existing ``output``.
        loras: LoRAs to bake in, as ``load_pipeline(loras=...)`` takes them: merged into float weights;
            with ``quantize``, kept as separate factors beside the quantized weights (see
            :mod:`mlx_i2v.lora.baked`), so the result equals loading them at run time.
        text_encoder: for a single-file source only: a diffusers LTX-Video directory whose
            ``text_encoder/`` (T5 v1.1 XXL) and ``tokenizer/`` complete the model.

    Returns:
        ``output``.

    Raises:
        ModelNotFoundError: no such source.
        WeightLoadError: a missing, unexpected, mis-shaped or unreadable tensor (named), or an unsafe
            ``.pth`` (:class:`~mlx_i2v.errors.UnsafeCheckpointError`).
        InvalidInputError: bad options, an existing output, a source already converted, too little disk,
            a single file without (or with an unusable) ``text_encoder``.
    """
    compute_dtype = resolve_dtype(dtype)
    quantization = QuantizationConfig(quantize, group_size, text_encoder_bits) if quantize is not None else None
    resolved = resolve_source(source)
    output = Path(output).expanduser()
    _check_output(resolved.path, output)
    if resolved.layout == "mlx":
        raise InvalidInputError(
            f"{resolved.path} is already an MLX model directory; quantize it with `mlx-i2v quantize` (quantize_model)"
        )
    if text_encoder is not None and resolved.layout != "single-file":
        raise InvalidInputError("--text-encoder (text_encoder=) is only for single-file LTX-Video checkpoints")
    if resolved.layout == "single-file":
        plan = plan_single_file(resolved, text_encoder, compute_dtype, quantization)
    else:
        plan_layout = plan_original if resolved.layout == "original" else _plan_diffusers
        plan = plan_layout(resolved, compute_dtype, quantization)
    bake_loras(plan, loras, compute_dtype)
    return write_plan(plan, output, dtype=compute_dtype, force=force)


def quantize_model(
    model_dir: str | Path,
    output: str | Path,
    *,
    bits: int,
    group_size: int = DEFAULT_GROUP_SIZE,
    text_encoder_bits: int | None = DEFAULT_TEXT_ENCODER_BITS,
    force: bool = False,
) -> Path:
    """Quantize a float MLX directory (written by :func:`convert_model`) into ``output``: the
    transformer(s) to ``bits``, the text encoder (UMT5 or T5) to ``text_encoder_bits`` (None keeps it
    float); CLIP, the VAE and the rest are copied.

    Raises:
        InvalidInputError: ``model_dir`` is not an MLX directory or is quantized already; bad bits or
            group size; an existing output; too little disk.
    """
    quantization = QuantizationConfig(bits, group_size, text_encoder_bits)
    folder = Path(model_dir).expanduser()
    index = read_index(folder) if folder.is_dir() else None
    if index is None or MLX_KEY not in index:
        raise InvalidInputError(f"{folder} is not an MLX model directory; convert it first with `mlx-i2v convert`")
    meta = index[MLX_KEY]
    if meta.get("loras"):
        raise InvalidInputError(
            f"{folder} has LoRAs merged into its weights, and quantizing a merged weight erases most of a LoRA; "
            "convert the original checkpoint with --quantize and --lora instead (the LoRAs then stay separate)"
        )
    if meta.get("quantization"):
        stored = meta["quantization"]["bits"]
        raise InvalidInputError(
            f"{folder} is already quantized to {stored} bits and cannot be quantized again; "
            "convert the original checkpoint with --quantize instead"
        )
    output = Path(output).expanduser()
    _check_output(folder, output)
    compute_dtype = resolve_dtype(meta["dtype"])
    jobs, copies = _component_jobs(folder, index, compute_dtype, quantization)
    # Only what is quantized is converted; CLIP and the VAE are copied as they are.
    copies.update({job.name: folder / job.name for job in jobs if job.quantization is None})
    jobs = [job for job in jobs if job.quantization is not None]
    new_index = {**index, MLX_KEY: {**meta, "quantization": quantization.to_dict()}}
    return write_plan(Plan(new_index, jobs, copies), output, dtype=compute_dtype, force=force)
