"""``mlx-i2v convert``, ``mlx-i2v quantize`` and ``mlx-i2v info``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from mlx_i2v.lora.spec import POLICIES
from mlx_i2v.quantize import BITS, DEFAULT_GROUP_SIZE, GROUP_SIZES

from .lora import collect_loras, lora_options, lora_summary

_BITS = click.Choice([str(b) for b in BITS])
_GROUP_SIZES = click.Choice([str(g) for g in GROUP_SIZES])


def _scaled(n: float, units: tuple[str, str, str, str]) -> str:
    """``n`` to three significant digits in the largest of (1, 1e3, 1e6, 1e9) ``units`` it reaches."""
    power = 0
    while power + 1 < len(units) and n >= 1000 ** (power + 1):
        power += 1
    return f"{n / 1000**power:.3g} {units[power]}".rstrip()


def _gb(n: int) -> str:
    return _scaled(n, ("B", "kB", "MB", "GB"))


def _params(n: int) -> str:
    return _scaled(n, ("", "K", "M", "B"))


@click.command()
@click.argument("source")
@click.argument("output", type=click.Path(file_okay=False, path_type=Path))
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16",
              show_default=True, help="Weight dtype (the reference's float32 parts stay float32).")
@click.option("--quantize", "bits", type=_BITS, default=None,
              help="Quantize the transformer(s) to 4 or 8 bits (the text encoder to 8).")
@click.option("--group-size", type=_GROUP_SIZES, default=str(DEFAULT_GROUP_SIZE), show_default=True,
              help="Quantization group size.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--text-encoder", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="For a single-file LTX-Video SOURCE: a diffusers LTX-Video directory whose text_encoder/ "
                   "(T5) and tokenizer/ complete it.")
@lora_options
def convert(source: str, output: Path, dtype: str, bits: str | None, group_size: str, force: bool,
            text_encoder: Path | None, lora: tuple[str, ...], lora_high: tuple[str, ...],
            lora_low: tuple[str, ...]) -> None:
    """Convert SOURCE (a Wan or LTX-Video diffusers directory, a Wan-AI original directory, a Hub id of
    either, or a Lightricks ltxv-*.safetensors file with --text-encoder) into an MLX model at OUTPUT.
    LoRAs are merged into a float output; with --quantize they are kept as separate factors."""
    from mlx_i2v.convert import convert_model, model_info
    from mlx_i2v.convert.families import model_name

    path = convert_model(source, output, dtype=dtype, quantize=int(bits) if bits else None,
                         group_size=int(group_size), force=force, loras=collect_loras(lora, lora_high, lora_low),
                         text_encoder=text_encoder)
    info = model_info(path)
    click.echo(f"wrote {path} ({model_name(info)}, {_describe_quantization(info)}, {_gb(info['bytes_on_disk'])})")


@click.command()
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("output", type=click.Path(file_okay=False, path_type=Path))
@click.option("--bits", type=_BITS, required=True, help="Bits of the transformer(s) (the text encoder gets 8).")
@click.option("--group-size", type=_GROUP_SIZES, default=str(DEFAULT_GROUP_SIZE), show_default=True,
              help="Quantization group size.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
def quantize(model_dir: Path, output: Path, bits: str, group_size: str, force: bool) -> None:
    """Quantize MODEL_DIR, a float model written by `mlx-i2v convert`, into OUTPUT."""
    from mlx_i2v.convert import model_info, quantize_model
    from mlx_i2v.convert.families import model_name

    path = quantize_model(model_dir, output, bits=int(bits), group_size=int(group_size), force=force)
    info = model_info(path)
    click.echo(f"wrote {path} ({model_name(info)}, {_describe_quantization(info)}, {_gb(info['bytes_on_disk'])})")


@click.command()
@click.argument("model", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--lora", "lora_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Describe this LoRA file instead (format, rank, alpha, targets); with a model, what it would apply.")
@click.option("--model", "model_option", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The model directory to check --lora against (same as MODEL).")
@click.option("--lora-policy", type=click.Choice(POLICIES), default="full", show_default=True,
              help="How --lora is read: every delta (full), or what diffusers 0.42.1 applies (diffusers).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a summary.")
def info(model: Path | None, lora_file: Path | None, model_option: Path | None, lora_policy: str,
         as_json: bool) -> None:
    """Describe MODEL, an MLX or diffusers model directory, or with --lora a LoRA file."""
    if lora_file is not None:
        from mlx_i2v.lora.info import lora_info

        data, lines = lora_info(lora_file, model_option or model, lora_policy), lora_summary
    elif model is None:
        raise click.UsageError("give a MODEL directory, or --lora FILE")
    else:
        from mlx_i2v.convert import model_info

        data, lines = model_info(model), _summary
    if as_json:
        click.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    for line in lines(data):
        click.echo(line)


def _describe_quantization(info: dict[str, Any]) -> str:
    q = info["quantization"]
    if q is None:
        return info["dtype"]
    text = f" (text encoder {q['text_encoder_bits']}-bit)" if q.get("text_encoder_bits") else ""
    return f"{info['dtype']}, {q['bits']}-bit group {q['group_size']}{text}"


def _summary(data: dict[str, Any]) -> list[str]:
    from mlx_i2v.convert.families import model_name

    source = data["source"]
    origin = f", converted from {source['model']} ({source['layout']} layout)" if source else ""
    lines = [
        f"model:        {data['path']} ({data['layout']}{origin})",
        f"variant:      {model_name(data)}",
        f"weights:      {_describe_quantization(data)}",
        f"parameters:   {_params(data['parameters'])}",
        f"size on disk: {_gb(data['bytes_on_disk'])}",
        "components:",
    ]
    for name, part in data["components"].items():
        if "parameters" in part:
            q = part["quantization"]
            kind = f"{q['bits']}-bit/{q['group_size']}" if q else part["dtype"]
            lines.append(f"  {name:<16}{_params(part['parameters']):>9}  {kind:<10}{_gb(part['bytes']):>10}")
        else:
            lines.append(f"  {name:<16}{'':>9}  {'':<10}{_gb(part['bytes']):>10}")
    lines += [_lora_line(r) for r in data.get("loras", [])]
    d = data["defaults"]
    if d is None:  # LTX-Video: the generation settings come from the pipeline's presets
        return lines
    sizes = ", ".join(f"{w}x{h}" for h, w in d["sizes"])
    guidance = f"{d['guidance_scale']:g}" + (f" / {d['guidance_scale_2']:g}" if d.get("guidance_scale_2") else "")
    lines += [
        f"defaults:     {d['num_inference_steps']} steps, guidance {guidance}, shift {d['flow_shift']:g}, "
        f"{d['num_frames']} frames at {d['fps']:g} fps, {sizes}",
        f"negative prompt: {d['negative_prompt']}",
    ]
    return lines


def _lora_line(record: dict[str, Any]) -> str:
    expert = f" ({record['expert']} expert)" if record["expert"] else ""
    strength = f"{record['name']} x{record['strength']:g}{expert}"
    return f"lora:         {strength}, baked ({record['baked']}), sha256 {record['sha256'][:12]}"
