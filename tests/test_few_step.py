"""Few-step sampling end to end: Euler on an explicit grid against diffusers' Wan pipelines, the DMD sampler
against diffusers' pipelines driving a torch transcription of FastVideo's loop, and the presets.

diffusers' ``WanPipeline`` / ``WanImageToVideoPipeline.__call__`` (0.42.1) take only ``num_inference_steps``
and call ``scheduler.set_timesteps(num_inference_steps, device=...)``, so the references here are those
pipelines with a scheduler whose ``set_timesteps`` fixes the grid: :class:`GridEuler` (diffusers' own
``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=...)``) and ``ref_dmd.ReferenceDMDScheduler``.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image
from ref_dmd import ReferenceDMDScheduler

from mlx_i2v import load_pipeline
from mlx_i2v.dmd import FASTWAN_TI2V_5B, TURBO_TI2V_5B, DMDScheduler
from mlx_i2v.models.wan.transformer import WanTransformer3DModel

HEIGHT, WIDTH, FRAMES = 64, 96, 9
LIGHTNING = [1.0, 0.75, 0.5, 0.25]


class GridEuler(FlowMatchEulerDiscreteScheduler):
    """diffusers' Euler scheduler on a fixed grid: ``set_timesteps(n)`` is ``set_timesteps(sigmas=grid)`` (the
    pipelines pass their default of 50 steps when not told; they use it only for the progress bar)."""

    def with_grid(self, grid: list[float]) -> GridEuler:
        self.grid = grid
        return self

    def set_timesteps(self, num_inference_steps=None, device=None, **kwargs) -> None:
        super().set_timesteps(device=device, sigmas=self.grid)


def _photo(width: int = WIDTH, height: int = HEIGHT) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 / width, y * 255 / height, (x + y) % 64 * 4], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def _noise(channels: int, stride: int, seed: int) -> np.ndarray:
    shape = (1, channels, (FRAMES - 1) // 4 + 1, HEIGHT // stride, WIDTH // stride)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _reference(pipeline_cls, model_dir, scheduler, **kwargs) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """diffusers' frames, and each transformer call's (which expert, timestep argument)."""
    ref = pipeline_cls.from_pretrained(model_dir, scheduler=scheduler, dtype=torch.float32)
    calls: list[tuple[str, np.ndarray]] = []
    for name in ("transformer", "transformer_2"):
        module = getattr(ref, name, None)
        if module is not None:
            module.register_forward_pre_hook(
                lambda m, args, kw, name=name: calls.append((name, kw["timestep"].numpy().copy())), with_kwargs=True
            )
    with torch.no_grad():
        frames = ref(output_type="np", max_sequence_length=512, **kwargs).frames
    return np.asarray(frames[0], np.float32), calls


def _assert_same_timesteps(ours: list[np.ndarray], calls: list[tuple[str, np.ndarray]]) -> None:
    """Pass by pass, the same timestep values: (B,) of ours equals diffusers' per-token (B, L) where its
    text-to-video TI2V run gives every token the same one."""
    assert len(ours) == len(calls)
    for mine, (_, theirs) in zip(ours, calls):
        if mine.ndim < theirs.ndim:
            mine = np.broadcast_to(mine[:, None], theirs.shape)
        np.testing.assert_array_equal(mine, theirs)


@pytest.fixture
def model_timesteps(monkeypatch) -> list[np.ndarray]:
    """The timestep argument of every transformer pass of ours, as the model receives it."""
    seen: list[np.ndarray] = []
    call = WanTransformer3DModel.__call__

    def record(self, x, timestep, *args, **kwargs):
        seen.append(np.array(timestep))
        return call(self, x, timestep, *args, **kwargs)

    monkeypatch.setattr(WanTransformer3DModel, "__call__", record)
    return seen


@pytest.fixture(scope="module")
def ti2v(tiny_ti2v_dir):
    return load_pipeline(tiny_ti2v_dir, dtype="float32")


def test_euler_grid_matches_diffusers_with_fractional_timesteps(ti2v, tiny_ti2v_dir, model_timesteps):
    """Lightning's grid shifted by 5 gives timesteps 1000, 937.5, 833.33, 625: they reach the transformer
    as they are (per token, 0 on the photo's frame), one pass per step without guidance."""
    from diffusers import WanImageToVideoPipeline

    noise = _noise(48, 16, seed=4)
    common = dict(height=HEIGHT, width=WIDTH, num_frames=FRAMES, guidance_scale=1.0)
    expected, calls = _reference(WanImageToVideoPipeline, tiny_ti2v_dir, GridEuler(shift=5.0).with_grid(LIGHTNING),
                                 image=_photo(), prompt="a kite in the wind", latents=torch.from_numpy(noise), **common)
    video = ti2v(_photo(), "a kite in the wind", latents=noise, sigmas=LIGHTNING, flow_shift=5.0, **common)
    assert np.abs(video.frames - expected).max() < 2e-3
    assert len(model_timesteps) == len(calls) == 4
    _assert_same_timesteps(model_timesteps, calls)
    assert [t.max() for t in model_timesteps] == pytest.approx([1000, 937.5, 833.3333, 625], abs=1e-3)
    m = video.metadata
    assert (m["scheduler"], m["sigmas"], m["num_inference_steps"], m["preset"]) == ("euler", tuple(LIGHTNING), 4, None)


def test_euler_grid_with_guidance_matches_diffusers(ti2v, tiny_ti2v_dir):
    """Text to video with classifier-free guidance on a three-entry grid of the model's own shift (5)."""
    from diffusers import WanPipeline

    grid = [1.0, 0.6, 0.3]
    noise = _noise(48, 16, seed=5)
    common = dict(negative_prompt="blurry", height=HEIGHT, width=WIDTH, num_frames=FRAMES, guidance_scale=4.0)
    expected, calls = _reference(WanPipeline, tiny_ti2v_dir, GridEuler(shift=5.0).with_grid(grid),
                                 prompt="waves", latents=torch.from_numpy(noise), **common)
    video = ti2v(None, "waves", latents=noise, sigmas=grid, **common)
    assert len(calls) == 6  # two passes per step in diffusers; ours batches them
    assert np.abs(video.frames - expected).max() < 2e-3


def test_a14b_lightning_preset_matches_diffusers(tiny_i2v_dirs, model_timesteps):
    """The preset: 4 Euler steps on the shifted grid, guidance off on both experts, and the switch to the
    low-noise expert at step index 2 (t = 833.3 < 900), as diffusers switches."""
    from diffusers import WanImageToVideoPipeline

    model_dir = tiny_i2v_dirs["a14b"]
    noise = _noise(16, 8, seed=6)
    common = dict(height=HEIGHT, width=WIDTH, num_frames=FRAMES)
    expected, calls = _reference(WanImageToVideoPipeline, model_dir, GridEuler(shift=5.0).with_grid(LIGHTNING),
                                 image=_photo(), prompt="a boat", latents=torch.from_numpy(noise),
                                 guidance_scale=1.0, guidance_scale_2=1.0, **common)  # fmt: skip
    pipe = load_pipeline(model_dir, dtype="float32")
    experts = []
    video = pipe(_photo(), "a boat", latents=noise, preset="lightning",
                 on_step=lambda *_: experts.append(pipe.experts.resident()[0]), **common)  # fmt: skip
    assert np.abs(video.frames - expected).max() < 2e-3
    assert [name for name, _ in calls] == ["transformer"] * 2 + ["transformer_2"] * 2
    assert experts == [0, 0, 1, 1] and len(model_timesteps) == 4  # one pass per step on each expert
    _assert_same_timesteps(model_timesteps, calls)
    m = video.metadata
    assert (m["preset"], m["scheduler"], m["flow_shift"], m["guidance_scale"], m["guidance_scale_2"]) == (
        "lightning", "euler", 5.0, 1.0, 1.0)  # fmt: skip


def _renoising_draws(timesteps, seed: int, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """The draws the pipeline's DMD sampler makes from the generation's seed, in diffusers' layout."""
    sampler = DMDScheduler(timesteps)
    sampler.set_timesteps(seed=seed)
    b, c, t, h, w = shape
    draws = [sampler.draw_noise((b, t, h, w, c)) for _ in timesteps[1:]]
    return [torch.from_numpy(np.moveaxis(np.array(d), -1, 1).copy()) for d in draws]


@pytest.mark.parametrize("preset, recipe, with_image", [("dmd", FASTWAN_TI2V_5B, True), ("turbo", TURBO_TI2V_5B, False)])
def test_dmd_presets_match_the_reference_loop(ti2v, tiny_ti2v_dir, model_timesteps, preset, recipe, with_image):
    """FastWan (image to video) and Turbo (text alone): diffusers' pipeline around the transcribed DMD step,
    with the re-noising draws of the generation's seed; the recipe's timesteps reach the model unshifted."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    noise = _noise(48, 16, seed=7)
    draws = _renoising_draws(recipe.timesteps, seed=21, shape=noise.shape)
    scheduler = ReferenceDMDScheduler().for_recipe(recipe, draws)
    prompt, image = "a fox in snow", (_photo() if with_image else None)
    common = dict(height=HEIGHT, width=WIDTH, num_frames=FRAMES, guidance_scale=1.0)
    ref_cls, extra = (WanImageToVideoPipeline, {"image": image}) if with_image else (WanPipeline, {})
    expected, calls = _reference(ref_cls, tiny_ti2v_dir, scheduler, prompt=prompt,
                                 latents=torch.from_numpy(noise), **extra, **common)  # fmt: skip
    video = ti2v(image, prompt, latents=noise, seed=21, preset=preset, height=HEIGHT, width=WIDTH, num_frames=FRAMES)
    assert np.abs(video.frames - expected).max() < 2e-3
    assert [t.max() for t in model_timesteps] == list(recipe.timesteps)
    _assert_same_timesteps(model_timesteps, calls)
    m = video.metadata
    assert (m["scheduler"], m["preset"], m["num_inference_steps"], m["guidance_scale"], m["flow_shift"]) == (
        "dmd", preset, len(recipe.timesteps), 1.0, 8.0)  # fmt: skip
    assert np.allclose(np.array(m["sigmas"]) * 1000, recipe.timesteps)


def test_dmd_is_reproducible_from_the_seed(ti2v):
    kwargs = dict(height=HEIGHT, width=WIDTH, num_frames=5, preset="dmd", latents=_noise(48, 16, seed=8)[:, :, :2])
    a = ti2v(_photo(), "x", seed=1, **kwargs).frames
    np.testing.assert_array_equal(a, ti2v(_photo(), "x", seed=1, **kwargs).frames)
    assert np.abs(a - ti2v(_photo(), "x", seed=2, **kwargs).frames).max() > 1e-3  # only the re-noising differs
    mx.random.seed(0)  # the global generator plays no part
    np.testing.assert_array_equal(a, ti2v(_photo(), "x", seed=1, **kwargs).frames)


# --- the command line ---------------------------------------------------------------------------------


def _cli(*args: str, cwd) -> "click.testing.Result":
    from click.testing import CliRunner

    from mlx_i2v.cli.main import main

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def photo_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    _photo().save(path)
    return path


def test_cli_preset_runs_and_is_recorded(tiny_ti2v_dir, tiny_i2v_dirs, photo_file, tmp_path):
    import json

    import av

    size = ["--frames", "5", "--height", str(HEIGHT), "--width", str(WIDTH)]
    result = _cli("generate", str(photo_file), "-p", "x", "--model", str(tiny_i2v_dirs["a14b"]), *size,
                  "--preset", "lightning", "--dry-run", cwd=tmp_path)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "4 steps (euler on sigmas 1, 0.75, 0.5, 0.25, preset lightning), guidance 1, shift 5" in result.stdout
    out = tmp_path / "dmd.mp4"
    result = _cli("generate", str(photo_file), "-p", "x", "--model", str(tiny_ti2v_dir), *size, "--preset", "dmd",
                  "--seed", "3", "--output", str(out), cwd=tmp_path)  # fmt: skip
    assert result.exit_code == 0, result.output
    with av.open(str(out)) as c:
        meta = json.loads(c.metadata["comment"])
    assert (meta["scheduler"], meta["preset"], meta["sigmas"], meta["guidance_scale"]) == ("dmd", "dmd", [1.0, 0.757, 0.522], 1.0)


@pytest.mark.parametrize(
    "model, args, message",
    [
        ("a14b", ["--preset", "dmd"], "error: the dmd preset is for distilled wan2.2-ti2v-5b checkpoints"),
        ("ti2v", ["--sigmas", "1,x"], "--sigmas"),
        ("ti2v", ["--sigmas", "0.5,1"], "error: sigmas must decrease strictly"),
        ("ti2v", ["--scheduler", "unipc", "--sigmas", "1,0.5"], "error: the unipc sampler takes no sigmas"),
        ("ti2v", ["--preset", "dmd", "--shift", "5"], "error: the dmd sampler takes no flow_shift"),
        ("ti2v", ["--preset", "lightning", "--steps", "6"], "grid has 4 sigmas"),
        ("ti2v", ["--preset", "fast"], "'fast' is not one of"),
        ("ti2v", ["--scheduler", "ddim"], "'ddim' is not one of"),
    ],
)
def test_cli_bad_sampling_is_one_line_before_any_model_loads(tiny_ti2v_dir, tiny_i2v_dirs, photo_file, tmp_path,
                                                            monkeypatch, model, args, message):  # fmt: skip
    import mlx_i2v.families.wan.loading as loading

    for loader in ("load_umt5", "load_wan_transformer", "load_wan_vae", "load_clip_vision"):
        monkeypatch.setattr(loading, loader, lambda *a, **k: pytest.fail("a model was loaded"))
    model_dir = tiny_ti2v_dir if model == "ti2v" else tiny_i2v_dirs[model]
    out = tmp_path / "never.mp4"
    result = _cli("generate", str(photo_file), "-p", "x", "--model", str(model_dir), *args, "--output", str(out),
                  cwd=tmp_path)  # fmt: skip
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not out.exists()
