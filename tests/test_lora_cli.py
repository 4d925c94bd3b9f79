"""LoRAs through the converter and the command line: ``convert --lora`` (merged into float weights; kept as
factors beside 4-bit weights) equals loading the LoRA at run time, ``generate --lora`` records it in the
mp4, ``info --lora`` reports it, and ``FILE[:STRENGTH]`` parsing and every bad flag give one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten
from PIL import Image
from ref_lora import BLOCK_LINEARS, TOP_LINEARS, lightx2v_lora, peft_lora
from safetensors.torch import load_file

from mlx_i2v import load_pipeline
from mlx_i2v.cli.main import main
from mlx_i2v.convert import convert_model, model_info, quantize_model
from mlx_i2v.errors import InvalidInputError
from mlx_i2v.lora import LoRALinear, parse_lora_argument
from mlx_i2v.quantize import QuantizationConfig


@pytest.fixture(scope="module")
def loras(tiny_ti2v_dir, tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("cli_loras")
    state = load_file(tiny_ti2v_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    peft = peft_lora(state, d / "peft.safetensors", lora_bias=True, pattern=BLOCK_LINEARS + "|" + TOP_LINEARS)
    return lightx2v_lora(state, d / "lx.safetensors"), peft


def _params(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def _assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_convert_merges_loras_into_a_float_model(tiny_ti2v_dir, loras, tmp_path):
    lx, peft = loras
    specs = [(lx, 0.7), (peft, -0.3)]
    out = convert_model(tiny_ti2v_dir, tmp_path / "merged", dtype="float32", loras=specs)
    baked = load_pipeline(out).experts.get(0)
    runtime = load_pipeline(tiny_ti2v_dir, dtype="float32", loras=specs).experts.get(0)
    _assert_same(_params(baked), _params(runtime))
    records = model_info(out)["loras"]
    assert [(r["name"], r["strength"], r["baked"]) for r in records] == [("lx.safetensors", 0.7, "merged"),
                                                                         ("peft.safetensors", -0.3, "merged")]
    with pytest.raises(InvalidInputError, match="quantizing a merged weight erases most of a LoRA"):
        quantize_model(out, tmp_path / "q", bits=4)


def test_convert_quantized_keeps_factors_and_equals_run_time(tiny_ti2v_dir, loras, tmp_path):
    lx, peft = loras
    out = tmp_path / "q4"
    args = ["convert", str(tiny_ti2v_dir), str(out), "--dtype", "float32", "--quantize", "4", "--group-size", "32",
            "--lora", f"{lx}:0.7", "--lora", f"{peft}:-0.3"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (out / "transformer" / "loras" / "factors.safetensors").is_file()
    pipe = load_pipeline(out, keep_resident=True)
    baked = pipe.experts.get(0)
    runtime = load_pipeline(tiny_ti2v_dir, dtype="float32", quantize=QuantizationConfig(4, 32),
                            loras=[(lx, 0.7), (peft, -0.3)]).experts.get(0)  # fmt: skip
    _assert_same(_params(baked), _params(runtime))
    layers = {p: m.scales for p, m in baked.named_modules() if isinstance(m, LoRALinear)}
    assert len(layers) > 20
    assert layers == {p: m.scales for p, m in runtime.named_modules() if isinstance(m, LoRALinear)}
    assert [r["baked"] for r in model_info(out)["loras"]] == ["factors", "factors"]
    info = CliRunner().invoke(main, ["info", str(out)])
    assert "lora:         lx.safetensors x0.7, baked (factors)" in info.output
    # the baked LoRAs are part of this model's base: set_loras adds to them and [] comes back to them
    before = _params(baked)
    pipe.set_loras([(lx, 1.0)])
    assert not all(np.array_equal(v, before[k]) for k, v in _params(baked).items() if k in before)
    pipe.set_loras([])
    _assert_same(_params(baked), before)


def test_generate_with_loras_records_them(tiny_ti2v_dir, loras, tmp_path):
    lx, _ = loras
    photo = tmp_path / "photo.png"
    y, x = np.mgrid[0:64, 0:96]
    Image.fromarray(np.stack([x * 2, y * 3, x + y], -1).astype(np.uint8)).save(photo)
    out = tmp_path / "clip.mp4"
    exe = Path(sys.executable).parent / "mlx-i2v"
    args = [str(exe), "generate", str(photo), "-p", "x", "--model", str(tiny_ti2v_dir), "--frames", "5",
            "--height", "64", "--width", "96", "--steps", "1", "--seed", "1", "--lora", f"{lx}:-0.25", "-o", str(out)]
    result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    with av.open(str(out)) as c:
        meta = json.loads(c.metadata["comment"])
    assert [(r["name"], r["strength"], r["expert"]) for r in meta["loras"]] == [("lx.safetensors", -0.25, None)]


@pytest.mark.parametrize(
    "args, message",
    [
        (lambda lx: ["--lora-high", str(lx)], "needs a two-expert model"),
        (lambda lx: ["--lora", f"{lx.parent / 'missing.safetensors'}:2"], "LoRA file not found"),
        (lambda lx: ["--lora", f"{lx}:nan"], "strength must be a finite number"),
    ],
)
def test_bad_lora_flags_are_one_line_errors(args, message, tiny_ti2v_dir, loras, tmp_path):
    photo = tmp_path / "p.png"
    Image.new("RGB", (96, 64)).save(photo)
    result = CliRunner().invoke(main, ["generate", str(photo), "-p", "x", "--model", str(tiny_ti2v_dir),
                                       "-o", str(tmp_path / "o.mp4"), *args(loras[0])])  # fmt: skip
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not (tmp_path / "o.mp4").exists()


def test_info_lora(tiny_ti2v_dir, tiny_i2v_dirs, loras):
    lx, peft = loras
    result = CliRunner().invoke(main, ["info", "--lora", str(lx), "--model", str(tiny_ti2v_dir)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "format:       wan, original names, lora_down + lora_up, full deltas (diff, diff_b, diff_m)" in out
    assert "rank:         4" in out and "alpha:        none (scale 1)" in out
    assert "blocks.N.attn1.to_q.weight" in out and "blocks.N.scale_shift_table" in out
    assert f"on transformer: {len(load_file(lx))} tensors applied, 0 ignored" in out
    compat = json.loads(CliRunner().invoke(main, ["info", "--lora", str(lx), "--lora-policy", "diffusers", "--json"]).output)
    assert {r["reason"] for r in compat["ignored_reasons"]} == {
        "diffusers drops norm deltas", "diffusers 0.42.1 ignores the .diff keys it does not handle"}
    assert compat["tensors"] == len(load_file(lx)) and sum(len(r["keys"]) for r in compat["ignored_reasons"]) > 0
    peft_info = json.loads(CliRunner().invoke(main, ["info", "--lora", str(peft), "--json"]).output)
    assert peft_info["ranks"] == [4] and peft_info["alphas"] == [6.0] and "PEFT metadata" in peft_info["format"]
    # the TI2V LoRA on the A14B experts: the patch embedding and head differ (36/16 channels, not 48)
    bad = CliRunner().invoke(main, ["info", "--lora", str(lx), tiny_i2v_dirs["a14b"].as_posix()])
    assert bad.exit_code == 1 and len(bad.output.strip().splitlines()) == 1
    assert "shapes that do not fit the transformer: diffusion_model.head.head.diff ((192, 32) != (64, 32))" in bad.output


@pytest.mark.parametrize(
    "text, path, strength",
    [
        ("a.safetensors", "a.safetensors", 1.0),
        ("a.safetensors:0.5", "a.safetensors", 0.5),
        ("a.safetensors:-2", "a.safetensors", -2.0),
        ("a:b.safetensors", "a:b.safetensors", 1.0),
        ("dir:x/a.safetensors:1e-1", "dir:x/a.safetensors", 0.1),
        ("C:\\loras\\a.safetensors:3", "C:\\loras\\a.safetensors", 3.0),
    ],
)
def test_parse_lora_argument(text, path, strength):
    lora = parse_lora_argument(text, "low")
    assert (str(lora.path), lora.strength, lora.expert) == (path, strength, "low")


@pytest.mark.parametrize("text, message", [(":1", "no file name"), ("a.safetensors:inf", "finite")])
def test_parse_lora_argument_errors(text, message):
    with pytest.raises(InvalidInputError, match=message):
        parse_lora_argument(text)
