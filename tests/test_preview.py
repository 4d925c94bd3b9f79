"""Step previews: the predicted clean latents against a diffusers run, their RGB projection, and the
callback forms."""

from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np
import torch
from diffusers import WanImageToVideoPipeline
from PIL import Image
from ref_creative import moving_clip, noise, run_reference

from mlx_i2v import load_pipeline
from mlx_i2v.conditioning import encode_mode
from mlx_i2v.pipeline import _takes_four_arguments
from mlx_i2v.preview import LATENT_RGB, write_png_atomically

HEIGHT, WIDTH, FRAMES = 64, 96, 9


def _project(latents: np.ndarray, z_dim: int) -> np.ndarray:
    """ComfyUI's Latent2RGB: ``linear(x, W^T, b)``, ``((v + 1) / 2).clamp(0, 1) * 255``, in numpy."""
    table = LATENT_RGB[z_dim]
    rgb = latents.astype(np.float64) @ np.asarray(table.weight) + np.asarray(table.bias)
    return np.round(np.clip((rgb + 1) / 2, 0, 1) * 255)


def test_previews_are_the_predicted_clean_latents_of_diffusers(tiny_ti2v_dir):
    photo = Image.fromarray(moving_clip(1)[0])
    latents = noise((1, 48, 3, HEIGHT // 16, WIDTH // 16), seed=21)
    common = dict(negative_prompt="", height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=3,
                  guidance_scale=4.0)  # fmt: skip
    captured: list[np.ndarray] = []
    run_reference(WanImageToVideoPipeline, tiny_ti2v_dir, capture=captured, image=photo, prompt="a kite rises",
                  latents=torch.from_numpy(latents), **common)  # fmt: skip
    pipe = load_pipeline(tiny_ti2v_dir, dtype="float32", keep_resident=True)
    previews = []
    pipe(photo, "a kite rises", latents=latents, on_step=lambda step, total, t, preview: previews.append(preview),
         **common)  # fmt: skip
    assert len(previews) == len(captured) == 3
    for preview, expected in zip(previews, captured):
        ours = np.array(preview.latents).transpose(0, 4, 1, 2, 3)  # diffusers' (1, C, T, h, w)
        assert np.abs(ours - expected).max() < 2e-3 * max(1.0, np.abs(expected).max())

    # The RGB frames are the projection of x0 with the photo's latent frame back in place (TI2V-5B).
    last = previews[-1]
    x0 = np.array(last.latents[0])
    x0[0] = np.array(encode_mode(pipe.vae_encoder.get(), np.asarray(photo, np.float32)[None] / 127.5 - 1)[0, 0])
    frames = last.frames()
    assert frames.dtype == np.uint8 and frames.shape == (3, HEIGHT // 16, WIDTH // 16, 3)
    assert np.abs(frames.astype(int) - _project(x0, 48)).max() <= 1
    strip = last.image(count=2, height=40)
    assert strip.size == (2 * 40 * WIDTH // HEIGHT, 40)


def test_wan21_projection_and_atomic_preview_file(tmp_path):
    x = np.random.default_rng(0).normal(0, 1, (2, 5, 7, 16)).astype(np.float32)
    np.testing.assert_array_equal(np.array(LATENT_RGB[16](mx.array(x))), _project(x, 16))
    assert {z: np.asarray(t.weight).shape for z, t in LATENT_RGB.items()} == {16: (16, 3), 48: (48, 3)}
    path = tmp_path / "preview.png"
    write_png_atomically(Image.new("RGB", (8, 4), (10, 20, 30)), path)
    write_png_atomically(Image.new("RGB", (8, 4), (40, 50, 60)), path)  # replaced whole
    assert Image.open(path).getpixel((0, 0)) == (40, 50, 60)
    assert [p.name for p in tmp_path.iterdir()] == ["preview.png"]  # no temporary file left


def test_callbacks_with_three_arguments_keep_working():
    class Old:
        def __call__(self, step, total, timestep):
            pass

    class New:
        def __call__(self, step, total, timestep, preview=None):
            pass

    def four(a, b, c, d):
        pass

    assert not _takes_four_arguments(lambda step, total, t: None)
    assert not _takes_four_arguments(Old())
    assert not _takes_four_arguments(functools.partial(four, 1))
    assert _takes_four_arguments(New()) and _takes_four_arguments(four) and _takes_four_arguments(lambda *a: None)


def test_text_to_video_preview_strip(tiny_ti2v_dir):
    pipe = load_pipeline(tiny_ti2v_dir, dtype="float32")
    previews = []
    pipe(None, "x", height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=1, seed=0,
         on_step=lambda *args: previews.append(args[3]))  # fmt: skip
    for count in (1, 3, 8):  # at most the 3 latent frames there are
        assert previews[0].image(count=count, height=32).size == (min(count, 3) * 32 * WIDTH // HEIGHT, 32)
