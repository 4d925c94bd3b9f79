"""What ``generate``, ``restyle`` and ``extend`` share: their common options and the run itself (load,
plan, denoise with a progress bar and an optional live preview, write atomically, report)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import click

from mlx_i2v.video import FORMATS, ensure_writable

DEFAULT_MODEL = "Wan-AI/Wan2.2-TI2V-5B-Diffusers"

_COMMON = (
    click.option("-p", "--prompt", required=True, help="What should happen in the video."),
    click.option("-m", "--model", default=DEFAULT_MODEL, show_default=True, help="Model directory or Hub repo id."),
    click.option("--negative-prompt", default=None, help="What to avoid (default: the model's own; '' for none)."),
    click.option("--steps", "num_inference_steps", type=click.IntRange(min=1), default=None, help="Denoising steps."),
    click.option("--guidance", "guidance_scale", type=click.FloatRange(min=0), default=None,
                 help="Classifier-free guidance scale (<= 1 turns guidance off)."),
    click.option("--guidance-2", "guidance_scale_2", type=click.FloatRange(min=0), default=None,
                 help="Guidance of the low-noise expert (Wan2.2-A14B; default: the model's)."),
    click.option("--shift", "flow_shift", type=click.FloatRange(min=0, min_open=True), default=None,
                 help="Flow-matching timestep shift."),
    click.option("--seed", type=int, default=None, help="Random seed (default: random, recorded in the file)."),
    click.option("--motion", type=click.FloatRange(0.25, 2.0), default=1.0, show_default=True,
                 help="Experimental motion amplitude (PainterI2V; Wan2.1-I2V/FLF2V, Wan2.2-A14B): >1 livelier."),
    click.option("--fps", type=click.FloatRange(min=0, min_open=True), default=None,
                 help="Playback rate of the output (default: the model's, or the input clip's)."),
    click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
                 help="Compute dtype (default: bfloat16 on a GPU, float32 on the CPU)."),
    click.option("--quantize", type=click.Choice(["4", "8"]), default=None,
                 help="Quantize the transformer to 4 or 8 bits on load (the text encoder to 8)."),
    click.option("--memory-limit", type=click.FloatRange(min=0, min_open=True), default=None,
                 help="Memory budget in GB (default: what the device recommends; env MLX_I2V_MEMORY_LIMIT)."),
    click.option("--preview", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="Keep this PNG updated with each step's prediction of the clip (latent preview)."),
    click.option("--dry-run", is_flag=True, help="Print the settings and the memory plan, then stop."),
    click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
                 help="Output .mp4, .gif or a folder name for PNG frames."),
)  # fmt: skip

_SIZE = (
    click.option("--height", type=click.IntRange(min=1), default=None, help="Frame height in pixels."),
    click.option("--width", type=click.IntRange(min=1), default=None, help="Frame width in pixels."),
)


def common_options(command: Callable) -> Callable:
    """The options every generating command takes (prompt, model, sampling, output, preview)."""
    for option in reversed(_COMMON):
        command = option(command)
    return command


def size_options(command: Callable) -> Callable:
    """``--height`` and ``--width``."""
    for option in reversed(_SIZE):
        command = option(command)
    return command


SETTINGS = ("negative_prompt", "num_inference_steps", "guidance_scale", "guidance_scale_2", "flow_shift", "seed")


def settings_of(options: dict) -> dict:
    """The pipeline keyword arguments among the shared options."""
    return {k: options[k] for k in SETTINGS}


def check_outputs(output: Path, preview: Path | None, inputs: list[Path]) -> None:
    """Fail early, with one line, if the output or preview is unusable or would overwrite an input."""
    if output.suffix.lower() not in FORMATS:
        raise click.BadParameter(
            f"unsupported format {output.suffix!r}; use .mp4, .gif or a folder", param_hint="--output"
        )
    taken = {p.resolve() for p in inputs}
    if output.resolve() in taken:
        raise click.BadParameter(f"{output} is an input; choose another output", param_hint="--output")
    if preview is not None:
        if preview.suffix.lower() != ".png":
            raise click.BadParameter("the preview is a PNG: give a .png path", param_hint="--preview")
        if preview.resolve() in taken | {output.resolve()}:
            raise click.BadParameter(
                f"{preview} is an input or the output; choose another path", param_hint="--preview"
            )
        ensure_writable(preview)
    ensure_writable(output)


def default_output(stem: str) -> Path:
    """``STEM.mp4`` in the working directory, or ``STEM-2.mp4``... if taken."""
    candidate, n = Path(f"{stem}.mp4"), 2
    while candidate.exists():
        candidate, n = Path(f"{stem}-{n}.mp4"), n + 1
    return candidate


def execute(prepare: Callable, prompt: str, output: Path, options: dict) -> None:
    """Load the model, resolve the request ``prepare(pipe)``, print the plan (``--dry-run``) or generate
    it with a progress bar (and ``--preview``), write ``output`` and report.

    Args:
        prepare: ``pipe -> Request`` (``pipe.prepare(...)`` or ``pipe.prepare_extend(...)``); the inputs are
            already read, so a bad one has failed before the model loads.
        options: the shared options (see :func:`common_options`).
    """
    from mlx_i2v import load_pipeline
    from mlx_i2v.memory import set_memory_limit
    from mlx_i2v.planner import check_fits

    if options["memory_limit"] is not None:
        set_memory_limit(options["memory_limit"])
    quantize = options["quantize"]
    pipe = load_pipeline(options["model"], dtype=options["dtype"], quantize=int(quantize) if quantize else None)
    request = prepare(pipe)
    plan = pipe.plan_request(request)
    s = request.settings
    if options["dry_run"]:
        click.echo(f"{pipe.variant.name}: {s.width}x{s.height}, {s.num_frames} frames, {s.num_inference_steps} steps, "
                   f"guidance {s.guidance_scale:g}, shift {s.flow_shift:g}")  # fmt: skip
        click.echo(plan.summary())
        return
    check_fits(plan)
    progress = _Progress(options["preview"])
    try:
        video = pipe.run(request, prompt, on_step=progress)
    finally:
        progress.close()
    if options["fps"] is not None:
        video.fps = options["fps"]
        video.metadata["fps"] = options["fps"]
    path = video.save(output)
    m = video.metadata
    click.echo(
        f"wrote {path} ({video.num_frames} frames, {m['width']}x{m['height']}, {video.fps:g} fps, seed {m['seed']})"
    )
    seconds = video.stats["seconds"]
    total = sum(seconds.values())
    click.echo("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()) + f", total {total:.1f}s")
    click.echo(f"peak memory: {video.stats['peak_memory_gb']:.2f} GB")


class _Progress:
    """A progress bar over the denoising steps, opened at the first step so that errors raised before
    it (bad settings, a broken checkpoint) stay the only line printed; with a preview path, each step's
    preview is written there (atomically)."""

    def __init__(self, preview: Path | None = None) -> None:
        self._bar = None
        self._preview = preview

    def __call__(self, step: int, total: int, timestep: float, preview) -> None:
        from mlx_i2v.preview import write_png_atomically

        if self._bar is None:
            self._bar = click.progressbar(length=total, label="denoising", show_pos=True, show_eta=True,
                                          file=click.get_text_stream("stderr"))  # fmt: skip
            self._bar.__enter__()
        if self._preview is not None:
            write_png_atomically(preview.image(), self._preview)
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
