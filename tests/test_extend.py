"""Extend against the reference conditioning paths (TI2V-5B: k clean latent frames at timestep 0; the
channel-concat models: diffusers' pixel-mask prefix), the seam, and the input rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from ref_creative import PrefixI2V, PrefixTI2V, moving_clip, noise, run_reference

from mlx_i2v import Video, load_pipeline
from mlx_i2v.colour import match_colour
from mlx_i2v.errors import InvalidInputError

HEIGHT, WIDTH, CLIP = 64, 96, 9


@pytest.fixture(scope="module")
def ti2v(tiny_ti2v_dir):
    return load_pipeline(tiny_ti2v_dir, dtype="float32")


def test_ti2v_extend_matches_clean_prefix_latent_frames(ti2v, tiny_ti2v_dir):
    """Default context: the last 5 frames, two latent frames held clean; 4 new frames make a 9-frame window."""
    clip = moving_clip(CLIP)
    latents = noise((1, 48, 3, HEIGHT // 16, WIDTH // 16), seed=7)
    common = dict(negative_prompt="static", num_inference_steps=2, guidance_scale=5.0)
    expected = run_reference(PrefixTI2V, tiny_ti2v_dir, attributes={"prefix": clip[-5:]},
                             image=Image.fromarray(clip[-5]), prompt="the camera pans on",
                             latents=torch.from_numpy(latents), height=HEIGHT, width=WIDTH, num_frames=9,
                             **common)  # fmt: skip
    plain = ti2v.extend(clip, "the camera pans on", num_frames=4, colour_match=0.0, latents=latents, **common)
    assert plain.frames.shape == (CLIP + 4, HEIGHT, WIDTH, 3)
    np.testing.assert_array_equal(plain.frames[:CLIP], clip.astype(np.float32) / 255)  # carried over, not re-decoded
    assert np.abs(plain.frames[CLIP:] - expected[5:]).max() < 2e-3
    m = plain.metadata
    assert (m["mode"], m["context_frames"], m["new_frames"], m["colour_match"]) == ("extend", 5, 4, 0.0)
    assert m["num_frames"] == 9  # the generated window: context + new frames

    # Colour matching (on by default) changes only the new frames: toward the context they continue.
    matched = ti2v.extend(clip, "the camera pans on", num_frames=4, latents=latents, **common)
    np.testing.assert_array_equal(matched.frames[:CLIP], plain.frames[:CLIP])
    expected_new = match_colour(plain.frames[CLIP:], clip[-5:].astype(np.float32) / 255, 1.0)
    np.testing.assert_allclose(matched.frames[CLIP:], expected_new, atol=1e-6)
    assert np.abs(matched.frames[CLIP:] - plain.frames[CLIP:]).max() > 1e-2
    assert matched.metadata["colour_match"] == 1.0


def test_channel_concat_extend_matches_pixel_mask_prefix(tiny_i2v_dirs):
    """Wan2.1-I2V with a 5-frame context: diffusers' WanAnimate prefix construction; CLIP sees the
    window's first frame. The input is an in-memory float Video, whose frames are kept exactly."""
    clip = moving_clip(CLIP, seed=4)
    source = Video(frames=clip.astype(np.float32) / 255 * 0.999 + 1e-4, fps=12.0)  # off the uint8 grid
    latents = noise((1, 16, 3, HEIGHT // 8, WIDTH // 8), seed=8)
    common = dict(negative_prompt="low quality", num_inference_steps=2, guidance_scale=4.0)
    expected = run_reference(PrefixI2V, tiny_i2v_dirs["i2v"], attributes={"prefix": clip[-5:]},
                             image=Image.fromarray(clip[-5]), prompt="a boat drifts", latents=torch.from_numpy(latents),
                             height=HEIGHT, width=WIDTH, num_frames=9, **common)  # fmt: skip
    pipe = load_pipeline(tiny_i2v_dirs["i2v"], dtype="float32")
    video = pipe.extend(source, "a boat drifts", num_frames=4, context=5, colour_match=0.0, latents=latents, **common)
    assert video.frames.shape == (CLIP + 4, HEIGHT, WIDTH, 3) and video.fps == 12.0
    np.testing.assert_array_equal(video.frames[:CLIP], source.frames)
    assert np.abs(video.frames[CLIP:] - expected[5:]).max() < 2e-3


def test_extend_inputs(ti2v, tiny_i2v_dirs, caplog):
    clip = moving_clip(CLIP)
    request = ti2v.prepare_extend(clip, num_frames=5)  # new frames come in fours
    assert (request.settings.num_frames, request.details["new_frames"]) == (9, 4) and "using 4" in caplog.text
    assert request.keyframes.head.shape == (5, HEIGHT, WIDTH, 3)
    short = ti2v.prepare_extend(clip[:3], num_frames=8)  # a 3-frame clip has room for a 1-frame context
    assert (short.details["context_frames"], short.settings.num_frames) == (1, 9)
    i2v = load_pipeline(tiny_i2v_dirs["i2v"], dtype="float32").prepare_extend(clip, num_frames=8)
    assert i2v.details["context_frames"] == 1  # the channel-concat models' trained first-frame mask
    np.testing.assert_array_equal(np.asarray(i2v.photos[0]), clip[-1])
    flf2v = load_pipeline(tiny_i2v_dirs["flf2v"], dtype="float32")
    with pytest.raises(InvalidInputError, match="needs a last image"):
        flf2v.prepare_extend(clip, num_frames=8)
    assert flf2v.prepare_extend(clip, num_frames=8, last_image=clip[0]).keyframes.tail is not None


@pytest.mark.parametrize(
    "clip, kwargs, message",
    [
        (moving_clip(9, height=70, width=100), {}, "multiples of 32"),
        (moving_clip(9, height=48, width=96), {}, "multiples of 32"),
        (moving_clip(9), {"context": 4}, "4k\\+1"),
        (moving_clip(3), {"context": 5}, "longer than the clip"),
        (moving_clip(9), {"num_frames": 0}, "positive integer"),
        (moving_clip(9), {"num_frames": None}, "positive integer"),
        (moving_clip(9), {"colour_match": 1.5}, "colour_match"),
        ("missing.mp4", {}, "clip not found"),
    ],
)
def test_bad_extend_inputs(ti2v, clip, kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        ti2v.prepare_extend(clip, **{"num_frames": 4, **kwargs})


@pytest.mark.parametrize("name", ["strength", "height", "no_such_setting"])
def test_arguments_extend_does_not_take_are_named(ti2v, name):
    """A call's argument extend has no use for (the size is the clip's; a strength is restyle's) is refused
    with extend's name, not a private function's."""
    with pytest.raises(TypeError, match=rf"^extend\(\) got an unexpected keyword argument '{name}'$"):
        ti2v.prepare_extend(moving_clip(9), num_frames=4, **{name: 1})
