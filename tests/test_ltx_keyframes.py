"""LTX-Video 0.9.5+ keyframes at any frame index, video extension and loops against diffusers 0.42.1's
``LTXConditionPipeline`` with ``conditions=[LTXVideoCondition(...)]`` on the tiny checkpoint, and their input
rules (refused with one line before anything loads).

Both sides get every random draw (see tests/test_ltx_pipeline.py): diffusers draws the initial noise, then per
condition in list order its VAE posterior sample and, for a condition at frame index > 0, the noise its
latents are mixed with; then one conditioning noise per step over its whole token sequence (the extra
condition tokens first: reordered here to our clip-then-extras order), and the decode noise.
"""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
import torch
from diffusers import LTXConditionPipeline
from diffusers.pipelines.ltx import pipeline_ltx_condition
from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition
from PIL import Image
from ref_creative import moving_clip
from test_ltx_pipeline import COMMON, HEIGHT, PROMPT, WIDTH, _noise, _photo, _reference, _same_decode_noise

import mlx.core as mx

from mlx_i2v import Video, load_pipeline
from mlx_i2v import conditioning
from mlx_i2v.families.ltx import conditioning as ltx_conditioning
from mlx_i2v.errors import InvalidInputError

TOKENS_PER_FRAME = 6  # the tiny VAE's 2x3 latent grid at 64x96
STEPS = COMMON["num_inference_steps"]
# Tighter than the usual 2e-3 for frames: both sides agree to ~1e-6, and the tiny model reacts weakly to where
# a keyframe sits (placing every keyframe one frame later moves its frames by ~2e-3).
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def pipe(tiny_ltx_condition_dir):
    return load_pipeline(tiny_ltx_condition_dir, dtype="float32")


def _key_photo(seed: int) -> Image.Image:
    return Image.fromarray(moving_clip(1, seed=seed)[0])


def _latent(frames: int) -> tuple[int, ...]:
    return (1, 16, frames, HEIGHT // 32, WIDTH // 32)


class Draws:
    """One generation's random draws in diffusers' layouts, given to diffusers (``queue``, in its order) and
    to our conditioning (``install``): the posterior samples and keyframe noises per condition index."""

    def __init__(self, seed: int, clip_frames: int, conditions: list[tuple[int, int]], steps: int = STEPS):
        """``conditions``: per condition, (latent frames encoded, extra latent frames it adds)."""
        rng = iter(range(seed, seed + 100))
        self.noise = _noise(next(rng), _latent(clip_frames))
        self.posteriors = [_noise(next(rng), _latent(n)) for n, _ in conditions]
        self.key_noises = {i: _noise(next(rng), _latent(extra)) for i, (_, extra) in enumerate(conditions) if extra}
        self.extra_tokens = sum(extra for _, extra in conditions) * TOKENS_PER_FRAME
        tokens = clip_frames * TOKENS_PER_FRAME + self.extra_tokens
        self.steps = [_noise(next(rng), (1, tokens, 16)) for _ in range(steps)]
        self.mix = _noise(next(rng), _latent(clip_frames))
        self.clip_frames = clip_frames

    def queue(self) -> list[np.ndarray]:
        per_condition = []
        for i, posterior in enumerate(self.posteriors):
            per_condition += [posterior] + ([self.key_noises[i]] if i in self.key_noises else [])
        return [self.noise, *per_condition, *self.steps, self.mix]

    def install(self, monkeypatch) -> None:
        def channels_last(a):
            return mx.array(a.transpose(0, 2, 3, 4, 1))

        def posterior_noise(seed, index, shape):
            assert tuple(shape) == channels_last(self.posteriors[index]).shape
            return channels_last(self.posteriors[index])

        def keyframe_noise(seed, index, shape):
            assert tuple(shape) == channels_last(self.key_noises[index]).shape
            return channels_last(self.key_noises[index])

        frames = self.clip_frames + self.extra_tokens // TOKENS_PER_FRAME
        steps = [np.concatenate([n[:, self.extra_tokens :], n[:, : self.extra_tokens]], axis=1) for n in self.steps]
        self.step_queue = [mx.array(n.reshape(1, frames, HEIGHT // 32, WIDTH // 32, 16)) for n in steps]
        monkeypatch.setattr(conditioning, "posterior_noise", posterior_noise)
        monkeypatch.setattr(ltx_conditioning, "keyframe_noise", keyframe_noise)
        monkeypatch.setattr(ltx_conditioning, "conditioning_noise", lambda seed, t, shape: self.step_queue.pop(0))
        _same_decode_noise(monkeypatch, self.mix)


def _diffusers(folder, monkeypatch, draws: Draws, **kwargs) -> np.ndarray:
    return _reference(LTXConditionPipeline, folder, monkeypatch, pipeline_ltx_condition, draws.queue(),
                      prompt=PROMPT, image_cond_noise_scale=0.15, generator=torch.Generator().manual_seed(5),
                      **kwargs)  # fmt: skip


def test_keyframes_at_middle_frames_match_diffusers(pipe, tiny_ltx_condition_dir, monkeypatch):
    """The photo at strength 0.8, a keyframe at frame 8 at its own strength 0.6 and one at frame 13 (not on
    the latent grid) held fully (so it gets the per-step noise): two extra latent frames."""
    frames = 17
    draws = Draws(40, 3, [(1, 0), (1, 1), (1, 1)])
    first, middle = _key_photo(1), _key_photo(2)
    conditions = [LTXVideoCondition(image=_photo(), frame_index=0, strength=0.8),
                  LTXVideoCondition(image=first, frame_index=8, strength=0.6),
                  LTXVideoCondition(image=middle, frame_index=13, strength=1.0)]  # fmt: skip
    expected = _diffusers(tiny_ltx_condition_dir, monkeypatch, draws, conditions=conditions, **COMMON)
    draws.install(monkeypatch)
    video = pipe(_photo(), PROMPT, strength=0.8, keyframes=[(first, 8, 0.6), (middle, 13, 1.0)],
                 latents=draws.noise, image_cond_noise_scale=0.15, **COMMON)  # fmt: skip
    assert not draws.step_queue and video.frames.shape == expected.shape == (frames, HEIGHT, WIDTH, 3)
    assert np.abs(video.frames - expected).max() < TOLERANCE
    assert video.metadata["keyframes"] == [[8, 0.6], [13, 1.0]] and video.metadata["strength"] == 0.8
    # The keyframes matter: without them the clip differs (no token is held fully then: no per-step noise).
    plain = pipe(_photo(), PROMPT, strength=0.8, latents=draws.noise, image_cond_noise_scale=0.0, **COMMON)
    assert np.abs(plain.frames - video.frames).max() > 1e-2


def test_clip_keyframe_at_a_middle_frame_matches_diffusers(pipe, tiny_ltx_condition_dir, monkeypatch):
    """A 17-frame clip at frame 8 of a 25-frame clip: its first two latent frames become extra tokens at
    frames 8 and 9, its third is blended into latent frame 8 // 8 + 2 = 3 (diffusers' prefix rule). Given
    as a :class:`Video` of 20 frames, it is cut to the 17 that fit (``trim_conditioning_sequence``)."""
    frames, clip = 25, moving_clip(20, seed=5)
    draws = Draws(60, 4, [(1, 0), (3, 2)])
    keyframe = LTXVideoCondition(video=[Image.fromarray(f) for f in clip], frame_index=8, strength=0.9)
    conditions = [LTXVideoCondition(image=_photo(), frame_index=0), keyframe]
    kwargs = dict(COMMON, num_frames=frames)
    expected = _diffusers(tiny_ltx_condition_dir, monkeypatch, draws, conditions=conditions, **kwargs)
    draws.install(monkeypatch)
    source = Video(frames=clip.astype(np.float32) / 255, fps=25.0)
    video = pipe(_photo(), PROMPT, keyframes=[(source, 8, 0.9)], latents=draws.noise, image_cond_noise_scale=0.15,
                 **kwargs)  # fmt: skip
    assert not draws.step_queue and video.frames.shape == expected.shape == (frames, HEIGHT, WIDTH, 3)
    assert np.abs(video.frames - expected).max() < TOLERANCE


def test_extend_matches_a_video_condition_at_frame_zero(pipe, tiny_ltx_condition_dir, monkeypatch):
    """The clip's last 9 frames (the default context: two latent frames) as a video condition at frame 0,
    8 new frames: a 17-frame window whose new frames follow the clip, which is carried over unchanged."""
    clip = moving_clip(12, seed=3)
    draws = Draws(80, 3, [(2, 0)])
    kwargs = {k: v for k, v in COMMON.items() if k not in ("height", "width", "num_frames")}
    context = LTXVideoCondition(video=[Image.fromarray(f) for f in clip[-9:]], frame_index=0)
    expected = _diffusers(tiny_ltx_condition_dir, monkeypatch, draws, conditions=[context], height=HEIGHT,
                          width=WIDTH, num_frames=17, **kwargs)  # fmt: skip
    draws.install(monkeypatch)
    video = pipe.extend(clip, PROMPT, num_frames=8, colour_match=0.0, latents=draws.noise,
                        image_cond_noise_scale=0.15, **kwargs)  # fmt: skip
    assert not draws.step_queue and video.frames.shape == (12 + 8, HEIGHT, WIDTH, 3)
    np.testing.assert_array_equal(video.frames[:12], clip.astype(np.float32) / 255)
    assert np.abs(video.frames[12:] - expected[9:]).max() < TOLERANCE
    m = video.metadata
    assert (m["mode"], m["context_frames"], m["new_frames"], m["num_frames"]) == ("extend", 9, 8, 17)


def test_loop_is_the_photo_as_keyframe_at_the_last_frame(pipe, tiny_ltx_condition_dir, monkeypatch):
    frames = 17
    draws = Draws(100, 3, [(1, 0), (1, 1)])
    conditions = [LTXVideoCondition(image=_photo(), frame_index=0), LTXVideoCondition(image=_photo(), frame_index=16)]
    expected = _diffusers(tiny_ltx_condition_dir, monkeypatch, draws, conditions=conditions, **COMMON)
    draws.install(monkeypatch)
    video = pipe(_photo(), PROMPT, loop=True, latents=draws.noise, image_cond_noise_scale=0.15, **COMMON)
    assert not draws.step_queue and video.frames.shape == (frames - 1, HEIGHT, WIDTH, 3)  # the repeat dropped
    assert np.abs(video.frames - expected[:-1]).max() < TOLERANCE
    assert video.metadata["loop"] is True and video.metadata["num_frames"] == frames


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(keyframes=[(_photo(), 17)]), "keyframe at frame 17 is outside the 17-frame clip"),
        (dict(keyframes=[(_photo(), 0)]), r"keyframes\[0\] frame index must be >= 1"),
        (dict(keyframes=[(_photo(), 8.0)]), "frame index must be an integer"),
        (dict(keyframes=["photo.png"]), r"keyframes\[0\] must be \(image, frame_index\)"),
        (dict(keyframes=(_photo(), 8)), r"keyframes\[0\] must be \(image, frame_index\)"),
        (dict(keyframes=[(_photo(), 8, 1.5)]), r"strength must be in \(0, 1\]"),
        (dict(keyframes=[("missing.png", 8)]), "missing.png"),
        (dict(loop=True, last_image=_photo()), "last_image does not apply"),
    ],
)
def test_bad_keyframes_are_refused_before_loading(pipe, kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        pipe(_photo(), PROMPT, height=HEIGHT, width=WIDTH, num_frames=17, **kwargs)
    assert not pipe.text_encoder.loaded and not pipe.vae_encoder.loaded and not pipe.experts.loaded()


def test_extend_and_keyframe_rules(pipe, tiny_ti2v_dir):
    with pytest.raises(InvalidInputError, match="keyframes need an image"):
        pipe.prepare(None, keyframes=[(_photo(), 8)], height=HEIGHT, width=WIDTH, num_frames=17)
    with pytest.raises(InvalidInputError, match=r"context must be 1, 9, 17, ... \(8k\+1\) frames, got 5"):
        pipe.prepare_extend(moving_clip(12), num_frames=8, context=5)
    short = pipe.prepare_extend(moving_clip(6), num_frames=5)  # 5 frames: too short for 9, new frames in eights
    assert (short.details["context_frames"], short.details["new_frames"], short.settings.num_frames) == (1, 8, 9)
    wan = load_pipeline(tiny_ti2v_dir, dtype="float32")
    with pytest.raises(InvalidInputError, match=r"keyframes at other frames \(keyframes=\): not supported on Wan"):
        wan.prepare(_photo(), keyframes=[(_photo(), 8)])


def test_cli_keyframe(tiny_ltx_condition_dir, photo, tmp_path):
    """``--keyframe PATH@FRAME[:STRENGTH]`` on ``generate``: the clip and its metadata; an index outside the
    clip is one line, before any model loads, and writes nothing."""
    from test_cli import _run
    from test_ltx_cli import SMALL

    out = tmp_path / "clip.mp4"
    result = _run("generate", str(photo), "-p", "a fox", "--model", str(tiny_ltx_condition_dir), *SMALL,
                  "--keyframe", f"{photo}@5:0.7", "--output", str(out), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    with av.open(str(out)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 9
        assert json.loads(c.metadata["comment"])["keyframes"] == [[5, 0.7]]
    bad = tmp_path / "bad.mp4"
    result = _run("generate", str(photo), "-p", "a fox", "--model", str(tiny_ltx_condition_dir), *SMALL,
                  "--keyframe", f"{photo}@9", "--output", str(bad), cwd=tmp_path)  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and "outside the 9-frame clip" in lines[0], result.stderr
    assert not bad.exists()
