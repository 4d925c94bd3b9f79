"""Step caching (``mlx_i2v.stepcache``) against diffusers 0.42.1's cache hooks on the same pipelines and noise.

First-Block-Cache and MagCache are compared with ``FirstBlockCacheConfig`` / ``MagCacheConfig`` enabled on
the diffusers pipeline's transformer(s) (both experts for A14B, each with its own state as in diffusers):
the sequence of skip decisions must be equal and the frames within 2e-3. TeaCache has no diffusers hook;
its reference is a transcription of TeaCache4Wan2.1's rule, below.

Random weights make the residuals unrealistic: block 0's residual changes by 3-15 % a step (a real model
changes far less) and TeaCache's polynomials, fitted to real embeddings, return values from -2 to 4000.
So each test uses a threshold picked to give a mix of skipped and computed passes on these tiny models
(it asserts the mix); the thresholds are not recommendations and nothing here measures quality or speed.
A long prompt against an empty negative prompt makes the two branches' residuals differ enough (a few %)
for First-Block-Cache to skip one branch and compute the other in the same step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import ClassVar

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image
from ref_cache import assert_same_indicators, record_step_caches, spy_first_block

from mlx_i2v import load_pipeline
from mlx_i2v.denoise import StepInfo
from mlx_i2v.errors import InvalidInputError
from mlx_i2v.stepcache import MAGCACHE, TEACACHE, FirstBlockCache, MagCache, StepCache, nearest_interp

HEIGHT, WIDTH, FRAMES, STEPS = 64, 96, 5, 8
PROMPT = " ".join(["a red fox runs through deep snow under a pale winter sun, its breath steaming"] * 40)
COMMON = dict(negative_prompt="", height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=STEPS)
# (noise channels, latent height, latent width, extra settings) of the two variants the hooks are compared on
SETUPS = {
    "ti2v": (48, 4, 6, dict(guidance_scale=5.0)),
    "a14b": (16, 8, 12, dict(guidance_scale=5.0, guidance_scale_2=4.0)),
}


def _photo() -> Image.Image:
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    return Image.fromarray(np.stack([x * 255 / WIDTH, y * 255 / HEIGHT, (x + y) % 64 * 4], -1).astype(np.uint8))


def _noise(variant: str) -> np.ndarray:
    channels, h, w, _ = SETUPS[variant]
    return np.random.default_rng(7).standard_normal((1, channels, (FRAMES - 1) // 4 + 1, h, w)).astype(np.float32)


@pytest.fixture(scope="module")
def model_dirs(tiny_ti2v_dir, tiny_i2v_dirs):
    return {"ti2v": tiny_ti2v_dir, **tiny_i2v_dirs}


@pytest.fixture(scope="module")
def pipes(model_dirs):
    return {k: load_pipeline(model_dirs[k], dtype="float32") for k in ("ti2v", "a14b", "i2v")}


@pytest.fixture
def recorded(monkeypatch):
    """The StepCache of every generation, to read its decisions."""
    return record_step_caches(monkeypatch)


def _generate(pipe, variant: str, **kwargs):
    return pipe(_photo(), PROMPT, latents=_noise(variant), **COMMON, **SETUPS[variant][3], **kwargs)


def _diffusers(model_dir, variant: str, configure) -> np.ndarray:
    """diffusers' ``WanImageToVideoPipeline`` on the same photo, prompts and noise, its transformer(s) set
    up by ``configure(pipe)`` (which enables the cache hooks)."""
    from diffusers import WanImageToVideoPipeline

    ref = WanImageToVideoPipeline.from_pretrained(model_dir, dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    configure(ref)
    with torch.no_grad():
        out = ref(image=_photo(), prompt=PROMPT, latents=torch.from_numpy(_noise(variant)), output_type="np",
                  max_sequence_length=512, **COMMON, **SETUPS[variant][3]).frames  # fmt: skip
    return np.asarray(out[0], dtype=np.float32)


def _high_noise_steps(ref) -> int:
    """How many steps diffusers gives A14B's high-noise expert (timesteps >= boundary)."""
    ref.scheduler.set_timesteps(STEPS)
    return int((ref.scheduler.timesteps >= ref.config.boundary_ratio * 1000).sum())


def _expert_of_steps(pipe) -> list[int]:
    """Which expert our pipeline runs at each step of the tests' schedule."""
    sampler = pipe.sampler(pipe.resolve_settings(_photo(), num_inference_steps=STEPS))
    return [pipe.experts.index_for(float(t)) for t in np.asarray(sampler.timesteps)]


def _transformers(ref) -> list:
    return [t for t in (ref.transformer, getattr(ref, "transformer_2", None)) if t is not None]


# --- exactness ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scripted:
    """A test method: a pass computes unless ``skips`` holds its (schedule step, branch)."""

    skips: frozenset = frozenset()
    probe_blocks: int = 0
    name: ClassVar[str] = "scripted"
    state_bytes: ClassVar[int] = 0

    def new_state(self, step):
        return None

    def decide(self, state, probe):
        return (probe.step.index, probe.branch) not in self.skips, None

    def describe(self):
        return {"method": self.name}


@pytest.mark.parametrize("variant", ["ti2v", "a14b"])
def test_settings_that_never_skip_are_bit_identical(pipes, variant):
    """First-Block threshold 0 (strict ``>``), MagCache below 0 (its documented no-op; 0 still skips) and a
    method that never skips run the blocks in two parts but must give the uncached frames exactly."""
    pipe = pipes[variant]
    plain = _generate(pipe, variant)
    assert plain.stats["transformer_passes"] == {
        "computed": 2 * STEPS, "skipped": 0, "probe_blocks": 0,
        "by_branch": {"cond": {"computed": STEPS, "skipped": 0}, "uncond": {"computed": STEPS, "skipped": 0}},
    }  # fmt: skip
    assert plain.metadata["cache"] is None
    never = [FirstBlockCache(0.0)]  # the pass split after block 0, per expert
    if variant == "ti2v":
        never += [replace(pipe.resolve_settings(_photo(), cache="magcache").cache, threshold=-1.0), Scripted()]
    for method in never:
        video = _generate(pipe, variant, cache=method)
        np.testing.assert_array_equal(video.frames, plain.frames, err_msg=str(method))
        assert video.stats["transformer_passes"]["skipped"] == 0


@pytest.mark.parametrize("probe_blocks", [0, 1])
def test_forced_skips_add_the_kept_residual(pipes, probe_blocks):
    """The residual arithmetic alone, on the I2V model (text and image K/V rows): a skipped row is
    ``head(probe(x) + kept residual)``, a computing row beside it is the plain pass of that row, and each
    branch keeps its own residual from its own last computed pass."""
    model = pipes["i2v"].experts.get(0)
    rng = np.random.default_rng(probe_blocks)
    text = mx.array(rng.standard_normal((2, 512, 48)).astype(np.float32))
    image = mx.array(rng.standard_normal((2, 17, 24)).astype(np.float32))
    context = model.cross_attention_cache(model.embed_context(text, image))
    xs = [mx.array(rng.standard_normal((2, 2, 8, 12, 36)).astype(np.float32)) for _ in range(3)]
    ts = [mx.array([t, t], dtype=mx.float32) for t in (900.0, 700.0, 500.0)]
    branches = ("cond", "uncond")
    # step 0: both compute; step 1: cond skips, uncond computes; step 2: both skip
    skips = frozenset({(1, "cond"), (2, "cond"), (2, "uncond")})
    cache = StepCache(Scripted(skips, probe_blocks))
    out = [cache(model, x, t, context, branches, StepInfo(i, i + 1, 3, float(t[0]), 0.5, 0, (0, 3), 3))
           for i, (x, t) in enumerate(zip(xs, ts))]  # fmt: skip

    def parts(x, t):
        tokens = model.embed(x, t)
        probed = model.run_blocks(tokens.x, tokens, context, blocks=slice(0, probe_blocks))
        return tokens, probed, model.run_blocks(probed, tokens, context, blocks=slice(probe_blocks, None))

    np.testing.assert_array_equal(out[0], model(xs[0], ts[0], context=context))
    _, probed0, full0 = parts(xs[0], ts[0])
    tokens1, probed1, full1 = parts(xs[1], ts[1])
    kept = full0 - probed0  # both branches' residuals after step 0
    expected1 = model.head(mx.concatenate([probed1[:1] + kept[:1], full1[1:]]), tokens1)
    np.testing.assert_allclose(out[1], expected1, rtol=1e-5, atol=1e-5)
    tokens2, probed2, _ = parts(xs[2], ts[2])
    kept_uncond = full1[1:] - probed1[1:]  # refreshed at step 1; cond's is still step 0's
    expected2 = model.head(mx.concatenate([probed2[:1] + kept[:1], probed2[1:] + kept_uncond]), tokens2)
    np.testing.assert_allclose(out[2], expected2, rtol=1e-5, atol=1e-5)
    assert [d.computed for d in cache.decisions] == [True, True, False, True, False, False]

    # a new expert starts without residuals: skipping its first pass is an error, not a silent zero
    with pytest.raises(RuntimeError, match="no residual"):
        cache(model, xs[0], ts[0], context, branches, StepInfo(2, 3, 3, 500.0, 0.5, 1, (2, 3), 3))


# --- First-Block-Cache and MagCache against diffusers --------------------------------------------------


# thresholds giving skips, computes and a step where one branch skips and the other computes (see top)
FIRST_BLOCK_THRESHOLDS = {"ti2v": 0.0523, "a14b": 0.1}


@pytest.mark.parametrize("variant", ["ti2v", "a14b"])
def test_first_block_cache_matches_diffusers(pipes, model_dirs, recorded, monkeypatch, variant):
    from diffusers import FirstBlockCacheConfig

    threshold = FIRST_BLOCK_THRESHOLDS[variant]
    log = spy_first_block(monkeypatch)
    expected = _diffusers(
        model_dirs[variant], variant,
        lambda ref: [t.enable_cache(FirstBlockCacheConfig(threshold=threshold)) for t in _transformers(ref)],
    )  # fmt: skip
    video = _generate(pipes[variant], variant, cache="first-block", cache_threshold=threshold)
    ours = recorded().decisions

    assert [(d.branch, d.computed) for d in ours] == [(name, computed) for name, computed, _ in log]
    assert_same_indicators(ours, log, threshold)
    computed = [d.computed for d in ours]
    assert 0 < sum(computed) < len(computed)
    by_step = {}
    for d in ours:
        by_step.setdefault(d.step, set()).add(d.computed)
    assert any(len(v) == 2 for v in by_step.values()), "no step with one branch skipping and one computing"
    np.testing.assert_allclose(video.frames, expected, atol=2e-3, rtol=0)

    passes = video.stats["transformer_passes"]
    assert passes["computed"] == sum(computed) and passes["skipped"] == len(computed) - sum(computed)
    assert passes["probe_blocks"] == 1
    assert passes["by_branch"]["cond"]["skipped"] == sum(not d.computed for d in ours if d.branch == "cond")
    assert video.metadata["cache"] == {"method": "first-block", "threshold": threshold}
    if variant == "a14b":  # each expert starts afresh: its first pass computes without comparing
        switch = _expert_of_steps(pipes[variant]).index(1)
        assert 0 < switch < STEPS - 1
        assert [(d.computed, d.indicator) for d in ours if d.step == switch] == [(True, None)] * 2


def _spy_magcache(monkeypatch) -> list:
    """Record each diffusers MagCache decision (context, computed); patched before the hooks bind it."""
    from diffusers.hooks.mag_cache import MagCacheHeadHook

    log = []
    forward = MagCacheHeadHook.new_forward

    def spy(self, module, *args, **kwargs):
        out = forward(self, module, *args, **kwargs)
        log.append((self.state_manager.context.name, self.state_manager.get_state().should_compute))
        return out

    monkeypatch.setattr(MagCacheHeadHook, "new_forward", spy)
    return log


@pytest.mark.parametrize("variant", ["ti2v", "a14b"])
def test_magcache_matches_diffusers(pipes, model_dirs, recorded, monkeypatch, variant):
    """The published ratios (TI2V-5B's i2v list; I2V-A14B's, here caching both experts to exercise the
    per-expert spans) at their recommended settings; MagCache's decisions do not depend on the data, so
    these settings give a mix on any model."""
    from diffusers import MagCacheConfig
    from diffusers.hooks.mag_cache import nearest_interp as diffusers_interp

    calibration = MAGCACHE["wan2.2-ti2v-5b" if variant == "ti2v" else "wan2.2-i2v-a14b"]
    method = calibration.method("test", None)
    if variant == "a14b":
        method = replace(method, experts=None)
    settings = dict(threshold=method.threshold, max_skip_steps=method.max_skip_steps,
                    retention_ratio=method.retention_ratio)  # fmt: skip
    log = _spy_magcache(monkeypatch)

    def configure(ref):
        if variant == "ti2v":  # one config over the whole run; diffusers resamples the curve itself
            ref.transformer.enable_cache(MagCacheConfig(mag_ratios=list(method.ratios), num_inference_steps=STEPS, **settings))
            return
        # one config per expert with its part of the curve, as a diffusers user would set up A14B
        curve = diffusers_interp(torch.tensor(method.ratios), STEPS)
        high = _high_noise_steps(ref)
        for transformer, part in ((ref.transformer, curve[:high]), (ref.transformer_2, curve[high:])):
            transformer.enable_cache(MagCacheConfig(mag_ratios=part, num_inference_steps=len(part), **settings))

    expected = _diffusers(model_dirs[variant], variant, configure)
    video = _generate(pipes[variant], variant, cache=method)
    ours = recorded().decisions

    assert [(d.branch, d.computed) for d in ours] == log
    computed = [d.computed for d in ours]
    assert 0 < sum(computed) < len(computed)
    np.testing.assert_allclose(video.frames, expected, atol=2e-3, rtol=0)
    assert video.metadata["cache"]["calibration"] == "test"


def test_published_a14b_setting_leaves_the_high_noise_expert_alone(pipes, recorded):
    """MagCache4Wan2.2 never caches I2V-A14B's high-noise expert; its published setting here neither."""
    video = _generate(pipes["a14b"], "a14b", cache="magcache")
    ours = recorded().decisions
    experts = _expert_of_steps(pipes["a14b"])
    assert video.metadata["cache"]["experts"] == [1] and 0 in experts
    assert all(d.computed for d in ours if experts[d.step] == 0)
    assert not all(d.computed for d in ours if experts[d.step] == 1)


@pytest.mark.parametrize("length", [1, 2, 7, 8, 13, 40, 50, 51, 97])
def test_curve_resampling_is_diffusers(length):
    from diffusers.hooks.mag_cache import nearest_interp as diffusers_interp

    for calibration in MAGCACHE.values():
        ours = nearest_interp(np.asarray(calibration.ratios, np.float32), length)
        theirs = diffusers_interp(torch.tensor(calibration.ratios), length).numpy()
        np.testing.assert_array_equal(ours, theirs)


# --- TeaCache against a transcription of TeaCache4Wan2.1 ------------------------------------------------


def teacache4wan_reference(embeddings: list[torch.Tensor], coefficients, thresh: float, use_ret_steps: bool):
    """TeaCache4Wan2.1's decisions (ali-vilab/TeaCache ``TeaCache4Wan2.1/teacache_generate.py``
    ``teacache_forward`` lines 520-551 and the set-up at 965-978), transcribed: calls are counted over
    the conditional (even) and unconditional (odd) passes, each parity with its own accumulator.

    ``embeddings``: the modulated input of each step (``e0`` with ret steps, else ``e``), any shape.
    Returns the (cond, uncond)-interleaved list of "compute" flags.
    """
    num_steps = 2 * len(embeddings)
    ret_steps = 5 * 2 if use_ret_steps else 1 * 2
    cutoff_steps = num_steps if use_ret_steps else num_steps - 2
    rescale_func = np.poly1d(coefficients)
    accumulated, previous, decisions = [0.0, 0.0], [None, None], []
    for cnt in range(num_steps):
        modulated_inp, parity = embeddings[cnt // 2], cnt % 2
        if cnt < ret_steps or cnt >= cutoff_steps:
            should_calc = True
            accumulated[parity] = 0
        else:
            prev = previous[parity]
            accumulated[parity] += rescale_func(((modulated_inp - prev).abs().mean() / prev.abs().mean()).cpu().item())
            if accumulated[parity] < thresh:
                should_calc = False
            else:
                should_calc = True
                accumulated[parity] = 0
        previous[parity] = modulated_inp.clone()
        decisions.append(should_calc)
    return decisions


# (variant key, calibration, threshold giving a mix on the tiny model: see the module docstring)
TEACACHE_CASES = [("ti2v", "wan2.2-ti2v-5b", 20.0), ("i2v", "wan2.1-i2v-14b-480p", 1500.0)]


@pytest.mark.parametrize("variant, calibration, threshold", TEACACHE_CASES)
def test_teacache_matches_teacache4wan(pipes, model_dirs, recorded, variant, calibration, threshold):
    """TI2V-5B (LightX2V's polynomial on ``e``, every token's embedding: the photo's tokens have timestep
    0) and Wan2.1-I2V-480P (the ret-steps polynomial on ``e0``)."""
    from diffusers import UniPCMultistepScheduler, WanTransformer3DModel

    pipe = pipes[variant]
    if variant == "ti2v":
        _generate(pipe, "ti2v", cache="teacache", cache_threshold=threshold)
    else:
        noise = np.random.default_rng(3).standard_normal((1, 16, 2, 8, 12)).astype(np.float32)
        pipe(_photo(), PROMPT, latents=noise, guidance_scale=5.0, cache="teacache", cache_threshold=threshold, **COMMON)
    ours = recorded().decisions

    ref = WanTransformer3DModel.from_pretrained(model_dirs[variant] / "transformer")
    scheduler = UniPCMultistepScheduler.from_pretrained(model_dirs[variant] / "scheduler")
    scheduler.set_timesteps(STEPS)
    # tokens per latent frame (2x2 patches), and the latent frames; TI2V's first frame is the clean photo
    per_frame, frames = (2 * 3, 2) if variant == "ti2v" else (4 * 6, 2)
    published = TEACACHE[calibration]
    use_ret = published.default_ret_steps
    embeddings = []
    for t in scheduler.timesteps:
        t_tokens = torch.full((per_frame * frames,), float(t))
        if variant == "ti2v":
            t_tokens[:per_frame] = 0.0
        embedder = ref.condition_embedder
        with torch.no_grad():
            e = embedder.time_embedder(embedder.timesteps_proj(t_tokens))
            embeddings.append(embedder.time_proj(embedder.act_fn(e)) if use_ret else e)
    coefficients = published.ret_steps if use_ret else published.plain
    expected = teacache4wan_reference(embeddings, coefficients, threshold, use_ret)

    assert [d.computed for d in ours] == expected
    assert [d.branch for d in ours] == ["cond", "uncond"] * STEPS
    assert 0 < sum(expected) < len(expected)


# --- settings and errors ------------------------------------------------------------------------------


def test_cache_settings_are_checked_before_anything_loads(pipes, model_dirs, caplog):
    ti2v = pipes["ti2v"]
    for kwargs, message in [
        (dict(cache="sometimes"), "unknown cache method"),
        (dict(cache_threshold=0.1), "needs a cache method"),
        (dict(cache="first-block", cache_threshold=float("nan")), "finite"),
    ]:
        with pytest.raises(InvalidInputError, match=message):
            ti2v(_photo(), "x", **COMMON, **kwargs)
    assert not ti2v.text_encoder.loaded and ti2v.experts.resident() == []

    flf2v = load_pipeline(model_dirs["flf2v"], dtype="float32")
    for pipe, cache in ((flf2v, "magcache"), (flf2v, "teacache"), (pipes["a14b"], "teacache")):
        with pytest.raises(InvalidInputError, match=f"no published {cache} calibration for {pipe.variant.name}"):
            pipe.resolve_settings(_photo(), last_image=_photo() if pipe is flf2v else None, cache=cache)

    # TI2V without a photo uses the text-to-video list; a threshold overrides the recommended one
    assert ti2v.resolve_settings(None, cache="magcache").cache.calibration == "wan2.2-ti2v-5b/t2v"
    assert ti2v.resolve_settings(_photo(), cache="teacache", cache_threshold=0.3).cache.threshold == 0.3
    # another variant's calibration only when passed explicitly, and then with a warning
    foreign = MAGCACHE["wan2.1-i2v-14b-720p"].method("wan2.1-i2v-14b-720p")
    with caplog.at_level(logging.WARNING, logger="mlx_i2v"):
        settings = flf2v.resolve_settings(_photo(), last_image=_photo(), cache=foreign)
    assert isinstance(settings.cache, MagCache) and "was not measured on wan2.1-flf2v-14b-720p" in caplog.text

    # the kept residuals are part of the memory plan: per branch, one in the compute dtype, and
    # First-Block-Cache's float32 block-0 residual
    size = dict(height=HEIGHT, width=WIDTH, num_frames=FRAMES)
    plain = ti2v.plan(**size).stage("denoise").activations
    fbc = ti2v.plan(**size, cache=FirstBlockCache()).stage("denoise").activations
    tokens, dim = ti2v.plan(**size).tokens, ti2v.dims.transformer.inner_dim
    assert fbc - plain == 2 * tokens * dim * (4 + 4)


def test_data_dependent_caches_are_refused_with_sequence_parallel_ranks(pipes, monkeypatch):
    """Sequence-parallel ranks each see a shard of the tokens: a cache that reads them would decide
    differently per rank (and the ranks would wait on each other), so only MagCache is allowed."""
    ti2v = pipes["ti2v"]

    class TwoShards:
        sequence = 2

    monkeypatch.setattr(ti2v.parallel, "layout", lambda scales: TwoShards())
    for cache in ("first-block", "teacache"):
        with pytest.raises(InvalidInputError, match=f"--cache {cache} does not work with sequence-parallel"):
            ti2v.resolve_settings(_photo(), cache=cache)
    assert ti2v.resolve_settings(_photo(), cache="magcache").cache.name == "magcache"
