"""CLIP vision tower and preprocessing against transformers (CLIPVisionModelWithProjection, and
CLIPImageProcessor on its PIL backend)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image
from ref_clip import (
    TINY_CLIP_CONFIG,
    VIT_H_2LAYER_CONFIG,
    build_clip,
    build_processor,
    build_tiny_clip,
    penultimate_states,
)
from safetensors.numpy import load_file, save_file
from transformers import CLIPImageProcessor as HFCLIPImageProcessor

from mlx_i2v.errors import InvalidInputError, WeightLoadError
from mlx_i2v.models.wan.clip import CLIPVisionConfig, load_clip_vision
from mlx_i2v.models.wan.clip_preprocess import CLIPImageProcessor


def _image(width: int, height: int, mode: str, seed: int) -> Image.Image:
    """A gradient plus noise (so bicubic overshoot and clipping are exercised) in the given mode."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([255 * x / width, 255 * y / height, 127 + 120 * np.sin(x / 5 + y / 7)], axis=-1)
    rgb = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    if mode == "RGBA":
        alpha = rng.integers(0, 256, (height, width, 1), dtype=np.uint8)
        return Image.fromarray(np.concatenate([rgb, alpha], axis=-1), "RGBA")
    return Image.fromarray(rgb, "RGB").convert(mode)


def _palette_with_transparency() -> Image.Image:
    image = _image(48, 72, "RGB", 9).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    image.info["transparency"] = 3
    return image


IMAGES = {
    "landscape": _image(97, 61, "RGB", 0),
    "portrait": _image(45, 130, "RGB", 1),
    "square": _image(80, 80, "RGB", 2),
    "smaller_than_crop": _image(30, 20, "RGB", 3),
    "odd": _image(57, 113, "RGB", 4),
    "rgba": _image(70, 50, "RGBA", 5),
    "grayscale": _image(64, 90, "L", 6),
    "grayscale_alpha": _image(33, 41, "LA", 7),
    "palette_transparency": _palette_with_transparency(),
}


def _to_nhwc(pixel_values: np.ndarray) -> np.ndarray:
    return np.asarray(pixel_values).transpose(0, 2, 3, 1)


def _relative_error(ours: mx.array, ref: torch.Tensor) -> float:
    ref_np = ref.numpy()
    return float(np.abs(np.array(ours.astype(mx.float32)) - ref_np).max() / np.abs(ref_np).max())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("clip")
    model, processor = build_tiny_clip(root / "image_encoder", root / "image_processor")
    return root, model, processor


# --- preprocessing ---------------------------------------------------------------------------------


# (shortest_edge, crop): the shipped layout, plus a crop larger than the resized image (zero padding).
@pytest.mark.parametrize("edge_crop", [(56, 56), (40, 56), (224, 224)], ids=["wan", "pad", "224"])
def test_preprocess_matches_transformers(tmp_path: Path, edge_crop: tuple[int, int]) -> None:
    edge, crop = edge_crop
    reference = build_processor(tmp_path, shortest_edge=edge, crop=crop)
    ours = CLIPImageProcessor.from_folder(tmp_path)
    for name, image in IMAGES.items():
        expected = _to_nhwc(reference(images=[image], return_tensors="np")["pixel_values"])
        got = ours([image])
        assert got.shape == (1, crop, crop, 3) and got.dtype == np.float32, name
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6, err_msg=name)


def test_preprocess_batch_and_legacy_config(tmp_path: Path) -> None:
    # Older repos store plain ints: size is then a shortest edge, crop_size a square.
    config = {
        "size": 64,
        "crop_size": 48,
        "do_center_crop": True,
        "resample": 3,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "feature_extractor_type": "CLIPFeatureExtractor",
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    reference = HFCLIPImageProcessor.from_pretrained(tmp_path)
    ours = CLIPImageProcessor.from_folder(tmp_path)
    assert dict(ours.size) == {"shortest_edge": 64} and dict(ours.crop_size) == {"height": 48, "width": 48}
    images = list(IMAGES.values())
    expected = _to_nhwc(reference(images=images, return_tensors="np")["pixel_values"])
    np.testing.assert_allclose(ours(images), expected, rtol=0, atol=1e-6)


def test_preprocess_rejects_bad_input(tiny) -> None:
    root, _, _ = tiny
    processor = CLIPImageProcessor.from_folder(root / "image_processor")
    with pytest.raises(InvalidInputError):
        processor([])
    with pytest.raises(InvalidInputError):
        processor([np.zeros((8, 8, 3), np.uint8)])  # type: ignore[list-item]
    with pytest.raises(InvalidInputError, match="longest_edge"):
        CLIPImageProcessor(size={"shortest_edge": 224, "longest_edge": 448})


# --- vision tower ----------------------------------------------------------------------------------


def test_tiny_penultimate_matches_transformers(tiny) -> None:
    root, model, reference_processor = tiny
    tower = load_clip_vision(root / "image_encoder", mx.float32)
    pixels = CLIPImageProcessor.from_folder(root / "image_processor")([IMAGES["landscape"], IMAGES["rgba"]])
    ref_pixels = reference_processor(images=[IMAGES["landscape"], IMAGES["rgba"]], return_tensors="pt")
    expected = penultimate_states(model, ref_pixels["pixel_values"])
    got = tower(mx.array(pixels))
    assert got.shape == (2, 17, 24) and got.dtype == mx.float32
    assert _relative_error(got, expected) < 1e-4


def test_tiny_bfloat16_close(tiny) -> None:
    root, model, _ = tiny
    tower = load_clip_vision(root / "image_encoder", mx.bfloat16)
    pixels = np.random.default_rng(0).normal(size=(1, 56, 56, 3)).astype(np.float32)
    got = tower(mx.array(pixels))
    assert got.dtype == mx.bfloat16
    expected = penultimate_states(model, torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
    assert _relative_error(got, expected) < 3e-2


def test_quick_gelu_tower(tmp_path: Path) -> None:
    model = build_clip(tmp_path, {**TINY_CLIP_CONFIG, "hidden_act": "quick_gelu"}, seed=1)
    tower = load_clip_vision(tmp_path, mx.float32)
    pixels = np.random.default_rng(1).normal(size=(2, 56, 56, 3)).astype(np.float32)
    expected = penultimate_states(model, torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
    assert _relative_error(tower(mx.array(pixels)), expected) < 1e-4


def test_vit_h_widths_match_transformers(tmp_path: Path) -> None:
    model = build_clip(tmp_path, VIT_H_2LAYER_CONFIG, seed=2)
    tower = load_clip_vision(tmp_path, mx.float32)
    pixels = np.random.default_rng(2).normal(size=(2, 224, 224, 3)).astype(np.float32)
    expected = penultimate_states(model, torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
    got = tower(mx.array(pixels))
    assert got.shape == (2, 257, 1280)
    assert _relative_error(got, expected) < 1e-4


def test_last_layer_not_built(tiny) -> None:
    root, _, _ = tiny
    tower = load_clip_vision(root / "image_encoder", mx.float32)
    assert len(tower.vision_model.encoder.layers) == TINY_CLIP_CONFIG["num_hidden_layers"] - 1
    with pytest.raises(InvalidInputError, match="expects"):
        tower(mx.zeros((1, 64, 64, 3)))


# --- loading ----------------------------------------------------------------------------------------


def _copy_with(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_missing_tensor_is_named(tiny, tmp_path: Path) -> None:
    root, _, _ = tiny
    key = "vision_model.encoder.layers.1.mlp.fc1.bias"
    broken = _copy_with(root / "image_encoder", tmp_path / "broken", lambda t: t.pop(key))
    with pytest.raises(WeightLoadError, match=f"missing 1 tensor \\({key}\\)"):
        load_clip_vision(broken, mx.float32)


def test_unknown_tensor_is_named(tiny, tmp_path: Path) -> None:
    root, _, _ = tiny
    key = "vision_model.extra.weight"
    broken = _copy_with(
        root / "image_encoder", tmp_path / "broken", lambda t: t.update({key: np.zeros(2, np.float32)})
    )
    with pytest.raises(WeightLoadError, match=key):
        load_clip_vision(broken, mx.float32)


def test_config_nested_and_validated() -> None:
    flat = CLIPVisionConfig.from_dict(TINY_CLIP_CONFIG)
    assert CLIPVisionConfig.from_dict({"projection_dim": 8, "vision_config": TINY_CLIP_CONFIG}) == flat
    assert flat.num_positions == 17 and flat.hidden_act == "gelu"
    with pytest.raises(WeightLoadError, match="relu"):
        CLIPVisionConfig.from_dict({**TINY_CLIP_CONFIG, "hidden_act": "relu"})
