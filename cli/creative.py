"""``mlx-i2v restyle`` and ``mlx-i2v extend``: feed a clip back in."""

from __future__ import annotations

from pathlib import Path

import click

from mlx_i2v.clips import load_clip
from mlx_i2v.extend import DEFAULT_COLOUR_MATCH
from mlx_i2v.restyle import DEFAULT_STRENGTH

from .options import check_photos, common_options, execute, settings_of, size_options

_CLIP = click.argument("clip", type=click.Path(path_type=Path))


@click.command()
@_CLIP
@click.option("--strength", type=click.FloatRange(0, 1, min_open=True), default=DEFAULT_STRENGTH, show_default=True,
              help="How much of the schedule is rerun: the last int(steps x strength) steps.")
@click.option("--image", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Image condition (default: the clip's first frame where the model needs one; on TI2V-5B it "
                   "pins the first frame).")
@click.option("--frames", "num_frames", type=click.IntRange(min=1), default=None,
              help="Restyle the first N frames (4k+1; default: all of the clip's 4k+1).")
@size_options
@common_options
def restyle(clip: Path, strength, image, num_frames, height, width, **options) -> None:
    """Restyle CLIP (a video file, a folder of PNG frames or an image) with a prompt: video-to-video."""

    def read_inputs():
        frames = load_clip(clip)  # a missing or unreadable clip fails here, before any model loads
        check_photos(options, image)
        return lambda pipe: pipe.prepare(
            image, video=frames, strength=strength, motion=options["motion"], height=height, width=width,
            num_frames=num_frames, **settings_of(options),
        )  # fmt: skip

    execute(options, read_inputs, default_stem=f"{clip.stem}-restyled", inputs=[clip, image])


@click.command()
@_CLIP
@click.option("--frames", "num_frames", type=click.IntRange(min=1), required=True,
              help="New frames to add (a multiple of 4; of 8 on LTX-Video).")
@click.option("--context", type=click.IntRange(min=1), default=None,
              help="Last frames of the clip the model sees, 4k+1 (default: 5 on TI2V-5B, 1 on the other Wan "
                   "models); 8k+1 on LTX-Video 0.9.5+ (default 9).")
@click.option("--color-match", "colour_match", type=click.FloatRange(0, 1), default=DEFAULT_COLOUR_MATCH,
              show_default=True, help="Match the new frames' colour statistics to the clip's end (0 = off).")
@click.option("--last-image", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where the continuation ends (required by Wan2.1-FLF2V; optional on Wan2.2-A14B and LTX-Video "
                   "0.9.5+).")
@common_options
def extend(clip: Path, num_frames, context, colour_match, last_image, **options) -> None:
    """Continue CLIP by --frames new frames; writes the original clip followed by them."""

    def read_inputs():
        frames = load_clip(clip)
        check_photos(options, last_image)
        return lambda pipe: pipe.prepare_extend(
            frames, num_frames=num_frames, context=context, colour_match=colour_match, motion=options["motion"],
            last_image=last_image, **settings_of(options),
        )  # fmt: skip

    execute(options, read_inputs, default_stem=f"{clip.stem}-extended", inputs=[clip, last_image])
