"""``mlx-i2v generate``: photo + prompt -> video file."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import click

from mlx_i2v.image import FITS, ROTATIONS, ImageOptions, LoadReport, load_image
from mlx_i2v.outputs import resolve_output
from mlx_i2v.schedulers import MAX_INFERENCE_STEPS
from mlx_i2v.validation import SEED_MAX

DEFAULT_MODEL = "Wan-AI/Wan2.2-TI2V-5B-Diffusers"


class FiniteFloat(click.FloatRange):
    """A float range that also refuses nan and inf."""

    name = "finite float"

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


def _utf8(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Refuse text whose command-line bytes were not UTF-8 (Python keeps them as lone surrogates)."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            byte = ord(value[e.start]) - 0xDC00 if 0xDC80 <= ord(value[e.start]) <= 0xDCFF else None
            what = f"byte 0x{byte:02X}" if byte is not None else "an invalid character"
            raise click.BadParameter(
                f"is not UTF-8 text ({what} at character {e.start + 1}); "
                "set the terminal to UTF-8 or use --prompt-file", ctx, param,
            ) from None
    return value


def _crop(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    parts = value.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
        raise click.BadParameter(f"expected X,Y,W,H in pixels, got {value!r}", ctx, param)
    return tuple(int(p) for p in parts)


def _read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    """The prompt from --prompt, --prompt-file, or standard input for ``-p -``; UTF-8 only."""
    if (prompt is None) == (prompt_file is None):
        raise click.UsageError("give the prompt with exactly one of --prompt and --prompt-file")
    if prompt is not None and prompt != "-":
        return prompt
    source = "standard input" if prompt_file is None else str(prompt_file)
    try:
        data = sys.stdin.buffer.read() if prompt_file is None else prompt_file.read_bytes()
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise click.UsageError(
            f"the prompt in {source} is not UTF-8 text (byte 0x{data[e.start]:02X} at offset {e.start})"
        ) from None
    except OSError as e:
        raise click.UsageError(f"cannot read the prompt from {source}: {e.strerror or e}") from None


@click.command()
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-p", "--prompt", default=None, callback=_utf8,
              help="What should happen in the video ('-': read standard input).")
@click.option("--prompt-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Read the prompt from this UTF-8 text file.")
@click.option("-m", "--model", default=DEFAULT_MODEL, show_default=True, help="Model directory or Hub repo id.")
@click.option("--negative-prompt", default=None, callback=_utf8,
              help="What to avoid (default: the model's own; '' for none).")
@click.option("--frames", "num_frames", type=click.IntRange(min=1), default=None, help="Number of frames (4k+1).")
@click.option("--height", type=click.IntRange(min=1), default=None, help="Frame height in pixels.")
@click.option("--width", type=click.IntRange(min=1), default=None, help="Frame width in pixels.")
@click.option("--steps", "num_inference_steps", type=click.IntRange(1, MAX_INFERENCE_STEPS), default=None,
              help="Denoising steps.")
@click.option("--guidance", "guidance_scale", type=FiniteFloat(min=0), default=None,
              help="Classifier-free guidance scale (<= 1 turns guidance off).")
@click.option("--guidance-2", "guidance_scale_2", type=FiniteFloat(min=0), default=None,
              help="Guidance of the low-noise expert (Wan2.2-A14B; default: the model's).")
@click.option("--last-image", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The clip's last frame (first-last-frame models, Wan2.1-FLF2V).")
@click.option("--shift", "flow_shift", type=FiniteFloat(min=0, min_open=True), default=None,
              help="Flow-matching timestep shift.")
@click.option("--seed", type=click.IntRange(0, SEED_MAX), default=None,
              help="Random seed, 0 to 2**64-1 (default: random, recorded in the file).")
@click.option("--fps", type=FiniteFloat(min=0, min_open=True), default=None,
              help="Playback rate of the output (default: the model's).")
@click.option("--crop", callback=_crop, default=None, metavar="X,Y,W,H",
              help="Use only this rectangle of the photo (pixels, after --rotate).")
@click.option("--rotate", type=click.Choice([str(r) for r in ROTATIONS]), default="0",
              help="Rotate the photo clockwise by this many degrees (after its EXIF orientation).")
@click.option("--fit", type=click.Choice(FITS), default="cover", show_default=True,
              help="cover: fill the frame and crop the overflow; contain: show all of it, padded.")
@click.option("--background", default="white", show_default=True,
              help="Colour under transparent pixels and of the padding: a name, #RRGGBB or R,G,B.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Compute dtype (default: bfloat16 on a GPU, float32 on the CPU).")
@click.option("--vae-dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Dtype of the VAE and CLIP (default: float32, as diffusers runs them; bfloat16 halves the "
                   "VAE's memory and costs fidelity).")
@click.option("--quantize", type=click.Choice(["4", "8"]), default=None,
              help="Quantize the transformer to 4 or 8 bits on load (the text encoder to 8).")
@click.option("--memory-limit", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Memory budget in GB (default: what the device recommends; env MLX_I2V_MEMORY_LIMIT).")
@click.option("--dry-run", is_flag=True, help="Print the settings and the memory plan, then stop.")
@click.option("-o", "--output", type=click.Path(), default=None,
              help="Output .mp4 or .gif, a new folder name for PNG frames, or a folder (existing, or ending in /) "
                   "to write IMAGE's name .mp4 into (default: IMAGE's name .mp4 here).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output of the same kind.")
def generate(image: Path, prompt: str | None, prompt_file: Path | None, model: str, negative_prompt, num_frames,
             height, width, num_inference_steps, guidance_scale, guidance_scale_2, last_image, flow_shift, seed,
             fps, crop, rotate, fit, background, dtype, vae_dtype, quantize, memory_limit, dry_run, output,
             overwrite) -> None:
    """Generate a video that starts from IMAGE."""
    from mlx_i2v import load_pipeline
    from mlx_i2v.memory import set_memory_limit

    # Cheap checks first: nobody should wait for a model to load to learn their photo is unreadable.
    prompt = _read_prompt(prompt, prompt_file)
    image_options = dict(crop=crop, rotate=int(rotate), fit=fit, background=background)
    for path in (image, last_image):  # decoded here to fail early; the pipeline loads (and reports) them
        if path is not None:
            load_image(path, ImageOptions(**image_options), LoadReport())
    output = resolve_output(output, default_stem=image.stem, protected=[image, last_image], overwrite=overwrite)

    if memory_limit is not None:
        set_memory_limit(memory_limit)
    pipe = load_pipeline(model, dtype=dtype, vae_dtype=vae_dtype, quantize=int(quantize) if quantize else None)
    arguments = dict(negative_prompt=negative_prompt, height=height, width=width, num_frames=num_frames,
                     num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                     guidance_scale_2=guidance_scale_2, flow_shift=flow_shift, seed=seed, **image_options)
    if dry_run:
        settings = pipe.resolve_settings(image, last_image=last_image, prompt=prompt, **arguments)
        use_cfg = settings.guidance_scale > 1 or (settings.guidance_scale_2 or 0) > 1
        plan = pipe.plan(height=settings.height, width=settings.width, num_frames=settings.num_frames, guidance=use_cfg)
        click.echo(f"{pipe.variant.name}: {settings.width}x{settings.height}, {settings.num_frames} frames, "
                   f"{settings.num_inference_steps} steps, guidance {settings.guidance_scale:g}, shift {settings.flow_shift:g}")
        click.echo(f"output: {output}")
        click.echo(plan.summary())
        return
    progress = _Progress()  # the pipeline checks every setting and the memory plan before loading a model
    try:
        video = pipe(image, prompt, last_image=last_image, on_step=progress, **arguments)
    finally:
        progress.close()
    if fps is not None:
        video.fps = fps
        video.metadata["fps"] = fps
    replacing = os.path.lexists(output)
    path = video.save(output, overwrite=overwrite)
    if replacing:
        click.echo(f"replaced {path}")
    m = video.metadata
    click.echo(f"wrote {path} ({m['num_frames']} frames, {m['width']}x{m['height']}, {video.fps:g} fps, seed {m['seed']})")
    seconds = video.stats["seconds"]
    click.echo("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()) + f", total {sum(seconds.values()):.1f}s")
    click.echo(f"peak memory: {video.stats['peak_memory_gb']:.2f} GB")


class _Progress:
    """A progress bar over the denoising steps, opened at the first step so that errors raised before
    it (bad settings, a broken checkpoint) stay the only line printed."""

    def __init__(self) -> None:
        self._bar = None

    def __call__(self, step: int, total: int, timestep: int) -> None:
        if self._bar is None:
            self._bar = click.progressbar(length=total, label="denoising", show_pos=True, show_eta=True,
                                          file=click.get_text_stream("stderr"))
            self._bar.__enter__()
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)

