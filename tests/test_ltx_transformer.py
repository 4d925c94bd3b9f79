"""Parity of the MLX LTX-Video transformer with diffusers 0.42.1 (float32), its weight maps, quantization and
FLOP count."""

from __future__ import annotations

import inspect

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from diffusers import LTXConditionPipeline, LTXPipeline, LTXVideoTransformer3DModel as RefTransformer
from diffusers.loaders.single_file_utils import convert_ltx_transformer_checkpoint_to_diffusers
from diffusers.models.transformers.transformer_ltx import LTXVideoRotaryPosEmbed
from ref_ltx_transformer import (
    LTX_2B_1LAYER,
    LTX_13B,
    ORIGINAL_PREFIX,
    TINY,
    build_transformer,
    reference_forward,
    to_original_layout,
)
from torch.utils.flop_counter import FlopCounterMode

from mlx_i2v.errors import WeightLoadError
from mlx_i2v.memory import ENV_VAR, GB
from mlx_i2v.flops import context_flops, forward_flops, ltx_shape, ltx_video_tokens
from mlx_i2v.models.ltx.single_file import split_single_file
from mlx_i2v.models import layers
from mlx_i2v.models.ltx.transformer import (
    ORIGINAL_MAP,
    LTXRotaryPosEmbed,
    LTXTransformerBlock,
    LTXTransformerConfig,
    LTXVideoTransformer3DModel,
    load_ltx_transformer,
    pack_latents,
    pixel_coords,
    rope_frequencies,
    unpack_latents,
)
from mlx_i2v.quantize import Quantization, quantize_transformer, quantized_layer_paths
from mlx_i2v.weights import config_from_dict, load_strict

TOL = 1e-5  # max |ours - ref| / max |ref|, float32 tiny models
SCALE_25FPS = (8 / 25, 32, 32)  # the pipelines' rope_interpolation_scale: (8 / frame_rate, 32, 32)


def to_mx(t: torch.Tensor) -> mx.array:
    return mx.array(t.numpy())


def rel_err(ours: mx.array, ref: torch.Tensor) -> float:
    got, want = np.asarray(ours), ref.numpy()
    assert got.shape == want.shape
    return float(np.abs(got - want).max() / np.abs(want).max())


def inputs(batch: int, tokens: int, context: int, *, channels: int = 8, caption: int = 24, seed: int = 0):
    """Random tokens (B, L, C), T5-like states (B, L_ctx, caption) and a padding mask: sample b has
    ``context - 3 * b`` real tokens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, channels, generator=g)
    text = torch.randn(batch, context, caption, generator=g)
    mask = torch.ones(batch, context, dtype=torch.bool)
    for b in range(batch):
        mask[b, context - 3 * b :] = False
    return x, text, mask


def both(ref, model, x, t, text, mask, **positions) -> tuple[mx.array, torch.Tensor]:
    """Our forward and diffusers' on the same inputs; positions as diffusers names them."""
    want = reference_forward(
        ref, hidden_states=x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask, **positions
    )
    if "video_coords" in positions:  # diffusers (B, 3, L) -> ours (B, L, 3)
        positions["video_coords"] = positions["video_coords"].transpose(1, 2).numpy()
    got = model(to_mx(x), to_mx(t), to_mx(text), None if mask is None else to_mx(mask), **positions)
    return got, want


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(diffusers model, MLX model, checkpoint folder) of the tiny config."""
    folder = tmp_path_factory.mktemp("ltx_tiny")
    ref = build_transformer(folder, TINY)
    return ref, load_ltx_transformer(folder, mx.float32), folder


GRID = (3, 4, 6)  # latent frames, rows, columns: 72 tokens
GRID_KW = dict(num_frames=3, height=4, width=6)


# --- forward parity -------------------------------------------------------------------------------------


def test_per_sample_timesteps_with_padded_captions(tiny):
    ref, model, _ = tiny
    x, text, mask = inputs(2, 72, 10)
    t = torch.tensor([1000.0, 437.5])
    got, want = both(ref, model, x, t, text, mask, **GRID_KW, rope_interpolation_scale=SCALE_25FPS)
    assert rel_err(got, want) < TOL


def test_per_token_timesteps_image_to_video(tiny):
    """``LTXImageToVideoPipeline``: t * (1 - mask) with the conditioning mask 1 on latent frame 0."""
    ref, model, _ = tiny
    x, text, mask = inputs(2, 72, 10, seed=1)
    first_frame = torch.zeros(2, 72)
    first_frame[:, :24] = 1
    t = torch.tensor([993.75, 500.0])[:, None] * (1 - first_frame)
    got, want = both(ref, model, x, t, text, mask, **GRID_KW, rope_interpolation_scale=SCALE_25FPS)
    assert rel_err(got, want) < TOL


def test_feed_forward_on_token_chunks_matches_diffusers(tiny, monkeypatch):
    """The feed-forward sub-layer on 10-token chunks (72 tokens: seven and a ragged one) with per-token
    timesteps, whose modulation rows are cut with the tokens."""
    ref, model, _ = tiny
    ffn_dim = model.transformer_blocks[0].ffn_dim
    workspace = 10 * layers.FEED_FORWARD_COPIES * 2 * ffn_dim * 4  # ten tokens' (batch 2, float32)
    calls: list[int] = []
    original = LTXTransformerBlock._feed_forward

    def spy(self, x, *rows):
        calls.append(x.shape[1])
        return original(self, x, *rows)

    monkeypatch.setattr(LTXTransformerBlock, "_feed_forward", spy)
    x, text, mask = inputs(2, 72, 10, seed=1)
    first_frame = torch.zeros(2, 72)
    first_frame[:, :24] = 1
    t = torch.tensor([993.75, 500.0])[:, None] * (1 - first_frame)
    monkeypatch.setenv(ENV_VAR, str(workspace / layers.FEED_FORWARD_FRACTION / GB))
    got, want = both(ref, model, x, t, text, mask, **GRID_KW, rope_interpolation_scale=SCALE_25FPS)
    assert calls == ([10] * 7 + [2]) * 2  # two blocks
    assert rel_err(got, want) < TOL


def test_frame_rate_enters_the_positions(tiny):
    ref, model, _ = tiny
    x, text, mask = inputs(1, 72, 10, seed=2)
    t = torch.tensor([700.0])
    got, want = both(ref, model, x, t, text, mask, **GRID_KW, rope_interpolation_scale=(8 / 12, 32, 32))
    assert rel_err(got, want) < TOL
    at_25 = model(to_mx(x), to_mx(t), to_mx(text), to_mx(mask), **GRID_KW, rope_interpolation_scale=SCALE_25FPS)
    assert rel_err(at_25, want) > 100 * TOL  # a different frame rate is a different prediction


def test_without_interpolation_scale_positions_are_raw_indices(tiny):
    ref, model, _ = tiny
    x, text, _ = inputs(1, 72, 10, seed=3)
    got, want = both(ref, model, x, torch.tensor([250.0]), text, None, **GRID_KW)
    assert rel_err(got, want) < TOL


def test_padding_tokens_are_masked_out(tiny):
    ref, model, _ = tiny
    x, text, mask = inputs(2, 72, 10, seed=4)
    t = torch.tensor([800.0, 800.0])
    got, want = both(ref, model, x, t, text, mask, **GRID_KW, rope_interpolation_scale=SCALE_25FPS)
    assert rel_err(got, want) < TOL
    garbled = text.clone()
    garbled[~mask] = 100.0
    again = model(to_mx(x), to_mx(t), to_mx(garbled), to_mx(mask), **GRID_KW, rope_interpolation_scale=SCALE_25FPS)
    assert np.abs(np.asarray(again) - np.asarray(got)).max() < 1e-6 * np.abs(np.asarray(got)).max()
    unmasked = model(to_mx(x), to_mx(t), to_mx(garbled), None, **GRID_KW, rope_interpolation_scale=SCALE_25FPS)
    assert np.abs(np.asarray(unmasked) - np.asarray(got)).max() > 1e-2


def test_explicit_video_coords_with_extra_conditioning_tokens(tiny):
    """``LTXConditionPipeline``: a keyframe at pixel frame 16 appended as one more latent frame of tokens
    with its own coordinates, per-token timesteps min(t, (1 - strength) * 1000)."""
    ref, model, _ = tiny
    grid_coords = pixel_coords(*GRID, frame_rate=24)
    keyframe = pixel_coords(1, *GRID[1:], frame_rate=24, frame_index=16)
    coords = np.concatenate([grid_coords, keyframe])  # (96, 3)
    x, text, mask = inputs(2, 96, 10, seed=5)
    strength = torch.zeros(2, 96)
    strength[:, :24] = 1.0  # the first frame
    strength[:, 72:] = 0.75  # the keyframe tokens
    t = torch.minimum(torch.tensor([[900.0], [400.0]]), (1 - strength) * 1000.0)
    ref_coords = torch.from_numpy(np.stack([coords, coords])).transpose(1, 2)  # diffusers' (B, 3, L)
    got, want = both(ref, model, x, t, text, mask, video_coords=ref_coords)
    assert rel_err(got, want) < TOL


def test_cached_context_and_rope_give_the_same_prediction(tiny):
    _, model, _ = tiny
    x, text, mask = inputs(2, 72, 10, seed=6)
    x, text, mask, t = to_mx(x), to_mx(text), to_mx(mask), mx.array([600.0, 300.0])
    direct = model(x, t, text, mask, **GRID_KW, rope_interpolation_scale=SCALE_25FPS)
    context = model.cross_attention_cache(model.embed_context(text, mask))
    assert len(context.kv) == TINY["num_layers"] and context.kv[0][0].shape == (2, 2, 10, 16)
    rope = model.rope_tables(**GRID_KW, rope_interpolation_scale=SCALE_25FPS)
    assert model.rope_tables(**GRID_KW, rope_interpolation_scale=SCALE_25FPS) is rope  # cached per grid
    cached = model(x, t, context=context, rope=rope)
    assert np.abs(np.asarray(cached) - np.asarray(direct)).max() <= 1e-6 * np.abs(np.asarray(direct)).max()


def test_bad_calls_are_refused(tiny):
    _, model, _ = tiny
    x, text = mx.zeros((1, 72, 8)), mx.zeros((1, 10, 24))
    with pytest.raises(ValueError, match="timestep"):
        model(x, mx.zeros((1, 5)), text, **GRID_KW)
    with pytest.raises(ValueError, match="positions for"):
        model(x, mx.zeros((1,)), text, num_frames=2, height=4, width=6)
    with pytest.raises(ValueError, match="num_frames, height and width"):
        model(x, mx.zeros((1,)), text)
    with pytest.raises(ValueError, match="encoder_attention_mask"):
        model(x, mx.zeros((1,)), text, mx.ones((1, 9)), **GRID_KW)


def test_one_block_at_2b_widths(tmp_path):
    """dim 2048 (32 x 64), FFN 8192, cross-attention 2048, caption 4096; padded caption, per-token t."""
    ref = build_transformer(tmp_path, LTX_2B_1LAYER, seed=3)
    model = load_ltx_transformer(tmp_path, mx.float32)
    assert model.config.inner_dim == 2048 and model.config.ffn_dim == 8192
    x, text, mask = inputs(1, 192, 16, channels=128, caption=4096, seed=7)
    mask[0, 11:] = False
    t = torch.full((1, 192), 900.0)
    t[:, :64] = 0.0
    got, want = both(
        ref, model, x, t, text, mask, num_frames=3, height=8, width=8, rope_interpolation_scale=SCALE_25FPS
    )
    assert rel_err(got, want) < 1e-4


# --- positions and layout ---------------------------------------------------------------------------------


# One ulp of a float32 exponent in [0, 1] moves theta ** exponent by ln(1e4) * 2**-23 = 1.1e-6 relative.
FREQ_RTOL = 1.5e-6


@pytest.mark.parametrize("dim", [18, 32, 48, 64, 2048, 4096])  # dim % 6 = 0, 2, 0, 4, 2, 4
def test_rope_tables_match_diffusers(dim):
    """Equal to rounding where diffusers' float32 exponents ``linspace(0, 1, n)`` are the exact ones;
    elsewhere torch's vectorised CPU ``linspace`` rounds some exponents one ulp differently (its CUDA
    kernel, like ours, does not), so an angle may differ by that rounding of its frequency, and no more."""
    grid = (7, 8, 12)
    cos, sin = LTXVideoRotaryPosEmbed(dim)(torch.zeros(1, 1, dim), *grid, SCALE_25FPS)
    rope = LTXRotaryPosEmbed(dim)
    got_cos, got_sin = (np.repeat(np.asarray(a)[0], 2, axis=-1) for a in rope(grid, SCALE_25FPS))  # per channel
    positions = rope.grid_positions(grid, SCALE_25FPS)  # (L, 3)
    angle_bound = np.abs(2 * positions[:, None, :] - 1) * rope.freqs[None, :, None] * FREQ_RTOL  # (L, n, 3)
    pad = dim % 6
    bound = np.concatenate(
        [np.zeros((len(positions), pad)), np.repeat(angle_bound.reshape(len(positions), -1), 2, axis=-1)], axis=-1
    )
    assert np.all(np.abs(got_cos - cos[0].numpy()) <= bound + 1e-6)
    assert np.all(np.abs(got_sin - sin[0].numpy()) <= bound + 1e-6)
    assert np.all(got_cos[:, :pad] == 1) and np.all(got_sin[:, :pad] == 0)
    if dim <= 48:  # torch's exponents are the exact ones here
        assert np.abs(got_cos - cos[0].numpy()).max() < 1e-6 and np.abs(got_sin - sin[0].numpy()).max() < 1e-6


def test_rope_frequencies_are_float32_powers():
    for dim in (32, 2048, 4096):
        n = dim // 6
        exact = 10000.0 ** (np.arange(n) / (n - 1)) * np.pi / 2
        np.testing.assert_allclose(rope_frequencies(dim), exact, rtol=FREQ_RTOL)


def test_video_coords_match_the_condition_pipeline():
    ids = LTXConditionPipeline._prepare_video_ids(2, 4, 3, 5)
    for frame_index in (0, 16):
        want = LTXConditionPipeline._scale_video_ids(ids, 32, 8, frame_index=frame_index).float()
        want[:, 0] = want[:, 0] * (1.0 / 24)
        got = pixel_coords(4, 3, 5, frame_rate=24, frame_index=frame_index)
        np.testing.assert_array_equal(got, want[0].T.numpy())


@pytest.mark.parametrize("patch_size, patch_size_t", [(1, 1), (2, 1), (2, 2)])
def test_pack_and_unpack_follow_diffusers(patch_size, patch_size_t):
    latents = torch.randn(2, 5, 4, 6, 8)  # (B, C, F, H, W)
    want = LTXPipeline._pack_latents(latents, patch_size, patch_size_t)
    ours = pack_latents(to_mx(latents.permute(0, 2, 3, 4, 1).contiguous()), patch_size, patch_size_t)
    np.testing.assert_array_equal(np.asarray(ours), want.numpy())
    grid = (4 // patch_size_t, 6 // patch_size, 8 // patch_size)
    back = unpack_latents(ours, grid, patch_size, patch_size_t)
    np.testing.assert_array_equal(np.asarray(back), latents.permute(0, 2, 3, 4, 1).numpy())


# --- configs and weights ----------------------------------------------------------------------------------


def test_config_defaults_are_diffusers():
    defaults = {
        name: p.default
        for name, p in inspect.signature(RefTransformer.__init__).parameters.items()
        if name != "self"
    }
    config = config_from_dict(LTXTransformerConfig, {"_class_name": "LTXVideoTransformer3DModel"})
    assert {name: getattr(config, name) for name in defaults} == defaults
    assert (config.inner_dim, config.ffn_dim, config.num_layers) == (2048, 8192, 28)
    big = config_from_dict(LTXTransformerConfig, LTX_13B)
    assert (big.inner_dim, big.ffn_dim, big.cross_attention_dim, big.num_layers) == (4096, 16384, 4096, 48)
    with pytest.raises(WeightLoadError, match="qk_norm"):
        config_from_dict(LTXTransformerConfig, {"qk_norm": "rms_norm"})


def original_checkpoint(ref) -> dict[str, torch.Tensor]:
    """A Lightricks-layout single file: the transformer under ``model.diffusion_model.`` plus VAE tensors."""
    original = to_original_layout(ref.state_dict())
    original["vae.encoder.conv_in.conv.weight"] = torch.zeros(2, 3, 3, 3, 3)
    original["vae.per_channel_statistics.mean-of-means"] = torch.zeros(2)
    return original


def test_original_layout_maps_as_diffusers_converts(tiny):
    ref, _, _ = tiny
    original = original_checkpoint(ref)
    want = convert_ltx_transformer_checkpoint_to_diffusers(dict(original))
    parts = split_single_file({k: to_mx(v) for k, v in original.items()})
    assert sorted(parts["vae"]) == ["encoder.conv_in.conv.weight", "per_channel_statistics.mean-of-means"]
    mapped = ORIGINAL_MAP.apply(parts["transformer"])
    assert sorted(mapped) == sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(np.asarray(mapped[key]), value.numpy())
    model = LTXVideoTransformer3DModel(LTXTransformerConfig(**TINY))
    load_strict(model, mapped, dtype=mx.float32)
    # the file's transformer keys may also come without the prefix
    bare = {k.removeprefix(ORIGINAL_PREFIX): to_mx(v) for k, v in original.items()}
    assert sorted(split_single_file(bare)["transformer"]) == sorted(parts["transformer"])


def test_original_layout_unknown_and_missing_tensors_are_named(tiny):
    ref, _, _ = tiny
    original = {k: to_mx(v) for k, v in original_checkpoint(ref).items()}
    stray = {**original, "text_encoder.shared.weight": mx.zeros((2, 2))}
    with pytest.raises(WeightLoadError, match=r"text_encoder\.shared\.weight"):
        split_single_file(stray)
    transformer = split_single_file(original)["transformer"]
    with pytest.raises(WeightLoadError, match=r"transformer_blocks\.0\.attn1\.to_x\.weight"):
        ORIGINAL_MAP.apply({**transformer, "transformer_blocks.0.attn1.to_x.weight": mx.zeros((2,))})
    with pytest.raises(WeightLoadError, match=r"proj_in\.weight"):  # diffusers' name is not the original's
        ORIGINAL_MAP.apply({**transformer, "proj_in.weight": mx.zeros((2,))})
    del transformer["transformer_blocks.1.attn2.k_norm.weight"]
    with pytest.raises(WeightLoadError, match=r"missing 1 tensor \(transformer_blocks\.1\.attn2\.norm_k\.weight\)"):
        model = LTXVideoTransformer3DModel(LTXTransformerConfig(**TINY))
        load_strict(model, ORIGINAL_MAP.apply(transformer), dtype=mx.float32)


def test_diffusers_checkpoint_extra_tensor_is_named(tiny, tmp_path):
    ref, _, _ = tiny
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    state["transformer_blocks.0.attn1.norm_added_q.weight"] = torch.ones(32)
    RefTransformer(**TINY).save_pretrained(tmp_path)
    from safetensors.torch import save_file

    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightLoadError, match=r"unexpected 1 tensor \(transformer_blocks\.0\.attn1\.norm_added_q"):
        load_ltx_transformer(tmp_path, mx.float32)


# --- quantization -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits, tol", [(8, 0.01), (4, 0.1)])  # measured 1.4e-3 and 3.6e-2
def test_quantized_load_runs_close_to_float(tiny, bits, tol):
    ref, model, folder = tiny
    quantized = load_ltx_transformer(folder, mx.float32, quantize=Quantization(bits, 32))
    blocks = [f"transformer_blocks.{i}" for i in range(TINY["num_layers"])]
    want = {f"{b}.{layer}" for b in blocks for layer in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
            "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")}  # fmt: skip
    # the time MLP (256 and 32 inputs), its projection and caption_projection.linear_2 (32 inputs);
    # caption_projection.linear_1 has 24 inputs, not a multiple of the group size
    want |= {"time_embed.emb.timestep_embedder.linear_1", "time_embed.emb.timestep_embedder.linear_2",
             "time_embed.linear", "caption_projection.linear_2"}  # fmt: skip
    assert set(quantized_layer_paths(quantized)) == want
    assert isinstance(quantized.proj_in, nn.Linear) and isinstance(quantized.proj_out, nn.Linear)
    x, text, mask = inputs(2, 72, 10, seed=8)
    t = mx.array([900.0, 100.0])
    args = (to_mx(x), t, to_mx(text), to_mx(mask))
    kwargs = dict(**GRID_KW, rope_interpolation_scale=SCALE_25FPS)
    exact = np.asarray(model(*args, **kwargs))
    approx = np.asarray(quantized(*args, **kwargs))
    err = np.abs(approx - exact).max() / np.abs(exact).max()
    assert 0 < err < tol


def test_quantized_mlx_layout_reloads_identically(tiny, tmp_path):
    """What ``mlx-i2v convert --quantize`` writes (MLX names, quantized) loads back bit for bit."""
    from mlx_i2v.convert.writer import save_component
    from mlx_i2v.weights import read_config

    _, _, folder = tiny
    quantized = load_ltx_transformer(folder, mx.float32, quantize=Quantization(4, 32))
    save_component(quantized, tmp_path, read_config(folder))
    again = load_ltx_transformer(tmp_path, mx.float32)
    x, text, mask = inputs(1, 72, 10, seed=9)
    args = (to_mx(x), mx.array([500.0]), to_mx(text), to_mx(mask))
    kwargs = dict(**GRID_KW, rope_interpolation_scale=SCALE_25FPS)
    np.testing.assert_array_equal(np.asarray(again(*args, **kwargs)), np.asarray(quantized(*args, **kwargs)))


def test_bfloat16_runs_close_to_float32(tiny):
    _, model, folder = tiny
    half = load_ltx_transformer(folder, mx.bfloat16)
    x, text, mask = inputs(2, 72, 10, seed=10)
    t = torch.zeros(2, 72)
    t[1] = 500.0
    args = (to_mx(x), to_mx(t), to_mx(text), to_mx(mask))
    kwargs = dict(**GRID_KW, rope_interpolation_scale=SCALE_25FPS)
    got = half(*args, **kwargs)
    assert got.dtype == mx.bfloat16
    exact = np.asarray(model(*args, **kwargs))
    assert np.abs(np.asarray(got.astype(mx.float32)) - exact).max() < 3e-2 * np.abs(exact).max()


def test_quantize_transformer_accepts_ltx():
    model = LTXVideoTransformer3DModel(LTXTransformerConfig(**TINY))
    chosen = quantize_transformer(model, 8, group_size=32)
    assert "transformer_blocks.1.ff.net.2" in chosen and model.transformer_blocks[1].ff.net[2].bits == 8


# --- FLOPs --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [{}, LTX_13B], ids=["2B", "13B"])
def test_flops_equal_torch_flop_counter(config):
    """FlopCounterMode on diffusers' model at the real widths (meta tensors, two blocks; the count is
    linear in blocks) with SDPA as explicit matmuls. It also counts what runs once per generation or per
    distinct timestep here (caption projection, time MLP), added to ours for the comparison."""
    config = {**config, "num_layers": 2}
    with torch.device("meta"):
        ref = RefTransformer(**config)
        x, text = torch.empty(1, 480, 128), torch.empty(1, 128, 4096)
        mask, t = torch.ones(1, 128), torch.tensor([500.0])
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH), FlopCounterMode(display=False) as count:
        ref(hidden_states=x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask,
            num_frames=3, height=10, width=16, rope_interpolation_scale=SCALE_25FPS)  # fmt: skip
    shape = ltx_shape(config, context_tokens=128)
    d = shape.dim
    time_mlp = 2 * (256 * d + d * d + d * 6 * d)
    assert forward_flops(shape, 480) + context_flops(shape, text_tokens=128) + time_mlp == count.get_total_flops()


def test_flops_at_the_multiscale_sizes_of_the_reference_table():
    """ltx.md section 5 (FakeTensorMode counts): 2B 8.1 / 44.1 and 13B 51.4 / 245.3 TFLOP per forward for
    the two passes of the 0.9.8 multi-scale pipeline towards 768x512x97 (first pass at 2/3 size, 512x320;
    second after the x2 latent upsampler, 1024x640), with LTXConditionPipeline's 256 caption tokens."""
    assert ltx_video_tokens(512, 768, 97) == 4992
    for config, first, second in (({}, 8.1, 44.1), (LTX_13B, 51.4, 245.3)):
        shape = ltx_shape(config, context_tokens=256)
        for size, table in (((320, 512), first), ((640, 1024), second)):
            tokens = ltx_video_tokens(*size, 97)
            tflop = (forward_flops(shape, tokens) + context_flops(shape, text_tokens=256)) / 1e12
            assert tflop == pytest.approx(table, rel=0.01)
