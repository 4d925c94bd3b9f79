"""End-to-end parity with diffusers for the same image, prompts and initial noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mlx_i2v import load_pipeline

HEIGHT, WIDTH, FRAMES = 64, 96, 9


def _photo(width=WIDTH, height=HEIGHT) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 / width, y * 255 / height, (x + y) % 64 * 4], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def _noise(channels: int, stride: int, seed: int = 0) -> np.ndarray:
    t = (FRAMES - 1) // 4 + 1
    return np.random.default_rng(seed).standard_normal((1, channels, t, HEIGHT // stride, WIDTH // stride)).astype(np.float32)


@pytest.fixture(scope="module")
def ti2v(tiny_ti2v_dir):
    return load_pipeline(tiny_ti2v_dir, dtype="float32")


def _reference(pipeline_cls, model_dir, **kwargs) -> np.ndarray:
    ref = pipeline_cls.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        out = ref(output_type="np", max_sequence_length=512, **kwargs).frames
    return np.asarray(out[0], dtype=np.float32)


@pytest.mark.parametrize("steps", [2, 3])
def test_ti2v_image_to_video_matches_diffusers(ti2v, tiny_ti2v_dir, steps):
    from diffusers import WanImageToVideoPipeline

    noise = _noise(48, 16)
    common = dict(prompt="a red fox runs through snow", negative_prompt="blurry, static", height=HEIGHT,
                  width=WIDTH, num_frames=FRAMES, num_inference_steps=steps, guidance_scale=5.0)
    expected = _reference(WanImageToVideoPipeline, tiny_ti2v_dir, image=_photo(), latents=torch.from_numpy(noise), **common)
    video = ti2v(_photo(), common.pop("prompt"), latents=noise, **common)
    assert video.frames.shape == (FRAMES, HEIGHT, WIDTH, 3) == expected.shape
    assert video.frames.dtype == np.float32
    assert np.abs(video.frames - expected).max() < 2e-3
    # The first frame reproduces the photo through the VAE; the rest must move away from it.
    assert np.abs(video.frames[-1] - video.frames[0]).max() > 1e-2


def test_ti2v_text_to_video_matches_diffusers(ti2v, tiny_ti2v_dir):
    from diffusers import WanPipeline

    noise = _noise(48, 16, seed=1)
    common = dict(prompt="waves at sunset", negative_prompt="", height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                  num_inference_steps=2, guidance_scale=4.0)
    expected = _reference(WanPipeline, tiny_ti2v_dir, latents=torch.from_numpy(noise), **common)
    video = ti2v(None, common.pop("prompt"), latents=noise, **common)
    assert np.abs(video.frames - expected).max() < 2e-3


def test_without_guidance_runs_one_pass_and_matches(ti2v, tiny_ti2v_dir):
    from diffusers import WanImageToVideoPipeline

    noise = _noise(48, 16, seed=2)
    common = dict(prompt="a lighthouse", height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=2,
                  guidance_scale=1.0)
    expected = _reference(WanImageToVideoPipeline, tiny_ti2v_dir, image=_photo(), latents=torch.from_numpy(noise), **common)
    video = ti2v(_photo(), common.pop("prompt"), latents=noise, **common)
    assert np.abs(video.frames - expected).max() < 2e-3


def test_settings_are_rounded_and_reported(ti2v, caplog):
    video = ti2v(_photo(100, 70), "x", height=70, width=100, num_frames=6, num_inference_steps=1, seed=5)
    assert video.frames.shape == (5, 64, 96, 3)
    m = video.metadata
    assert (m["height"], m["width"], m["num_frames"], m["seed"]) == (64, 96, 5, 5)
    assert m["negative_prompt"].startswith("色调艳丽")  # None means Wan's own default negative prompt
    assert "using 96x64" in caplog.text and "using 5" in caplog.text


def test_seed_is_reproducible_and_cancel_is_clean(ti2v):
    from mlx_i2v.errors import GenerationCancelled

    kwargs = dict(height=HEIGHT, width=WIDTH, num_frames=5, num_inference_steps=2, seed=11)
    a = ti2v(_photo(), "x", **kwargs).frames
    b = ti2v(_photo(), "x", **kwargs).frames
    np.testing.assert_array_equal(a, b)
    calls = []
    with pytest.raises(GenerationCancelled):
        ti2v(_photo(), "x", on_step=lambda step, total, t: calls.append((step, total, t)) or False, **kwargs)
    assert calls == [(1, 2, 999)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
        (dict(flow_shift=0.0), "flow_shift"),
        (dict(latents=np.zeros((1, 48, 2, 4, 6), np.float32)), "latents must have shape"),
    ],
)
def test_bad_arguments(ti2v, kwargs, message):
    from mlx_i2v.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match=message):
        ti2v(_photo(), "x", height=HEIGHT, width=WIDTH, num_frames=FRAMES, **kwargs)


def test_each_model_is_loaded_only_for_its_stage(tiny_ti2v_dir):
    pipe = load_pipeline(tiny_ti2v_dir, dtype="float32")
    def loaded():
        return (pipe.text_encoder.loaded, pipe.vae_encoder.loaded, pipe.vae_decoder.loaded, pipe.experts.resident())

    assert loaded() == (False, False, False, [])
    during = []
    video = pipe(_photo(), "x", height=HEIGHT, width=WIDTH, num_frames=5, num_inference_steps=2, seed=0,
                 on_step=lambda *_: during.append(loaded()))
    # while denoising only the transformer is in memory; afterwards nothing is
    assert during == [(False, False, False, [0])] * 2
    assert loaded() == (False, False, False, [])
    # each stage reports the part of its time spent loading its components
    seconds, loading = video.stats["seconds"], video.stats["loading_seconds"]
    assert set(loading) == {"text", "image", "denoise", "decode"}
    assert all(0 < loading[stage] < seconds[stage] for stage in loading)

    kept = load_pipeline(tiny_ti2v_dir, dtype="float32", keep_resident=True)
    kept(_photo(), "x", height=HEIGHT, width=WIDTH, num_frames=5, num_inference_steps=1, seed=0)
    again = kept(_photo(), "x", height=HEIGHT, width=WIDTH, num_frames=5, num_inference_steps=1, seed=0)
    assert again.stats["loading_seconds"] == {}  # nothing loaded twice
    assert kept.text_encoder.loaded and kept.vae_encoder.loaded and kept.vae_decoder.loaded
    assert kept.experts.resident() == [0]
    assert "decoder" not in kept.vae_encoder.get() and "encoder" not in kept.vae_decoder.get()


def test_request_that_cannot_fit_stops_before_loading(tiny_ti2v_dir):
    from mlx_i2v.memory import set_memory_limit
    from mlx_i2v.planner import PlanDoesNotFitError

    pipe = load_pipeline(tiny_ti2v_dir, dtype="float32")
    plan = pipe.plan(height=HEIGHT, width=WIDTH, num_frames=FRAMES)
    assert 0 < plan.peak < 2e9
    set_memory_limit(plan.peak / 2 / 1e9)
    try:
        with pytest.raises(PlanDoesNotFitError, match="GB"):
            pipe(_photo(), "x", height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=1)
    finally:
        set_memory_limit(None)
    assert not pipe.text_encoder.loaded and pipe.experts.resident() == []
