"""LTX-Video through the one pipeline, end to end against diffusers 0.42.1 on tiny random-weight checkpoints:
``LTXImageToVideoPipeline`` and ``LTXPipeline`` (0.9.0/0.9.1 semantics), ``LTXConditionPipeline`` (0.9.5+),
the family boundary (what LTX refuses, before loading), and the memory plan.

Every random draw is given to both sides: the initial noise (our ``latents=``; diffusers' module-level
``randn_tensor`` replaced by one that returns it), the noise that samples each encoded image's VAE posterior
(diffusers' ``DiagonalGaussianDistribution.sample``, whose ``randn_tensor`` is replaced by the same queue, in
diffusers' draw order; our ``posterior_noise`` replaced by the same tensors), the noise mixed into the latents before a
timestep-conditioned decode (diffusers draws it from the pipeline's generator; ours from the seed, replaced
here by the same tensor), the 0.9.1 decoder's injected noise (torch's global generator on both sides) and
``LTXConditionPipeline``'s per-step noise on the held image latents (``randn_tensor`` on its side, our
``conditioning_noise`` replaced by the same tensors).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers.models.autoencoders import vae as diffusers_vae
from diffusers.pipelines.ltx import pipeline_ltx, pipeline_ltx_condition, pipeline_ltx_image2video
from diffusers import AutoencoderKLLTXVideo, LTXConditionPipeline, LTXImageToVideoPipeline, LTXPipeline
from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition
from mlx.utils import tree_flatten
from PIL import Image

import mlx.core as mx

from mlx_i2v import Pipeline, load_pipeline
from mlx_i2v import conditioning, preview
from mlx_i2v.families.ltx import conditioning as ltx_conditioning
from mlx_i2v.families.ltx import variants as ltx_family
from mlx_i2v.errors import InvalidInputError
from mlx_i2v.families.ltx.planner import LTXTiling
from mlx_i2v.models.ltx.vae import GENERATION_CONFIGS, LTXVAEConfig
from mlx_i2v.weights import config_from_dict
from mlx_i2v.models.ltx.vae_tiling import SpatialTiling
from mlx_i2v.models.ltx.transformer import load_ltx_transformer
from mlx_i2v.models.ltx.vae import load_ltx_vae
from mlx_i2v.models.umt5 import load_t5
from ref_cache import assert_same_indicators, record_step_caches, spy_first_block
from ref_ltx_pipeline import build_tiny_ltx

HEIGHT, WIDTH, FRAMES = 64, 96, 17  # latents (3, 2, 3): 18 tokens
LATENT = (1, 16, 3, 2, 3)  # diffusers' (B, C, F, h, w)
IMAGE_LATENT = (1, 16, 1, 2, 3)  # one encoded image
TORCH_SEED = 11  # the decoder's injected noise (torch's global generator)
PROMPT, NEGATIVE = "a red fox runs through snow", "blurry, static"


def _photo() -> Image.Image:
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    rgb = np.stack([x * 255 / WIDTH, y * 255 / HEIGHT, (x + y) % 64 * 4], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def _noise(seed: int, shape=LATENT) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module", params=["0.9.0", "0.9.1"])
def i2v(request, tmp_path_factory):
    """(VAE version, checkpoint folder, our pipeline)."""
    folder = build_tiny_ltx(tmp_path_factory.mktemp(f"ltx_{request.param}"), request.param)
    return request.param, folder, load_pipeline(folder, dtype="float32")


class FixedNoise:
    """Stands in for diffusers' ``randn_tensor``: returns the given tensors in order, checking shapes."""

    def __init__(self, *tensors: np.ndarray):
        self.queue = [torch.from_numpy(t.copy()) for t in tensors]  # diffusers writes into its latents

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        tensor = self.queue.pop(0)
        assert tuple(tensor.shape) == tuple(shape)
        return tensor.to(dtype or torch.float32)


def _same_decode_noise(monkeypatch, mix: np.ndarray) -> None:
    """Our decode draws: ``mix`` (diffusers' layout) and torch's global generator for the decoder."""
    mix_ours = mx.array(mix.transpose(0, 2, 3, 4, 1))
    monkeypatch.setattr(ltx_family, "decode_noises",
                        lambda shape, seed: (mix_ours, lambda s: mx.array(torch.randn(s).numpy())))  # fmt: skip


def _same_posterior_noise(monkeypatch, *draws: np.ndarray) -> None:
    """Our posterior draws: ``draws[index]`` (diffusers' layout) for the ``index``-th encoded image."""
    ours = [mx.array(d.transpose(0, 2, 3, 4, 1)) for d in draws]

    def posterior_noise(seed, index, shape):
        assert tuple(ours[index].shape) == tuple(shape)
        return ours[index]

    monkeypatch.setattr(conditioning, "posterior_noise", posterior_noise)


def _reference(cls, folder, monkeypatch, module, draws, configure=None, **kwargs) -> np.ndarray:
    """diffusers' frames, its ``randn_tensor`` draws (the pipeline's and the posterior samples') taken from
    ``draws`` in order; ``configure(pipe)`` first, if given (e.g. enabling a cache hook)."""
    fixed = FixedNoise(*draws)
    monkeypatch.setattr(module, "randn_tensor", fixed)
    monkeypatch.setattr(diffusers_vae, "randn_tensor", fixed)
    ref = cls.from_pretrained(folder, dtype=torch.float32)
    if configure is not None:
        configure(ref)
    torch.manual_seed(TORCH_SEED)
    with torch.no_grad():
        out = ref(output_type="np", **kwargs).frames
    assert not fixed.queue  # every draw given was taken
    return np.asarray(out[0], dtype=np.float32)


COMMON = dict(negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=3,
              guidance_scale=3.0, decode_timestep=0.05, decode_noise_scale=0.025)  # fmt: skip


def test_image_to_video_matches_diffusers(i2v, monkeypatch):
    version, folder, pipe = i2v
    posterior, noise = _noise(9, IMAGE_LATENT), _noise(0)
    # diffusers draws the photo's posterior sample, then the initial noise (both ``randn_tensor``); its
    # decode noise comes from the generator (``torch.randn``), the first draw since the others are given.
    mix = torch.randn(LATENT, generator=torch.Generator().manual_seed(5)).numpy()
    expected = _reference(LTXImageToVideoPipeline, folder, monkeypatch, pipeline_ltx_image2video, [posterior, noise],
                          image=_photo(), prompt=PROMPT, frame_rate=24, generator=torch.Generator().manual_seed(5),
                          **COMMON)  # fmt: skip
    _same_decode_noise(monkeypatch, mix)
    _same_posterior_noise(monkeypatch, posterior)
    torch.manual_seed(TORCH_SEED)
    video = pipe(_photo(), PROMPT, latents=noise, fps=24, **COMMON)
    assert video.frames.shape == expected.shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert np.abs(video.frames - expected).max() < 2e-3
    # The posterior sample matters: the posterior mean (zero noise) misses diffusers' frames.
    _same_posterior_noise(monkeypatch, np.zeros(IMAGE_LATENT, np.float32))
    torch.manual_seed(TORCH_SEED)
    mean = pipe(_photo(), PROMPT, latents=noise, fps=24, **COMMON)
    assert np.abs(mean.frames - expected).max() > 1e-2
    _same_posterior_noise(monkeypatch, posterior)
    assert video.fps == 24 and video.metadata["decode_timestep"] == 0.05
    # The clip moves away from the photo, and the frame rate conditions the model.
    assert np.abs(video.frames[-1] - video.frames[0]).max() > 1e-2
    torch.manual_seed(TORCH_SEED)
    other = pipe(_photo(), PROMPT, latents=noise, fps=12, **COMMON)
    assert np.abs(other.frames - video.frames).max() > 1e-3


def test_text_to_video_matches_diffusers(i2v, monkeypatch):
    version, folder, pipe = i2v
    noise, mix = _noise(1), _noise(2)
    draws = [noise] if version == "0.9.0" else [noise, mix]  # the 0.9.0 decoder takes no timestep: no mix
    expected = _reference(LTXPipeline, folder, monkeypatch, pipeline_ltx, draws, prompt=PROMPT, **COMMON)
    _same_decode_noise(monkeypatch, mix)
    torch.manual_seed(TORCH_SEED)
    video = pipe(None, PROMPT, latents=noise, **COMMON)
    assert video.fps == 25  # diffusers' default frame rate
    assert np.abs(video.frames - expected).max() < 2e-3


def test_decode_settings_matter_only_for_a_timestep_conditioned_vae(i2v, monkeypatch):
    version, _, pipe = i2v
    kwargs = dict(COMMON, num_inference_steps=2, seed=3)
    base = pipe(None, PROMPT, **kwargs).frames
    changed = pipe(None, PROMPT, **dict(kwargs, decode_timestep=0.5, decode_noise_scale=0.3)).frames
    assert (np.abs(changed - base).max() > 1e-3) == (version != "0.9.0")


def test_defaults_and_rounding(i2v, caplog):
    _, _, pipe = i2v
    s = pipe.resolve_settings(_photo(), num_frames=20)
    assert (s.num_frames, s.fps, s.num_inference_steps, s.guidance_scale) == (17, 25.0, 50, 3.0)
    assert (s.decode_timestep, s.decode_noise_scale, s.negative_prompt) == (0.05, 0.025, "")
    assert "not 8k+1" in caplog.text
    s = pipe.resolve_settings(_photo())  # landscape photo: 704x512
    assert (s.width, s.height, s.num_frames) == (704, 512, 161)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(video=np.zeros((9, 64, 96, 3), np.uint8)), "restyling a clip"),
        (dict(loop=True), "a loop"),
        (dict(motion=1.5), "motion amplitude"),
        (dict(cache="magcache"), "no published magcache calibration for ltx-video"),
        (dict(flow_shift=3.0), "flow_shift"),
        (dict(last_image=_photo()), "last image"),
        (dict(keyframes=[(_photo(), 8)]), "keyframes at other frames"),
        (dict(scheduler="unipc"), "euler"),
        (dict(decode_noise_scale=2.0), "decode_noise_scale"),
        (dict(fps=0), "fps"),
    ],
)
def test_what_ltx_refuses_before_loading(i2v, kwargs, message):
    _, _, pipe = i2v
    with pytest.raises(InvalidInputError, match=message):
        pipe(_photo(), PROMPT, **kwargs)
    assert not pipe.text_encoder.loaded and not pipe.vae_encoder.loaded and not pipe.experts.loaded()


def test_ltx_image_to_video_does_not_extend(i2v):
    """0.9.0 / 0.9.1 hold one image at latent frame 0: extension is the 0.9.5+ models'
    (tests/test_ltx_keyframes.py)."""
    with pytest.raises(InvalidInputError, match="extending a clip: not supported on LTX-Video"):
        i2v[2].prepare_extend(np.zeros((9, 64, 96, 3), np.uint8), num_frames=8)


def test_loader_tells_the_family_and_refuses_wan_only_options(i2v, tiny_ti2v_dir):
    _, folder, pipe = i2v
    assert isinstance(pipe, Pipeline) and pipe.variant.name == "ltx-video"
    assert pipe.variant.family.name == "LTX-Video" and not pipe.has_preview  # the tiny VAE has 16 channels
    assert np.asarray(pipe.variant.family.preview_projection(128).weight).shape == (128, 3)
    wan = load_pipeline(tiny_ti2v_dir, dtype="float32")
    with pytest.raises(InvalidInputError, match="decode_timestep does not apply"):
        wan.resolve_settings(_photo(), decode_timestep=0.05)


def _bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def test_plan_weights_are_the_loaded_models(i2v):
    _, folder, pipe = i2v
    plan = pipe.plan(height=HEIGHT, width=WIDTH, num_frames=FRAMES)
    assert plan.tokens == 18 and plan.vae_tiling is None
    assert plan.stage("denoise").weights == _bytes(load_ltx_transformer(folder / "transformer", mx.float32))
    assert plan.stage("text").weights == _bytes(load_t5(folder / "text_encoder", mx.float32))
    assert plan.stage("vae_encode").weights == _bytes(load_ltx_vae(folder / "vae", mx.float32, "encoder"))
    assert plan.stage("vae_decode").weights == _bytes(load_ltx_vae(folder / "vae", mx.float32, "decoder"))
    assert all(s.activations > 0 for s in plan.stages)
    bigger = pipe.plan(height=2 * HEIGHT, width=2 * WIDTH, num_frames=2 * FRAMES - 1)
    assert bigger.tokens == 5 * 4 * 6 and bigger.peak > plan.peak


# --- LTXConditionPipeline (0.9.5+) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def condition(tiny_ltx_condition_dir):
    return tiny_ltx_condition_dir, load_pipeline(tiny_ltx_condition_dir, dtype="float32")


@pytest.mark.parametrize("strength,noise_scale", [(1.0, 0.15), (0.6, 0.0)], ids=["held-noised", "strength-0.6"])
def test_condition_image_matches_diffusers(condition, monkeypatch, strength, noise_scale):
    """Frame 0 held fully with per-step noise, or at strength 0.6 (frozen tokens until t < 400)."""
    folder, pipe = condition
    noise, posterior, mix = _noise(3), _noise(12, IMAGE_LATENT), _noise(4)
    step_noises = [_noise(10 + i, (1, 18, 16)) for i in range(3)] if noise_scale else []
    expected = _reference(LTXConditionPipeline, folder, monkeypatch, pipeline_ltx_condition,
                          [noise, posterior, *step_noises, mix], image=_photo(), prompt=PROMPT, frame_rate=24,
                          strength=strength, image_cond_noise_scale=noise_scale,
                          generator=torch.Generator().manual_seed(5), **COMMON)  # fmt: skip
    _same_decode_noise(monkeypatch, mix)
    _same_posterior_noise(monkeypatch, posterior)
    queue = [mx.array(n.reshape(1, 3, 2, 3, 16)) for n in step_noises]
    monkeypatch.setattr(ltx_conditioning, "conditioning_noise", lambda seed, t, shape: queue.pop(0))
    torch.manual_seed(TORCH_SEED)
    video = pipe(_photo(), PROMPT, latents=noise, fps=24, strength=strength, image_cond_noise_scale=noise_scale,
                 **COMMON)  # fmt: skip
    assert not queue  # one conditioning draw per step, as diffusers
    assert video.frames.shape == expected.shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert np.abs(video.frames - expected).max() < 2e-3
    assert video.metadata["strength"] == strength and video.metadata["image_cond_noise_scale"] == noise_scale


def test_condition_text_to_video_matches_diffusers(condition, monkeypatch):
    folder, pipe = condition
    noise, mix = _noise(5), _noise(6)
    expected = _reference(LTXConditionPipeline, folder, monkeypatch, pipeline_ltx_condition, [noise, mix],
                          prompt=PROMPT, **COMMON)  # fmt: skip
    _same_decode_noise(monkeypatch, mix)
    video = pipe(None, PROMPT, latents=noise, **COMMON)
    assert np.abs(video.frames - expected).max() < 2e-3


def test_condition_settings(condition, i2v):
    _, pipe = condition
    s = pipe.resolve_settings(_photo(), num_frames=17)
    assert pipe.variant.name == "ltx-video-condition" and s.image_cond_noise_scale == 0.15
    with pytest.raises(InvalidInputError, match="strength must be in"):
        pipe.resolve_settings(_photo(), strength=1.5)
    with pytest.raises(InvalidInputError, match="image_cond_noise_scale does not apply"):
        i2v[2].resolve_settings(_photo(), image_cond_noise_scale=0.1)
    with pytest.raises(InvalidInputError, match="strength applies to a restyle"):
        i2v[2].resolve_settings(_photo(), strength=0.5)


DISTILLED_TIMESTEPS = [1000, 993, 987, 981, 975, 909, 725, 0.03]


def test_distilled_preset_matches_diffusers_given_its_timesteps(condition, monkeypatch):
    folder, pipe = condition
    noise, posterior, mix = _noise(7), _noise(13, IMAGE_LATENT), _noise(8)
    size = dict(height=HEIGHT, width=WIDTH, num_frames=FRAMES, image_cond_noise_scale=0.0)
    expected = _reference(LTXConditionPipeline, folder, monkeypatch, pipeline_ltx_condition, [noise, posterior, mix],
                          image=_photo(), prompt=PROMPT, timesteps=DISTILLED_TIMESTEPS, guidance_scale=1.0,
                          decode_timestep=0.05, decode_noise_scale=0.025, generator=torch.Generator().manual_seed(5),
                          **size)  # fmt: skip
    _same_decode_noise(monkeypatch, mix)
    _same_posterior_noise(monkeypatch, posterior)
    passes = []
    video = pipe(_photo(), PROMPT, preset="distilled", latents=noise, on_step=lambda *a: passes.append(a[2]), **size)
    assert np.abs(video.frames - expected).max() < 2e-3
    m = video.metadata
    settings = (m["preset"], m["num_inference_steps"], m["guidance_scale"], m["decode_timestep"])
    assert settings == ("distilled", 8, 1.0, 0.05)
    np.testing.assert_allclose(passes, DISTILLED_TIMESTEPS, rtol=1e-6)
    assert video.stats["transformer_passes"]["computed"] == 8  # no guidance: one pass per step


def test_presets_belong_to_their_family(condition, tiny_ti2v_dir):
    _, pipe = condition
    with pytest.raises(InvalidInputError, match="lightning preset is for Wan models"):
        pipe.resolve_settings(_photo(), preset="lightning")
    wan = load_pipeline(tiny_ti2v_dir, dtype="float32")
    with pytest.raises(InvalidInputError, match="distilled preset is for LTX-Video models"):
        wan.resolve_settings(_photo(), preset="distilled")


def test_last_image_keyframe_matches_diffusers(condition, monkeypatch):
    """A keyframe at the clip's last frame: diffusers' extra condition tokens (placed first in its token
    sequence, after the clip here: the per-step noise is reordered to match). Through ``conditions=``:
    diffusers 0.42.1 keeps only the first of ``image=[...]`` when no video list is given."""
    folder, pipe = condition
    last = _photo().transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    noise, key_noise, mix = _noise(20), _noise(21, IMAGE_LATENT), _noise(22)
    posteriors = _noise(26, IMAGE_LATENT), _noise(27, IMAGE_LATENT)  # the first photo's, the last photo's
    step_noises = [_noise(23 + i, (1, 6 + 18, 16)) for i in range(3)]  # keyframe tokens first
    # diffusers' draw order: initial noise, then per condition its posterior sample (and a keyframe's noise).
    expected = _reference(LTXConditionPipeline, folder, monkeypatch, pipeline_ltx_condition,
                          [noise, posteriors[0], posteriors[1], key_noise, *step_noises, mix],
                          conditions=[LTXVideoCondition(image=_photo(), frame_index=0),
                                      LTXVideoCondition(image=last, frame_index=FRAMES - 1)],
                          prompt=PROMPT, image_cond_noise_scale=0.15, generator=torch.Generator().manual_seed(5),
                          **COMMON)  # fmt: skip
    _same_decode_noise(monkeypatch, mix)
    _same_posterior_noise(monkeypatch, *posteriors)
    key_noise_ours = mx.array(key_noise.transpose(0, 2, 3, 4, 1))
    monkeypatch.setattr(ltx_conditioning, "keyframe_noise", lambda seed, index, shape: key_noise_ours)
    queue = [mx.array(np.concatenate([n[:, 6:], n[:, :6]], axis=1).reshape(1, 4, 2, 3, 16)) for n in step_noises]
    monkeypatch.setattr(ltx_conditioning, "conditioning_noise", lambda seed, t, shape: queue.pop(0))
    video = pipe(_photo(), PROMPT, last_image=last, latents=noise, image_cond_noise_scale=0.15, **COMMON)
    assert not queue and video.frames.shape == expected.shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert np.abs(video.frames - expected).max() < 2e-3


def test_plan_tiles_the_decode_that_does_not_fit(condition):
    """With the real 0.9.5 VAE (the tiny one is so narrow that its output frames outweigh its activations,
    so no tiling helps it): untiled with room, tiled when the untiled decode does not fit."""
    _, pipe = condition
    dims = replace(pipe.dims, vae=config_from_dict(LTXVAEConfig, GENERATION_CONFIGS["0.9.5"]))
    size = dict(height=704, width=1216, num_frames=121)
    assert dims.plan(**size, budget=10**12).vae_tiling is None
    budget = 8 * 10**9
    tiled = dims.plan(**size, budget=budget)
    assert isinstance(tiled.vae_tiling, LTXTiling) and tiled.vae_tiling.spatial is not None
    untiled = dims.decode_activations(*size.values(), mx.float32, None, budget)
    assert untiled > budget > tiled.stage("vae_decode").peak
    assert f"VAE decode: {tiled.vae_tiling.describe()};" in tiled.summary()
    assert tiled.vae_tiling.describe().startswith("tiles ")


def test_tiled_decode_is_diffusers_tiled_decode(condition, monkeypatch):
    """The pipeline's decode with a plan's tiling against diffusers' decode lines (denormalise, mix in the
    noise, ``vae.decode`` at the decode timestep, post-process) on its VAE with ``enable_tiling``."""
    folder, pipe = condition
    z, mix = _noise(30), _noise(31)
    settings = pipe.resolve_settings(None, height=HEIGHT, width=WIDTH, num_frames=FRAMES, seed=1)
    _same_decode_noise(monkeypatch, mix)
    ours = pipe.decode(mx.array(z.transpose(0, 2, 3, 4, 1)), settings, LTXTiling(SpatialTiling(64, 64, 32, 32)))
    vae = AutoencoderKLLTXVideo.from_pretrained(folder / "vae").eval()
    vae.enable_tiling(64, 64, None, 32, 32)
    with torch.no_grad():
        latents = LTXPipeline._denormalize_latents(torch.from_numpy(z), vae.latents_mean, vae.latents_std,
                                                   vae.config.scaling_factor)  # fmt: skip
        latents = (1 - 0.025) * latents + 0.025 * torch.from_numpy(mix)
        video = vae.decode(latents, torch.tensor([0.05])).sample
    expected = (video / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 3, 0).numpy()
    assert ours.shape == expected.shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert np.abs(ours - expected).max() < 2e-4
    untiled = pipe.decode(mx.array(z.transpose(0, 2, 3, 4, 1)), settings)
    assert np.abs(untiled - ours).max() > 1e-4  # the tiles really were used


def test_posterior_noise_is_the_seeds_own_draw_per_image():
    """Each encoded condition gets its own standard-normal draw, reproducible from the seed and apart from the
    other conditions', the keyframes' noise and the decode's; drawn in diffusers' (1, C, T, h, w) order,
    returned channels-last."""
    shape = (1, 1, 2, 3, 16)
    head, tail = (np.array(conditioning.posterior_noise(3, i, shape)) for i in (0, 1))
    assert head.shape == shape and np.array_equal(head, np.array(conditioning.posterior_noise(3, 0, shape)))
    others = [tail, np.array(conditioning.posterior_noise(4, 0, shape)),
              np.array(ltx_conditioning.keyframe_noise(3, 0, shape)), np.array(ltx_conditioning.keyframe_noise(3, 1, shape)),
              np.array(conditioning.posterior_noise(3, 2, shape)), np.array(ltx_family.decode_noises(shape, 3)[0])]
    assert all(np.abs(a - b).max() > 0.1 for i, a in enumerate([head, *others]) for b in others[i:])
    key = mx.random.split(mx.random.split(mx.random.key(3), 5)[3], 1)[0]
    np.testing.assert_array_equal(head, np.array(mx.random.normal((1, 16, 1, 2, 3), key=key)).transpose(0, 2, 3, 4, 1))


def test_previews_show_the_clip_with_held_frames_as_given(condition, monkeypatch):
    """Step previews on LTX-Video: the clip's latent frames only (a last-frame keyframe's extra frames
    dropped), x0 = x_t - sigma * v where the loop steps, and the photo held at strength 1 shown as given
    (its latent, the same at every step) rather than as x_t - sigma * v of a token the model saw at
    timestep 0. The tiny VAE has 16 latent channels: a 16-channel map stands in for LTX's 128-channel one."""
    _, pipe = condition
    rng = np.random.default_rng(0)
    table = preview.LatentRGB(tuple(map(tuple, rng.normal(0, 0.3, (16, 3)))), (0.0, 0.1, -0.1))
    family = replace(pipe.variant.family, latent_rgb=((16, table),))
    monkeypatch.setattr(pipe, "variant", replace(pipe.variant, family=family))
    assert pipe.has_preview
    last = _photo().transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    previews = []
    pipe(_photo(), PROMPT, last_image=last, latents=_noise(30), image_cond_noise_scale=0.0,
         on_step=lambda step, total, t, p: previews.append(p), **COMMON)  # fmt: skip
    assert len(previews) == COMMON["num_inference_steps"]
    first = [np.array(p.frames([0])) for p in previews]
    shown = [np.array(p.frames()) for p in previews]
    assert all(f.shape == (3, 2, 3, 3) for f in shown)  # 3 clip latent frames, not the 2 extra ones
    assert all(np.array_equal(first[0], f) for f in first)  # the held photo: the same at every step
    assert not np.array_equal(shown[0][1:], shown[-1][1:])  # the invented frames form
    # The free frames are x0 = x_t - sigma * v as predicted (the loop's own x0).
    x0 = np.array(previews[-1].latents[0, 1:3])
    assert np.abs(shown[-1][1:].astype(int) - np.array(table(mx.array(x0))).astype(int)).max() == 0


FIRST_BLOCK_THRESHOLD = 0.03


def test_first_block_cache_matches_diffusers(condition, monkeypatch):
    """First-Block-Cache against diffusers' ``FirstBlockCacheConfig`` hook on ``LTXConditionPipeline``,
    which runs both prompt branches in one call under one cache context ("cond_uncond"): one decision
    per step for the batch, the same decisions and indicators, frames within 2e-3, the passes counted."""
    from diffusers import FirstBlockCacheConfig

    folder, pipe = condition
    steps = 6
    noise, posterior, mix = _noise(40), _noise(41, IMAGE_LATENT), _noise(42)
    common = {**COMMON, "num_inference_steps": steps}
    log = spy_first_block(monkeypatch)
    recorded = record_step_caches(monkeypatch)
    expected = _reference(LTXConditionPipeline, folder, monkeypatch, pipeline_ltx_condition, [noise, posterior, mix],
                          configure=lambda ref: ref.transformer.enable_cache(
                              FirstBlockCacheConfig(threshold=FIRST_BLOCK_THRESHOLD)),
                          image=_photo(), prompt=PROMPT, image_cond_noise_scale=0.0,
                          generator=torch.Generator().manual_seed(5), **common)  # fmt: skip
    _same_decode_noise(monkeypatch, mix)
    _same_posterior_noise(monkeypatch, posterior)
    torch.manual_seed(TORCH_SEED)
    video = pipe(_photo(), PROMPT, latents=noise, image_cond_noise_scale=0.0, cache="first-block",
                 cache_threshold=FIRST_BLOCK_THRESHOLD, **common)  # fmt: skip
    ours = recorded().decisions
    assert [name for name, _, _ in log] == ["cond_uncond"] * steps
    assert [d.computed for d in ours] == [computed for _, computed, _ in log]
    assert {d.branch for d in ours} == {"cond+uncond"}
    assert_same_indicators(ours, log, FIRST_BLOCK_THRESHOLD)
    computed = [d.computed for d in ours]
    assert 0 < sum(computed) < steps
    assert np.abs(video.frames - expected).max() < 2e-3
    passes = video.stats["transformer_passes"]
    assert (passes["computed"], passes["skipped"]) == (sum(computed), steps - sum(computed))
    assert video.metadata["cache"] == {"method": "first-block", "threshold": FIRST_BLOCK_THRESHOLD}
    # threshold 0 never skips (the comparison is strict): the uncached loop's frames, bit for bit
    torch.manual_seed(TORCH_SEED)
    plain = pipe(_photo(), PROMPT, latents=noise, image_cond_noise_scale=0.0, **common).frames
    torch.manual_seed(TORCH_SEED)
    never = pipe(_photo(), PROMPT, latents=noise, image_cond_noise_scale=0.0, cache="first-block", cache_threshold=0.0,
                 **common).frames  # fmt: skip
    assert np.array_equal(plain, never)
