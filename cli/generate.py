"""``mlx-i2v generate``: photo + prompt -> video file."""

from __future__ import annotations

from pathlib import Path

import click

from mlx_i2v.image import load_image
from mlx_i2v.video import FORMATS, ensure_writable

from .lora import collect_loras, lora_options

DEFAULT_MODEL = "Wan-AI/Wan2.2-TI2V-5B-Diffusers"


@click.command()
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-p", "--prompt", required=True, help="What should happen in the video.")
@click.option("-m", "--model", default=DEFAULT_MODEL, show_default=True, help="Model directory or Hub repo id.")
@click.option("--negative-prompt", default=None, help="What to avoid (default: the model's own; '' for none).")
@click.option("--frames", "num_frames", type=click.IntRange(min=1), default=None, help="Number of frames (4k+1).")
@click.option("--height", type=click.IntRange(min=1), default=None, help="Frame height in pixels.")
@click.option("--width", type=click.IntRange(min=1), default=None, help="Frame width in pixels.")
@click.option("--steps", "num_inference_steps", type=click.IntRange(min=1), default=None, help="Denoising steps.")
@click.option("--guidance", "guidance_scale", type=click.FloatRange(min=0), default=None,
              help="Classifier-free guidance scale (<= 1 turns guidance off).")
@click.option("--guidance-2", "guidance_scale_2", type=click.FloatRange(min=0), default=None,
              help="Guidance of the low-noise expert (Wan2.2-A14B; default: the model's).")
@click.option("--last-image", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The clip's last frame (first-last-frame models, Wan2.1-FLF2V).")
@click.option("--shift", "flow_shift", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Flow-matching timestep shift.")
@click.option("--seed", type=int, default=None, help="Random seed (default: random, recorded in the file).")
@click.option("--fps", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Playback rate of the output (default: the model's).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Compute dtype (default: bfloat16 on a GPU, float32 on the CPU).")
@click.option("--quantize", type=click.Choice(["4", "8"]), default=None,
              help="Quantize the transformer to 4 or 8 bits on load (the text encoder to 8).")
@click.option("--memory-limit", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Memory budget in GB (default: what the device recommends; env MLX_I2V_MEMORY_LIMIT).")
@click.option("--dry-run", is_flag=True, help="Print the settings and the memory plan, then stop.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Output .mp4, .gif or a folder name for PNG frames (default: IMAGE's name with .mp4).")
@lora_options
def generate(image: Path, prompt: str, model: str, negative_prompt, num_frames, height, width,
             num_inference_steps, guidance_scale, guidance_scale_2, last_image, flow_shift, seed, fps, dtype,
             quantize, memory_limit, dry_run, output, lora, lora_high, lora_low) -> None:
    """Generate a video that starts from IMAGE."""
    from mlx_i2v import load_pipeline
    from mlx_i2v.memory import set_memory_limit
    from mlx_i2v.planner import check_fits

    output = output or _default_output(image)
    if output.suffix.lower() not in FORMATS:
        raise click.BadParameter(f"unsupported format {output.suffix!r}; use .mp4, .gif or a folder", param_hint="--output")
    # Cheap checks first: nobody should wait for a model to load to learn their photo is unreadable.
    photo = load_image(image)
    last_photo = load_image(last_image) if last_image is not None else None
    ensure_writable(output)

    if memory_limit is not None:
        set_memory_limit(memory_limit)
    loras = collect_loras(lora, lora_high, lora_low)
    pipe = load_pipeline(model, dtype=dtype, quantize=int(quantize) if quantize else None, loras=loras)
    arguments = dict(negative_prompt=negative_prompt, height=height, width=width, num_frames=num_frames,
                     num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                     guidance_scale_2=guidance_scale_2, flow_shift=flow_shift, seed=seed)
    settings = pipe.resolve_settings(photo, last_image=last_photo, **arguments)
    use_cfg = settings.guidance_scale > 1 or (settings.guidance_scale_2 or 0) > 1
    plan = pipe.plan(height=settings.height, width=settings.width, num_frames=settings.num_frames, guidance=use_cfg)
    if dry_run:
        click.echo(f"{pipe.variant.name}: {settings.width}x{settings.height}, {settings.num_frames} frames, "
                   f"{settings.num_inference_steps} steps, guidance {settings.guidance_scale:g}, shift {settings.flow_shift:g}")
        for r in pipe.loras.records():
            click.echo(f"lora: {r['name']} x{r['strength']:g}" + (f" ({r['expert']} expert)" if r["expert"] else ""))
        click.echo(plan.summary())
        return
    check_fits(plan)
    progress = _Progress()
    try:
        video = pipe(photo, prompt, last_image=last_photo, on_step=progress, **arguments)
    finally:
        progress.close()
    if fps is not None:
        video.fps = fps
        video.metadata["fps"] = fps
    path = video.save(output)
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


def _default_output(image: Path) -> Path:
    candidate = Path(f"{image.stem}.mp4")
    n = 2
    while candidate.exists():
        candidate = Path(f"{image.stem}-{n}.mp4")
        n += 1
    return candidate
