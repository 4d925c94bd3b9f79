"""LoRAs on the LTX-Video transformer, against diffusers' ``LTXPipeline.load_lora_weights`` (PEFT): the
merged weights must equal diffusers' fused ones.

diffusers reads two LTX-Video styles (``LTXVideoLoraLoaderMixin.lora_state_dict``): diffusers/PEFT files
(``transformer.`` + ``lora_A``/``lora_B``, as ``LTXPipeline.save_lora_weights`` writes them, alpha in the
metadata) and the original/ComfyUI style under ``diffusion_model.``, which it re-prefixes without renaming
(``_convert_non_diffusers_ltxv_lora_to_diffusers``). Block linears are named alike in both namings, so such
files load as they are; LTX's original-only module names (``patchify_proj``, ``adaln_single``) match no
diffusers module there. We map them through the transformer's ``ORIGINAL_MAP``, so for those the reference
is diffusers loading the same factors under diffusers' names.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel
from mlx.utils import tree_flatten
from ref_lora import factors, linear_modules, save
from ref_ltx_convert import TINY_TRANSFORMER
from ref_ltx_transformer import build_transformer
from safetensors.torch import load_file

from mlx_i2v.convert import convert_model
from mlx_i2v.errors import InvalidInputError
from mlx_i2v.lora import LoRA, read_lora
from mlx_i2v.lora.apply import lora_layers
from mlx_i2v.lora.info import lora_info
from mlx_i2v.lora.manager import TransformerLoras
from mlx_i2v.models.ltx.transformer import load_ltx_transformer
from mlx_i2v.weights import read_config

BLOCK_LINEARS = r"transformer_blocks\.\d+\.(attn[12]\.(to_[qkv]|to_out\.0)|ff\.net\.(0\.proj|2))"
TOP_LINEARS = (
    r"proj_in|proj_out|time_embed\.(linear|emb\.timestep_embedder\.linear_[12])|caption_projection\.linear_[12]"
)
# diffusers' names -> LTX's original ones (the inverse of the transformer's ORIGINAL_MAP renames)
ORIGINAL_NAMES = (("proj_in", "patchify_proj"), ("time_embed", "adaln_single"))


@pytest.fixture(scope="module")
def transformer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ltx") / "transformer"
    build_transformer(folder, TINY_TRANSFORMER)
    return folder


def _state(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "diffusion_pytorch_model.safetensors")


def _layers(state, pattern: str, seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for module, shape in linear_modules(state, pattern).items():
        layers[f"{module}.lora_A.weight"], layers[f"{module}.lora_B.weight"] = factors(shape, rank, gen)
    return layers


def peft_file(path: Path, layers: dict[str, torch.Tensor], alpha: float, rank: int = 4) -> Path:
    """A diffusers/PEFT LoRA written by ``LTXPipeline.save_lora_weights`` with its adapter metadata."""
    metadata = {"r": rank, "lora_alpha": alpha, "target_modules": sorted({k.rsplit(".lora_", 1)[0] for k in layers})}
    LTXPipeline.save_lora_weights(path.parent, transformer_lora_layers=layers, weight_name=path.name,
                                  transformer_lora_adapter_metadata=metadata)  # fmt: skip
    return path


def original_file(path: Path, layers: dict[str, torch.Tensor]) -> Path:
    """The same factors in the original/ComfyUI style: ``diffusion_model.`` + LTX's original module names."""
    def original(key: str) -> str:
        for diffusers_name, original_name in ORIGINAL_NAMES:
            key = re.sub(rf"^{diffusers_name}\b", original_name, key)
        return "diffusion_model." + key

    return save(path, {original(k): v for k, v in layers.items()})


def diffusers_fused(folder: Path, lora: Path, strength: float) -> dict[str, np.ndarray]:
    """diffusers' transformer with ``lora`` loaded by ``LTXPipeline.load_lora_weights`` and fused at
    ``strength`` (PEFT's merge), then unloaded: the merged weights under their own names."""
    transformer = LTXVideoTransformer3DModel.from_pretrained(folder).eval()
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                       transformer=transformer)  # fmt: skip
    pipe.load_lora_weights(str(lora), adapter_name="lora")
    pipe.fuse_lora(components=["transformer"], lora_scale=strength)
    pipe.unload_lora_weights()
    return {k: v.detach().numpy() for k, v in pipe.transformer.state_dict().items()}


def ours(folder: Path, lora: Path, strength: float, policy: str = "full") -> dict[str, np.ndarray]:
    model = load_ltx_transformer(folder, mx.float32)
    loras = TransformerLoras([read_config(folder)], mx.float32, [folder])
    loras.set([LoRA(lora, strength, policy=policy)], {0: model})
    return {k: np.asarray(v) for k, v in tree_flatten(model.parameters())}


def _assert_merged_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray], base: dict[str, torch.Tensor]):
    assert sorted(got) == sorted(want)
    changed = 0
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
        changed += not np.allclose(v, base[k].numpy(), atol=1e-4)
    assert changed >= 10  # the LoRA changed many weights, far beyond the tolerance


def test_peft_lora_merges_as_diffusers(transformer_dir, tmp_path):
    state = _state(transformer_dir)
    lora = peft_file(tmp_path / "peft.safetensors", _layers(state, BLOCK_LINEARS + "|" + TOP_LINEARS, 0), 6.0)
    assert read_lora(lora).style.peft_metadata
    _assert_merged_equal(ours(transformer_dir, lora, 0.7), diffusers_fused(transformer_dir, lora, 0.7), state)


def test_original_block_lora_loads_as_diffusers_loads_it(transformer_dir, tmp_path):
    """A ``diffusion_model.`` file of block linears: diffusers reads it as it is."""
    state = _state(transformer_dir)
    lora = original_file(tmp_path / "comfy.safetensors", _layers(state, BLOCK_LINEARS, 1))
    _assert_merged_equal(ours(transformer_dir, lora, -0.6), diffusers_fused(transformer_dir, lora, -0.6), state)


def test_original_module_names_map_through_the_original_map(transformer_dir, tmp_path):
    """``patchify_proj`` and ``adaln_single`` factors land on ``proj_in`` and ``time_embed``: the same
    merge as diffusers loading the factors under its own names."""
    state = _state(transformer_dir)
    layers = _layers(state, BLOCK_LINEARS + "|" + TOP_LINEARS, 2)
    original = original_file(tmp_path / "original.safetensors", layers)
    assert any(k.startswith("diffusion_model.patchify_proj.") for k in load_file(original))
    assert read_lora(original).style.naming == "original"
    renamed = save(tmp_path / "renamed.safetensors", {f"transformer.{k}": v for k, v in layers.items()})
    _assert_merged_equal(ours(transformer_dir, original, 1.2), diffusers_fused(transformer_dir, renamed, 1.2), state)
    info = lora_info(original)
    assert {"layers": "transformer_blocks.N.attn1.to_q.weight", "count": 2, "kind": "low-rank"} in info["targets"]


def test_diffusers_policy_drops_what_diffusers_drops(transformer_dir, tmp_path):
    """Under the "diffusers" policy an original-style file loses its ``patchify_proj`` / ``adaln_single``
    factors, as in diffusers, and the rest merges as diffusers merges it."""
    state = _state(transformer_dir)
    original = original_file(tmp_path / "original.safetensors", _layers(state, BLOCK_LINEARS + "|" + TOP_LINEARS, 4))
    got = ours(transformer_dir, original, 0.9, policy="diffusers")
    _assert_merged_equal(got, diffusers_fused(transformer_dir, original, 0.9), state)
    assert np.array_equal(got["proj_in.weight"], state["proj_in.weight"].numpy())
    assert not np.array_equal(got["proj_out.weight"], state["proj_out.weight"].numpy())


def test_lora_baked_by_convert_equals_run_time_loading(transformer_dir, tmp_path):
    from ref_ltx_convert import build_ltx_dir

    source = build_ltx_dir(tmp_path / "ltx", "0.9.5")
    lora = peft_file(tmp_path / "peft.safetensors", _layers(_state(source / "transformer"), BLOCK_LINEARS, 3), 4.0)
    out = convert_model(source, tmp_path / "mlx", dtype="float32", loras=[(lora, 0.5)])
    baked = load_ltx_transformer(out / "transformer", mx.float32)
    want = ours(source / "transformer", lora, 0.5)
    got = {k: np.asarray(v) for k, v in tree_flatten(baked.parameters())}
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
    assert read_config(out, "model_index.json")["_mlx_i2v"]["loras"][0]["baked"] == "merged"
    on_model = lora_info(lora, source)["model"]["transformer"]  # what it would do to the source model
    assert (on_model["applied"], on_model["ignored"]) == (len(load_file(lora)), 0)


def test_quantized_conversion_keeps_factors_and_equals_run_time(tmp_path):
    """``convert --quantize --lora``: the quantized linears keep the factors beside them; loading the result
    (factors applied from ``loras/factors.safetensors``) equals quantizing the source and applying the LoRA
    at run time, parameter for parameter."""
    from ref_ltx_convert import build_ltx_dir

    from mlx_i2v.quantize import Quantization

    source = build_ltx_dir(tmp_path / "ltx", "0.9.5")
    folder = source / "transformer"
    lora = peft_file(tmp_path / "peft.safetensors", _layers(_state(folder), BLOCK_LINEARS + "|" + TOP_LINEARS, 5), 4.0)
    out = convert_model(source, tmp_path / "mlx", dtype="float32", quantize=8, group_size=32, loras=[(lora, 0.8)])
    assert (out / "transformer" / "loras" / "factors.safetensors").is_file()
    baked = load_ltx_transformer(out / "transformer", mx.float32)
    TransformerLoras([read_config(out / "transformer")], mx.float32, [out / "transformer"]).apply(0, baked)
    runtime = load_ltx_transformer(folder, mx.float32, quantize=Quantization(8, 32))
    loras = TransformerLoras([read_config(folder)], mx.float32, [folder])
    loras.set([LoRA(lora, 0.8)], {0: runtime})
    assert loras.factor_bytes(mx.float32, 32) > 0
    got, want = dict(tree_flatten(baked.parameters())), dict(tree_flatten(runtime.parameters()))
    assert sorted(got) == sorted(want) and any(k.endswith(".loras.0.down") for k in want)  # factors kept
    assert all(mx.array_equal(got[k], want[k]).item() for k in want)
    assert [m.scales for m in lora_layers(baked).values()] == [m.scales for m in lora_layers(runtime).values()]


def test_wan_lora_on_ltx_is_refused(transformer_dir, tmp_path):
    wan = save(tmp_path / "wan.safetensors", {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 32),
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(32, 4),
    })  # fmt: skip
    with pytest.raises(InvalidInputError, match="blocks.0.self_attn.q"):
        TransformerLoras([read_config(transformer_dir)]).validate([LoRA(wan)])


def test_pipeline_with_a_lora_equals_the_baked_conversion_and_set_loras_restores(tmp_path):
    """A LoRA given to ``load_pipeline`` on an LTX-Video model gives the frames of the same LoRA baked in
    by ``convert --lora`` (held against diffusers' fused weights above); ``set_loras([])`` gives the base
    model's frames back exactly."""
    from PIL import Image
    from ref_ltx_convert import build_ltx_dir

    from mlx_i2v import load_pipeline

    source = build_ltx_dir(tmp_path / "ltx", "0.9.5")
    lora = peft_file(tmp_path / "peft.safetensors", _layers(_state(source / "transformer"), BLOCK_LINEARS, 5), 4.0)
    baked = convert_model(source, tmp_path / "mlx", dtype="float32", loras=[(lora, 0.7)])
    photo = Image.fromarray((np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8))
    call = dict(height=64, width=96, num_frames=9, num_inference_steps=2, seed=1)

    pipe = load_pipeline(source, dtype="float32", loras=[(lora, 0.7)])
    with_lora = np.asarray(pipe(photo, "a fox", **call).frames, np.float32)
    want = np.asarray(load_pipeline(baked, dtype="float32")(photo, "a fox", **call).frames, np.float32)
    assert np.abs(with_lora - want).max() < 1e-5
    pipe.set_loras([])
    base = np.asarray(pipe(photo, "a fox", **call).frames, np.float32)
    np.testing.assert_array_equal(base, np.asarray(load_pipeline(source, dtype="float32")(photo, "a fox", **call).frames, np.float32))
    assert np.abs(base - with_lora).max() > 1e-3  # the LoRA changed the clip
