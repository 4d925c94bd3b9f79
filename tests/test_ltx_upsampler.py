"""Parity of the MLX LTX latent upsampler and the upsample pipeline's latent filters with diffusers 0.42.1."""

from __future__ import annotations

import inspect

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import LTXLatentUpsamplePipeline
from diffusers.pipelines.ltx.modeling_latent_upsampler import LTXLatentUpsamplerModel as RefUpsampler
from ref_ltx_upsampler import build_upsampler

from mlx_i2v.errors import WeightLoadError
from mlx_i2v.models.ltx.latent_upsampler import (
    LTXLatentUpsamplerConfig,
    adain_filter_latent,
    load_ltx_latent_upsampler,
    tone_map_latents,
)
from mlx_i2v.weights import config_from_dict

TOL = 1e-5


def channels_last(t: torch.Tensor) -> mx.array:
    """(B, C, F, H, W) torch -> (B, F, H, W, C) mlx."""
    return mx.array(t.permute(0, 2, 3, 4, 1).contiguous().numpy())


def rel_err(ours: mx.array, ref: torch.Tensor) -> float:
    got = np.asarray(ours).transpose(0, 4, 1, 2, 3)
    want = ref.numpy()
    assert got.shape == want.shape
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("variant, out_shape", [
    ("spatial", (2, 8, 3, 12, 8)),
    ("temporal", (2, 8, 5, 6, 4)),
    ("spatiotemporal", (2, 8, 5, 12, 8)),
    ("spatial_2d", (2, 8, 3, 12, 8)),
])  # fmt: skip
def test_upsampler_matches_diffusers(tmp_path, variant, out_shape):
    ref = build_upsampler(tmp_path, variant)
    model = load_ltx_latent_upsampler(tmp_path, mx.float32)
    latents = torch.randn(2, 8, 3, 6, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(latents)
    assert tuple(want.shape) == out_shape
    assert rel_err(model(channels_last(latents)), want) < TOL


def test_config_defaults_are_diffusers_and_bad_kinds_are_refused():
    defaults = {n: p.default for n, p in inspect.signature(RefUpsampler.__init__).parameters.items() if n != "self"}
    config = config_from_dict(LTXLatentUpsamplerConfig, {"_class_name": "LTXLatentUpsamplerModel"})
    assert {n: getattr(config, n) for n in defaults} == defaults
    assert config.factors == (1, 2, 2)
    with pytest.raises(WeightLoadError, match="cannot upsample in time"):
        LTXLatentUpsamplerConfig(dims=2, temporal_upsample=True)
    with pytest.raises(WeightLoadError, match="neither"):
        LTXLatentUpsamplerConfig(spatial_upsample=False)


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    build_upsampler(tmp_path, "spatial")
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    del state["post_upsample_res_blocks.0.norm2.bias"]
    save_file(state, path)
    with pytest.raises(WeightLoadError, match=r"missing 1 tensor \(post_upsample_res_blocks\.0\.norm2\.bias\)"):
        load_ltx_latent_upsampler(tmp_path, mx.float32)


@pytest.mark.parametrize("factor", [1.0, 0.3, 0.7, -0.5])
def test_adain_filter_matches_diffusers(factor):
    g = torch.Generator().manual_seed(2)
    latents = 2 * torch.randn(2, 8, 5, 6, 4, generator=g) + 1
    reference = torch.randn(2, 8, 3, 3, 2, generator=g)
    # the pipeline method does not use ``self``
    want = LTXLatentUpsamplePipeline.adain_filter_latent(None, latents, reference, factor)
    got = adain_filter_latent(channels_last(latents), channels_last(reference), factor)
    assert rel_err(got, want) < TOL


@pytest.mark.parametrize("compression", [0.0, 0.6, 1.0])
def test_tone_map_matches_diffusers(compression):
    latents = 3 * torch.randn(2, 8, 3, 6, 4, generator=torch.Generator().manual_seed(3))
    want = LTXLatentUpsamplePipeline.tone_map_latents(None, latents, compression)
    got = tone_map_latents(channels_last(latents), compression)
    assert rel_err(got, want) < TOL
    if compression == 0.0:
        np.testing.assert_array_equal(np.asarray(got), np.asarray(channels_last(latents)))
