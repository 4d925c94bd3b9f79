"""``mlx-i2v convert`` for LTX-Video: diffusers-layout directories and Lightricks single files.

A converted directory must load into the same models as the diffusers directory it came from (float),
reload bit-identically when quantized, and a single file must convert to the same tensors and configs as
the diffusers directory of the same weights, tensor for tensor; bad input fails with one line and leaves
nothing behind. The tiny checkpoints come from ``ref_ltx_convert``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import mlx.core as mx
import pytest
import torch
from click.testing import CliRunner
from diffusers import FlowMatchEulerDiscreteScheduler
from mlx.utils import tree_flatten
from ref_ltx_convert import (
    GENERATIONS,
    PIPELINES,
    build_ltx_dir,
    ltx_metadata,
    reference_scheduler,
    single_file_tensors,
    write_single_file,
)
from ref_t5 import TINY_T5_CONFIG
from transformers import UMT5Config, UMT5EncoderModel

from mlx_i2v.cli.convert import convert as convert_cli
from mlx_i2v.cli.convert import info as info_cli
from mlx_i2v.cli.main import main as cli_main
from mlx_i2v.components import load_component
from mlx_i2v.convert import MLX_KEY, convert_model, model_info, quantize_model
from mlx_i2v.errors import InvalidInputError, WeightLoadError
from mlx_i2v.models.ltx.transformer import TRANSFORMER
from mlx_i2v.models.ltx.vae import VAE
from mlx_i2v.models.umt5 import T5_TEXT_ENCODER
from mlx_i2v.quantize import quantize_text_encoder, quantize_transformer
from mlx_i2v.weights import read_config, read_safetensors

KINDS = {"transformer": TRANSFORMER, "text_encoder": T5_TEXT_ENCODER, "vae": VAE}


def _cached(build: Callable[[str], Path]) -> Callable[[str], Path]:
    cache: dict[str, Path] = {}
    return lambda key: cache[key] if key in cache else cache.setdefault(key, build(key))


@pytest.fixture(scope="module")
def diffusers_dirs(tmp_path_factory) -> Callable[[str], Path]:
    """generation -> a tiny diffusers-layout LTX-Video directory, built on first use."""
    return _cached(lambda generation: build_ltx_dir(tmp_path_factory.mktemp(f"ltx-{generation}"), generation))


@pytest.fixture(scope="module")
def converted(diffusers_dirs, tmp_path_factory) -> Callable[[str], Path]:
    """generation -> its diffusers directory converted to float32."""
    def convert(generation: str) -> Path:
        return convert_model(diffusers_dirs(generation), tmp_path_factory.mktemp("mlx") / generation, dtype="float32")

    return _cached(convert)


def _parameters(model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))


def _assert_same_parameters(got, want, what: str) -> None:
    got, want = _parameters(got), _parameters(want)
    assert sorted(got) == sorted(want), what
    for k in want:
        assert got[k].dtype == want[k].dtype and mx.array_equal(got[k], want[k]).item(), f"{what}: {k}"


def _same_tensors(a: Path, b: Path) -> None:
    got, want = read_safetensors(a), read_safetensors(b)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and mx.array_equal(got[k], want[k]).item(), k


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _no_leftovers(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name]


# --- diffusers layout ------------------------------------------------------------------------------------


@pytest.mark.parametrize("generation", ["0.9.1", "0.9.5"])
def test_diffusers_dir_converts_to_the_same_models(generation, diffusers_dirs, converted):
    source, out = diffusers_dirs(generation), converted(generation)
    index = read_config(out, "model_index.json")
    source_index = read_config(source, "model_index.json")
    assert {k: v for k, v in index.items() if k != MLX_KEY} == source_index  # _class_name and components kept
    meta = index[MLX_KEY]
    assert (meta["family"], meta["generation"], meta["dtype"], meta["quantization"]) == (
        "ltx", generation, "float32", None)
    assert meta["source"] == {"model": str(source), "layout": "diffusers"}
    for copied in ("tokenizer", "scheduler"):
        names = _names(source / copied)
        assert _names(out / copied) == names
        assert all((out / copied / n).read_bytes() == (source / copied / n).read_bytes() for n in names)
    for name, kind in KINDS.items():
        _, metadata = mx.load(str(out / name / "model.safetensors"), return_metadata=True)
        assert metadata == {"format": "mlx"}, name
        assert read_config(out / name) == read_config(source / name), name
        ours = load_component(kind, out / name, mx.float32)
        _assert_same_parameters(ours, load_component(kind, source / name, mx.float32), name)


def test_vae_stays_float32_in_a_bfloat16_conversion(diffusers_dirs, tmp_path):
    out = convert_model(diffusers_dirs("0.9.5"), tmp_path / "bf16", dtype="bfloat16")
    dtypes = {name: {v.dtype for v in read_safetensors(out / name).values()} for name in KINDS}
    assert dtypes == {"transformer": {mx.bfloat16}, "text_encoder": {mx.bfloat16}, "vae": {mx.float32}}
    assert model_info(out)["dtype"] == "bfloat16"


def test_quantized_conversion_reloads_bit_identically(diffusers_dirs, converted, tmp_path):
    out = tmp_path / "q8"
    args = [str(diffusers_dirs("0.9.5")), str(out), "--dtype", "float32", "--quantize", "8", "--group-size", "32"]
    result = CliRunner().invoke(convert_cli, args)
    assert result.exit_code == 0, result.output
    assert f"wrote {out} (LTX-Video 0.9.5+, float32, 8-bit group 32 (text encoder 8-bit)" in result.output
    meta = read_config(out, "model_index.json")[MLX_KEY]
    assert meta["quantization"] == {"bits": 8, "group_size": 32, "text_encoder_bits": 8}
    entry = {"group_size": 32, "bits": 8, "mode": "affine"}
    stored = {name: read_config(out / name).get("quantization") for name in KINDS}
    assert stored == {"transformer": entry, "text_encoder": entry, "vae": None}

    float_dir = converted("0.9.5")
    for name, quantize in (("transformer", quantize_transformer), ("text_encoder", quantize_text_encoder)):
        fresh = load_component(KINDS[name], float_dir / name, mx.float32)
        assert quantize(fresh, 8, 32)  # some layers are wide enough for group size 32
        _assert_same_parameters(load_component(KINDS[name], out / name, mx.float32), fresh, name)
    _same_tensors(out / "vae", float_dir / "vae")

    # quantize_model on the float conversion writes the same directory
    again = quantize_model(float_dir, tmp_path / "q8-again", bits=8, group_size=32)
    assert read_config(again, "model_index.json") == read_config(out, "model_index.json")
    for name in KINDS:
        _same_tensors(again / name, out / name)


def test_info_on_ltx_directories(diffusers_dirs, converted):
    out = converted("0.9.1")
    info = model_info(out)
    summary = (info["layout"], info["family"], info["generation"], info["variant"], info["dtype"], info["defaults"])
    assert summary == ("mlx", "ltx", "0.9.1", None, "float32", None)
    theirs = model_info(diffusers_dirs("0.9.1"))
    assert (theirs["layout"], theirs["family"], theirs["generation"]) == ("diffusers", "ltx", "0.9.1")
    for name in ("transformer", "vae"):
        assert theirs["components"][name]["parameters"] == info["components"][name]["parameters"], name
    result = CliRunner().invoke(info_cli, [str(out)])
    assert result.exit_code == 0, result.output
    assert "variant:      LTX-Video 0.9.1" in result.output and "text_encoder" in result.output


# --- single file -----------------------------------------------------------------------------------------


def _single_file(diffusers_dir: Path, folder: Path, generation: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = single_file_tensors(diffusers_dir, generation)
    return write_single_file(folder / f"ltxv-tiny-{generation}.safetensors", tensors, ltx_metadata(diffusers_dir))


@pytest.mark.parametrize("generation", GENERATIONS)
def test_single_file_converts_to_the_diffusers_layout(generation, diffusers_dirs, converted, tmp_path):
    source = diffusers_dirs(generation)
    single = _single_file(source, tmp_path, generation)
    out = tmp_path / "mlx"
    result = CliRunner().invoke(convert_cli, [str(single), str(out), "--dtype", "float32", "--text-encoder",
                                              str(source)])  # fmt: skip
    assert result.exit_code == 0, result.output
    reference = converted(generation)
    for name in KINDS:  # tensor for tensor
        _same_tensors(out / name, reference / name)
    assert read_config(out / "text_encoder") == read_config(reference / "text_encoder")
    # the configs read off the tensors are the diffusers configs (diffusers' bookkeeping keys aside)
    for name in ("transformer", "vae"):
        ours, theirs = read_config(out / name), read_config(reference / name)
        fields = [k for k in theirs if not k.startswith("_")]
        assert {k: ours.get(k) for k in fields} == {k: theirs[k] for k in fields}, name
        assert ours["_class_name"] == theirs["_class_name"]
    assert _names(out / "tokenizer") == _names(source / "tokenizer")

    index = read_config(out, "model_index.json")
    assert index["_class_name"] == PIPELINES[generation]
    assert {k for k, v in index.items() if isinstance(v, list)} == {"scheduler", "text_encoder", "tokenizer",
                                                                     "transformer", "vae"}  # fmt: skip
    meta = index[MLX_KEY]
    assert (meta["family"], meta["generation"]) == ("ltx", generation)
    assert meta["source"] == {"model": str(single), "layout": "single-file"}
    # the scheduler diffusers' converter writes for the generation, every field spelt out
    written = read_config(out / "scheduler", "scheduler_config.json")
    expected = {k: v for k, v in reference_scheduler(generation).config.items() if not k.startswith("_")}
    assert {k: v for k, v in written.items() if not k.startswith("_")} == expected
    loaded = FlowMatchEulerDiscreteScheduler.from_pretrained(out / "scheduler").config
    assert {k: loaded[k] for k in expected} == expected


def test_single_file_checkpoint_config_is_read_from_tensors_and_metadata(diffusers_dirs, tmp_path):
    from mlx_i2v.convert.ltx_infer import transformer_config

    source = diffusers_dirs("0.9.5")
    tensors = {k.removeprefix("model.diffusion_model."): mx.zeros(v.shape) for k, v in
               single_file_tensors(source, "0.9.5").items() if not k.startswith("vae.")}  # fmt: skip
    expected = read_config(source / "transformer")
    metadata = json.loads(ltx_metadata(source)["config"])["transformer"]
    config = transformer_config(tensors, metadata)
    assert {k: v for k, v in config.items() if k in expected} == {k: v for k, v in expected.items() if k in config}
    # without metadata, the released head count (32) is assumed
    assert transformer_config(tensors, None)["num_attention_heads"] == 32
    with pytest.raises(WeightLoadError, match="metadata says num_layers=3 but the weights have 2"):
        transformer_config(tensors, {**metadata, "num_layers": 3})


def _invoke(args: list[str]):
    """The installed CLI (one line and a non-zero exit code on a user error)."""
    return CliRunner().invoke(cli_main, ["convert", *args])


def test_single_file_bad_input_fails_cleanly(diffusers_dirs, tmp_path):
    source = diffusers_dirs("0.9.5")
    good = _single_file(source, tmp_path / "in", "0.9.5")
    tensors = single_file_tensors(source, "0.9.5")
    transformer_only = write_single_file(tmp_path / "in" / "transformer-only.safetensors",
                                         {k: v for k, v in tensors.items() if not k.startswith("vae.")}, None)
    other = write_single_file(tmp_path / "in" / "other.safetensors", {"weight": torch.zeros(2, 2)}, None)
    notes = tmp_path / "in" / "notes.txt"
    notes.write_text("not a checkpoint")
    fp8 = write_single_file(tmp_path / "in" / "ltxv-fp8.safetensors",
                            {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in tensors.items()}, None)
    truncated = tmp_path / "in" / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    umt5_dir = tmp_path / "umt5"
    shutil.copytree(source, umt5_dir)
    shutil.rmtree(umt5_dir / "text_encoder")
    UMT5EncoderModel(UMT5Config(**TINY_T5_CONFIG)).save_pretrained(umt5_dir / "text_encoder")
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(source, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer"))

    out = tmp_path / "out"
    cases = {
        "missing T5": ([str(good), str(out)], "holds no text encoder: pass --text-encoder"),
        "UMT5 as T5": ([str(good), str(out), "--text-encoder", str(umt5_dir)], "LTX-Video needs T5 v1.1"),
        "no tokenizer": ([str(good), str(out), "--text-encoder", str(no_tokenizer)], "missing tokenizer"),
        "unknown version": ([str(transformer_only), str(out), "--text-encoder", str(source)],
                            "LTX-Video version is unknown"),
        "wrong file": ([str(other), str(out), "--text-encoder", str(source)], "not an LTX-Video checkpoint"),
        "truncated": ([str(truncated), str(out), "--text-encoder", str(source)], "truncated or corrupt"),
        "float8": ([str(fp8), str(out), "--text-encoder", str(source)], "is a float8 checkpoint"),
        "not a checkpoint": ([str(notes), str(out)], "neither a model directory nor a single-file"),
        "text encoder for a directory": ([str(source), str(out), "--text-encoder", str(source)],
                                         "only for single-file"),
    }  # fmt: skip
    for case, (args, message) in cases.items():
        result = _invoke(args)
        assert result.exit_code != 0, case
        assert message in result.output and len(result.output.strip().splitlines()) == 1, (case, result.output)
        assert not out.exists(), case
    _no_leftovers(tmp_path)


def test_single_file_misshaped_tensor_leaves_nothing(diffusers_dirs, tmp_path):
    source = diffusers_dirs("0.9.5")
    tensors = single_file_tensors(source, "0.9.5")
    tensors["model.diffusion_model.transformer_blocks.1.ff.net.2.bias"] = torch.zeros(3)
    broken = write_single_file(tmp_path / "broken.safetensors", tensors, ltx_metadata(source))
    with pytest.raises(WeightLoadError, match=r"transformer_blocks\.1\.ff\.net\.2\.bias \(3,\)"):
        convert_model(broken, tmp_path / "out", dtype="float32", text_encoder=source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.safetensors"]


def test_unknown_single_file_tensor_is_named(diffusers_dirs, tmp_path):
    source = diffusers_dirs("0.9.1")
    tensors = {**single_file_tensors(source, "0.9.1"), "model.diffusion_model.surprise.weight": torch.zeros(2)}
    stray = write_single_file(tmp_path / "stray.safetensors", tensors, ltx_metadata(source))
    with pytest.raises(WeightLoadError, match="surprise"):
        convert_model(stray, tmp_path / "out", text_encoder=source)
    with pytest.raises(InvalidInputError, match="holds no text encoder"):
        convert_model(stray, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stray.safetensors"]


NO_TORCH = textwrap.dedent(
    """
    import sys
    for name in ("torch", "diffusers", "transformers"):
        sys.modules[name] = None  # importing any of them now raises ImportError
    from mlx_i2v.convert import convert_model

    source, output, text_encoder = sys.argv[1:]
    convert_model(source, output, dtype="float32", quantize=4, group_size=32, text_encoder=text_encoder)
    """
)


def test_single_file_conversion_without_torch(diffusers_dirs, converted, tmp_path):
    source = diffusers_dirs("0.9.5")
    single = _single_file(source, tmp_path, "0.9.5")
    out = tmp_path / "mlx"
    subprocess.run([sys.executable, "-c", NO_TORCH, str(single), str(out), str(source)], check=True, timeout=300)
    assert read_config(out / "transformer")["quantization"]["bits"] == 4
    fresh = load_component(TRANSFORMER, converted("0.9.5") / "transformer", mx.float32)
    assert quantize_transformer(fresh, 4, 32)
    _assert_same_parameters(load_component(TRANSFORMER, out / "transformer", mx.float32), fresh, "transformer")


def test_converted_ltx_directory_generates_the_frames_of_its_source(tiny_ltx_condition_dir, tmp_path):
    """The converter's output and the pipeline's loader agree: a converted LTXConditionPipeline directory
    loads through ``load_pipeline`` as LTX-Video and gives the source directory's frames exactly."""
    import numpy as np
    from PIL import Image

    from mlx_i2v import load_pipeline
    from mlx_i2v.convert import convert_model

    convert_model(tiny_ltx_condition_dir, tmp_path / "out", dtype="float32")
    photo = Image.fromarray((np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8))
    call = dict(height=64, width=96, num_frames=9, num_inference_steps=2, seed=1)
    source = load_pipeline(tiny_ltx_condition_dir, dtype="float32")(photo, "a fox", **call)
    converted = load_pipeline(tmp_path / "out", dtype="float32")(photo, "a fox", **call)
    assert converted.metadata["variant"] == source.metadata["variant"]
    np.testing.assert_array_equal(np.asarray(converted.frames), np.asarray(source.frames))
