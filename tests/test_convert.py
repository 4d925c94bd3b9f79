"""``mlx-i2v convert / quantize / info``: original and diffusers checkpoints -> MLX directories.

Original-layout repos are built from tiny diffusers models by inverting the maps (``ref_original``,
``ref_convert``), converted, loaded and run; the frames must match diffusers' pipeline on the reference
weights. Also: the diffusers layout, a ComfyUI transformer file, a malicious pickle, quantization,
interrupted and refused conversions, a run with PyTorch unimportable, and ``info``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import types
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlx.utils import tree_flatten
from PIL import Image
from ref_convert import KINDS, SHIFTS, build_original, reference_pipeline
from ref_original import T5_FILE, VAE_FILES, write_comfyui_transformer
from safetensors.torch import load_file, save_file

from mlx_i2v import load_pipeline
from mlx_i2v.cli.convert import convert as convert_cli
from mlx_i2v.cli.convert import info as info_cli
from mlx_i2v.cli.convert import quantize as quantize_cli
from mlx_i2v.components import load_component
from mlx_i2v.convert import MLX_KEY, convert_model, model_info, quantize_model, writer
from mlx_i2v.errors import InvalidInputError, UnsafeCheckpointError, WeightLoadError
from mlx_i2v.models.umt5 import TEXT_ENCODER
from mlx_i2v.models.wan.transformer import TRANSFORMER
from mlx_i2v.quantize import quantize_text_encoder, quantize_transformer
from mlx_i2v.families.wan.variants import I2V_14B_480P
from mlx_i2v.weights import read_config, read_safetensors

HEIGHT, WIDTH, FRAMES = 64, 96, 9
PROMPT = "a boat on a lake"
VARIANTS = {"ti2v": "wan2.2-ti2v-5b", "i2v": "wan2.1-i2v-14b-480p", "a14b": "wan2.2-i2v-a14b"}
# kind -> (latent channels, spatial stride, steps): A14B runs 4 steps so both experts take part.
LATENTS = {"ti2v": (48, 16, 2), "i2v": (16, 8, 2), "a14b": (16, 8, 4)}
COMPONENTS = ("transformer", "text_encoder", "vae")


def _photo(seed: int = 1) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    base = np.stack([x * 255 / WIDTH, y * 255 / HEIGHT, np.full_like(x, 128)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


def _noise(kind: str, seed: int = 0) -> np.ndarray:
    channels, stride, _ = LATENTS[kind]
    shape = (1, channels, (FRAMES - 1) // 4 + 1, HEIGHT // stride, WIDTH // stride)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _settings(kind: str) -> dict:
    """Generation settings both pipelines get (the shift explicitly: ours would take the variant's)."""
    settings = dict(negative_prompt="low quality", height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                    num_inference_steps=LATENTS[kind][2], guidance_scale=5.0, flow_shift=SHIFTS[kind])
    if kind == "a14b":
        settings["guidance_scale_2"] = 3.0
    return settings


def _generate(model_dir: Path, kind: str, **load) -> np.ndarray:
    pipe = load_pipeline(model_dir, dtype="float32", **load)
    return pipe(_photo(), PROMPT, latents=_noise(kind), **_settings(kind)).frames


def _cached(build: Callable[[str], Path]) -> Callable[[str], Path]:
    cache: dict[str, Path] = {}
    return lambda kind: cache[kind] if kind in cache else cache.setdefault(kind, build(kind))


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> Callable[[str], tuple[Path, Path]]:
    """kind -> (original repo, diffusers reference components), built on first use."""
    def build(kind: str) -> tuple[Path, Path]:
        base = tmp_path_factory.mktemp(kind)
        build_original(base / "original", base / "reference", kind)
        return base / "original", base / "reference"

    return _cached(build)


@pytest.fixture(scope="module")
def converted(originals, tmp_path_factory) -> Callable[[str], Path]:
    """kind -> its original repo converted to a float32 MLX directory, converted on first use."""
    def convert(kind: str) -> Path:
        return convert_model(originals(kind)[0], tmp_path_factory.mktemp("mlx") / kind, dtype="float32")

    return _cached(convert)


@pytest.fixture(scope="module")
def quantized(originals, tmp_path_factory) -> Path:
    """The TI2V original repo converted with ``--quantize 8 --group-size 32``, through the CLI."""
    out = tmp_path_factory.mktemp("quantized") / "ti2v-q8"
    args = [str(originals("ti2v")[0]), str(out), "--dtype", "float32", "--quantize", "8", "--group-size", "32"]
    result = CliRunner().invoke(convert_cli, args)
    assert result.exit_code == 0, result.output
    assert f"wrote {out} (wan2.2-ti2v-5b, float32, 8-bit group 32 (text encoder 8-bit)" in result.output
    return out


def _same_tensors(a: Path, b: Path) -> None:
    got, want = read_safetensors(a), read_safetensors(b)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and mx.array_equal(got[k], want[k]).item(), k


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _no_leftovers(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name]


# --- original layout, end to end -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_original_layout_matches_diffusers(kind, originals, converted):
    root, reference = originals(kind)
    out = converted(kind)
    index = json.loads((out / "model_index.json").read_text())
    meta = index[MLX_KEY]
    assert (meta["variant"], meta["dtype"], meta["quantization"]) == (VARIANTS[kind], "float32", None)
    assert meta["source"] == {"model": str(root), "layout": "original"}
    assert read_config(out / "scheduler", "scheduler_config.json")["flow_shift"] == SHIFTS[kind]
    extra = {"ti2v": set(), "i2v": {"image_encoder"}, "a14b": {"transformer_2"}}[kind]
    weights = {"transformer", "text_encoder", "vae"} | extra
    for name in weights:
        _, metadata = mx.load(str(out / name / "model.safetensors"), return_metadata=True)
        assert metadata == {"format": "mlx"}, name
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert (out / "image_processor").is_dir() == (kind == "i2v")

    with torch.no_grad():
        expected = reference_pipeline(root, reference, kind)(
            image=_photo(), prompt=PROMPT, latents=torch.from_numpy(_noise(kind)), output_type="np",
            max_sequence_length=512, **{k: v for k, v in _settings(kind).items() if k != "flow_shift"},
        ).frames[0]
    frames = _generate(out, kind)
    assert frames.shape == expected.shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert np.abs(frames - expected).max() < 2e-3


def test_comfyui_transformer_file(originals, converted, tmp_path):
    from diffusers import WanTransformer3DModel

    root, reference = originals("ti2v")
    repo = tmp_path / "comfy"
    shutil.copytree(root, repo)
    for f in repo.glob("diffusion_pytorch_model*"):
        f.unlink()
    comfy_file = repo / "wan2.2_ti2v_5B_fp32.safetensors"
    write_comfyui_transformer(comfy_file, WanTransformer3DModel.from_pretrained(reference / "transformer"))
    assert all(k.startswith("model.diffusion_model.") for k in mx.load(str(comfy_file)))

    out = convert_model(repo, tmp_path / "mlx", dtype="float32")
    assert read_config(out / "transformer") == read_config(converted("ti2v") / "transformer")
    _same_tensors(out / "transformer", converted("ti2v") / "transformer")


class _Payload:
    """Unpickling this would create ``marker``: ``open(marker, "w")``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_malicious_pth_is_refused_without_running(originals, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(originals("ti2v")[0], repo)
    marker = tmp_path / "pwned"
    torch.save({"encoder.conv1.weight": _Payload(marker)}, repo / VAE_FILES["2.2"])
    out = tmp_path / "out"
    with pytest.raises(UnsafeCheckpointError, match="Wan2.2_VAE.pth"):
        convert_model(repo, out, dtype="float32")
    assert not marker.exists()
    assert not out.exists()
    _no_leftovers(tmp_path)


def _edit_transformer(repo: Path, edit: Callable[[dict], None]) -> None:
    (path,) = repo.glob("diffusion_pytorch_model*.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _edit_pth(path: Path, edit: Callable[[dict], None]) -> None:
    tensors = torch.load(path)
    edit(tensors)
    torch.save(tensors, path)


BROKEN = {
    # what is broken -> (edit of the repo, what the error must name)
    "extra": (lambda repo: _edit_transformer(repo, lambda t: t.update(stray=torch.zeros(2))), "stray"),
    "mis-shaped": (
        lambda repo: _edit_transformer(repo, lambda t: t.update({"blocks.1.ffn.2.bias": torch.zeros(3)})),
        r"blocks\.1\.ffn\.net\.2\.bias \(3,\)",
    ),
    "missing": (
        lambda repo: _edit_pth(repo / T5_FILE, lambda t: t.pop("blocks.1.attn.o.weight")),
        r"encoder\.block\.1\.layer\.0\.SelfAttention\.o\.weight",
    ),
}


@pytest.mark.parametrize("broken", list(BROKEN))
def test_broken_tensors_are_named(broken, originals, tmp_path):
    edit, name = BROKEN[broken]
    repo = tmp_path / "repo"
    shutil.copytree(originals("ti2v")[0], repo)
    edit(repo)
    with pytest.raises(WeightLoadError, match=name):
        convert_model(repo, tmp_path / "out", dtype="float32")
    assert _names(tmp_path) == ["repo"]


# --- diffusers layout ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ti2v", "i2v"])
def test_diffusers_layout_converts_to_the_same_frames(kind, tiny_ti2v_dir, tiny_i2v_dirs, tmp_path):
    source = tiny_ti2v_dir if kind == "ti2v" else tiny_i2v_dirs["i2v"]
    out = convert_model(source, tmp_path / "mlx", dtype="float32")
    meta = json.loads((out / "model_index.json").read_text())[MLX_KEY]
    assert (meta["variant"], meta["source"]["layout"]) == (VARIANTS[kind], "diffusers")
    for copied in ("tokenizer", "scheduler", "image_processor"):
        if (source / copied).is_dir():
            assert _names(out / copied) == _names(source / copied)
    assert np.array_equal(_generate(out, kind), _generate(source, kind))


def test_converting_a_converted_directory_is_refused(converted, tmp_path):
    with pytest.raises(InvalidInputError, match="already an MLX model directory"):
        convert_model(converted("ti2v"), tmp_path / "again")


# --- quantization ------------------------------------------------------------------------------------------


def test_quantized_save_and_reload_is_bit_identical(quantized, converted):
    meta = json.loads((quantized / "model_index.json").read_text())[MLX_KEY]
    assert meta["quantization"] == {"bits": 8, "group_size": 32, "text_encoder_bits": 8}
    stored = {name: read_config(quantized / name).get("quantization") for name in COMPONENTS}
    entry = {"group_size": 32, "bits": 8, "mode": "affine"}
    assert stored == {"transformer": entry, "text_encoder": entry, "vae": None}

    # Quantizing the float conversion here gives exactly what was saved, and what reloads.
    float_dir = converted("ti2v")
    for kind, quantize, name in ((TRANSFORMER, quantize_transformer, "transformer"),
                                 (TEXT_ENCODER, quantize_text_encoder, "text_encoder")):
        fresh = load_component(kind, float_dir / name, mx.float32)
        assert quantize(fresh, 8, 32)  # some layers are wide enough for group size 32
        reloaded = load_component(kind, quantized / name, mx.float32)
        got, want = dict(tree_flatten(reloaded.parameters())), dict(tree_flatten(fresh.parameters()))
        assert sorted(got) == sorted(want)
        assert all(got[k].dtype == want[k].dtype and mx.array_equal(got[k], want[k]).item() for k in want), name

    first, second = _generate(quantized, "ti2v"), _generate(quantized, "ti2v")
    assert np.array_equal(first, second)
    assert np.abs(first - _generate(float_dir, "ti2v")).max() < 0.1  # 8 bits: close to float
    # info counts a quantized layer as the float layer it stands for
    info, float_info = model_info(quantized), model_info(float_dir)
    assert info["quantization"] == meta["quantization"]
    assert info["components"]["transformer"]["parameters"] == float_info["components"]["transformer"]["parameters"]


def test_quantize_model_on_a_float_directory(converted, quantized, tmp_path):
    out = tmp_path / "q"
    result = CliRunner().invoke(quantize_cli, [str(converted("ti2v")), str(out), "--bits", "8", "--group-size", "32"])
    assert result.exit_code == 0, result.output
    assert read_config(out, "model_index.json") == read_config(quantized, "model_index.json")
    for name in COMPONENTS:
        _same_tensors(out / name, quantized / name)
        assert read_config(out / name) == read_config(quantized / name)

    # The UMT5 encoder can stay float: it is then copied as it is.
    float_text = quantize_model(converted("ti2v"), tmp_path / "q-text-float", bits=4, text_encoder_bits=None)
    assert read_config(float_text, "model_index.json")[MLX_KEY]["quantization"]["text_encoder_bits"] is None
    assert read_config(float_text / "transformer")["quantization"]["bits"] == 4
    _same_tensors(float_text / "text_encoder", converted("ti2v") / "text_encoder")


def test_quantized_directory_cannot_be_quantized_again(quantized, tmp_path):
    with pytest.raises(InvalidInputError, match="already quantized to 8 bits"):
        quantize_model(quantized, tmp_path / "q4", bits=4)
    result = CliRunner().invoke(quantize_cli, [str(quantized), str(tmp_path / "q4"), "--bits", "4"])
    assert isinstance(result.exception, InvalidInputError)
    with pytest.raises(InvalidInputError, match="already quantized to 8 bits"):
        pipe = load_pipeline(quantized, dtype="float32", quantize=4)
        pipe(_photo(), PROMPT, latents=_noise("ti2v"), **{**_settings("ti2v"), "num_inference_steps": 1})
    assert not (tmp_path / "q4").exists()
    frames = _generate(quantized, "ti2v", quantize=8)  # the stored bits: loads as it is
    assert np.array_equal(frames, _generate(quantized, "ti2v"))


def test_quantization_options_are_checked(originals, tmp_path):
    with pytest.raises(InvalidInputError, match="bits"):
        convert_model(originals("ti2v")[0], tmp_path / "q3", quantize=3)
    with pytest.raises(InvalidInputError, match="group size"):
        convert_model(originals("ti2v")[0], tmp_path / "g48", quantize=4, group_size=48)
    assert not list(tmp_path.iterdir())


def test_sharded_save_reloads(converted, tmp_path):
    model = load_component(TRANSFORMER, converted("ti2v") / "transformer", mx.float32)
    files = writer.save_component(model, tmp_path / "t", read_config(converted("ti2v") / "transformer"),
                                  max_shard_bytes=64 * 1024)
    shards = [f for f in files if f.suffix == ".safetensors"]
    assert len(shards) > 1 and (tmp_path / "t" / "model.safetensors.index.json") in files
    reloaded = load_component(TRANSFORMER, tmp_path / "t", mx.float32)
    got, want = dict(tree_flatten(reloaded.parameters())), dict(tree_flatten(model.parameters()))
    assert sorted(got) == sorted(want) and all(mx.array_equal(got[k], want[k]).item() for k in want)


# --- all or nothing ----------------------------------------------------------------------------------------


def test_interrupted_conversion_leaves_nothing(originals, tmp_path, monkeypatch):
    saved: list[str] = []
    real = writer.save_component

    def save_then_interrupt(model, folder, config, **kwargs):
        saved.append(folder.name)
        if len(saved) == 2:
            raise KeyboardInterrupt
        return real(model, folder, config, **kwargs)

    monkeypatch.setattr(writer, "save_component", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert_model(originals("ti2v")[0], tmp_path / "out", dtype="float32")
    assert saved == ["transformer", "text_encoder"]
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_kept_unless_forced(originals, tmp_path):
    root = originals("ti2v")[0]
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(InvalidInputError, match="already exists"):
        convert_model(root, out)
    assert (out / "mine.txt").read_text() == "keep me"
    convert_model(root, out, dtype="float32", force=True)
    assert not (out / "mine.txt").exists() and (out / "model_index.json").is_file()
    _no_leftovers(tmp_path)
    with pytest.raises(InvalidInputError, match="overlaps the source"):
        convert_model(root, root / "mlx", force=True)


def test_insufficient_disk_space_fails_before_writing(originals, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: types.SimpleNamespace(total=10**12, used=10**12, free=10**6))
    monkeypatch.setattr(writer, "save_component", lambda *a, **k: pytest.fail("wrote despite the full disk"))
    with pytest.raises(InvalidInputError, match="not enough free disk space"):
        convert_model(originals("ti2v")[0], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# --- without PyTorch ---------------------------------------------------------------------------------------

NO_TORCH = textwrap.dedent(
    """
    import json, sys
    for name in ("torch", "diffusers", "transformers"):
        sys.modules[name] = None  # importing any of them now raises ImportError
    import numpy as np
    from PIL import Image
    from mlx_i2v import load_pipeline
    from mlx_i2v.convert import convert_model

    source, output, photo, noise, settings, frames = sys.argv[1:]
    settings = json.loads(settings)
    convert_model(source, output, dtype="float32")
    pipe = load_pipeline(output, dtype="float32")
    video = pipe(Image.open(photo), settings["prompt"], latents=np.load(noise), **settings["kwargs"])
    np.save(frames, video.frames)
    """
)


def test_conversion_and_generation_without_torch(originals, converted, tmp_path):
    _photo().save(tmp_path / "photo.png")
    np.save(tmp_path / "noise.npy", _noise("i2v"))
    settings = json.dumps({"prompt": PROMPT, "kwargs": _settings("i2v")})
    args = [originals("i2v")[0], tmp_path / "mlx", tmp_path / "photo.png", tmp_path / "noise.npy", settings,
            tmp_path / "frames.npy"]
    subprocess.run([sys.executable, "-c", NO_TORCH, *map(str, args)], check=True, timeout=300)
    assert np.array_equal(np.load(tmp_path / "frames.npy"), _generate(converted("i2v"), "i2v"))


# --- info --------------------------------------------------------------------------------------------------


def test_info_on_mlx_and_diffusers_directories(originals, converted, tiny_i2v_dirs):
    from diffusers import WanTransformer3DModel

    root, reference = originals("i2v")
    out = converted("i2v")
    info = model_info(out)
    summary = (info["layout"], info["variant"], info["dtype"], info["quantization"])
    assert summary == ("mlx", VARIANTS["i2v"], "float32", None)
    assert info["source"] == {"model": str(root), "layout": "original"}
    assert set(info["components"]) == {"transformer", "text_encoder", "tokenizer", "vae", "image_encoder",
                                       "image_processor", "scheduler"}
    reference_model = WanTransformer3DModel.from_pretrained(reference / "transformer")
    assert info["components"]["transformer"]["parameters"] == sum(p.numel() for p in reference_model.parameters())
    assert info["bytes_on_disk"] == sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert info["defaults"] == json.loads(json.dumps(asdict(I2V_14B_480P.defaults)))

    diffusers_dir = tiny_i2v_dirs["i2v"]
    theirs = model_info(diffusers_dir)
    summary = (theirs["layout"], theirs["variant"], theirs["dtype"], theirs["source"])
    assert summary == ("diffusers", VARIANTS["i2v"], "float32", None)
    assert theirs["components"]["vae"]["parameters"] == info["components"]["vae"]["parameters"]

    runner = CliRunner()
    summary = runner.invoke(info_cli, [str(out)])
    assert summary.exit_code == 0, summary.output
    assert "variant:      wan2.1-i2v-14b-480p" in summary.output and "image_encoder" in summary.output
    as_json = runner.invoke(info_cli, [str(diffusers_dir), "--json"])
    assert json.loads(as_json.output) == theirs
