"""Restyle (video-to-video) against diffusers for the same clip, prompts and noise; its input rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ref_creative import moving_clip, noise, restyle_reference, ti2v_video_to_video
from ref_dmd import TABLES, ReferenceDMDScheduler
from test_few_step import LIGHTNING, GridEuler, _renoising_draws

from mlx_i2v import Video, load_pipeline
from mlx_i2v.dmd import FASTWAN_TI2V_5B
from mlx_i2v.errors import InvalidInputError

HEIGHT, WIDTH = 64, 96


@pytest.fixture(scope="module")
def ti2v(tiny_ti2v_dir):
    return load_pipeline(tiny_ti2v_dir, dtype="float32")


@pytest.mark.parametrize("frames", [9, 1])  # one frame: the image-to-image pass
def test_ti2v_restyle_matches_video_to_video_pipeline(ti2v, tiny_ti2v_dir, frames):
    clip = moving_clip(frames)
    common = dict(negative_prompt="blurry", height=HEIGHT, width=WIDTH, num_inference_steps=4, guidance_scale=5.0)
    expected = ti2v_video_to_video(tiny_ti2v_dir, clip, seed=3, prompt="an oil painting", strength=0.5, **common)
    latents = noise((1, 48, (frames - 1) // 4 + 1, HEIGHT // 16, WIDTH // 16), seed=3)
    video = ti2v(None, "an oil painting", video=clip, strength=0.5, latents=latents, **common)
    assert video.frames.shape == expected.shape == (frames, HEIGHT, WIDTH, 3)
    assert np.abs(video.frames - expected).max() < 2e-3
    m = video.metadata
    assert (m["mode"], m["strength"], m["steps_run"], m["source"], m["image"]) == ("restyle", 0.5, 2, "<frames>", False)


@pytest.mark.parametrize("variant, extra", [("i2v", {}), ("a14b", {"guidance_scale_2": 3.0})])
def test_channel_concat_restyle_matches_i2v_from_the_noised_clip(tiny_i2v_dirs, variant, extra):
    """A14B with 4 steps at strength 0.75 runs timesteps 937, 833, 625: both experts."""
    clip = moving_clip(9, seed=1)
    common = dict(negative_prompt="low quality", num_inference_steps=4, guidance_scale=4.0, **extra)
    expected = restyle_reference(tiny_i2v_dirs[variant], clip, 0.75, seed=5, height=HEIGHT, width=WIDTH,
                                 prompt="a watercolour", **common)  # fmt: skip
    pipe = load_pipeline(tiny_i2v_dirs[variant], dtype="float32")
    timesteps = []
    video = pipe(None, "a watercolour", video=clip, strength=0.75, latents=noise((1, 16, 3, 8, 12), seed=5),
                 on_step=lambda step, total, t: timesteps.append(t), **common)  # fmt: skip
    assert video.frames.shape == expected.shape == (9, HEIGHT, WIDTH, 3)
    assert np.abs(video.frames - expected).max() < 2e-3
    assert len(timesteps) == 3
    if variant == "a14b":
        assert timesteps == [937, 833, 625]


def test_restyle_on_an_euler_grid_matches_video_to_video_pipeline(ti2v, tiny_ti2v_dir):
    """The lightning grid shifted by 5, strength 0.5: the clip noised to sigma 0.833 (timestep 833.3) of the
    Euler schedule, then its last two steps with guidance, as diffusers' pipeline does with that scheduler."""
    clip = moving_clip(9, seed=3)
    common = dict(negative_prompt="blurry", height=HEIGHT, width=WIDTH, num_inference_steps=4, guidance_scale=3.0)
    expected = ti2v_video_to_video(tiny_ti2v_dir, clip, seed=4, scheduler=GridEuler(shift=5.0).with_grid(LIGHTNING),
                                   prompt="ink", strength=0.5, **common)  # fmt: skip
    timesteps = []
    video = ti2v(None, "ink", video=clip, strength=0.5, latents=noise((1, 48, 3, 4, 6), seed=4), sigmas=LIGHTNING,
                 flow_shift=5.0, on_step=lambda step, total, t: timesteps.append(t), **common)  # fmt: skip
    assert np.abs(video.frames - expected).max() < 2e-3
    assert timesteps == pytest.approx([833.3333, 625.0], abs=1e-3)
    assert (video.metadata["scheduler"], video.metadata["steps_run"]) == ("euler", 2)


class _RestyleDMD(ReferenceDMDScheduler):
    """The DMD reference loop started at schedule entry ``start``: the clip noised to the looked-up sigma of
    that timestep, as the recipe re-noises between steps (``ref_dmd.dmd_step``), then its steps from there."""

    def for_restyle(self, recipe, noises, start: int) -> _RestyleDMD:
        self.start = start
        return self.for_recipe(recipe, noises)

    def set_timesteps(self, *args, **kwargs) -> None:
        super().set_timesteps()
        self._step_index = self.start

    def scale_noise(self, sample, timestep, noise):
        table_t, table_sigmas = TABLES[self.recipe.table](self.recipe.shift)
        sigma = table_sigmas[torch.argmin((table_t - timestep.long()).abs())]
        return (1 - sigma) * sample + sigma * noise


def test_restyle_with_the_dmd_preset_matches_the_reference_loop(ti2v, tiny_ti2v_dir):
    """FastWan's 3 steps at strength 0.7: the clip noised to the sigma of timestep 757 in the DMD table, then
    the steps at 757 (re-noised with the seed's first draw) and 522."""
    recipe, shape = FASTWAN_TI2V_5B, (1, 48, 3, 4, 6)
    draws = _renoising_draws(recipe.timesteps, seed=21, shape=shape)
    scheduler = _RestyleDMD().for_restyle(recipe, [None, draws[0]], start=1)
    clip = moving_clip(9, seed=4)
    common = dict(height=HEIGHT, width=WIDTH, guidance_scale=1.0)
    expected = ti2v_video_to_video(tiny_ti2v_dir, clip, seed=6, scheduler=scheduler, prompt="ink", strength=0.7,
                                   num_inference_steps=3, **common)  # fmt: skip
    timesteps = []
    video = ti2v(None, "ink", video=clip, strength=0.7, preset="dmd", seed=21, latents=noise(shape, seed=6),
                 on_step=lambda step, total, t: timesteps.append(t), **common)  # fmt: skip
    assert np.abs(video.frames - expected).max() < 2e-3
    assert timesteps == [757, 522]


def test_restyle_settings_follow_the_clip(ti2v, caplog):
    clip = Video(frames=moving_clip(10).astype(np.float32) / 255, fps=12.0)
    request = ti2v.prepare(None, video=clip, num_inference_steps=10)
    s = request.settings
    assert (s.height, s.width, s.num_frames, s.fps) == (HEIGHT, WIDTH, 9, 12.0)  # 10 frames: the first 4k+1
    assert "restyling the first 9" in caplog.text
    assert request.start == 4 and request.source.shape == (9, HEIGHT, WIDTH, 3)  # default strength 0.6: 6 steps
    assert request.keyframes is None  # TI2V-5B restyles from the text alone, as WanVideoToVideoPipeline
    pinned = ti2v.prepare(moving_clip(1)[0], video=clip, num_frames=5, width=192)
    assert pinned.keyframes.head.shape == (1, 128, 192, 3)  # the image pins the first frame; aspect kept
    assert pinned.source.shape == (5, 128, 192, 3)
    odd = ti2v.prepare(None, video=moving_clip(5, height=70, width=100))
    assert (odd.settings.height, odd.settings.width) == (64, 96) and odd.source.shape == (5, 64, 96, 3)


def test_channel_concat_restyle_takes_the_clips_frames_as_condition(tiny_i2v_dirs):
    clip = moving_clip(9, seed=2)
    request = load_pipeline(tiny_i2v_dirs["i2v"], dtype="float32").prepare(None, video=clip)
    np.testing.assert_array_equal(np.asarray(request.photos[0]), clip[0])
    flf2v = load_pipeline(tiny_i2v_dirs["flf2v"], dtype="float32").prepare(None, video=clip)
    np.testing.assert_array_equal(np.asarray(flf2v.photos[1]), clip[-1])  # FLF2V: the clip's last frame closes it
    assert flf2v.keyframes.tail is not None


def test_photo_options_apply_to_the_given_photo_not_to_the_clip(tiny_i2v_dirs):
    clip = moving_clip(9, seed=2)
    pipe = load_pipeline(tiny_i2v_dirs["i2v"], dtype="float32")
    plain = pipe.prepare(None, video=clip, rotate=180, fit="contain", background="black")
    np.testing.assert_array_equal(np.asarray(plain.photos[0]), clip[0])  # the clip's own frame, as it is
    np.testing.assert_array_equal(plain.keyframes.head, plain.source[:1])  # fitted as the clip's frames are
    assert "rotate" not in plain.details
    turned = pipe.prepare(clip[0], video=clip, rotate=180)
    np.testing.assert_array_equal(np.asarray(turned.photos[0]), clip[0][::-1, ::-1])
    assert turned.details["rotate"] == 180


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(strength=0.1, num_inference_steps=4), "runs no step"),  # diffusers crashes here
        (dict(strength=0.0), r"strength must be in \(0, 1\]"),
        (dict(strength=1.5), r"strength must be in \(0, 1\]"),
        (dict(num_frames=13), "more than the clip has"),
        (dict(video="missing.mp4"), "clip not found"),
        (dict(video=np.zeros((3, 8, 8, 3), np.int32)), "uint8 or float"),
        (dict(video=np.zeros((3, 8, 8), np.uint8)), r"shape \(F, H, W, 3\)"),
        (dict(video=None, strength=0.5), "strength applies to a restyle"),
    ],
)
def test_bad_restyle_inputs(ti2v, kwargs, message):
    kwargs = {"video": moving_clip(9), **kwargs}
    with pytest.raises(InvalidInputError, match=message):
        ti2v.prepare(None, **kwargs)
