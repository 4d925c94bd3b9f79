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
@common_options
def generate(image: Path, num_frames, height, width, last_image, loop, strength, keyframes, **options) -> None:
    """Generate a video that starts from IMAGE.

    Under `mlx.launch` every rank runs this same command: rank 0 writes the output and prints, the other
    ranks print only errors."""

    def read_inputs():
        check_photos(options, image, last_image, *(path for path, _, _ in keyframes))
        held = [(path, frame) if s is None else (path, frame, s) for path, frame, s in keyframes] or None
        return lambda pipe: pipe.prepare(
            image, last_image=last_image, keyframes=held, loop=loop, motion=options["motion"], strength=strength,
            height=height, width=width, num_frames=num_frames, **settings_of(options),
        )  # fmt: skip

    inputs = [image, last_image, *(path for path, _, _ in keyframes)]
    execute(options, read_inputs, default_stem=image.stem, inputs=inputs)
