"""What ``generate``, ``restyle`` and ``extend`` share: their common options and the run itself (join the
other ranks, read the prompt and inputs, resolve the output, load, plan, denoise with a progress bar and an
optional live preview, write atomically, report).

Under ``mlx.launch`` every rank runs the same command: rank 0 writes the output and prints, the other
ranks print only errors.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import Callable

import click

from mlx_i2v.image import FITS, ROTATIONS, ImageOptions
from mlx_i2v.parallel import MODES
from mlx_i2v.sampling import PRESETS, SAMPLERS
from mlx_i2v.schedulers import MAX_INFERENCE_STEPS
from mlx_i2v.stepcache.calibrations import METHODS
from mlx_i2v.validation import SEED_MAX

from .lora import collect_loras, lora_options

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


def _sigmas(ctx: click.Context, param: click.Parameter, value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(s) for s in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected numbers separated by commas, e.g. 1,0.75,0.5,0.25; got {value!r}",
                                 ctx, param) from None  # fmt: skip


_COMMON = (
    click.option("-p", "--prompt", default=None, callback=_utf8,
                 help="What should happen in the video ('-': read standard input)."),
    click.option("--prompt-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="Read the prompt from this UTF-8 text file."),
    click.option("-m", "--model", default=DEFAULT_MODEL, show_default=True, help="Model directory or Hub repo id."),
    click.option("--negative-prompt", default=None, callback=_utf8,
                 help="What to avoid (default: the model's own; '' for none)."),
    click.option("--steps", "num_inference_steps", type=click.IntRange(1, MAX_INFERENCE_STEPS), default=None,
                 help="Denoising steps."),
    click.option("--guidance", "guidance_scale", type=FiniteFloat(min=0), default=None,
                 help="Classifier-free guidance scale (<= 1 turns guidance off)."),
    click.option("--guidance-2", "guidance_scale_2", type=FiniteFloat(min=0), default=None,
                 help="Guidance of the low-noise expert (Wan2.2-A14B; default: the model's)."),
    click.option("--shift", "flow_shift", type=FiniteFloat(min=0, min_open=True), default=None,
                 help="Flow-matching timestep shift."),
    click.option("--scheduler", type=click.Choice(list(SAMPLERS)), default=None,
                 help="Sampler (default: the model's, or the preset's)."),
    click.option("--sigmas", callback=_sigmas, default=None,
                 help="Explicit grid from 1 down, unshifted, e.g. 1,0.75,0.5,0.25 (Euler unless --scheduler dmd)."),
    click.option("--preset", type=click.Choice(list(PRESETS)), default=None,
                 help="Few-step recipe: lightning (lightx2v / Wan2.2-Lightning LoRAs: 4 Euler steps, shift 5, no "
                      "guidance), dmd (FastWan2.2-TI2V-5B), turbo (Wan2.2-TI2V-5B-Turbo), distilled (LTX-Video "
                      "0.9.7/0.9.8 distilled: 8 steps, no guidance). Other flags override it."),
    click.option("--seed", type=click.IntRange(0, SEED_MAX), default=None,
                 help="Random seed, 0 to 2**64-1 (default: random, recorded in the file)."),
    click.option("--motion", type=click.FloatRange(0.25, 2.0), default=1.0, show_default=True,
                 help="Experimental motion amplitude (PainterI2V; Wan2.1-I2V/FLF2V, Wan2.2-A14B): >1 livelier."),
    click.option("--fps", type=FiniteFloat(min=0, min_open=True), default=None,
                 help="Frame rate of the output (default: the model's, or the input clip's); LTX-Video also "
                      "conditions on it."),
    click.option("--decode-timestep", type=FiniteFloat(min=0), default=None,
                 help="LTX-Video 0.9.1+: the VAE decoder's timestep (default 0.05)."),
    click.option("--decode-noise-scale", type=FiniteFloat(0, 1), default=None,
                 help="LTX-Video 0.9.1+: noise mixed into the latents before decoding (default 0.025)."),
    click.option("--image-cond-noise-scale", type=FiniteFloat(min=0), default=None,
                 help="LTX-Video 0.9.5+: noise added to the held photo latents each step (default 0.15)."),
    click.option("--crop", callback=_crop, default=None, metavar="X,Y,W,H",
                 help="Use only this rectangle of the photo(s) (pixels, after --rotate)."),
    click.option("--rotate", type=click.Choice([str(r) for r in ROTATIONS]), default="0",
                 help="Rotate the photo(s) clockwise by this many degrees (after the EXIF orientation)."),
    click.option("--fit", type=click.Choice(FITS), default="cover", show_default=True,
                 help="cover: fill the frame and crop the overflow; contain: show all of the photo, padded."),
    click.option("--background", default="white", show_default=True,
                 help="Colour under transparent pixels and of the padding: a name, #RRGGBB or R,G,B."),
    click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
                 help="Compute dtype (default: bfloat16 on a GPU, float32 on the CPU)."),
    click.option("--vae-dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
                 help="Dtype of the VAE and CLIP (default: float32, as diffusers runs them; bfloat16 halves the "
                      "VAE's memory and costs fidelity)."),
    click.option("--quantize", type=click.Choice(["4", "8"]), default=None,
                 help="Quantize the transformer to 4 or 8 bits on load (the text encoder to 8)."),
    click.option("--memory-limit", type=click.FloatRange(min=0, min_open=True), default=None,
                 help="Memory budget in GB (default: what the device recommends; env MLX_I2V_MEMORY_LIMIT)."),
    click.option("--cache", type=click.Choice(METHODS), default=None,
                 help="Step caching: skip the transformer blocks on steps where they would barely change the result "
                      "(off by default; magcache and teacache use the model's published calibration)."),
    click.option("--cache-threshold", type=float, default=None,
                 help="The cache's threshold (default: the method's recommended one for the model)."),
    click.option("--parallel", type=click.Choice(MODES), default="auto", show_default=True,
                 help="Under mlx.launch with several processes, how they share the clip: auto (CFG over 2 ranks, "
                      "CFG x sequence over 4), cfg, sequence, or none (each process alone)."),
    click.option("--parallel-timeout", type=click.FloatRange(min=0, min_open=True), default=None,
                 help="Seconds a rank waits for the others beyond its own work before it gives up "
                      "(default 300; env MLX_I2V_PARALLEL_TIMEOUT)."),
    click.option("--preview", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="Keep this PNG updated with each step's prediction of the clip (latent preview)."),
    click.option("--dry-run", is_flag=True, help="Print the settings and the memory plan (per rank), then stop."),
    click.option("-o", "--output", type=click.Path(), default=None,
                 help="Output .mp4 or .gif, a new folder name for PNG frames, or a folder (existing, or ending in /) "
                      "to write the default name .mp4 into (default: the input's name .mp4 here)."),
    click.option("--overwrite", is_flag=True, help="Replace an existing output (or preview) of the same kind."),
    lora_options,
)  # fmt: skip

_SIZE = (
    click.option("--height", type=click.IntRange(min=1), default=None, help="Frame height in pixels."),
    click.option("--width", type=click.IntRange(min=1), default=None, help="Frame width in pixels."),
)


def common_options(command: Callable) -> Callable:
    """The options every generating command takes (prompt, model, sampling, photo options, caching,
    parallel ranks, LoRAs, output, preview)."""
    for option in reversed(_COMMON):
        command = option(command)
    return command


def size_options(command: Callable) -> Callable:
    """``--height`` and ``--width``."""
    for option in reversed(_SIZE):
        command = option(command)
    return command


SETTINGS = ("negative_prompt", "num_inference_steps", "guidance_scale", "guidance_scale_2", "flow_shift", "seed",
            "scheduler", "sigmas", "preset", "cache", "cache_threshold", "fps", "decode_timestep",
            "decode_noise_scale", "image_cond_noise_scale")  # fmt: skip


def settings_of(options: dict) -> dict:
    """The pipeline keyword arguments among the shared options (the photo options included)."""
    return {**{k: options[k] for k in SETTINGS}, **image_options(options)}


def image_options(options: dict) -> dict:
    """``crop``, ``rotate``, ``fit`` and ``background`` as the pipeline takes them."""
    return dict(crop=options["crop"], rotate=int(options["rotate"]), fit=options["fit"],
                background=options["background"])  # fmt: skip


def check_photos(options: dict, *paths: Path | None) -> None:
    """Decode the photos now, with the photo options, to fail early; the pipeline loads (and reports) them."""
    from mlx_i2v.image import LoadReport, load_image

    for path in paths:
        if path is not None:
            load_image(path, ImageOptions(**image_options(options)), LoadReport())


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
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


def execute(options: dict, read_inputs: Callable[[], Callable], *, default_stem: str, inputs: list) -> None:
    """Join the other ranks, read the prompt and the inputs, resolve the output (and preview), load the
    model, resolve the request, print the plan (``--dry-run``) or generate it with a progress bar (and
    ``--preview``), write the output and report.

    Args:
        options: the shared options (see :func:`common_options`).
        read_inputs: reads and checks the command's inputs (cheap: nobody should wait for a model to load to
            learn their input is unreadable) and returns ``pipe -> Request`` (``pipe.prepare(...)`` or
            ``pipe.prepare_extend(...)``).
        default_stem: the output's name when ``--output`` names none (a folder, or nothing).
        inputs: the input files, which the output and the preview must never be.
    """
    from mlx_i2v import load_pipeline
    from mlx_i2v.memory import set_memory_limit
    from mlx_i2v.outputs import resolve_output, resolve_preview
    from mlx_i2v.parallel import join

    group = join(options["parallel"], timeout=options["parallel_timeout"])
    if group.size > 1:
        _quiet_rank(group.rank)
    echo = click.echo if group.rank == 0 else _silent
    prompt = read_prompt(options["prompt"], options["prompt_file"])
    prepare = read_inputs()
    overwrite = options["overwrite"]
    output = preview = None
    if group.rank == 0:  # only rank 0 writes (the others may run on hosts without that folder)
        output = resolve_output(options["output"], default_stem=default_stem, protected=inputs, overwrite=overwrite)
        if options["preview"] is not None:
            preview = resolve_preview(options["preview"], inputs=inputs, output=output, overwrite=overwrite)

    if options["memory_limit"] is not None:
        set_memory_limit(options["memory_limit"])
    quantize = options["quantize"]
    loras = collect_loras(options["lora"], options["lora_high"], options["lora_low"])
    pipe = load_pipeline(options["model"], dtype=options["dtype"], vae_dtype=options["vae_dtype"],
                         quantize=int(quantize) if quantize else None, parallel=group, loras=loras)  # fmt: skip
    if preview is not None and not pipe.has_preview:
        raise click.UsageError(f"--preview: no latent preview is known for {pipe.variant.name} models")
    request = prepare(pipe)  # every setting is checked here, before a model loads
    if options["dry_run"]:
        s = request.settings
        echo(f"{pipe.variant.name}: {s.width}x{s.height}, {s.num_frames} frames, {s.num_inference_steps} steps "
             f"({_sampler(s)}), guidance {s.guidance_scale:g}, shift {s.flow_shift:g}"
             + (f", cache {s.cache.name} {s.cache.threshold:g}" if s.cache else ""))  # fmt: skip
        if "upscale" in request.details:
            u, d = request.details["upscale"], request.details
            echo(f"upscale: {u['base_size'][0]}x{u['base_size'][1]} -> {u['upsampler']} -> refine at "
                 f"{u['refine_size'][0]}x{u['refine_size'][1]} ({u['steps_run']} steps), resized to "
                 f"{d['width']}x{d['height']}")  # fmt: skip
        for r in pipe.loras.records() if pipe.loras is not None else []:
            echo(f"lora: {r['name']} x{r['strength']:g}" + (f" ({r['expert']} expert)" if r["expert"] else ""))
        echo(f"output: {output}")
        echo(pipe.plan_request(request).summary())
        return
    progress = _Progress(preview) if group.rank == 0 else None
    try:
        video = pipe.run(request, prompt, on_step=progress)
    finally:
        if progress is not None:
            progress.close()
    if not group.decodes():
        return
    replacing = os.path.lexists(output)
    path = video.save(output, overwrite=overwrite)
    if replacing:
        click.echo(f"replaced {path}")
    _report(video, path, echo)


def _report(video, path: Path, echo: Callable) -> None:
    m = video.metadata
    echo(f"wrote {path} ({video.num_frames} frames, {m['width']}x{m['height']}, {video.fps:g} fps, seed {m['seed']})")
    seconds = video.stats["seconds"]
    echo("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()) + f", total {sum(seconds.values()):.1f}s")
    loading = video.stats["loading_seconds"]
    if loading:  # components load in the stage that needs them: say how much of each stage that was
        echo("of which loading models: " + ", ".join(f"{k} {v:.1f}s" for k, v in loading.items()))
    echo(f"peak memory: {video.stats['peak_memory_gb']:.2f} GB")
    cache = m.get("cache")
    if cache is not None:
        passes = video.stats["transformer_passes"]
        echo(f"transformer passes: {passes['computed']} computed, {passes['skipped']} skipped "
             f"({cache['method']}, threshold {cache['threshold']:g})")  # fmt: skip
    if "parallel" in video.stats:
        p = video.stats["parallel"]
        echo(f"parallel: {p['ranks']} ranks ({p['mode']}), rank 0 received {p['total_bytes_received'] / 1e6:.1f} MB "
             f"and waited {p['wait_seconds']:.1f}s for the others")  # fmt: skip


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
                                          file=sys.stderr)  # fmt: skip
            self._bar.__enter__()
        if self._preview is not None:
            write_png_atomically(preview.image(), self._preview)
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)


def _silent(*args, **kwargs) -> None:
    """What ranks other than 0 print: nothing (errors reach stderr through the CLI's error handler)."""


def _quiet_rank(rank: int) -> None:
    """Keep a rank's stderr to one line per error: MLX's distributed backends log from C++ straight to
    file descriptor 2 (a dozen lines when a peer leaves), so fd 2 goes to /dev/null while Python's
    sys.stderr (click, logging) keeps the real one; ranks other than 0 also drop warnings. ``-v`` keeps
    everything."""
    if click.get_current_context().find_root().params.get("verbose"):
        return
    if rank != 0:
        logging.getLogger().setLevel(logging.ERROR)
    old = sys.stderr
    old.flush()
    real = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    sys.stderr = open(real, "w", buffering=1, encoding=old.encoding, errors="backslashreplace")
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is old:
            handler.setStream(sys.stderr)


def _sampler(settings) -> str:
    """'euler on sigmas 1, 0.75, 0.5, 0.25, preset lightning'."""
    parts = [settings.scheduler]
    if settings.sigmas is not None:
        parts[0] += " on sigmas " + ", ".join(f"{s:g}" for s in settings.sigmas)
    if settings.preset is not None:
        parts.append(f"preset {settings.preset}")
    return ", ".join(parts)
