"""Wan2.1-I2V, Wan2.1-FLF2V and Wan2.2-I2V-A14B end to end against diffusers' WanImageToVideoPipeline."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from mlx_i2v import load_pipeline
from mlx_i2v.errors import InvalidInputError

HEIGHT, WIDTH, FRAMES = 64, 96, 9


def _photo(seed: int, width: int = WIDTH, height: int = HEIGHT) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, np.full_like(x, 128)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


def _noise(seed: int) -> np.ndarray:
    shape = (1, 16, (FRAMES - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _reference(model_dir, **kwargs) -> np.ndarray:
    from diffusers import WanImageToVideoPipeline

    ref = WanImageToVideoPipeline.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        frames = ref(output_type="np", max_sequence_length=512, **kwargs).frames
    return np.asarray(frames[0], np.float32)


CASES = {
    # variant key: (steps, flow shift of the shipped scheduler, extra arguments)
    "i2v": (2, 3.0, {}),
    "flf2v": (2, 16.0, {"last_image": _photo(7)}),
    "a14b": (4, 5.0, {"guidance_scale_2": 3.0}),
}


@pytest.mark.parametrize("variant", list(CASES))
def test_matches_diffusers(variant, tiny_i2v_dirs):
    steps, shift, extra = CASES[variant]
    model_dir = tiny_i2v_dirs[variant]
    common = dict(negative_prompt="low quality", height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                  num_inference_steps=steps, guidance_scale=5.0, **extra)
    # The CLIP branch sees the photo as given (here not at the video size), the VAE the fitted frame.
    photo = _photo(1, WIDTH, HEIGHT)
    expected = _reference(model_dir, image=photo, prompt="a boat on a lake", latents=torch.from_numpy(_noise(0)), **common)
    pipe = load_pipeline(model_dir, dtype="float32")
    video = pipe(photo, "a boat on a lake", latents=_noise(0), flow_shift=shift, **common)
    assert video.frames.shape == expected.shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert np.abs(video.frames - expected).max() < 2e-3


def test_variants_are_detected_with_their_defaults(tiny_i2v_dirs):
    from mlx_i2v.families.wan.variants import detect_variant

    names = {k: detect_variant(d, d.name).name for k, d in tiny_i2v_dirs.items()}
    assert names == {"i2v": "wan2.1-i2v-14b-480p", "flf2v": "wan2.1-flf2v-14b-720p", "a14b": "wan2.2-i2v-a14b"}
    a14b = detect_variant(tiny_i2v_dirs["a14b"])
    assert (a14b.defaults.num_inference_steps, a14b.defaults.flow_shift, a14b.defaults.guidance_scale_2) == (40, 5.0, 3.5)
    assert detect_variant(tiny_i2v_dirs["flf2v"]).defaults.negative_prompt.startswith("镜头切换，")
    assert detect_variant(tiny_i2v_dirs["i2v"], "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers").defaults.sizes[0] == (720, 1280)


@pytest.mark.parametrize("keep_resident, expected", [(False, [[0], [0], [1], [1]]), (True, [[0], [0], [0, 1], [0, 1]])])
def test_a14b_switches_experts_at_the_boundary(tiny_i2v_dirs, keep_resident, expected):
    pipe = load_pipeline(tiny_i2v_dirs["a14b"], dtype="float32", keep_experts_resident=keep_resident)
    high = weakref.ref(pipe.experts.get(0))
    seen, timesteps, high_alive = [], [], []

    def on_step(step, total, t):
        seen.append(pipe.experts.resident())
        timesteps.append(t)
        gc.collect()
        high_alive.append(high() is not None)

    pipe(_photo(2), "x", height=HEIGHT, width=WIDTH, num_frames=5, num_inference_steps=4, seed=0, on_step=on_step)
    assert timesteps == [999, 937, 833, 625]  # boundary 0.9 * 1000: two steps per expert
    assert seen == expected
    # With one expert resident, the high-noise expert's memory is really gone once the low one runs.
    assert high_alive == [True, True, keep_resident, keep_resident]


def test_a14b_guidance_per_expert_changes_only_the_low_noise_steps(tiny_i2v_dirs):
    pipe = load_pipeline(tiny_i2v_dirs["a14b"], dtype="float32")
    kwargs = dict(height=HEIGHT, width=WIDTH, num_frames=5, seed=3, guidance_scale=4.0)
    high_only = pipe(_photo(3), "x", num_inference_steps=2, guidance_scale_2=1.5, **kwargs).frames  # 999, 750
    assert np.array_equal(high_only, pipe(_photo(3), "x", num_inference_steps=2, guidance_scale_2=9.0, **kwargs).frames) is False
    with pytest.raises(InvalidInputError, match="guidance_scale_2"):
        pipe(_photo(3), "x", num_inference_steps=1, guidance_scale_2=-1.0, **kwargs)


def test_image_requirements(tiny_i2v_dirs):
    i2v = load_pipeline(tiny_i2v_dirs["i2v"], dtype="float32")
    with pytest.raises(InvalidInputError, match="needs an input image"):
        i2v(None, "x", num_inference_steps=1)
    with pytest.raises(InvalidInputError, match="does not take a last image"):
        i2v(_photo(0), "x", last_image=_photo(1), num_inference_steps=1)
    with pytest.raises(InvalidInputError, match="guidance_scale_2 does not apply"):
        i2v(_photo(0), "x", guidance_scale_2=2.0, num_inference_steps=1)
    flf2v = load_pipeline(tiny_i2v_dirs["flf2v"], dtype="float32")
    with pytest.raises(InvalidInputError, match="needs a last image"):
        flf2v(_photo(0), "x", num_inference_steps=1)
