"""``mlx-i2v generate``: photo + prompt -> video file."""

from __future__ import annotations

from pathlib import Path

import click

from .options import check_photos, common_options, execute, settings_of, size_options


@click.command()
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--frames", "num_frames", type=click.IntRange(min=1), default=None,
              help="Number of frames (4k+1 for Wan, 8k+1 for LTX-Video).")
@size_options
@click.option("--last-image", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The clip's last frame (first-last-frame models, Wan2.1-FLF2V; optional on Wan2.2-A14B and "
                   "LTX-Video 0.9.5+).")
@click.option("--loop", is_flag=True,
              help="End on the first frame, for a seamless loop (Wan2.1-FLF2V, Wan2.2-A14B); the duplicate "
                   "final frame is dropped.")
@click.option("--strength", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="LTX-Video 0.9.5+: how strongly the photo holds the first frame (default 1).")
@common_options
def generate(image: Path, num_frames, height, width, last_image, loop, strength, **options) -> None:
    """Generate a video that starts from IMAGE.

    Under `mlx.launch` every rank runs this same command: rank 0 writes the output and prints, the other
    ranks print only errors."""

    def read_inputs():
        check_photos(options, image, last_image)
        return lambda pipe: pipe.prepare(
            image, last_image=last_image, loop=loop, motion=options["motion"], strength=strength, height=height,
            width=width, num_frames=num_frames, **settings_of(options),
        )  # fmt: skip

    execute(options, read_inputs, default_stem=image.stem, inputs=[image, last_image])
