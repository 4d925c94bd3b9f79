"""LoRAs in whole pipelines, against diffusers' ``load_lora_weights`` + ``set_adapters`` (T2); the
``set_loras`` round trip; the video's metadata; bad input before any weights load.

diffusers runs PEFT's unmerged forward ``base(x) + scaling * B(A(x))`` per adapter; we merge into the
float32 weights. Same noise, frames within 2e-3.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from PIL import Image
from ref_lora import BLOCK_LINEARS, IMAGE_KV, TOP_LINEARS, kohya_lora, lightx2v_lora, original_lora, peft_lora
from safetensors.torch import load_file

from mlx_i2v import load_pipeline
from mlx_i2v.errors import InvalidInputError
from mlx_i2v.lora import LoRA

HEIGHT, WIDTH, FRAMES = 64, 96, 5


def _photo() -> Image.Image:
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    return Image.fromarray(np.stack([x * 2, y * 3, (x + y) % 64 * 4], -1).astype(np.uint8))


def _noise(channels: int, stride: int) -> np.ndarray:
    shape = (1, channels, (FRAMES - 1) // 4 + 1, HEIGHT // stride, WIDTH // stride)
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def _transformer_state(model_dir, name="transformer") -> dict[str, torch.Tensor]:
    return load_file(model_dir / name / "diffusion_pytorch_model.safetensors")


def _diffusers(model_dir, adapters: list[tuple[str, float, bool]], **call) -> np.ndarray:
    """diffusers' frames with each (file, weight, into transformer_2) loaded as its own adapter."""
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline.from_pretrained(model_dir, dtype=torch.float32)
    names = []
    for i, (path, _, low) in enumerate(adapters):
        names.append(f"lora{i}")
        pipe.load_lora_weights(str(path), adapter_name=names[-1], load_into_transformer_2=low)
    pipe.set_adapters(names, adapter_weights=[w for _, w, _ in adapters])
    with torch.no_grad():
        return np.asarray(pipe(output_type="np", max_sequence_length=512, **call).frames[0], np.float32)


@pytest.fixture(scope="module")
def ti2v_loras(tiny_ti2v_dir, tmp_path_factory):
    """A PEFT LoRA with metadata (alpha != r, rank/alpha patterns, lora_B.bias) on the block and embedder
    linears, and a LightX2V-style file (pairs, diff_b, head.head.diff, and the diff_m/norm/patch deltas
    diffusers drops)."""
    d = tmp_path_factory.mktemp("loras")
    state = _transformer_state(tiny_ti2v_dir)
    peft = peft_lora(state, d / "peft.safetensors", rank_pattern={"blocks.1.ffn.net.2": 2},
                     alpha_pattern={"blocks.0.attn1.to_q": 3.0}, lora_bias=True,
                     pattern=BLOCK_LINEARS + "|" + TOP_LINEARS)  # fmt: skip
    return peft, lightx2v_lora(state, d / "lightx2v.safetensors")


def test_two_loras_at_different_strengths_match_diffusers(tiny_ti2v_dir, ti2v_loras):
    peft, lx = ti2v_loras
    call = dict(prompt="a red fox", negative_prompt="blurry", height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                num_inference_steps=2, guidance_scale=4.0)  # fmt: skip
    expected = _diffusers(tiny_ti2v_dir, [(peft, 0.7, False), (lx, -0.4, False)], image=_photo(),
                          latents=torch.from_numpy(_noise(48, 16)), **call)  # fmt: skip
    loras = [LoRA(peft, 0.7, policy="diffusers"), LoRA(lx, -0.4, policy="diffusers")]
    pipe = load_pipeline(tiny_ti2v_dir, dtype="float32", loras=loras)
    prompt = call.pop("prompt")
    got = pipe(_photo(), prompt, latents=_noise(48, 16), **call).frames
    assert np.abs(got - expected).max() < 2e-3
    pipe.set_loras([])
    base = pipe(_photo(), prompt, latents=_noise(48, 16), **call).frames
    assert np.abs(got - base).max() > 0.05  # the LoRAs matter far beyond the tolerance


def test_a14b_lora_per_expert_matches_diffusers(tiny_i2v_dirs, tmp_path):
    """A Wan2.1-I2V-style LoRA (with k_img/v_img, which A14B lacks: diffusers' PEFT skips them, we ignore them
    with a notice) on the high-noise expert, a musubi LoRA on the low-noise one (``load_into_transformer_2``)."""
    model_dir = tiny_i2v_dirs["a14b"]
    torch.manual_seed(0)
    from diffusers import WanTransformer3DModel
    from ref_transformer import TINY_COMMON, TINY_VARIANTS

    i2v_state = WanTransformer3DModel(**TINY_COMMON, **TINY_VARIANTS["i2v"]).state_dict()
    high = original_lora(i2v_state, tmp_path / "high.safetensors", pattern=BLOCK_LINEARS + "|" + IMAGE_KV,
                         alpha={"blocks.0.attn1.to_q": 2.0})  # fmt: skip
    low = kohya_lora(_transformer_state(model_dir, "transformer_2"), tmp_path / "low.safetensors")
    call = dict(prompt="a boat", negative_prompt="low quality", height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                num_inference_steps=4, guidance_scale=5.0, guidance_scale_2=3.0)  # fmt: skip
    expected = _diffusers(model_dir, [(high, 0.8, False), (low, 1.3, True)], image=_photo(),
                          latents=torch.from_numpy(_noise(16, 8)), **call)  # fmt: skip
    loras = [LoRA(high, 0.8, "high", "diffusers"), LoRA(low, 1.3, "low", "diffusers")]
    pipe = load_pipeline(model_dir, dtype="float32", loras=loras)
    prompt = call.pop("prompt")
    video = pipe(_photo(), prompt, latents=_noise(16, 8), **call)
    assert np.abs(video.frames - expected).max() < 2e-3
    records = video.metadata["loras"]
    assert [(r["name"], r["strength"], r["expert"]) for r in records] == [("high.safetensors", 0.8, "high"),
                                                                          ("low.safetensors", 1.3, "low")]
    assert all(len(r["sha256"]) == 64 for r in records)


def test_set_loras_round_trip_is_bit_exact(tiny_ti2v_dir, ti2v_loras):
    """On a resident transformer, set_loras merges, changes strengths and restores the base exactly; a
    fresh pipeline with the same LoRAs gives the same weights; a bad set changes nothing."""
    peft, lx = ti2v_loras
    pipe = load_pipeline(tiny_ti2v_dir, dtype="float32", keep_resident=True)
    model = pipe.experts.get(0)
    base = {k: np.array(v) for k, v in tree_flatten(model.parameters())}

    pipe.set_loras([(lx, 0.5), (peft, -1.0)])
    changed = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    assert sum(not np.array_equal(changed[k], base[k]) for k in base) > 40
    fresh = load_pipeline(tiny_ti2v_dir, dtype="float32", loras=[(lx, 0.5), (peft, -1.0)]).experts.get(0)
    for k, v in tree_flatten(fresh.parameters()):
        np.testing.assert_array_equal(np.array(v), changed[k], err_msg=k)

    with pytest.raises(InvalidInputError, match="LoRA file not found"):
        pipe.set_loras([(lx, 0.5), ("missing.safetensors", 1.0)])
    assert [a.spec.name for a in pipe.loras.active] == ["lightx2v.safetensors", "peft.safetensors"]

    pipe.set_loras([(lx, 2.0)])
    pipe.set_loras([])
    for k, v in tree_flatten(model.parameters()):
        np.testing.assert_array_equal(np.array(v), base[k], err_msg=k)
    assert pipe.experts.get(0) is model


def test_non_resident_expert_picks_up_the_new_set(tiny_ti2v_dir, ti2v_loras):
    _, lx = ti2v_loras
    pipe = load_pipeline(tiny_ti2v_dir, dtype="float32")
    kwargs = dict(height=HEIGHT, width=WIDTH, num_frames=FRAMES, num_inference_steps=1, seed=3, guidance_scale=1.0)
    base = pipe(_photo(), "x", **kwargs)
    assert pipe.experts.resident() == [] and base.metadata["loras"] == []
    pipe.set_loras([(lx, 1.5)])
    with_lora = pipe(_photo(), "x", **kwargs)
    again = load_pipeline(tiny_ti2v_dir, dtype="float32", loras=[(lx, 1.5)])(_photo(), "x", **kwargs)
    np.testing.assert_array_equal(with_lora.frames, again.frames)
    assert np.abs(with_lora.frames - base.frames).max() > 0.05
    assert with_lora.metadata["loras"] == [{"name": "lightx2v.safetensors", "sha256": with_lora.metadata["loras"][0]["sha256"],
                                            "strength": 1.5, "expert": None, "policy": "full"}]  # fmt: skip


@pytest.mark.parametrize(
    "loras, message",
    [
        (lambda: [("lora.safetensors", 1.0, "high")], "needs a two-expert model"),
        (lambda: [("lora.safetensors", float("nan"))], "strength must be a finite number"),
        (lambda: [("lora.safetensors", 1.0, "middle")], "expert must be 'high', 'low'"),
        (lambda: "lora.safetensors", "loras must be a list"),
        (lambda: [("nothere.safetensors", 1.0)], "LoRA file not found"),
        (lambda: [LoRA("lora.safetensors", policy="comfy")], "policy must be one of"),
    ],
)
def test_bad_loras_fail_before_any_weights_load(loras, message, tiny_ti2v_dir, ti2v_loras, tmp_path, monkeypatch):
    import mlx_i2v.families.wan.loading as loading

    monkeypatch.chdir(tmp_path)
    (tmp_path / "lora.safetensors").write_bytes(ti2v_loras[1].read_bytes())
    monkeypatch.setattr(loading, "load_wan_transformer", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(InvalidInputError, match=message):
        load_pipeline(tiny_ti2v_dir, dtype="float32", loras=loras())
