"""LoRA files of every style -> canonical deltas, against diffusers 0.42.1's ``lora_state_dict``.

T1: under the "diffusers" policy the deltas equal what diffusers converts, module by module (``B @ A`` with
the adapter's ``lora_alpha / r`` and PEFT's ``lora_B.bias``), and every file diffusers refuses with a
ValueError/KeyError is refused; the "full" policy adds exactly the deltas diffusers drops. T4 (the
format-level part): unknown keys, shapes of another model, files that change nothing, the image branch
on a model without one, DoRA, unreadable and unsafe files.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import WanPipeline
from diffusers import WanTransformer3DModel as TorchWan
from ref_lora import (
    BLOCK_LINEARS,
    IMAGE_KV,
    factors,
    kohya_lora,
    lightx2v_lora,
    linear_modules,
    original_lora,
    original_module,
    peft_lora,
    save,
)
from ref_transformer import TINY_COMMON, TINY_VARIANTS

from mlx_i2v.errors import InvalidInputError, UnsafeCheckpointError, WeightLoadError
from mlx_i2v.lora import LowRank, read_lora, resolve, transformer_shapes
from mlx_i2v.models.wan.transformer import WanTransformerConfig
from mlx_i2v.weights import config_from_dict


def _config(variant: str, **overrides) -> dict:
    return {**TINY_COMMON, **TINY_VARIANTS[variant], **overrides}


@pytest.fixture(scope="module")
def states() -> dict[str, dict[str, torch.Tensor]]:
    """State dicts of the tiny diffusers transformers (only the names and shapes matter here)."""
    torch.manual_seed(0)
    return {v: TorchWan(**_config(v)).state_dict() for v in ("i2v", "ti2v", "a14b")}


@pytest.fixture(scope="module")
def shapes() -> dict[str, dict[str, tuple[int, ...]]]:
    return {v: transformer_shapes(config_from_dict(WanTransformerConfig, _config(v))) for v in ("i2v", "ti2v", "a14b")}


def ours(path: Path, shapes, policy: str = "diffusers") -> dict[str, np.ndarray]:
    """Our deltas by target parameter: ``scale * up @ down`` for pairs, the tensor for full deltas."""
    out = {}
    for d in resolve(read_lora(path), shapes, policy).deltas:
        if isinstance(d, LowRank):
            value = d.scale * (d.up.astype(mx.float32) @ d.down.astype(mx.float32))
        else:
            value = d.tensor
        assert d.target not in out
        out[d.target] = np.array(value, dtype=np.float32)
    return out


def _pattern(patterns: dict, module: str):
    return next((v for p, v in patterns.items() if re.match(rf"(.*\.)?({p})$", module)), None)


def diffusers_deltas(path: Path) -> dict[str, np.ndarray]:
    """What diffusers applies per parameter at adapter weight 1: its converted ``lora_B @ lora_A`` times
    ``lora_alpha / r`` from the file's metadata (1 without), and ``lora_B.bias`` times the same."""
    sd, metadata = WanPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    meta = {k.removeprefix("transformer."): v for k, v in (metadata or {}).items()}

    def scale(module: str) -> float:
        if not meta:
            return 1.0
        r = _pattern(meta.get("rank_pattern", {}), module) or meta["r"]
        alpha = _pattern(meta.get("alpha_pattern", {}), module) or meta["lora_alpha"]
        return alpha / r

    out = {}
    for key, value in sd.items():
        key = key.removeprefix("transformer.")
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            up = sd[f"transformer.{module}.lora_B.weight"]
            out[f"{module}.weight"] = (scale(module) * (up.float() @ value.float())).numpy()
        elif key.endswith(".lora_B.bias"):
            module = key.removesuffix(".lora_B.bias")
            out[f"{module}.bias"] = (scale(module) * value.float()).numpy()
    return out


def assert_same_deltas(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert np.abs(got[name]).max() > 0, name  # random non-zero factors: a lost delta cannot hide
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7, err_msg=name)


STYLES = {
    "peft_metadata": lambda s, p: peft_lora(s, p, rank_pattern={"blocks.1.ffn.net.2": 2},
                                           alpha_pattern={"blocks.0.attn1.to_q": 3.0}, lora_bias=True),
    "peft_no_metadata": lambda s, p: peft_lora(s, p, alpha=None, pattern=BLOCK_LINEARS + "|" + IMAGE_KV),
    "original_down_up_alpha": lambda s, p: original_lora(
        s, p, alpha={"blocks.0.attn1.to_q": 2.0, "blocks.1.attn2.to_k": 16.0, "blocks.0.ffn.net.2": 1.0},
        ranks={"blocks.0.ffn.net.0.proj": 3}, diff_b=True),
    "original_A_B_no_alpha": lambda s, p: original_lora(s, p, names=("lora_A", "lora_B"), alpha=None),
    "kohya_musubi": lambda s, p: kohya_lora(s, p, pattern=BLOCK_LINEARS + "|" + IMAGE_KV),
    "lightx2v": lambda s, p: lightx2v_lora(s, p),
    "lightx2v_pth": lambda s, p: lightx2v_lora(s, p.with_suffix(".pth")),
}  # fmt: skip


@pytest.mark.parametrize("style", STYLES)
def test_conversion_matches_diffusers(style, states, shapes, tmp_path):
    path = STYLES[style](states["i2v"], tmp_path / "lora.safetensors")
    assert_same_deltas(ours(path, shapes["i2v"]), diffusers_deltas(path))


def test_full_policy_adds_exactly_what_diffusers_drops(states, shapes, tmp_path):
    path = lightx2v_lora(states["i2v"], tmp_path / "lx.safetensors")
    lora = read_lora(path)
    full, compat = ours(path, shapes["i2v"], "full"), ours(path, shapes["i2v"], "diffusers")
    assert set(compat) < set(full)
    for k in compat:
        np.testing.assert_array_equal(full[k], compat[k])
    extra = set(full) - set(compat)
    blocks = [f"blocks.{i}." for i in range(2)]
    expected = {"scale_shift_table", "patch_embedding.weight", "patch_embedding.bias"}
    expected |= {f"condition_embedder.image_embedder.norm{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    expected |= {b + n for b in blocks for n in ("scale_shift_table", "norm2.weight", "norm2.bias",
                 "attn1.norm_q.weight", "attn1.norm_k.weight", "attn2.norm_q.weight", "attn2.norm_k.weight",
                 "attn2.norm_added_k.weight")}  # fmt: skip
    assert extra == expected
    # the deltas are the file's tensors, re-laid out like the weights (the patch conv channels-last)
    raw = {k: v for k, v in zip(lora.keys, mx.load(str(path)).values())}
    np.testing.assert_array_equal(full["blocks.1.scale_shift_table"], np.array(raw["diffusion_model.blocks.1.diff_m"]))
    np.testing.assert_array_equal(full["blocks.0.norm2.bias"], np.array(raw["diffusion_model.blocks.0.norm3.diff_b"]))
    np.testing.assert_array_equal(
        full["patch_embedding.weight"], np.moveaxis(np.array(raw["diffusion_model.patch_embedding.diff"]), 1, -1)
    )
    # strict accounting: under "full" every tensor applies; under "diffusers" the rest is ignored with a reason
    assert resolve(lora, shapes["i2v"], "full").num_applied_keys == lora.num_tensors
    compat_resolved = resolve(lora, shapes["i2v"], "diffusers")
    assert compat_resolved.num_applied_keys + compat_resolved.num_ignored_keys == lora.num_tensors
    assert {i.reason for i in compat_resolved.ignored} == {
        "diffusers drops norm deltas", "diffusers 0.42.1 ignores the .diff keys it does not handle"}


def _orig(states, *modules, rank=2, **extra) -> dict[str, torch.Tensor]:
    """A diffusion_model.-prefixed file: a lora_down/up pair on each original module, plus ``extra``."""
    state = states["i2v"]
    gen = torch.Generator().manual_seed(7)
    tensors = {}
    for module in modules:
        out, inp = state[module + ".weight"].shape
        name = "diffusion_model." + original_module(module)
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, inp, generator=gen)
        tensors[f"{name}.lora_up.weight"] = torch.randn(out, rank, generator=gen)
    tensors.update({k: torch.randn(v, generator=gen) if isinstance(v, tuple) else v for k, v in extra.items()})
    return tensors


# (name, build(states) -> tensors, the full policy's verdict: None = applies, else an error pattern)
REFUSED = {
    "alpha_on_text_embedding": (lambda s: _orig(s, "blocks.0.attn1.to_q", "condition_embedder.text_embedder.linear_1",
                                               **{"diffusion_model.text_embedding.0.alpha": torch.tensor(4.0)}), None),
    "pair_on_patch_embedding": (lambda s: {**_orig(s, "blocks.0.attn1.to_q"),
                                           "diffusion_model.patch_embedding.lora_down.weight": torch.randn(2, 36 * 4),
                                           "diffusion_model.patch_embedding.lora_up.weight": torch.randn(32, 2)},
                                "two matrices on a linear"),
    "unknown_module": (lambda s: _orig(s, "blocks.0.attn1.to_q", **{"diffusion_model.blocks.0.mystery.lora_down.weight": (2, 32),
                                                                     "diffusion_model.blocks.0.mystery.lora_up.weight": (32, 2)}),
                       "blocks.0.mystery"),
    "head_diff_without_bias": (lambda s: _orig(s, "blocks.0.attn1.to_q", **{"diffusion_model.head.head.diff": (64, 32)}), None),
    "embedding_bias_without_pair": (lambda s: _orig(s, "blocks.0.attn1.to_q", **{"diffusion_model.text_embedding.0.diff_b": (32,)}), None),
    "no_blocks": (lambda s: _orig(s, "condition_embedder.time_proj"), None),
    "peft_with_alpha_keys": (lambda s: {"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.randn(2, 32),
                                        "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.randn(32, 2),
                                        "transformer.blocks.0.attn1.to_q.alpha": torch.tensor(4.0)}, None),
    "musubi_attention_only": (lambda s: {k: v for k, v in _kohya(s).items() if "ffn" not in k}, None),
    "wan_fun_double_underscore": (lambda s: {k.replace("lora_unet_", "lora_unet__"): v for k, v in _kohya(s).items()}, None),
}  # fmt: skip


def _kohya(states) -> dict[str, torch.Tensor]:
    """musubi's keys for every block linear of the tiny I2V model."""
    gen = torch.Generator().manual_seed(5)
    tensors = {}
    for module, shape in linear_modules(states["i2v"], BLOCK_LINEARS).items():
        name = "lora_unet_" + original_module(module).replace(".", "_")
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = factors(shape, 2, gen)
        tensors[f"{name}.alpha"] = torch.tensor(1.0)
    return tensors


@pytest.mark.parametrize("case", REFUSED)
def test_diffusers_policy_refuses_what_diffusers_raises_on(case, states, shapes, tmp_path):
    build, full_verdict = REFUSED[case]
    path = save(tmp_path / f"{case}.safetensors", build(states))
    with pytest.raises((ValueError, KeyError)):
        sd = WanPipeline.lora_state_dict(str(path))
        if not all("lora" in k for k in sd):  # load_lora_weights' own check, after conversion
            raise ValueError("Invalid LoRA checkpoint")
    with pytest.raises(InvalidInputError, match="under the diffusers policy"):
        resolve(read_lora(path), shapes["i2v"], "diffusers")
    if full_verdict is None:
        assert resolve(read_lora(path), shapes["i2v"], "full").num_applied_keys == len(build(states))
    else:
        with pytest.raises(InvalidInputError, match=re.escape(full_verdict)):
            resolve(read_lora(path), shapes["i2v"], "full")


@pytest.mark.parametrize("prefix", ["", "pipe.dit.", "model.diffusion_model.", "base_model.model."])
def test_other_prefixes_apply_under_full_and_are_refused_under_diffusers(prefix, states, shapes, tmp_path):
    """DiffSynth (bare or ``pipe.dit.``), ComfyUI and PEFT-internal prefixes: the same deltas as the
    ``diffusion_model.`` file; diffusers keeps none of these keys (it filters on ``transformer.``), so
    its LoRA would silently do nothing, which the diffusers policy refuses."""
    reference = original_lora(states["i2v"], tmp_path / "ref.safetensors", names=("lora_A", "lora_B"), alpha=None)
    path = original_lora(states["i2v"], tmp_path / "other.safetensors", names=("lora_A", "lora_B"), alpha=None, prefix=prefix)
    got, want = ours(path, shapes["i2v"], "full"), ours(reference, shapes["i2v"], "full")
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    assert not any(k.startswith("transformer.") for k in WanPipeline.lora_state_dict(str(path)))
    with pytest.raises(InvalidInputError, match="would load nothing"):
        resolve(read_lora(path), shapes["i2v"], "diffusers")


def test_peft_default_adapter_names_read_under_full(states, shapes, tmp_path):
    from safetensors.torch import load_file

    path = peft_lora(states["i2v"], tmp_path / "p.safetensors", alpha=None)
    renamed = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
               for k, v in load_file(path).items()}  # fmt: skip
    other = save(tmp_path / "default.safetensors", renamed)
    got, want = ours(other, shapes["i2v"], "full"), ours(path, shapes["i2v"], "full")
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


def test_image_branch_is_ignored_on_a_model_without_one(states, shapes, tmp_path, caplog):
    """A Wan2.1-I2V LoRA on Wan2.2-A14B: ``k_img``/``v_img``/``img_emb`` keys are ignored with a notice
    naming their count; everything else applies."""
    path = lightx2v_lora(states["i2v"], tmp_path / "i2v_lora.safetensors")
    lora = read_lora(path)
    resolved = resolve(lora, shapes["a14b"], "full")
    image = [k for k in lora.keys if "_img" in k or "img_emb" in k]
    assert len(image) > 10
    assert sorted(k for i in resolved.ignored for k in i.keys) == sorted(image)
    assert resolved.num_applied_keys + len(image) == lora.num_tensors
    assert f"ignoring {len(image)} keys for the image branch" in caplog.text


def test_shapes_of_another_model_are_named(states, shapes, tmp_path):
    torch.manual_seed(0)
    wide = TorchWan(**_config("ti2v", attention_head_dim=24)).state_dict()  # a "14B" LoRA on the "5B" model
    path = original_lora(wide, tmp_path / "wide.safetensors")
    with pytest.raises(InvalidInputError, match=r"shapes that do not fit the transformer: .*blocks\.0\.\w+_attn\.\w\.lora_down\.weight"):
        resolve(read_lora(path), shapes["ti2v"], "full")


def test_unknown_keys_and_files_that_change_nothing(states, shapes, tmp_path):
    base = original_lora(states["ti2v"], tmp_path / "base.safetensors")
    from safetensors.torch import load_file

    tensors = load_file(base)
    bad = save(tmp_path / "bad.safetensors", {**tensors, "diffusion_model.blocks.0.self_attn.q.lora_mid.weight": torch.ones(2)})
    with pytest.raises(InvalidInputError, match=r"unknown key name: diffusion_model\.blocks\.0\.self_attn\.q\.lora_mid\.weight"):
        resolve(read_lora(bad), shapes["ti2v"])
    deep = save(tmp_path / "deep.safetensors", {**tensors, "diffusion_model.blocks.7.self_attn.q.diff_b": torch.ones(32)})
    with pytest.raises(InvalidInputError, match=r"does not have: diffusion_model\.blocks\.7\.self_attn\.q\.diff_b"):
        resolve(read_lora(deep), shapes["ti2v"])
    only_image = save(tmp_path / "img.safetensors", {"diffusion_model.blocks.0.cross_attn.k_img.diff_b": torch.ones(32)})
    with pytest.raises(InvalidInputError, match="changes nothing in the transformer: the transformer has no image branch"):
        resolve(read_lora(only_image), shapes["ti2v"])
    lone = save(tmp_path / "lone.safetensors", {k: v for k, v in tensors.items() if "lora_up" not in k or "self_attn.q" not in k})
    with pytest.raises(InvalidInputError, match="a LoRA factor without its partner"):
        resolve(read_lora(lone), shapes["ti2v"])
    dora = save(tmp_path / "dora.safetensors", {**tensors, "diffusion_model.blocks.0.self_attn.q.dora_scale": torch.ones(1, 32)})
    with pytest.raises(InvalidInputError, match="DoRA"):
        resolve(read_lora(dora), shapes["ti2v"])
    mixed = save(tmp_path / "mixed.safetensors", {**tensors, "blocks.0.attn1.to_k.diff_b": torch.ones(32)})
    with pytest.raises(InvalidInputError, match="mixes original Wan and diffusers module names"):
        read_lora(mixed)


def test_peft_metadata_rank_must_match(states, shapes, tmp_path):
    path = peft_lora(states["ti2v"], tmp_path / "p.safetensors", rank=4, rank_pattern={"blocks.0.attn1.to_q": 2})
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    metadata["lora_adapter_metadata"] = metadata["lora_adapter_metadata"].replace('"blocks.0.attn1.to_q": 2', '"blocks.0.attn1.to_q": 3')
    bad = save(tmp_path / "bad.safetensors", load_file(path), metadata)
    with pytest.raises(InvalidInputError, match="rank 2 but r=3"):
        resolve(read_lora(bad), shapes["ti2v"])


def test_unreadable_and_unsafe_files(tmp_path):
    with pytest.raises(InvalidInputError, match="LoRA file not found"):
        read_lora(tmp_path / "missing.safetensors")
    (tmp_path / "lora.txt").write_text("x")
    with pytest.raises(InvalidInputError, match="must be .safetensors or a torch pickle"):
        read_lora(tmp_path / "lora.txt")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": ")
    with pytest.raises(WeightLoadError, match="cannot read LoRA file"):
        read_lora(tmp_path / "cut.safetensors")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.ones(2, 32), "x": Evil()},
               tmp_path / "evil.pth")  # fmt: skip
    with pytest.raises(UnsafeCheckpointError):
        read_lora(tmp_path / "evil.pth")


def test_every_tensor_is_accounted_for_in_a_style_report(states, tmp_path):
    lora = read_lora(lightx2v_lora(states["i2v"], tmp_path / "lx.safetensors"))
    assert not lora.unusable and sum(len(d.keys) for d in lora.deltas) == lora.num_tensors
    assert lora.style.describe() == (
        "wan, original names, lora_down + lora_up, full deltas (diff, diff_b, diff_m)")
    assert pickle.loads(pickle.dumps(lora.style)) == lora.style
