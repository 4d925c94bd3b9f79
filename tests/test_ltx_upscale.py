"""LTX-Video's upsample-and-refine recipe (``upscale=``) and video-to-video (``video=`` + ``strength``, diffusers'
``denoise_strength``) against diffusers 0.42.1 on the tiny 0.9.5 checkpoint and a tiny latent upsampler.

The reference of the whole recipe is diffusers' three calls as its LTX docs chain them:
``LTXConditionPipeline(output_type="latent")`` -> ``LTXLatentUpsamplePipeline(latents=..., output_type="latent")``
-> ``LTXConditionPipeline(latents=..., denoise_strength=0.999, timesteps=[1000, 909, 725, 421, 0])``. Every
random draw is given to both sides, as in test_ltx_pipeline.py (diffusers' ``randn_tensor`` replaced by a queue
in its draw order; our seeded draws replaced by the same tensors).
"""

from __future__ import annotations

import json

import av
import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import LTXConditionPipeline, LTXLatentUpsamplePipeline
from diffusers.models.autoencoders import vae as diffusers_vae
from diffusers.pipelines.ltx import pipeline_ltx_condition
from diffusers.pipelines.ltx.modeling_latent_upsampler import LTXLatentUpsamplerModel as RefUpsampler
from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition
from mlx.utils import tree_flatten
from PIL import Image
from test_cli import _run
from test_ltx_pipeline import NEGATIVE, PROMPT, TORCH_SEED, FixedNoise, _noise, _same_decode_noise

from mlx_i2v import conditioning, load_pipeline
from mlx_i2v.families.ltx import conditioning as ltx_conditioning
from mlx_i2v import pipeline as pipeline_module
from mlx_i2v.errors import InvalidInputError
from mlx_i2v.models.ltx.latent_upsampler import load_ltx_latent_upsampler, upsampler_source
from mlx_i2v import Upscale
from mlx_i2v.families.ltx.upscale import base_size, resize_frames

FRAMES = 17  # 3 latent frames
DISTILLED = [1000, 993, 987, 981, 975, 909, 725, 0.03]
REFINE = [1000, 909, 725, 421, 0]


def _photo(height: int, width: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 / width, y * 255 / height, (x + y) % 64 * 4], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


@torch.no_grad()
def _build_upsampler(path, **kinds) -> RefUpsampler:
    """A tiny upsampler on the tiny VAE's 16 latent channels, its GroupNorm affines noised."""
    torch.manual_seed(9)
    model = RefUpsampler(in_channels=16, mid_channels=64, num_blocks_per_stage=1, **kinds).eval()
    for name, p in model.named_parameters():
        if "norm" in name:
            p.add_(0.1 * torch.randn(p.shape))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def setup(tiny_ltx_condition_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("upsampler") / "latent_upsampler"
    ref = _build_upsampler(folder)
    return tiny_ltx_condition_dir, load_pipeline(tiny_ltx_condition_dir, dtype="float32"), folder, ref


def _same_posterior_noise_by_shape(monkeypatch, *draws: np.ndarray) -> None:
    """Our posterior draws: ``draws`` (diffusers' layout) in order of image index, for each size (the base
    and refine passes each encode the photos at their own size)."""
    ours: dict = {}
    for d in draws:
        by_size = ours.setdefault(d.shape[3:], [])
        by_size.append(mx.array(d.transpose(0, 2, 3, 4, 1)))
    monkeypatch.setattr(conditioning, "posterior_noise", lambda seed, index, shape: ours[tuple(shape[2:4])][index])


@pytest.mark.parametrize("inputs,tone_map", [("photo", 0.0), ("photo", 0.6), ("text", 0.0), ("photo+last", 0.0)])
def test_upscale_recipe_matches_diffusers(setup, monkeypatch, inputs, tone_map):
    """64x128 asked: base pass at 32x64 (2/3, rounded down to 32), upsampled to and refined at 64x128; from
    a photo, from text alone (the docs' example), and with a last-frame keyframe."""
    folder, pipe, up_folder, ref_up = setup
    photo, last = _photo(64, 128), _photo(64, 128).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    base_shape, refine_shape = (1, 16, 3, 1, 2), (1, 16, 3, 2, 4)
    images = {"photo": 1, "text": 0, "photo+last": 2}[inputs]
    noise, noise_2x, mix = _noise(30, base_shape), _noise(32, refine_shape), _noise(34, refine_shape)
    posteriors = [_noise(35 + i, (1, 16, 1, 1, 2)) for i in range(images)]
    posteriors_2x = [_noise(37 + i, (1, 16, 1, 2, 4)) for i in range(images)]
    keys = [_noise(39, (1, 16, 1, 1, 2)), _noise(40, (1, 16, 1, 2, 4))] if images == 2 else []
    conditions = {0: {}, 1: dict(image=photo),
                  2: dict(conditions=[LTXVideoCondition(image=photo, frame_index=0),
                                      LTXVideoCondition(image=last, frame_index=FRAMES - 1)])}[images]  # fmt: skip
    common = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_frames=FRAMES, guidance_scale=1.0,
                  image_cond_noise_scale=0.0, decode_timestep=0.05, decode_noise_scale=0.025, **conditions)  # fmt: skip

    fixed = FixedNoise(noise, *posteriors, *keys[:1], noise_2x, *posteriors_2x, *keys[1:], mix)
    monkeypatch.setattr(pipeline_ltx_condition, "randn_tensor", fixed)
    monkeypatch.setattr(diffusers_vae, "randn_tensor", fixed)
    ref = LTXConditionPipeline.from_pretrained(folder, dtype=torch.float32)
    upsample = LTXLatentUpsamplePipeline(vae=ref.vae, latent_upsampler=ref_up)
    torch.manual_seed(TORCH_SEED)
    with torch.no_grad():
        latents = ref(height=32, width=64, timesteps=DISTILLED, output_type="latent", **common).frames
        latents = upsample(latents=latents, adain_factor=1.0, tone_map_compression_ratio=tone_map,
                           output_type="latent").frames  # fmt: skip
        expected = ref(height=64, width=128, latents=latents, denoise_strength=0.999, timesteps=REFINE,
                       output_type="np", **common).frames[0]  # fmt: skip
    assert not fixed.queue

    _same_decode_noise(monkeypatch, mix)
    _same_posterior_noise_by_shape(monkeypatch, *posteriors, *posteriors_2x)
    keys_ours = {k.shape[3:]: mx.array(k.transpose(0, 2, 3, 4, 1)) for k in keys}
    monkeypatch.setattr(ltx_conditioning, "keyframe_noise", lambda seed, index, shape: keys_ours[tuple(shape[2:4])])
    noise_2x_ours = mx.array(noise_2x.transpose(0, 2, 3, 4, 1))
    monkeypatch.setattr(pipeline_module, "refine_noise", lambda shape, seed: noise_2x_ours)
    steps = []
    torch.manual_seed(TORCH_SEED)
    recipe = Upscale(up_folder, tone_map_compression_ratio=tone_map)
    video = pipe(photo if images else None, PROMPT, last_image=last if images == 2 else None,
                 negative_prompt=NEGATIVE, height=64, width=128, num_frames=FRAMES, preset="distilled", latents=noise,
                 image_cond_noise_scale=0.0, upscale=recipe, on_step=lambda *a: steps.append(a[:3]))  # fmt: skip
    assert video.frames.shape == expected.shape == (FRAMES, 64, 128, 3)
    assert np.abs(video.frames - expected).max() < 2e-3
    # one count over both passes: 8 base steps, then the refine's 909, 725, 421, 0
    assert [s[:2] for s in steps] == [(i, 12) for i in range(1, 13)]
    np.testing.assert_allclose([s[2] for s in steps[8:]], REFINE[1:], rtol=1e-6)
    m, seconds = video.metadata, video.stats["seconds"]
    assert (m["width"], m["height"]) == (128, 64) and m["upscale"]["base_size"] == [64, 32]
    assert m["upscale"]["refine_size"] == [128, 64] and m["upscale"]["steps_run"] == 4
    assert m["upscale"]["tone_map_compression_ratio"] == tone_map
    assert seconds["upsample"] > 0 and seconds["refine"] > 0


def test_upscale_resizes_to_the_size_asked_for(setup, monkeypatch):
    """64x96 asked: base 32x64, refined at 64x128, the decoded frames resized (bicubic) to 64x96."""
    _, pipe, up_folder, _ = setup
    captured = {}
    resize = pipeline_module.UpscalePass.finish

    def finish(self, frames):
        captured["decoded"] = frames
        return resize(self, frames)

    monkeypatch.setattr(pipeline_module.UpscalePass, "finish", finish)
    video = pipe(_photo(64, 96), PROMPT, height=64, width=96, num_frames=9, num_inference_steps=2, seed=1,
                 upscale=up_folder)  # fmt: skip
    assert captured["decoded"].shape == (9, 64, 128, 3) and video.frames.shape == (9, 64, 96, 3)
    np.testing.assert_array_equal(video.frames, resize_frames(captured["decoded"], 64, 96))
    frame = Image.fromarray((captured["decoded"][0, ..., 0] * 255).astype(np.float32), mode="F")
    want = np.asarray(frame.resize((96, 64), Image.Resampling.BICUBIC)) / 255
    assert np.abs(video.frames[0, ..., 0] - np.clip(want, 0, 1)).max() < 1e-5


@pytest.mark.parametrize("strength,steps,noise_scale", [(0.5, 4, 0.15), (0.8, 5, 0.0)])
def test_video_to_video_matches_denoise_strength(setup, monkeypatch, strength, steps, noise_scale):
    """``video=`` + ``strength`` on LTX-Video 0.9.5+ is diffusers' ``LTXConditionPipeline(latents=<the clip's
    normalised posterior mode>, denoise_strength=strength)``, the photo held at frame 0 of the noised clip."""
    folder, pipe, _, _ = setup
    height, width = 64, 96
    rng = np.random.default_rng(3)
    clip = (np.clip(np.asarray(_photo(height, width))[None] + rng.normal(0, 20, (FRAMES, 1, 1, 3)), 0, 255)
            .astype(np.uint8))  # fmt: skip
    photo = _photo(height, width).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    noise, posterior, mix = _noise(40), _noise(41, (1, 16, 1, 2, 3)), _noise(42)
    run = steps - int(steps * strength)
    step_noises = [_noise(43 + i, (1, 18, 16)) for i in range(steps - run)] if noise_scale else []

    fixed = FixedNoise(noise, posterior, *step_noises, mix)
    monkeypatch.setattr(pipeline_ltx_condition, "randn_tensor", fixed)
    monkeypatch.setattr(diffusers_vae, "randn_tensor", fixed)
    ref = LTXConditionPipeline.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        video_tensor = torch.from_numpy(clip.astype(np.float32) / 255 * 2 - 1).permute(3, 0, 1, 2)[None]
        mode = ref.vae.encode(video_tensor).latent_dist.mode()
        latents = ref._normalize_latents(mode, ref.vae.latents_mean, ref.vae.latents_std)
        torch.manual_seed(TORCH_SEED)
        expected = ref(image=photo, prompt=PROMPT, negative_prompt=NEGATIVE, height=height, width=width,
                       num_frames=FRAMES, num_inference_steps=steps, guidance_scale=3.0, latents=latents,
                       denoise_strength=strength, image_cond_noise_scale=noise_scale, decode_timestep=0.05,
                       decode_noise_scale=0.025, output_type="np").frames[0]  # fmt: skip
    assert not fixed.queue

    _same_decode_noise(monkeypatch, mix)
    _same_posterior_noise_by_shape(monkeypatch, posterior)
    queue = [mx.array(n.reshape(1, 3, 2, 3, 16)) for n in step_noises]
    monkeypatch.setattr(ltx_conditioning, "conditioning_noise", lambda seed, t, shape: queue.pop(0))
    passes = []
    torch.manual_seed(TORCH_SEED)
    video = pipe(photo, PROMPT, video=clip, strength=strength, negative_prompt=NEGATIVE, num_inference_steps=steps,
                 guidance_scale=3.0, latents=noise, image_cond_noise_scale=noise_scale,
                 on_step=lambda *a: passes.append(a))  # fmt: skip
    assert not queue and len(passes) == steps - run
    assert video.frames.shape == expected.shape == (FRAMES, height, width, 3)
    assert np.abs(video.frames - expected).max() < 2e-3
    assert video.metadata["mode"] == "restyle" and video.metadata["steps_run"] == steps - run


def test_restyle_takes_8k_plus_1_frames_on_ltx(setup, caplog):
    _, pipe, _, _ = setup
    clip = np.zeros((20, 64, 96, 3), np.uint8)
    assert pipe.resolve_settings(None, video=clip, strength=0.5).num_frames == 17
    assert "not 8k+1; restyling the first 17" in caplog.text


@pytest.mark.parametrize(
    "kwargs,recipe,message",
    [
        (dict(height=32, width=64), {}, "too small to upscale"),
        (dict(video=np.zeros((9, 64, 96, 3), np.uint8)), {}, "not to a restyle"),
        (dict(keyframes=[(np.zeros((64, 96, 3), np.uint8), 4)]), {}, "upscale with keyframes= is not supported"),
        (dict(upscale="missing/upsampler"), {}, "no such latent upsampler"),
        ({}, dict(denoise_strength=0.1), "runs no step"),
        ({}, dict(tone_map_compression_ratio=2), "tone_map_compression_ratio must lie in"),
        ({}, dict(timesteps=(1000, "x")), "timesteps must be a decreasing list"),
        ({}, dict(timesteps=(500, 900, 0)), "timesteps must be a decreasing list"),
    ],
)
def test_bad_upscales_are_refused_before_loading(setup, kwargs, recipe, message):
    _, pipe, up_folder, _ = setup
    kwargs.setdefault("upscale", Upscale(up_folder, **recipe))
    with pytest.raises(InvalidInputError, match=message):
        pipe.resolve_settings(_photo(64, 96), num_frames=9, **kwargs)
    assert not pipe.experts.loaded() and not pipe.vae_encoder.loaded


def test_upsampler_paths(setup, tmp_path, tiny_ltx_condition_dir, tiny_ti2v_dir):
    """A diffusers upsample-pipeline folder, an original single file (config in its metadata) and its weights
    load alike; a checkpoint that is no upsampler and a temporal upsampler are refused with one line; Wan
    has no upscale."""
    from safetensors.torch import save_file

    _, pipe, up_folder, ref = setup
    single = tmp_path / "ltxv-spatial-upscaler-tiny.safetensors"
    config = {k: ref.config[k] for k in ("in_channels", "mid_channels", "num_blocks_per_stage", "dims",
                                         "spatial_upsample", "temporal_upsample")}  # fmt: skip
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, single, metadata={"config": json.dumps(config)})
    assert upsampler_source(up_folder.parent) == up_folder
    a, b = load_ltx_latent_upsampler(up_folder.parent, mx.float32), load_ltx_latent_upsampler(single, mx.float32)
    for (name, x), (_, y) in zip(tree_flatten(a.parameters()), tree_flatten(b.parameters())):
        assert mx.array_equal(x, y), name
    assert pipe.resolve_settings(_photo(64, 96), height=64, width=96, upscale=single).height == 32
    with pytest.raises(InvalidInputError, match="is not an LTX-Video latent upsampler"):
        pipe.resolve_settings(_photo(64, 96), upscale=tiny_ltx_condition_dir / "transformer")
    temporal = tmp_path / "temporal"
    _build_upsampler(temporal, spatial_upsample=False, temporal_upsample=True)
    with pytest.raises(InvalidInputError, match="upsamples in time"):
        pipe.resolve_settings(_photo(64, 96), upscale=temporal)
    wan = load_pipeline(tiny_ti2v_dir, dtype="float32")
    with pytest.raises(InvalidInputError, match=r"upscale=\): not supported on Wan"):
        wan.resolve_settings(_photo(64, 96), upscale=up_folder)


def test_base_size_is_diffusers_rounding():
    assert base_size(768, 1152, 2 / 3, 32) == (512, 768)  # the docs' 0.9.7 example
    assert base_size(480, 832, 2 / 3, 32) == (320, 544)  # the 0.9.8 example: int(554.67) = 554 -> 544
    with pytest.raises(InvalidInputError, match="at least 48"):
        base_size(32, 832, 2 / 3, 32)


def test_plan_counts_the_refine_pass_and_the_upsampler(setup):
    _, pipe, up_folder, _ = setup
    request = pipe.prepare(_photo(512, 704), num_frames=17, upscale=up_folder)
    plan = pipe.plan_request(request)
    plain = pipe.plan_settings(request.settings)
    assert (plan.height, plan.width) == (640, 896) and (plain.height, plain.width) == (320, 448)
    assert plan.tokens == pipe.dims.tokens(640, 896, 17) == 4 * plain.tokens
    upsampler = load_ltx_latent_upsampler(up_folder, mx.float32)
    upsampler_bytes = sum(p.nbytes for _, p in tree_flatten(upsampler.parameters()))
    stage = plan.stage("upsample")
    assert stage.weights == plan.stage("denoise").weights + upsampler_bytes
    assert stage.activations >= 4 * 3 * 20 * 28 * 64 * 4  # mid channels at the 2x latent grid
    assert plan.stage("denoise").activations > plain.stage("denoise").activations
    assert plan.peak >= max(s.peak for s in plain.stages)


def test_plan_suggestions_of_an_upscale(setup, monkeypatch):
    """Sizes the planner suggests for the refine pass would read as output sizes: dropped; without the
    upscale the request fits (here: an upsample stage beyond the budget), so that is suggested."""
    from mlx_i2v import planner
    from mlx_i2v.planner import Stage

    _, pipe, up_folder, _ = setup
    request = pipe.prepare(_photo(512, 704), num_frames=17, upscale=up_folder)
    for budget in range(50 * 10**6, 500 * 10**6, 10**7):  # one where the refine pass gets a size suggestion
        monkeypatch.setattr(planner, "memory_budget", lambda: budget)
        if any(x.startswith("--width") for x in pipe.plan_settings(request.upscale.refine.settings).suggestions):
            break
    else:
        pytest.fail("no budget gives the refine pass a size suggestion")
    plan = pipe.plan_request(request)
    assert not plan.fits() and not any(x.startswith("--width") for x in plan.suggestions)
    assert ("no --upscale" in plan.suggestions) == pipe.plan_settings(request.settings).fits()
    monkeypatch.undo()
    monkeypatch.setattr(pipeline_module.UpscalePass, "stage", lambda self, *a: Stage("upsample", 10**15, 0))
    plan = pipe.plan_request(request)
    assert not plan.fits() and plan.suggestions == ["no --upscale"]


def test_cli_upscale_writes_the_size_asked_for(setup, photo, tmp_path):
    folder, _, up_folder, _ = setup
    out = tmp_path / "clip.mp4"
    args = ["generate", str(photo), "-p", "a fox", "--model", str(folder), "--frames", "9", "--height", "64",
            "--width", "96", "--steps", "2", "--seed", "3", "--upscale", str(up_folder)]  # fmt: skip
    dry = _run(*args, "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "upscale: 64x32 -> latent_upsampler -> refine at 128x64 (4 steps), resized to 96x64" in dry.stdout
    assert "plan: 128x64" in dry.stdout and "upsample" in dry.stdout
    result = _run(*args, "--upscale-tone-map", "0.6", "--output", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with av.open(str(out)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        meta = json.loads(c.metadata["comment"])
    assert len(frames) == 9 and frames[0].shape == (64, 96, 3)
    assert meta["upscale"]["tone_map_compression_ratio"] == 0.6 and meta["upscale"]["refine_size"] == [128, 64]
    bad = _run("generate", str(photo), "-p", "x", "--model", str(folder), "--upscale", str(photo),
               "--output", str(tmp_path / "bad.mp4"), cwd=tmp_path)  # fmt: skip
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1
    assert "not an LTX-Video latent upsampler" in bad.stderr and not (tmp_path / "bad.mp4").exists()


def test_cli_restyles_on_ltx(setup, tmp_path):
    folder, pipe, _, _ = setup
    clip = tmp_path / "clip.mp4"
    pipe(None, "x", height=64, width=96, num_frames=9, num_inference_steps=1, seed=2).save(clip)
    out = tmp_path / "restyled.mp4"
    result = _run("restyle", str(clip), "-p", "a fox", "--model", str(folder), "--strength", "0.5", "--steps", "4",
                  "--output", str(out), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    with av.open(str(out)) as c:
        meta = json.loads(c.metadata["comment"])
        assert len(list(c.decode(video=0))) == 9
    assert (meta["mode"], meta["strength"], meta["steps_run"], meta["num_frames"]) == ("restyle", 0.5, 2, 9)
