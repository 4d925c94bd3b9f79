"""Loops against diffusers' ``last_image=image`` and motion amplitude against PainterI2V in torch."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline
from PIL import Image
from ref_creative import PainterI2V, moving_clip, noise, run_reference

from mlx_i2v import load_pipeline
from mlx_i2v.errors import InvalidInputError
from mlx_i2v.motion import amplify_motion

HEIGHT, WIDTH, FRAMES = 64, 96, 9


def _photo(seed: int = 0) -> Image.Image:
    return Image.fromarray(moving_clip(1, seed=seed)[0])


@pytest.mark.parametrize("variant, extra", [("flf2v", {}), ("a14b", {"guidance_scale_2": 2.0})])
def test_loop_matches_diffusers_with_the_first_image_last(tiny_i2v_dirs, variant, extra):
    latents = noise((1, 16, 3, HEIGHT // 8, WIDTH // 8), seed=11)
    common = dict(negative_prompt="", height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=2,
                  guidance_scale=3.0, **extra)  # fmt: skip
    expected = run_reference(WanImageToVideoPipeline, tiny_i2v_dirs[variant], image=_photo(), last_image=_photo(),
                             prompt="waves roll in", latents=torch.from_numpy(latents), **common)  # fmt: skip
    pipe = load_pipeline(tiny_i2v_dirs[variant], dtype="float32")
    video = pipe(_photo(), "waves roll in", loop=True, latents=latents, **common)
    assert video.frames.shape == (FRAMES - 1, HEIGHT, WIDTH, 3)  # the final frame, equal to the first, dropped
    assert np.abs(video.frames - expected[:-1]).max() < 2e-3
    assert video.metadata["loop"] is True and video.metadata["num_frames"] == FRAMES


def test_loop_needs_a_last_frame_input(tiny_ti2v_dir, tiny_i2v_dirs):
    for model_dir in (tiny_ti2v_dir, tiny_i2v_dirs["i2v"]):
        with pytest.raises(InvalidInputError, match="has no last-frame input, so it cannot close a loop"):
            load_pipeline(model_dir, dtype="float32").prepare(_photo(), loop=True)
    with pytest.raises(InvalidInputError, match="last_image does not apply"):
        load_pipeline(tiny_i2v_dirs["flf2v"], dtype="float32").prepare(_photo(), loop=True, last_image=_photo(1))


def test_motion_matches_painter_i2v_and_one_is_off(tiny_i2v_dirs):
    latents = noise((1, 16, 3, HEIGHT // 8, WIDTH // 8), seed=12)
    common = dict(negative_prompt="", height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=2,
                  guidance_scale=3.0, guidance_scale_2=3.0)  # fmt: skip
    expected = run_reference(PainterI2V, tiny_i2v_dirs["a14b"], attributes={"amplitude": 1.5}, image=_photo(2),
                             prompt="a dancer spins", latents=torch.from_numpy(latents), **common)  # fmt: skip
    pipe = load_pipeline(tiny_i2v_dirs["a14b"], dtype="float32")
    amplified = pipe(_photo(2), "a dancer spins", motion=1.5, latents=latents, **common)
    assert np.abs(amplified.frames - expected).max() < 2e-3
    assert amplified.metadata["motion"] == 1.5
    plain = pipe(_photo(2), "a dancer spins", latents=latents, **common)
    off = pipe(_photo(2), "a dancer spins", motion=1.0, latents=latents, **common)
    np.testing.assert_array_equal(off.frames, plain.frames)  # motion 1 is today's generation, bit for bit
    assert np.abs(amplified.frames - plain.frames).max() > 1e-3


def test_amplify_motion_leaves_given_frames_and_clamps():
    raw = mx.array(np.random.default_rng(0).normal(0, 3, (1, 4, 2, 3, 16)).astype(np.float32))
    assert amplify_motion(raw, 1.0, np.array([False, True, True, True])) is raw
    free = np.array([False, True, True, False])  # a first-last-frame clip: the last latent frame is given
    out = np.array(amplify_motion(raw, 2.0, free))
    np.testing.assert_array_equal(out[:, [0, 3]], np.array(raw)[:, [0, 3]])
    assert np.abs(out[:, 1:3]).max() <= 6.0 and not np.allclose(out[:, 1:3], np.array(raw)[:, 1:3])


def test_motion_checks(tiny_ti2v_dir, tiny_i2v_dirs):
    with pytest.raises(InvalidInputError, match="motion is not supported on wan2.2-ti2v-5b"):
        load_pipeline(tiny_ti2v_dir, dtype="float32").prepare(_photo(), motion=1.2)
    with pytest.raises(InvalidInputError, match=r"motion must be in \[0.25, 2\]"):
        load_pipeline(tiny_i2v_dirs["i2v"], dtype="float32").prepare(_photo(), motion=3.0)
