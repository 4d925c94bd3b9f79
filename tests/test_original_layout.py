"""Wan-AI ORIGINAL checkpoint layout: the ORIGINAL maps against the diffusers layout, float32, strict.

Every component is built tiny in both layouts from the same weights (``ref_original``). The original
checkpoint through its ORIGINAL map must give exactly the tensors (names, shapes, values) the diffusers
checkpoint gives through DIFFUSERS_MAP, and the models loaded from each must agree. The inverse renames
that write the original files are themselves checked against diffusers' single-file converters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel as TorchWanTransformer
from diffusers.loaders.single_file_utils import (
    convert_wan_transformer_to_diffusers,
    convert_wan_vae_to_diffusers,
)
from ref_original import (
    A14B_EXPERTS,
    CLIP_FILE,
    REPO_KINDS,
    T5_FILE,
    TEXT_TOWER_SHAPES,
    TOKENIZER_DIR,
    VAE_FILES,
    build_original_repo,
    write_comfyui_transformer,
)
from ref_transformer import TINY_IMAGE_TOKENS
from safetensors.torch import load_file

from mlx_i2v.errors import WeightLoadError
from mlx_i2v.models import umt5
from mlx_i2v.models.wan import clip
from mlx_i2v.models.wan import transformer as wan_transformer
from mlx_i2v.models.wan import vae as wan_vae
from mlx_i2v.models.tokenizer import UMT5Tokenizer
from mlx_i2v.pth import read_pth
from mlx_i2v.weights import config_from_dict, load_strict, read_config, read_safetensors

TOL = 1e-5  # max |a - b| / max |b|; the weights are identical, so this is really exact

# (repo kind, A14B expert subfolder or "") -> transformer checkpoints to check
TRANSFORMERS = [("ti2v", ""), ("i2v", ""), ("flf2v", ""), *(("a14b", e) for e in A14B_EXPERTS)]


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Path]]:
    """kind -> (original repo, diffusers reference), built on first use; the I2V DiT is sharded."""
    cache: dict[str, tuple[Path, Path]] = {}

    def get(kind: str) -> tuple[Path, Path]:
        if kind not in cache:
            base = tmp_path_factory.mktemp(kind)
            build_original_repo(base / "original", base / "diffusers", kind, shards=2 if kind == "i2v" else 1)
            cache[kind] = (base / "original", base / "diffusers")
        return cache[kind]

    return get


def transformer_dirs(repos, kind: str, expert: str) -> tuple[Path, Path]:
    original, reference = repos(kind)
    if expert:
        return original / expert, reference / A14B_EXPERTS[expert]
    return original, reference / "transformer"


def torch_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors folder (single file or shards), as torch tensors."""
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def assert_same_torch(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def assert_same_mx(got: Mapping[str, mx.array], want: Mapping[str, mx.array]) -> None:
    """Identical names, shapes and values (compared in float32: the half-precision originals hold
    exactly the values of the float32 references)."""
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert mx.array_equal(got[k].astype(mx.float32), want[k].astype(mx.float32)).item(), k


def rel_err(a: mx.array, b: mx.array) -> float:
    a, b = np.asarray(a.astype(mx.float32)), np.asarray(b.astype(mx.float32))
    assert a.shape == b.shape
    return float(np.abs(a - b).max() / np.abs(b).max())


# --- repo layout ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(REPO_KINDS))
def test_repo_layout(repos, kind: str) -> None:
    original, _ = repos(kind)
    _, vae_version, has_clip = REPO_KINDS[kind]
    for expert in A14B_EXPERTS if kind == "a14b" else [""]:
        folder, reference = transformer_dirs(repos, kind, expert)
        config, ref = json.loads((folder / "config.json").read_text()), read_config(reference)
        assert config["_class_name"] == "WanModel"
        assert config["model_type"] == ("i2v" if kind == "a14b" else kind)
        widths = [config[k] for k in ("dim", "num_heads", "in_dim", "out_dim", "num_layers", "ffn_dim")]
        assert widths == [
            ref["num_attention_heads"] * ref["attention_head_dim"],
            ref["num_attention_heads"],
            ref["in_channels"],
            ref["out_channels"],
            ref["num_layers"],
            ref["ffn_dim"],
        ]
    assert (original / VAE_FILES[vae_version]).is_file() and (original / T5_FILE).is_file()
    assert (original / CLIP_FILE).is_file() == has_clip
    assert UMT5Tokenizer.from_folder(original / TOKENIZER_DIR)(["a cat"], max_length=8)[0].shape == (1, 8)


def test_sharded_transformer_has_an_index(repos) -> None:
    original, _ = repos("i2v")
    index = json.loads((original / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "diffusion_pytorch_model-00001-of-00002.safetensors",
        "diffusion_pytorch_model-00002-of-00002.safetensors",
    ]


# --- transformer ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "expert"), TRANSFORMERS)
def test_transformer_inverse_matches_diffusers_converter(repos, kind: str, expert: str) -> None:
    """diffusers' own single-file converter turns the written original checkpoint back into the
    reference state dict exactly: the inverse renames are right."""
    original, reference = transformer_dirs(repos, kind, expert)
    converted = convert_wan_transformer_to_diffusers(torch_folder(original))
    # diffusers 0.42.1's single-file converter has no rename for the FLF2V position table and passes it
    # through; its conversion script has one (wan.md §4.1: img_emb.emb_pos -> ...image_embedder.pos_embed).
    assert ("img_emb.emb_pos" in converted) == (kind == "flf2v")
    if kind == "flf2v":
        converted["condition_embedder.image_embedder.pos_embed"] = converted.pop("img_emb.emb_pos")
    assert_same_torch(converted, torch_folder(reference))


def transformer_inputs(config: wan_transformer.WanTransformerConfig, kind: str) -> dict[str, mx.array]:
    """Random inputs; I2V/FLF2V get the 512 text tokens their image K/V split assumes."""
    mx.random.seed(0)
    inputs = {
        "hidden_states": mx.random.normal((1, 2, 4, 4, config.in_channels)),
        "timestep": mx.array([700.0]),
        "encoder_hidden_states": mx.random.normal((1, 512 if config.image_dim else 8, config.text_dim)),
    }
    if config.image_dim:
        images = 2 if kind == "flf2v" else 1
        shape = (images, TINY_IMAGE_TOKENS, config.image_dim)
        inputs["encoder_hidden_states_image"] = mx.random.normal(shape)
    return inputs


@pytest.mark.parametrize(("kind", "expert"), TRANSFORMERS)
def test_transformer_original_map(repos, kind: str, expert: str) -> None:
    original, reference = transformer_dirs(repos, kind, expert)
    got = wan_transformer.ORIGINAL_MAP.apply(read_safetensors(original))
    want = wan_transformer.DIFFUSERS_MAP.apply(read_safetensors(reference))
    assert_same_mx(got, want)

    config = config_from_dict(wan_transformer.WanTransformerConfig, read_config(reference))
    ours = wan_transformer.WanTransformer3DModel(config)
    load_strict(ours, got, dtype=mx.float32, keep_float32=wan_transformer.KEEP_FLOAT32)
    ref = wan_transformer.load_wan_transformer(reference, mx.float32)
    inputs = transformer_inputs(config, kind)
    assert rel_err(ours(**inputs), ref(**inputs)) < TOL


def test_comfyui_single_file(repos, tmp_path: Path) -> None:
    """A ComfyUI repack (keys prefixed ``model.diffusion_model.``) loads through strip_prefix."""
    _, reference = repos("i2v")
    path = tmp_path / "wan2.1_i2v_comfy.safetensors"
    write_comfyui_transformer(path, TorchWanTransformer.from_pretrained(reference / "transformer"))
    tensors = mx.load(str(path))
    assert all(k.startswith(wan_transformer.COMFYUI_PREFIX) for k in tensors)
    got = wan_transformer.ORIGINAL_MAP.apply(wan_transformer.strip_prefix(tensors))
    assert_same_mx(got, wan_transformer.DIFFUSERS_MAP.apply(read_safetensors(reference / "transformer")))

    # The prefix is not blindly removed: another component bundled in the file is named, not dropped...
    with pytest.raises(WeightLoadError, match=r"first_stage_model\.conv1\.weight"):
        wan_transformer.ORIGINAL_MAP.apply(
            wan_transformer.strip_prefix({**tensors, "first_stage_model.conv1.weight": mx.zeros((1,))})
        )
    # ...and a key present with and without the prefix is ambiguous.
    with pytest.raises(WeightLoadError, match=r"head\.modulation"):
        wan_transformer.strip_prefix({**tensors, "head.modulation": mx.zeros((1,))})


# --- VAE -----------------------------------------------------------------------------------------------

VAE_KINDS = {"2.1": "i2v", "2.2": "ti2v"}
VAE_MAPS = {"2.1": wan_vae.ORIGINAL_MAP_21, "2.2": wan_vae.ORIGINAL_MAP_22}
# Keys copied from wan.md §4.2 / §4.3 (generated there by diffusers' convert_vae / convert_vae_22): the
# regrouped decoder, the width-changing shortcuts and the resamplers, where the layouts differ most.
VAE_SPOT_KEYS = {
    "2.1": (194, [
        "decoder.upsamples.3.resample.1.weight", "decoder.upsamples.3.time_conv.bias",
        "decoder.upsamples.4.shortcut.weight", "decoder.upsamples.11.resample.1.bias",
        "decoder.upsamples.14.residual.6.weight", "encoder.downsamples.5.time_conv.weight",
        "encoder.downsamples.8.resample.1.weight", "encoder.downsamples.10.residual.3.gamma",
        "encoder.middle.1.to_qkv.weight", "decoder.head.0.gamma", "conv2.bias",
    ]),
    "2.2": (196, [
        "encoder.downsamples.0.downsamples.2.resample.1.weight",
        "encoder.downsamples.1.downsamples.2.time_conv.bias",
        "encoder.downsamples.2.downsamples.0.shortcut.weight",
        "decoder.upsamples.0.upsamples.3.time_conv.weight",
        "decoder.upsamples.2.upsamples.3.resample.1.bias",
        "decoder.upsamples.3.upsamples.0.shortcut.bias",
        "decoder.upsamples.3.upsamples.2.residual.6.weight",
        "decoder.middle.2.residual.3.gamma",
    ]),
}  # fmt: skip


def vae_files(repos, version: str) -> tuple[Path, Path]:
    original, reference = repos(VAE_KINDS[version])
    return original / VAE_FILES[version], reference / "vae"


def test_vae21_inverse_matches_diffusers_converter(repos) -> None:
    path, reference = vae_files(repos, "2.1")
    original = torch.load(path, weights_only=True)
    assert_same_torch(convert_wan_vae_to_diffusers(original), torch_folder(reference))


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_vae_original_keys(repos, version: str) -> None:
    count, spot = VAE_SPOT_KEYS[version]
    keys = set(torch.load(vae_files(repos, version)[0], weights_only=True))
    assert len(keys) == count and set(spot) <= keys


@pytest.mark.parametrize("version", ["2.1", "2.2"])
def test_vae_original_map(repos, version: str) -> None:
    path, reference = vae_files(repos, version)
    tensors = read_pth(path)
    got = VAE_MAPS[version].apply(tensors)
    assert_same_mx(got, wan_vae.DIFFUSERS_MAP.apply(read_safetensors(reference)))
    # each version's table rejects the other's file
    with pytest.raises(WeightLoadError, match="not used by any rule"):
        VAE_MAPS["2.2" if version == "2.1" else "2.1"].apply(tensors)

    ours = wan_vae.AutoencoderKLWan(config_from_dict(wan_vae.WanVAEConfig, read_config(reference)))
    load_strict(ours, got, dtype=mx.float32)
    ref = wan_vae.load_wan_vae(reference, mx.float32)
    mx.random.seed(1)
    z = mx.random.normal((1, 2, 2, 2, ref.config.z_dim))
    assert rel_err(ours.decode(z), ref.decode(z)) < TOL


# --- UMT5 ----------------------------------------------------------------------------------------------


def test_umt5_original_map(repos) -> None:
    original, reference = repos("i2v")
    tensors = read_pth(original / T5_FILE)
    assert {t.dtype for t in tensors.values()} == {mx.bfloat16}
    got = umt5.ORIGINAL_MAP.apply(tensors)
    assert_same_mx(got, umt5.DIFFUSERS_MAP.apply(read_safetensors(reference / "text_encoder")))

    ours = umt5.UMT5Encoder(config_from_dict(umt5.UMT5Config, read_config(reference / "text_encoder")))
    load_strict(ours, got, dtype=mx.float32)
    ref = umt5.load_umt5(reference / "text_encoder", mx.float32)
    ids = mx.array(np.random.default_rng(0).integers(0, ref.config.vocab_size, (2, 12)))
    mask = mx.array([[1] * 12, [1] * 7 + [0] * 5])
    assert rel_err(ours(ids, mask), ref(ids, mask)) < TOL


# --- CLIP ----------------------------------------------------------------------------------------------


def test_clip_original_map(repos) -> None:
    original, reference = repos("i2v")
    tensors = read_pth(original / CLIP_FILE)
    assert {t.dtype for t in tensors.values()} == {mx.float16}
    assert set(TEXT_TOWER_SHAPES) <= set(tensors)  # present in the file, and ignored below
    config = clip.CLIPVisionConfig.from_dict(read_config(reference / "image_encoder"))
    got = clip.original_map(config).apply(clip.split_fused_qkv(tensors))
    assert_same_mx(got, clip.diffusers_map(config).apply(read_safetensors(reference / "image_encoder")))

    ours = clip.CLIPVisionTower(config)
    load_strict(ours, got, dtype=mx.float32)
    ref = clip.load_clip_vision(reference / "image_encoder", mx.float32)
    mx.random.seed(2)
    pixels = mx.random.normal((2, config.image_size, config.image_size, 3))
    assert rel_err(ours(pixels), ref(pixels)) < TOL


def test_split_fused_qkv_rejects_bad_tensors() -> None:
    with pytest.raises(WeightLoadError, match=r"a\.to_qkv\.weight"):
        clip.split_fused_qkv({"a.to_qkv.weight": mx.zeros((4, 2))})
    with pytest.raises(WeightLoadError, match=r"a\.to_q\.bias"):
        clip.split_fused_qkv({"a.to_q.bias": mx.zeros((2,)), "a.to_qkv.bias": mx.zeros((6,))})


# --- strictness ----------------------------------------------------------------------------------------


def _transformer(repos):
    original, reference = repos("i2v")
    config = config_from_dict(wan_transformer.WanTransformerConfig, read_config(reference / "transformer"))
    model = wan_transformer.WanTransformer3DModel(config)
    return wan_transformer.ORIGINAL_MAP, read_safetensors(original), model


def _vae(version: str):
    def make(repos):
        path, reference = vae_files(repos, version)
        config = config_from_dict(wan_vae.WanVAEConfig, read_config(reference))
        return VAE_MAPS[version], read_pth(path), wan_vae.AutoencoderKLWan(config)

    return make


def _umt5(repos):
    original, reference = repos("i2v")
    config = config_from_dict(umt5.UMT5Config, read_config(reference / "text_encoder"))
    return umt5.ORIGINAL_MAP, read_pth(original / T5_FILE), umt5.UMT5Encoder(config)


def _clip(repos):
    original, reference = repos("i2v")
    config = clip.CLIPVisionConfig.from_dict(read_config(reference / "image_encoder"))
    tensors = clip.split_fused_qkv(read_pth(original / CLIP_FILE))
    return clip.original_map(config), tensors, clip.CLIPVisionTower(config)


# component -> (its ORIGINAL map, the original tensors (after any pre-pass), an unloaded model), and a
# tensor to drop with the parameter name the error must give
STRICT_CASES: dict[str, tuple[Callable, str, str]] = {
    "transformer": (_transformer, "blocks.1.norm3.bias", "blocks.1.norm2.bias"),
    "vae2.1": (
        _vae("2.1"),
        "decoder.upsamples.4.shortcut.weight",
        "decoder.up_blocks.1.resnets.0.conv_shortcut.weight",
    ),
    "vae2.2": (
        _vae("2.2"),
        "encoder.downsamples.1.downsamples.2.time_conv.bias",
        "encoder.down_blocks.1.downsampler.time_conv.bias",
    ),
    "umt5": (
        _umt5,
        "blocks.1.pos_embedding.embedding.weight",
        "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight",
    ),
    "clip": (
        _clip,
        "visual.transformer.1.attn.to_v.bias",  # a split-off part of the fused to_qkv
        "vision_model.encoder.layers.1.self_attn.v_proj.bias",
    ),
}


@pytest.mark.parametrize("component", list(STRICT_CASES))
def test_unknown_tensor_is_named(repos, component: str) -> None:
    weight_map, tensors, _ = STRICT_CASES[component][0](repos)
    with pytest.raises(WeightLoadError, match=r"1 tensor \(blocks\.0\.surprise\.weight\) not used by"):
        weight_map.apply({**tensors, "blocks.0.surprise.weight": mx.zeros((1,))})


@pytest.mark.parametrize("component", list(STRICT_CASES))
def test_missing_tensor_is_named(repos, component: str) -> None:
    make, drop, param = STRICT_CASES[component]
    weight_map, tensors, model = make(repos)
    del tensors[drop]
    weights = weight_map.apply(tensors)
    with pytest.raises(WeightLoadError, match=rf"missing 1 tensor \({param.replace('.', '[.]')}\)"):
        load_strict(model, weights, dtype=mx.float32)

