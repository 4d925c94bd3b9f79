"""MLX affine quantization of the transformer and UMT5: layer selection, size, output quality at real
widths, bit-identical save/reload, and errors. Quality thresholds are the measured values
(benchmarks/quantization_quality.py) with about a 2x margin; the weights are randomly initialised."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from ref_text import UMT5_XXL_1LAYER_CONFIG, build_text_encoder
from ref_transformer import TI2V_5B_1LAYER, TINY_COMMON, TINY_VARIANTS, build_transformer

from mlx_i2v.convert.writer import save_component
from mlx_i2v.errors import InvalidInputError, WeightLoadError
from mlx_i2v.models.umt5 import DIFFUSERS_MAP as UMT5_MAP
from mlx_i2v.models.umt5 import UMT5Config, UMT5Encoder
from mlx_i2v.models.wan.transformer import (
    KEEP_FLOAT32,
    WanTransformer3DModel,
    WanTransformerConfig,
    load_wan_transformer,
)
from mlx_i2v.quantize import (
    Quantization,
    QuantizationConfig,
    model_quantization,
    model_state,
    parameter_bytes,
    prepare_for_quantized_load,
    quantize_text_encoder,
    quantize_transformer,
    quantized_layer_paths,
    stored_quantization,
)
from mlx_i2v.weights import config_from_dict, load_strict, read_config, read_safetensors


def rel_err(got: mx.array, want: mx.array) -> float:
    """||got - want|| / ||want|| over all elements."""
    g, w = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(g - w) / np.linalg.norm(w))


def psnr(got: mx.array, want: mx.array) -> float:
    """20 log10(max |want| / rms(got - want))."""
    g, w = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return 20 * math.log10(np.abs(w).max() / np.sqrt(np.mean((g - w) ** 2)))


def tiny_i2v(num_layers: int = 2) -> WanTransformer3DModel:
    """The tiny Wan2.1-I2V transformer (dim 32, FFN 64, text 48, image 24): every kind of linear."""
    config = {**TINY_COMMON, **TINY_VARIANTS["i2v"], "num_layers": num_layers}
    return WanTransformer3DModel(config_from_dict(WanTransformerConfig, config))


def reload_quantized(folder: Path, dtype: mx.Dtype) -> WanTransformer3DModel:
    """What the transformer loader does with a folder whose config.json has a quantization entry."""
    raw = read_config(folder)
    model = WanTransformer3DModel(config_from_dict(WanTransformerConfig, raw))
    weights = read_safetensors(folder)
    prepare_for_quantized_load(model, stored_quantization(raw, what=folder.name), weights)
    load_strict(model, weights, dtype=dtype, keep_float32=KEEP_FLOAT32, what=folder.name)
    return model


def assert_identical(a: nn.Module, b: nn.Module) -> None:
    state_a, state_b = model_state(a), model_state(b)
    assert state_a.keys() == state_b.keys()
    for k, v in state_a.items():
        assert v.dtype == state_b[k].dtype, k
        assert mx.array_equal(v, state_b[k]).item(), k


BLOCK_LINEARS = [
    f"attn{a}.{name}" for a in (1, 2) for name in ("to_q", "to_k", "to_v", "to_out.0")
] + ["attn2.add_k_proj", "attn2.add_v_proj", "ffn.net.0.proj", "ffn.net.2"]


# --- which layers -----------------------------------------------------------------------------------


def test_selection_when_group_divides_widths():
    model = tiny_i2v()
    chosen = quantize_transformer(model, 4, group_size=32)
    want = {f"blocks.{i}.{name}" for i in (0, 1) for name in BLOCK_LINEARS} | {
        # embedders with 256 / 32 inputs; text_embedder.linear_1 (48) and the image MLP (24) stay float
        "condition_embedder.time_embedder.linear_1",
        "condition_embedder.time_embedder.linear_2",
        "condition_embedder.time_proj",
        "condition_embedder.text_embedder.linear_2",
    }
    assert set(chosen) == want and set(quantized_layer_paths(model)) == want
    embedder = model.condition_embedder
    assert isinstance(embedder.text_embedder.linear_1, nn.Linear)
    assert isinstance(embedder.image_embedder.ff.net[0].proj, nn.Linear)
    assert isinstance(model.blocks[1].attn2.add_v_proj, nn.QuantizedLinear)
    assert model.blocks[0].ffn.net[2].bits == 4 and model.blocks[0].ffn.net[2].group_size == 32
    # never quantized, whatever the group size
    assert isinstance(model.patch_embedding, nn.Conv3d) and isinstance(model.proj_out, nn.Linear)
    norms = [m for name, m in model.named_modules() if "norm" in name.rsplit(".", 1)[-1]]
    assert len(norms) == 2 * 8 + 3 and not any(isinstance(m, nn.QuantizedLinear) for m in norms)
    assert model.scale_shift_table.dtype == model.blocks[0].scale_shift_table.dtype == mx.float32
    assert model_quantization(model) == Quantization(4, 32)


def test_selection_when_group_does_not_divide_widths():
    """Group 64: only layers with 64 or 256 inputs can be quantized; the rest stay float."""
    model = tiny_i2v()
    chosen = quantize_transformer(model, 8, group_size=64)
    want = {"condition_embedder.time_embedder.linear_1", "blocks.0.ffn.net.2", "blocks.1.ffn.net.2"}
    assert set(chosen) == want
    assert isinstance(model.blocks[0].attn1.to_q, nn.Linear)


def test_text_encoder_selection():
    config = UMT5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
    model = UMT5Encoder(config)
    chosen = quantize_text_encoder(model)
    layers = [f"layer.0.SelfAttention.{n}" for n in "qkvo"] + [
        f"layer.1.DenseReluDense.{n}" for n in ("wi_0", "wi_1", "wo")
    ]
    assert set(chosen) == {"shared"} | {f"encoder.block.{i}.{n}" for i in (0, 1) for n in layers}
    assert isinstance(model.shared, nn.QuantizedEmbedding) and model.shared.bits == 8
    attention = model.encoder.block[0].layer[0].SelfAttention
    assert type(attention.relative_attention_bias) is nn.Embedding
    assert model(mx.array([[5, 6, 7]]), mx.array([[1, 1, 1]])).shape == (1, 3, 64)


# --- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bits,group_size", [(3, 64), (16, 64), (True, 64), ("4", 64), (4, 16), (4, 100), (8, 64.0)]
)
def test_bad_bits_or_group_size(bits, group_size):
    with pytest.raises(InvalidInputError, match="bits|group size"):
        quantize_transformer(tiny_i2v(1), bits, group_size)
    with pytest.raises(InvalidInputError):
        QuantizationConfig(bits, group_size)


def test_bad_text_encoder_bits():
    with pytest.raises(InvalidInputError, match="bits must be one of"):
        QuantizationConfig(4, text_encoder_bits=6)
    config = QuantizationConfig(4)
    assert config.transformer == Quantization(4, 64) and config.text_encoder == Quantization(8, 64)
    assert QuantizationConfig(8, 128, None).text_encoder is None
    assert QuantizationConfig.from_dict(config.to_dict()) == config


def test_quantizing_twice_is_an_error():
    model = tiny_i2v(1)
    quantize_transformer(model, 4, 32)
    with pytest.raises(InvalidInputError, match="already quantized"):
        quantize_transformer(model, 4, 32)
    with pytest.raises(TypeError, match="expected a UMT5Encoder"):
        quantize_text_encoder(tiny_i2v(1))


def test_stored_quantization_entry():
    entry = {"quantization": {"group_size": 64, "bits": 4, "mode": "affine"}}
    assert stored_quantization({"num_layers": 30}, what="transformer", requested_bits=4) is None
    assert stored_quantization(entry, what="transformer") == Quantization(4, 64)
    assert stored_quantization(entry, what="transformer", requested_bits=4) == Quantization(4, 64)
    with pytest.raises(InvalidInputError, match="transformer is already quantized to 4 bits.*quantize=4"):
        stored_quantization(entry, what="transformer", requested_bits=8)
    for bad in ({"bits": 3}, {"bits": 4, "mode": "mxfp4"}, {"group_size": 64}, [4]):
        with pytest.raises(WeightLoadError, match="transformer"):
            stored_quantization({"quantization": bad}, what="transformer")


def test_tiny_save_and_reload_follow_the_checkpoint(tmp_path):
    """Reload rebuilds exactly the saved layers (here group 32 on the tiny widths) and is bit-identical."""
    model = tiny_i2v()
    quantize_transformer(model, 8, group_size=32)
    config = {**TINY_COMMON, **TINY_VARIANTS["i2v"]}
    written = save_component(model, tmp_path / "q", config)
    assert [p.name for p in written] == ["model.safetensors", "config.json"]
    reloaded = reload_quantized(tmp_path / "q", mx.float32)
    assert quantized_layer_paths(reloaded) == quantized_layer_paths(model)
    assert_identical(model, reloaded)

    # a group size that cannot have produced these tensors
    saved = json.loads((tmp_path / "q" / "config.json").read_text())
    saved["quantization"]["group_size"] = 64
    (tmp_path / "q" / "config.json").write_text(json.dumps(saved))
    with pytest.raises(WeightLoadError, match="cannot have been quantized with group size 64"):
        reload_quantized(tmp_path / "q", mx.float32)


# --- real-width transformer ----------------------------------------------------------------------------

# Measured on this block and input (group 64): 8-bit 1.08e-3 relative error, 71.0 dB PSNR; 4-bit 2.08e-2,
# 45.3 dB. Limits: twice the error (6 dB).
QUALITY = {8: (2.2e-3, 65.0), 4: (4.2e-2, 39.3)}


@pytest.fixture(scope="module")
def ti2v_block(tmp_path_factory):
    """A one-block TI2V-5B-width checkpoint, a small input, and the float32 output on it."""
    folder = tmp_path_factory.mktemp("ti2v_5b_1layer")
    build_transformer(folder, TI2V_5B_1LAYER, seed=7)
    g = torch.Generator().manual_seed(4)
    x = mx.array(torch.randn(1, 2, 8, 4, 48, generator=g).numpy())  # (B, F, H, W, C): 16 tokens
    text = mx.array(torch.randn(1, 32, 4096, generator=g).numpy())
    t = mx.array([[0.0] * 8 + [875.0] * 8])  # TI2V: conditioning frame at t = 0
    inputs = (x, t, text)
    reference = load_wan_transformer(folder, mx.float32)(*inputs)
    mx.eval(reference)
    return folder, inputs, reference


def test_4bit_is_a_quarter_of_bfloat16(ti2v_block, tmp_path):
    folder, _, _ = ti2v_block
    model = load_wan_transformer(folder, mx.bfloat16)
    before = {k: v.nbytes for k, v in model_state(model).items()}
    total_before = parameter_bytes(model)
    chosen = quantize_transformer(model, 4)
    assert len(chosen) == 8 + 2 + 5  # block linears (no image branch), FFN, embedder linears
    after = model_state(model)
    layer_before = sum(n for k, n in before.items() if k.rsplit(".", 1)[0] in chosen)
    layer_after = sum(v.nbytes for k, v in after.items() if k.rsplit(".", 1)[0] in chosen)
    # 4 bits + a bf16 scale and bias per 64 weights = 4.5 bits per weight: 0.281 of bfloat16 (0.156 for
    # the float32 time MLP, whose scales stay float32); measured 0.272 over these layers
    assert layer_after / layer_before < 0.29
    # patch embedding, proj_out, norms and tables stay float: measured 0.275 on this block, 0.281 on the
    # full 30-block model (benchmarks/quantization_quality.py)
    assert parameter_bytes(model) / total_before < 0.3

    # bfloat16 save -> reload is bit-identical, dtypes included (the float32 islands stay float32)
    save_component(model, tmp_path / "q", read_config(folder), max_shard_bytes=40 * 2**20)
    assert len(list((tmp_path / "q").glob("model-*-of-*.safetensors"))) > 1
    reloaded = reload_quantized(tmp_path / "q", mx.bfloat16)
    assert reloaded.condition_embedder.time_embedder.linear_2.scales.dtype == mx.float32
    assert_identical(model, reloaded)


@pytest.mark.parametrize("bits", [8, 4])
def test_output_close_to_float(ti2v_block, tmp_path, bits):
    folder, inputs, reference = ti2v_block
    model = load_wan_transformer(folder, mx.float32)
    quantize_transformer(model, bits)
    out = model(*inputs)
    max_rel, min_psnr = QUALITY[bits]
    assert rel_err(out, reference) < max_rel and psnr(out, reference) > min_psnr
    assert rel_err(out, reference) > max_rel / 100  # quantization did happen

    if bits == 4:
        save_component(model, tmp_path / "q", read_config(folder))
        saved = json.loads((tmp_path / "q" / "config.json").read_text())
        assert saved["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
        assert saved["num_layers"] == 1
        reloaded = reload_quantized(tmp_path / "q", mx.float32)
        assert_identical(model, reloaded)
        assert mx.array_equal(reloaded(*inputs), out).item()


# --- real-width UMT5 ------------------------------------------------------------------------------------


def test_umt5_8bit_embeddings():
    """One umt5-xxl-width layer (4096 / 64 heads / 10240) on a padded batch: measured 8-bit relative
    error 9.3e-3 (53.8 dB), worst per-token cosine similarity 0.99995."""
    ref_model = build_text_encoder(None, UMT5_XXL_1LAYER_CONFIG, seed=1)
    weights = UMT5_MAP.apply({k: mx.array(v.numpy()) for k, v in ref_model.state_dict().items()})
    del ref_model
    config = config_from_dict(UMT5Config, UMT5_XXL_1LAYER_CONFIG)
    model = UMT5Encoder(config)
    load_strict(model, weights, dtype=mx.float32, what="text_encoder")
    g = torch.Generator().manual_seed(0)
    ids = mx.array(torch.randint(3, 512, (2, 12), generator=g).numpy())
    mask = np.ones((2, 12), np.int32)
    mask[1, 8:] = 0
    reference = model(ids, mx.array(mask))

    assert len(quantize_text_encoder(model)) == 1 + 7
    out = model(ids, mx.array(mask))
    real = mask > 0
    q, f = np.asarray(out, np.float64)[real], np.asarray(reference, np.float64)[real]
    cosine = (q * f).sum(-1) / (np.linalg.norm(q, axis=-1) * np.linalg.norm(f, axis=-1))
    assert 1e-4 < rel_err(out, reference) < 1.9e-2
    assert cosine.min() > 0.9998
