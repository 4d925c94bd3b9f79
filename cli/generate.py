"""``mlx-i2v generate``: photo + prompt -> video file."""

from __future__ import annotations

from pathlib import Path

import click

from mlx_i2v.image import load_image

from .options import check_outputs, common_options, default_output, execute, settings_of, size_options


@click.command()
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--frames", "num_frames", type=click.IntRange(min=1), default=None, help="Number of frames (4k+1).")
@size_options
@click.option("--last-image", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The clip's last frame (first-last-frame models, Wan2.1-FLF2V; optional on Wan2.2-A14B).")
@click.option("--loop", is_flag=True,
              help="End on the first frame, for a seamless loop (Wan2.1-FLF2V, Wan2.2-A14B); the duplicate "
                   "final frame is dropped.")
@common_options
def generate(image: Path, prompt: str, num_frames, height, width, last_image, loop, output, **options) -> None:
    """Generate a video that starts from IMAGE."""
    output = output or default_output(image.stem)
    # Cheap checks first: nobody should wait for a model to load to learn their photo is unreadable.
    photo = load_image(image)
    last_photo = load_image(last_image) if last_image is not None else None
    check_outputs(output, options["preview"], [image] + ([last_image] if last_image else []))

    def prepare(pipe):
        return pipe.prepare(photo, last_image=last_photo, loop=loop, motion=options["motion"], height=height,
                            width=width, num_frames=num_frames, **settings_of(options))  # fmt: skip

    execute(prepare, prompt, output, options)
