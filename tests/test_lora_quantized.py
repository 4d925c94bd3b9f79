"""LoRAs on 4- and 8-bit transformers (T3): the quantized weights are never touched, the LoRA part is exact
(the output equals ``x @ (dequantize(W) + delta)^T``), memory grows by the factors only, and taking the
LoRAs off restores the original modules and parameters bit for bit."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten, tree_unflatten
from ref_lora import BLOCK_LINEARS, TOP_LINEARS, lightx2v_lora, peft_lora, save
from safetensors.torch import load_file

from mlx_i2v import load_pipeline
from mlx_i2v.lora import LoRALinear, LowRank, read_lora, resolve, transformer_shapes
from mlx_i2v.lora.apply import apply_loras
from mlx_i2v.models.wan.transformer import WanTransformerConfig, load_wan_transformer
from mlx_i2v.quantize import Quantization, QuantizationConfig, parameter_bytes
from mlx_i2v.weights import config_from_dict, read_config

GROUP = 32  # the tiny model's widths (32, 64, 256) are multiples of 32; its text projection (48) stays float


@pytest.fixture(scope="module")
def loras(tiny_ti2v_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("qloras")
    state = load_file(tiny_ti2v_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    peft = peft_lora(state, d / "peft.safetensors", lora_bias=True, pattern=BLOCK_LINEARS + "|" + TOP_LINEARS)
    lx = lightx2v_lora(state, d / "lx.safetensors")
    # a full .diff on a (quantized) block linear: applied as an exact dense residual
    dense = save(d / "dense.safetensors", {"diffusion_model.blocks.0.self_attn.q.diff": 0.05 * torch.randn(32, 32)})
    return [(peft, 0.8), (lx, -0.6), (dense, 1.5)]


def _resolved(tiny_ti2v_dir, loras):
    shapes = transformer_shapes(config_from_dict(WanTransformerConfig, read_config(tiny_ti2v_dir / "transformer")))
    return [(resolve(read_lora(path), shapes), strength) for path, strength in loras]


def _deltas(resolved) -> dict[str, np.ndarray]:
    """Sum of strength * delta per target parameter, in float64."""
    out: dict[str, np.ndarray] = {}
    for r, strength in resolved:
        for d in r.deltas:
            if isinstance(d, LowRank):
                value = d.scale * np.array(d.up, np.float64) @ np.array(d.down, np.float64)
            else:
                value = np.array(d.tensor, np.float64)
            out[d.target] = out.get(d.target, 0) + strength * value
    return out


@pytest.mark.parametrize("bits", [4, 8])
def test_lora_part_is_exact_and_weights_untouched(bits, tiny_ti2v_dir, loras):
    folder = tiny_ti2v_dir / "transformer"
    model = load_wan_transformer(folder, mx.float32, quantize=Quantization(bits, GROUP))
    reference = load_wan_transformer(folder, mx.float32, quantize=Quantization(bits, GROUP))
    quantized = {p: m for p, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)}
    before = parameter_bytes(model)
    resolved = _resolved(tiny_ti2v_dir, loras)
    apply_loras(model, resolved)
    deltas = _deltas(resolved)

    layers = {p: m for p, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert set(layers) == {p for p in quantized if f"{p}.weight" in deltas}
    assert len(layers) > 20
    assert [sorted(f) for f in layers["blocks.0.attn1.to_q"].loras] == [["down", "up"], ["down", "up"], ["dense"]]
    x = mx.random.normal((2, 7, 256), key=mx.random.key(1))
    factor_bytes = 0
    for path, layer in layers.items():
        assert layer.base is quantized[path]  # the same module, its packed weights untouched
        ref = dict(reference.named_modules())[path]
        assert layer.base.weight.dtype == mx.uint32 and mx.array_equal(layer.base.weight, ref.weight).item()
        inp = x[..., : ref.weight.shape[1] * 32 // bits]
        w = np.array(mx.dequantize(ref.weight, ref.scales, ref.biases, GROUP, bits), np.float64) + deltas[f"{path}.weight"]
        bias = np.array(ref.bias, np.float64) + deltas.get(f"{path}.bias", 0)
        want = np.array(inp, np.float64) @ w.T + bias
        got = np.array(layer(inp), np.float64)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-6, path
        factor_bytes += sum(v.nbytes for _, v in tree_flatten(layer.loras))
    # memory: the quantized model plus the factors, nothing dequantized
    assert parameter_bytes(model) == before + factor_bytes
    assert not any(isinstance(m, nn.Linear) and p in quantized for p, m in model.named_modules())


@pytest.mark.parametrize("bits", [4, 8])
def test_whole_model_equals_dequantized_base_plus_delta(bits, tiny_ti2v_dir, loras):
    folder = tiny_ti2v_dir / "transformer"
    resolved = _resolved(tiny_ti2v_dir, loras)
    model = load_wan_transformer(folder, mx.float32, quantize=Quantization(bits, GROUP))
    apply_loras(model, resolved)
    dense = load_wan_transformer(folder, mx.float32, quantize=Quantization(bits, GROUP))
    linears = [(p, nn.Linear(m.weight.shape[1] * 32 // bits, m.weight.shape[0])) for p, m in dense.named_modules()
               if isinstance(m, nn.QuantizedLinear)]  # fmt: skip
    for (path, linear), m in zip(linears, (dict(dense.named_modules())[p] for p, _ in linears)):
        linear.weight = mx.dequantize(m.weight, m.scales, m.biases, GROUP, bits)
        linear.bias = m.bias
    dense.update_modules(tree_unflatten(linears))
    apply_loras(dense, resolved)  # float now: every delta merged

    latents = mx.random.normal((1, 2, 4, 6, 48), key=mx.random.key(2))
    text = mx.random.normal((1, 12, 48), key=mx.random.key(3))
    got, want = model(latents, mx.array([700.0]), text), dense(latents, mx.array([700.0]), text)
    assert float(mx.abs(got - want).max() / mx.abs(want).max()) < 1e-5


def test_set_loras_on_a_quantized_pipeline_restores_the_original_modules(tiny_ti2v_dir, loras):
    pipe = load_pipeline(tiny_ti2v_dir, dtype="float32", quantize=QuantizationConfig(4, GROUP), keep_resident=True)
    model = pipe.experts.get(0)
    modules = {p: m for p, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)}
    params = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    pipe.set_loras(loras)
    assert len([m for _, m in model.named_modules() if isinstance(m, LoRALinear)]) > 20
    pipe.set_loras([loras[1]])
    pipe.set_loras([])
    assert {p: m for p, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)} == modules
    assert all(dict(model.named_modules())[p] is m for p, m in modules.items())
    for k, v in tree_flatten(model.parameters()):
        np.testing.assert_array_equal(np.array(v), params[k], err_msg=k)


def test_factors_take_each_layers_compute_dtype(tiny_ti2v_dir, loras):
    """bfloat16 factors on a bfloat16 model, float32 ones on its float32 time MLP (the reference's island)."""
    model = load_wan_transformer(tiny_ti2v_dir / "transformer", mx.bfloat16, quantize=Quantization(4, GROUP))
    apply_loras(model, _resolved(tiny_ti2v_dir, loras[:1]))
    dtypes = {p: {v.dtype for f in m.loras for v in f.values()} for p, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert dtypes["blocks.0.attn1.to_q"] == {mx.bfloat16} and dtypes["blocks.1.ffn.net.2"] == {mx.bfloat16}
    assert dtypes["condition_embedder.time_embedder.linear_1"] == {mx.float32}


def test_planner_counts_the_factors_kept_beside_quantized_weights(tiny_ti2v_dir, loras):
    """The factors a quantized model keeps are what ``factor_bytes`` says, and the plan's transformer
    weights grow by exactly that; a float model merges its LoRAs and its plan does not change."""
    from mlx_i2v.lora.manager import TransformerLoras
    from mlx_i2v.planner import GROUP_SIZE

    model = load_wan_transformer(tiny_ti2v_dir / "transformer", mx.float32, quantize=Quantization(4, GROUP))
    apply_loras(model, _resolved(tiny_ti2v_dir, loras))
    kept = sum(v.nbytes for _, m in model.named_modules() if isinstance(m, LoRALinear) for f in m.loras for v in f.values())
    manager = TransformerLoras([read_config(tiny_ti2v_dir / "transformer")])
    manager.active = manager.validate(loras)
    assert manager.factor_bytes(mx.float32, GROUP) == kept > 0

    request = dict(height=64, width=96, num_frames=5)
    for quantize, grows in ((QuantizationConfig(4, GROUP), True), (None, False)):
        pipe = load_pipeline(tiny_ti2v_dir, dtype="float32", quantize=quantize)
        before = pipe.plan(**request).stage("denoise").weights
        pipe.set_loras(loras)
        after = pipe.plan(**request).stage("denoise").weights
        expected = pipe.loras.factor_bytes(mx.float32, GROUP_SIZE) if grows else 0
        assert after - before == expected and (expected > 0) == grows
