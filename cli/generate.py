"""``mlx-i2v generate``: photo + prompt -> video file."""

from __future__ import annotations

from pathlib import Path

import click

from .options import check_photos, common_options, execute, settings_of, size_options


class KeyframeParam(click.ParamType):
    """``PATH@FRAME`` or ``PATH@FRAME:STRENGTH`` -> (path, frame, strength or None)."""

    name = "PATH@FRAME[:STRENGTH]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        path, at, spec = str(value).rpartition("@")
        frame, _, strength = spec.partition(":")
        try:
            if not (path and at and frame):
                raise ValueError
            return Path(path), int(frame), float(strength) if strength else None
        except ValueError:
            self.fail(f"{value!r} is not PATH@FRAME or PATH@FRAME:STRENGTH (a.png@48, a.png@48:0.8)", param, ctx)


@click.command()
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--frames", "num_frames", type=click.IntRange(min=1), default=None,
              help="Number of frames (4k+1 for Wan, 8k+1 for LTX-Video).")
@size_options
@click.option("--last-image", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The clip's last frame (first-last-frame models, Wan2.1-FLF2V; optional on Wan2.2-A14B and "
                   "LTX-Video 0.9.5+).")
@click.option("--loop", is_flag=True,
              help="End on the first frame, for a seamless loop (Wan2.1-FLF2V, Wan2.2-A14B, LTX-Video 0.9.5+); the "
                   "duplicate final frame is dropped.")
@click.option("--strength", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="LTX-Video 0.9.5+: how strongly the photo (and --last-image) holds its frame (default 1).")
@click.option("--keyframe", "keyframes", type=KeyframeParam(), multiple=True,
              help="LTX-Video 0.9.5+: hold frame FRAME to the image at PATH, at STRENGTH in (0, 1] (default: "
                   "--strength's); repeatable.")
@click.option("--upscale", type=click.Path(path_type=Path), default=None,
              help="LTX-Video 0.9.5+: generate at 2/3 of the size, upsample the latents x2 with this latent "
                   "upsampler (latent_upsampler/ folder or ltxv-spatial-upscaler-*.safetensors) and refine them "
                   "(4 steps), then resize to the size asked for.")
@click.option("--upscale-tone-map", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="With --upscale: tone-map compression of the upsampled latents (0.6 for the 0.9.8 upscaler).")
@common_options
def generate(image: Path, num_frames, height, width, last_image, loop, strength, keyframes, upscale,
             upscale_tone_map, **options) -> None:
    """Generate a video that starts from IMAGE.

    Under `mlx.launch` every rank runs this same command: rank 0 writes the output and prints, the other
    ranks print only errors."""

    def read_inputs():
        from mlx_i2v.families.ltx.upscale import Upscale

        check_photos(options, image, last_image, *(path for path, _, _ in keyframes))
        held = [(path, frame) if s is None else (path, frame, s) for path, frame, s in keyframes] or None
        recipe = None if upscale is None else Upscale(upscale, tone_map_compression_ratio=upscale_tone_map)
        return lambda pipe: pipe.prepare(
            image, last_image=last_image, keyframes=held, loop=loop, motion=options["motion"], strength=strength,
            height=height, width=width, num_frames=num_frames, upscale=recipe, **settings_of(options),
        )  # fmt: skip

    inputs = [image, last_image, *(path for path, _, _ in keyframes)]
    execute(options, read_inputs, default_stem=image.stem, inputs=inputs)
