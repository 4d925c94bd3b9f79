"""Memory policy: the budget, chunked attention, tiled VAE (against diffusers) and the planner's estimates
against peaks measured with ``mx.get_peak_memory`` (CPU, float32)."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_i2v import planner
from mlx_i2v.families.wan import planner as wan_planner
from mlx_i2v.flops import DiTShape
from mlx_i2v.errors import InvalidInputError
from mlx_i2v.memory import ENV_VAR, GB, memory_budget, set_memory_limit
from mlx_i2v.models import attention as attn
from mlx_i2v.models import layers
from mlx_i2v.models.wan import transformer as wan_transformer
from mlx_i2v.models.wan.transformer import (
    WanTransformer3DModel,
    WanTransformerBlock,
    WanTransformerConfig,
    modulation,
)
from mlx_i2v.models.wan.vae import load_wan_vae
from mlx_i2v.models.wan.vae_tiling import Tiling, tiled_decode, tiled_encode
from ref_vae import build_tiny_vae

PLANNER_TOL = 0.15


@pytest.fixture(autouse=True)
def no_override(monkeypatch):
    """Every test starts from the device budget and leaves no override behind."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    set_memory_limit(None)
    yield
    set_memory_limit(None)


def active_memory() -> int:
    """Bytes MLX holds now, once arrays that earlier tests left in reference cycles are collected (else a
    later collection would move the peaks measured from here, depending on the tests run before)."""
    gc.collect()
    return mx.get_active_memory()


def measure_peak(fn) -> tuple[int, object]:
    """Peak bytes of all MLX allocations while ``fn()`` runs and is evaluated."""
    gc.collect()
    mx.synchronize()
    mx.reset_peak_memory()
    out = fn()
    mx.eval(out)
    mx.synchronize()
    return mx.get_peak_memory(), out


def rel_err(a: mx.array, b: mx.array) -> float:
    a, b = np.array(a), np.array(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


def small_wan_block(dim: int, heads: int, ffn_dim: int) -> WanTransformerBlock:
    """A Wan block of the given widths with random weights, evaluated."""
    cfg = WanTransformerConfig(
        num_attention_heads=heads, attention_head_dim=dim // heads, ffn_dim=ffn_dim, num_layers=1,
        in_channels=4, out_channels=4, text_dim=32,
    )  # fmt: skip
    block = WanTransformerBlock(cfg)
    mx.eval(block.parameters())
    return block


# --- budget -------------------------------------------------------------------------------------------


def test_budget_from_device_env_and_override(monkeypatch):
    device = memory_budget()
    assert device > 10**8
    monkeypatch.setenv(ENV_VAR, "3.5")
    assert memory_budget() == int(3.5 * GB)
    set_memory_limit(2)  # the CLI flag wins over the environment
    assert memory_budget() == 2 * GB
    set_memory_limit(None)
    assert memory_budget() == int(3.5 * GB)
    monkeypatch.setenv(ENV_VAR, "lots")
    with pytest.raises(InvalidInputError, match=ENV_VAR):
        memory_budget()
    with pytest.raises(InvalidInputError):
        set_memory_limit(-1)


# --- attention ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, mask_shape",
    [
        ((2, 3, 100, 200, 16), None),
        ((1, 4, 257, 257, 32), None),  # 257 does not divide into the chunks
        ((2, 4, 130, 130, 64), (2, 4, 130, 130)),  # UMT5's bias: per batch and head
        ((2, 4, 130, 130, 64), (1, 4, 130, 130)),  # shared over the batch
        ((2, 4, 130, 90, 64), (2, 1, 1, 90)),  # key padding, broadcast over queries
    ],
)
def test_chunked_attention_equals_unchunked(shape, mask_shape):
    B, H, Lq, Lk, D = shape
    keys = mx.random.split(mx.random.key(Lq + Lk), 4)
    q = mx.random.normal((B, H, Lq, D), key=keys[0])
    k = mx.random.normal((B, H, Lk, D), key=keys[1])
    v = mx.random.normal((B, H, Lk, D), key=keys[2])
    mask = None if mask_shape is None else mx.random.normal(mask_shape, key=keys[3])
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5, mask=mask)
    # A budget so small that every chunk holds a few queries, leaving a ragged last chunk.
    set_memory_limit(B * H * Lk * attn.SCORE_BYTES * 7 / attn.ATTENTION_FRACTION / GB)
    chunk = attn.query_chunk_size(B, H, Lq, Lk, attn.attention_workspace())
    assert chunk == 7 and Lq % chunk
    assert rel_err(attn.attention(q, k, v, mask=mask), expected) < 1e-5


def test_chunk_size_respects_the_workspace():
    B, H, L = 2, 24, 27280
    for workspace in (10**6, 10**8, 2 * 10**9):
        chunk = attn.query_chunk_size(B, H, L, L, workspace)
        per_query = B * H * L * attn.SCORE_BYTES
        assert chunk * per_query <= workspace < (chunk + 1) * per_query or chunk == 1
    assert attn.query_chunk_size(B, H, L, L, 1) == 1  # always progresses
    assert attn.query_chunk_size(1, 1, 10, 10, 10**12) == 10  # never more than the queries
    assert attn.attention_workspace(8 * GB, cpu=False) == int(8 * GB * attn.ATTENTION_FRACTION)
    # On the CPU small chunks are no slower, so the workspace stays small whatever the budget.
    assert attn.attention_workspace(8 * GB, cpu=True) == attn.CPU_WORKSPACE
    assert attn.attention_workspace(GB // 4, cpu=True) == GB // 4 * attn.ATTENTION_FRACTION


def test_chunked_attention_peak_is_much_lower():
    L, H, D = 4096, 4, 64
    keys = mx.random.split(mx.random.key(0), 3)
    q, k, v = (mx.random.normal((1, H, L, D), key=kk) for kk in keys)
    mx.eval(q, k, v)
    base = active_memory()
    whole, expected = measure_peak(lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5))
    scores = H * L * L * 4
    assert whole - base > scores  # the CPU fallback materialises every score
    set_memory_limit(scores / 8 / GB / attn.ATTENTION_FRACTION)  # a workspace of 1/8 of the scores
    chunked, out = measure_peak(lambda: attn.attention(q, k, v))
    assert chunked - base < (whole - base) / 3
    assert rel_err(out, expected) < 1e-5


def test_attention_holds_no_projection_intermediates_beside_its_scores():
    """Queries, keys and values still to be computed (projections with RMSNorm, as in a Wan block): MLX
    allocates every queued operation's output before the first finishes, so the first chunk must not be
    evaluated together with the projections' intermediates."""
    B, H, D, L = 1, 8, 64, 2048
    keys = mx.random.split(mx.random.key(0), 4)
    x = mx.random.normal((B, L, H * D), key=keys[0])
    weights = [mx.random.normal((H * D, H * D), key=kk) * (H * D) ** -0.5 for kk in keys[1:]]
    norm_weight = mx.ones((H * D,))
    mx.eval(x, weights, norm_weight)

    def projected() -> list[mx.array]:
        heads = [mx.fast.rms_norm(x @ w, norm_weight, 1e-6) * 1.5 + 0.25 for w in weights]
        return [h.reshape(B, L, H, D).transpose(0, 2, 1, 3) for h in heads]

    scores = B * H * L * L * 4
    set_memory_limit(scores / 8 / GB / attn.ATTENTION_FRACTION)  # 8 chunks
    base = active_memory()
    projections, qkv = measure_peak(projected)
    over_evaluated, expected = measure_peak(lambda: attn.attention(*qkv))
    del qkv
    over_lazy, out = measure_peak(lambda: attn.attention(*projected()))
    # measured: 1.07x the larger of the two; 1.31x with the first chunk queued behind the projections
    assert over_lazy - base < 1.15 * max(projections - base, over_evaluated - base)
    assert rel_err(out, expected) < 1e-6


def test_feed_forward_sub_layer_holds_no_modulation_intermediates_beside_its_inner_tensors():
    """The modulated feed-forward of a Wan block with per-token timesteps: its LayerNorm, modulation rows
    and projection are evaluated before the activation, so they are not held beside the two (tokens,
    inner) tensors (the projection and the tanh-GELU's argument); queued together they added five
    hidden-state copies."""
    dim, ffn_dim, L = 256, 1024, 2048
    block = small_wan_block(dim, 2, ffn_dim)
    x = mx.random.normal((2, L, dim), key=mx.random.key(0))
    mod = modulation(block.scale_shift_table, mx.random.normal((2, 6, dim), key=mx.random.key(1)) * 0.1)
    per_token = mx.broadcast_to((mx.arange(L) >= L // 4).astype(mx.int32)[None], (2, L))
    mx.eval(x, mod, per_token)
    base = active_memory()
    peak = float(np.median([measure_peak(lambda: block.feed_forward(x, per_token, mod))[0] for _ in range(3)]))
    hidden_f32, inner_f32 = 2 * L * dim * 4, 2 * L * ffn_dim * 4
    assert peak - base < 2 * inner_f32 + 3 * hidden_f32, (peak - base) / hidden_f32  # measured: 10 copies


def test_block_evaluates_its_sub_layers_one_at_a_time(monkeypatch):
    """On the CPU a Wan block evaluates each sub-layer's output, and its feed-forward's projection, before
    queuing what follows (memory.evaluate_on_cpu): queued as one chain the block held every operation's
    output along the way. Measured here: 16.7 hidden-state copies against 22.0 for the chain."""
    dim, heads, ffn_dim, L = 1536, 12, 6144, 1024
    block = small_wan_block(dim, heads, ffn_dim)
    keys = mx.random.split(mx.random.key(0), 5)
    x = mx.random.normal((2, L, dim), key=keys[0])
    kv = block.attn2.project_kv(mx.random.normal((2, 512, dim), key=keys[1]))
    rope = tuple(mx.random.normal((L, dim // heads // 2), key=key) for key in keys[2:4])
    time_proj = mx.random.normal((2, 6, dim), key=keys[4]) * 0.1
    index = mx.broadcast_to((mx.arange(L) >= L // 4).astype(mx.int32)[None], (2, L))
    mx.eval(x, kv, rope, time_proj, index)
    base = active_memory()

    def peak() -> tuple[float, mx.array]:
        peaks, out = zip(*(measure_peak(lambda: block(x, kv, time_proj, index, rope)) for _ in range(3)))
        return float(np.median(peaks)) - base, out[0]

    staged, out = peak()
    for module in (wan_transformer, layers):
        monkeypatch.setattr(module, "evaluate_on_cpu", lambda *arrays: None)
    chained, expected = peak()
    hidden_f32 = 2 * L * dim * 4
    assert staged < chained - 3 * hidden_f32, (staged / hidden_f32, chained / hidden_f32)
    assert mx.array_equal(out, expected)


def test_a_pass_peaks_at_one_block_whatever_its_depth():
    """On the CPU the model evaluates each block's output before queuing the next (``run_blocks``): else a
    block's feed-forward tail is evaluated with the next block's self-attention (or the output head), and
    each block added to the pass raised its peak. Measured here: 36.1 hidden-state copies for one block
    and for two, against 40.5 and 45.3 without it (at TI2V-5B widths, 2 x 1056 tokens: 14.7 against 22.4
    for two blocks)."""

    def pass_peak(layers: int) -> float:
        cfg = WanTransformerConfig(
            num_attention_heads=4, attention_head_dim=128, ffn_dim=8192, num_layers=layers, in_channels=16,
            out_channels=16, text_dim=32,
        )  # fmt: skip
        model = WanTransformer3DModel(cfg)
        context = model.cross_attention_cache(model.embed_context(mx.random.normal((2, 512, 32), key=mx.random.key(0))))
        latents = mx.random.normal((2, 11, 16, 24, 16), key=mx.random.key(1))
        timestep = np.full((2, 11 * 8 * 12), 700.0, np.float32)
        timestep[:, : 8 * 12] = 0  # TI2V: the conditioning frame's tokens are clean
        mx.eval(model.parameters(), context, latents)
        base = active_memory()
        peak, _ = measure_peak(lambda: model(latents, timestep, context=context))
        return (peak - base) / (2 * 11 * 8 * 12 * 512 * 4)

    one, two = pass_peak(1), pass_peak(2)
    assert two < one + 1, (one, two)


def test_feed_forward_chunk_respects_the_workspace():
    B, L, F = 2, 75600, 13824
    per_token = layers.FEED_FORWARD_COPIES * B * F * 2
    for workspace in (10**6, 10**8, 2 * 10**9):
        chunk = layers.feed_forward_chunk(B, L, F, 2, workspace)
        assert chunk * per_token <= workspace < (chunk + 1) * per_token or chunk == 1
    assert layers.feed_forward_chunk(B, L, F, 2, 1) == 1  # always progresses
    assert layers.feed_forward_chunk(1, 10, 64, 4, 10**12) == 10  # never more than the tokens
    assert layers.feed_forward_workspace(8 * GB) == int(8 * GB * layers.FEED_FORWARD_FRACTION)


def test_chunked_feed_forward_peak_is_much_lower():
    """A feed-forward sub-layer over 2048 tokens with a workspace of 1/8 of its intermediates."""
    dim, inner, L = 256, 4096, 2048
    ffn = layers.FeedForward(dim, inner, dim, approximate=True)
    x = mx.random.normal((1, L, dim), key=mx.random.key(0))
    mx.eval(ffn.parameters(), x)
    base = active_memory()
    whole, expected = measure_peak(lambda: ffn(x))
    intermediates = layers.FEED_FORWARD_COPIES * L * inner * 4
    assert whole - base > intermediates
    set_memory_limit(intermediates / 8 / GB / layers.FEED_FORWARD_FRACTION)
    assert layers.feed_forward_chunk(1, L, inner, 4, layers.feed_forward_workspace()) == L // 8
    chunked, out = measure_peak(lambda: layers.by_token_chunks(ffn, x, (), inner))
    assert chunked - base < (whole - base) / 3
    assert rel_err(out, expected) < 1e-6


def test_per_token_modulation_costs_no_whole_rows_in_a_chunked_feed_forward():
    """TI2V's per-token timesteps: each modulation row is a float32 copy of the hidden state. With the
    feed-forward on 8 chunks, its peak is within a chunk's rows of the peak with one timestep per sample
    (holding its three rows whole added three hidden-state copies). Measured on the block's feed-forward
    sub-layer: the whole block's peak is its self-attention's."""
    dim, ffn_dim, L = 256, 8192, 512
    block = small_wan_block(dim, 2, ffn_dim)
    x = mx.random.normal((2, L, dim), key=mx.random.key(0))
    mod = modulation(block.scale_shift_table, mx.random.normal((2, 6, dim), key=mx.random.key(1)) * 0.1)
    shared = mx.zeros((2, 1), mx.int32)
    per_token = mx.broadcast_to((mx.arange(L) >= L // 4).astype(mx.int32)[None], (2, L))
    mx.eval(x, mod, shared, per_token)
    set_memory_limit(layers.FEED_FORWARD_COPIES * 2 * (L // 8) * ffn_dim * 4 / layers.FEED_FORWARD_FRACTION / GB)
    base = active_memory()
    # The median of five peaks each: when MLX frees a temporary depends on how its CPU stream's thread
    # interleaves with this one, which can move a single peak by a hidden-state copy.
    peaks = [
        float(np.median([measure_peak(lambda: block.feed_forward(x, index, mod))[0] for _ in range(5)])) - base
        for index in (shared, per_token)
    ]
    hidden_f32 = 2 * L * dim * 4
    assert peaks[1] - peaks[0] < 1.5 * hidden_f32, peaks  # a chunk's rows: 3/8 of a copy


# --- tiled VAE ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["2.1", "2.2"])
def tiny_vaes(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"vae{request.param}")
    ref = build_tiny_vae(path, request.param)
    return ref, load_wan_vae(path, mx.float32)


TEST_TILING = Tiling(size=64, stride=48)  # small tiles, so a small video still has a 2x3 grid


def test_tiled_decode_matches_diffusers(tiny_vaes):
    ref, ours = tiny_vaes
    s = ref.config.scale_factor_spatial
    ref.enable_tiling(TEST_TILING.size, TEST_TILING.size, TEST_TILING.stride, TEST_TILING.stride)
    torch.manual_seed(0)
    z = torch.randn(1, ref.config.z_dim, 2, 96 // s, 128 // s)
    with torch.no_grad():
        expected = ref.decode(z).sample.permute(0, 2, 3, 4, 1).numpy()
    z_mlx = mx.array(z.permute(0, 2, 3, 4, 1).numpy())
    video = tiled_decode(ours, z_mlx, TEST_TILING)
    assert video.shape == expected.shape == (1, 5, 96, 128, 3)
    assert rel_err(video, mx.array(expected)) < 1e-4
    # Tiles see zero padding instead of their neighbours: the seams differ from the untiled decode.
    assert rel_err(video, ours.decode(z_mlx)) > 1e-3


def test_tiled_encode_matches_diffusers(tiny_vaes):
    ref, ours = tiny_vaes
    ref.enable_tiling(TEST_TILING.size, TEST_TILING.size, TEST_TILING.stride, TEST_TILING.stride)
    torch.manual_seed(1)
    video = torch.rand(1, 3, 5, 96, 128) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(video).latent_dist
    mean, logvar = tiled_encode(ours, mx.array(video.permute(0, 2, 3, 4, 1).numpy()), TEST_TILING)
    assert rel_err(mean, mx.array(dist.mean.permute(0, 2, 3, 4, 1).numpy())) < 1e-4
    assert rel_err(logvar, mx.array(dist.logvar.permute(0, 2, 3, 4, 1).numpy())) < 1e-4


# --- planner ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget_gb, frames", [(None, 3), (0.5, 3), (None, 8)])
def test_planner_matches_measured_denoise_peak(budget_gb, frames):
    """One block at TI2V-5B widths, CFG batch, 384 or 1024 tokens: weights + activations within 15 %, as
    the plan counts Wan on the CPU (its blocks staged), with the device's budget and with one that puts the
    feed-forward on three chunks."""
    set_memory_limit(budget_gb)
    cfg = WanTransformerConfig(
        num_attention_heads=24, attention_head_dim=128, in_channels=48, out_channels=48, ffn_dim=14336,
        num_layers=1,
    )  # fmt: skip
    model = WanTransformer3DModel(cfg)
    mx.eval(model.parameters())
    context = model.embed_context(mx.random.normal((2, 512, 4096), key=mx.random.key(0)))
    latents = mx.random.normal((2, frames, 16, 32, 48), key=mx.random.key(1))
    tokens = frames * 8 * 16
    timestep = np.full((2, tokens), 700.0, np.float32)
    timestep[:, : tokens // frames] = 0  # TI2V: the conditioning frame's tokens are clean
    mx.eval(context, latents)
    measured, _ = measure_peak(lambda: model(latents, timestep, context=context))

    weights = planner.module_weight_bytes(WanTransformer3DModel(cfg), mx.float32)
    activations, chunk = planner.denoise_activations(cfg, tokens, 2, mx.float32, False, memory_budget(), staged=True)
    assert (chunk is None) == (frames == 3)  # 2 x 1024 tokens' scores exceed the CPU's 64 MB workspace
    ffn_tokens = layers.feed_forward_chunk(2, tokens, cfg.ffn_dim, 4, layers.feed_forward_workspace())
    assert ffn_tokens == (tokens if budget_gb is None else 136)
    estimate = weights + activations
    assert abs(estimate - measured) / measured < PLANNER_TOL, (estimate / measured, estimate, measured)


@pytest.mark.parametrize("image", [False, True])
def test_planner_counts_the_held_cross_attention_cache(image):
    """The loop holds every block's cross-attention keys and values (text, and the photo's CLIP tokens for
    Wan2.1-I2V) from its first step to its last; the plan counts exactly their bytes."""
    cfg = WanTransformerConfig(
        num_attention_heads=2, attention_head_dim=32, ffn_dim=128, num_layers=3, in_channels=4, out_channels=4,
        text_dim=32, image_dim=48 if image else None, added_kv_proj_dim=64 if image else None,
    )  # fmt: skip
    model = WanTransformer3DModel(cfg)
    text = mx.random.normal((2, 512, 32), key=mx.random.key(0))
    images = mx.random.normal((2, 257, 48), key=mx.random.key(1)) if image else None
    kv = model.cross_attention_cache(model.embed_context(text, images))
    mx.eval(kv)
    held = sum(a.nbytes for _, a in tree_flatten(kv) if isinstance(a, mx.array))
    assert held == planner.context_kv_bytes(DiTShape.from_config(cfg), 2, mx.float32)


def test_planner_matches_measured_vae_decode_peak(tiny_vaes):
    _, ours = tiny_vaes
    cfg = ours.config
    s = cfg.scale_factor_spatial
    z = mx.random.normal((1, 3, 192 // s, 320 // s, cfg.z_dim), key=mx.random.key(2))
    mx.eval(z)

    def decode():
        for chunk in ours.decode_frames(z):
            mx.eval(chunk.astype(mx.float32))
        return z

    measured, _ = measure_peak(decode)
    weights = planner.module_weight_bytes(ours, mx.float32)
    estimate = weights + wan_planner.vae_decode_activations(cfg, z.shape[2:4], mx.float32, None, memory_budget())
    assert abs(estimate - measured) / measured < PLANNER_TOL, (estimate, measured)


def test_planner_matches_measured_vae_encode_peak(tiny_vaes):
    _, ours = tiny_vaes
    video = mx.random.uniform(-1, 1, (1, 1, 192, 320, 3), key=mx.random.key(3))
    mx.eval(video)
    measured, _ = measure_peak(lambda: ours.encode(video)[0])
    weights = planner.module_weight_bytes(ours, mx.float32)
    estimate = weights + wan_planner.vae_encode_activations(ours.config, 192, 320, 1, mx.float32, None, memory_budget())
    assert abs(estimate - measured) / measured < PLANNER_TOL, (estimate, measured)


def test_ti2v_5b_4bit_720p_121_frames_plans_within_16gb():
    plan = planner.plan_generation(
        wan_planner.TI2V_5B, height=704, width=1280, num_frames=121, dtype=mx.bfloat16, quantize=4,
        backend="metal", budget=16 * GB,
    )  # fmt: skip
    assert plan.tokens == 27280
    assert plan.peak <= 16 * GB and plan.fits()
    # Each model is resident for its stage only: the 4-bit DiT (~2.8 GB) while denoising, the 8-bit UMT5
    # (~6 GB) while encoding text, the float32 VAE's halves (704.7 M parameters) while encoding and decoding.
    assert 2.6 * GB < plan.stage("denoise").weights < 3.2 * GB
    assert 2.7 * GB < plan.stage("vae_encode").weights + plan.stage("vae_decode").weights < 2.9 * GB
    assert 5.5 * GB < plan.stage("text").weights < 6.5 * GB
    planner.check_fits(plan)
    assert "denoise" in plan.summary()


def test_plan_that_does_not_fit_says_what_would():
    plan = planner.plan_generation(
        wan_planner.TI2V_5B, height=704, width=1280, num_frames=121, dtype=mx.bfloat16, backend="metal",
        budget=16 * GB,
    )  # fmt: skip
    assert not plan.fits()
    assert "--quantize 4" in plan.suggestions
    with pytest.raises(planner.PlanDoesNotFitError, match=r"exceeds the 16\.0 GB.*--quantize 4"):
        planner.check_fits(plan)
    # On the CPU attention is chunked to the budget, and the planner knows the chunk.
    cpu = planner.plan_generation(
        wan_planner.TI2V_5B, height=704, width=1280, num_frames=121, dtype=mx.float32, quantize=4,
        backend="cpu", budget=16 * GB,
    )  # fmt: skip
    chunk = attn.query_chunk_size(2, 24, 27280, 27280, attn.attention_workspace(16 * GB, cpu=True))
    assert cpu.attention_chunk == chunk
