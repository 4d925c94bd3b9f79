"""UMT5 text encoder and tokenizer against transformers / diffusers (the references the Wan pipelines use)."""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers.pipelines.wan.pipeline_wan_i2v import WanImageToVideoPipeline
from diffusers.pipelines.wan.pipeline_wan_i2v import prompt_clean as diffusers_prompt_clean
from safetensors.numpy import load_file, save_file
from transformers import AutoTokenizer, UMT5EncoderModel
from transformers.models.umt5.modeling_umt5 import UMT5Attention

from mlx_i2v.errors import ModelNotFoundError, WeightLoadError
from mlx_i2v.models.tokenizer import UMT5Tokenizer, prompt_clean
from mlx_i2v.models.umt5 import (
    DIFFUSERS_MAP,
    UMT5Config,
    UMT5Encoder,
    encode_prompts,
    load_umt5,
    relative_position_buckets,
)
from mlx_i2v.weights import config_from_dict, load_strict
from ref_text import (
    CORPUS,
    UMT5_XXL_1LAYER_CONFIG,
    build_text_encoder,
    build_tiny_text_encoder,
    build_tiny_tokenizer,
)

PROMPTS = [
    "A cat surfing a wave at sunset, cinematic lighting.",
    "  two   people\tdancing\n\nin the rain &amp;amp; neon &lt;3 &quot;reflections&quot;  ",
    "The camera doesnâ€™t pan â€” it stays on the lake. Café crème ﬁne",
    " ".join(CORPUS * 12),  # longer than 512 tokens: exercises truncation
    "",
    "UPPERCASE, digits 0123 and emoji 🐒 are mostly unknown </s> pieces",
]
PROMPT_IDS = ["plain", "whitespace-html", "mojibake", "long", "empty", "unknown"]


Array = mx.array | torch.Tensor | np.ndarray


def as_numpy(x: Array) -> np.ndarray:
    """float32 numpy copy of an MLX array, a torch tensor or a numpy array."""
    if isinstance(x, torch.Tensor):
        return x.detach().float().numpy()
    if isinstance(x, mx.array):
        return np.array(x.astype(mx.float32))
    return x.astype(np.float32)


def rel_diff(ours: Array, ref: Array) -> float:
    """max |ours - ref| / max |ref|, in float32."""
    ours, ref = as_numpy(ours), as_numpy(ref)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> types.SimpleNamespace:
    """The tiny tokenizer and encoder, saved once: folders, transformers objects and ours."""
    root = tmp_path_factory.mktemp("text")
    ref_encoder = build_tiny_text_encoder(root / "text_encoder")
    build_tiny_tokenizer(root / "tokenizer")
    return types.SimpleNamespace(
        root=root,
        ref_encoder=ref_encoder,
        ref_tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"),
        tokenizer=UMT5Tokenizer.from_folder(root / "tokenizer"),
        encoder=load_umt5(root / "text_encoder", mx.float32),
    )


# --- tokenizer ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", PROMPTS, ids=PROMPT_IDS)
def test_prompt_clean_matches_diffusers(text: str) -> None:
    assert prompt_clean(text) == diffusers_prompt_clean(text)


def test_prompt_clean_repairs_text() -> None:
    assert prompt_clean(PROMPTS[1]) == 'two people dancing in the rain & neon <3 "reflections"'
    assert prompt_clean(PROMPTS[2]) == "The camera doesn't pan — it stays on the lake. Café crème fine"


@pytest.mark.parametrize("max_length", [512, 9, 1])
def test_tokenizer_matches_transformers(tiny: types.SimpleNamespace, max_length: int) -> None:
    input_ids, attention_mask = tiny.tokenizer(PROMPTS, max_length=max_length)
    ref = tiny.ref_tokenizer(
        [diffusers_prompt_clean(p) for p in PROMPTS],
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="np",
    )
    assert input_ids.shape == attention_mask.shape == (len(PROMPTS), max_length)
    np.testing.assert_array_equal(input_ids, ref["input_ids"])
    np.testing.assert_array_equal(attention_mask, ref["attention_mask"])


def test_tokenizer_layout(tiny: types.SimpleNamespace) -> None:
    """The long prompt really is truncated, unknown pieces occur, and the empty prompt is just </s>."""
    input_ids, attention_mask = tiny.tokenizer(PROMPTS, max_length=512)
    lengths = attention_mask.sum(1)
    assert lengths[3] == 512 and input_ids[3, -1] == tiny.tokenizer.eos_id
    assert lengths[4] == 1 and input_ids[4, 0] == tiny.tokenizer.eos_id and (input_ids[4, 1:] == 0).all()
    assert (input_ids[5] == tiny.ref_tokenizer.unk_token_id).any()


def test_tokenizer_pipeline_follows_transformers_not_the_file(tiny: types.SimpleNamespace, tmp_path: Path) -> None:
    """transformers rebuilds T5 tokenizers, dropping a tokenizer.json normalizer other than sentencepiece's
    ``Precompiled``; an NFKC normalizer in the file (which would map "𝐜𝐚𝐭" to "cat") must be ignored too."""
    shutil.copy(tiny.root / "tokenizer" / "tokenizer_config.json", tmp_path)
    spec = json.loads((tiny.root / "tokenizer" / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "NFKC"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    prompts = ["𝐜𝐚𝐭 and ⓐ dog", "a  cat"]
    ours = UMT5Tokenizer.from_folder(tmp_path)(prompts, max_length=16)
    ref = AutoTokenizer.from_pretrained(tmp_path)(
        [diffusers_prompt_clean(p) for p in prompts], padding="max_length", max_length=16, truncation=True
    )
    np.testing.assert_array_equal(ours[0], ref["input_ids"])
    np.testing.assert_array_equal(ours[1], ref["attention_mask"])


def test_tokenizer_accepts_a_single_string(tiny: types.SimpleNamespace) -> None:
    single = tiny.tokenizer(PROMPTS[0], max_length=16)
    batch = tiny.tokenizer([PROMPTS[0]], max_length=16)
    np.testing.assert_array_equal(single[0], batch[0])


def test_tokenizer_missing_files(tiny: types.SimpleNamespace, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        UMT5Tokenizer.from_folder(tmp_path / "nowhere")
    shutil.copy(tiny.root / "tokenizer" / "tokenizer_config.json", tmp_path)
    with pytest.raises(WeightLoadError, match="tokenizer.json"):
        UMT5Tokenizer.from_folder(tmp_path)


# --- encoder -----------------------------------------------------------------------------------------


def test_config_reads_checkpoint(tiny: types.SimpleNamespace) -> None:
    config = tiny.encoder.config
    assert (config.vocab_size, config.d_model, config.d_kv, config.d_ff) == (256, 48, 12, 96)
    assert (config.num_layers, config.num_heads, config.relative_attention_num_buckets) == (2, 4, 32)
    with pytest.raises(WeightLoadError, match="feed_forward_proj"):
        config_from_dict(UMT5Config, {"feed_forward_proj": "relu"})


@pytest.mark.parametrize("buckets,max_distance", [(32, 128), (8, 20)])
def test_relative_position_buckets_match_transformers(buckets: int, max_distance: int) -> None:
    length = 600
    module = UMT5Attention(
        types.SimpleNamespace(
            is_decoder=False,
            relative_attention_num_buckets=buckets,
            relative_attention_max_distance=max_distance,
            d_model=8,
            d_kv=2,
            num_heads=4,
            dropout_rate=0.0,
        ),
        has_relative_attention_bias=False,
    )
    positions = torch.arange(length)
    ref = module._relative_position_bucket(positions[None, :] - positions[:, None])
    ours = relative_position_buckets(length, buckets, max_distance)
    np.testing.assert_array_equal(np.array(ours), ref.numpy())


def test_encoder_matches_transformers(tiny: types.SimpleNamespace) -> None:
    """Two prompts of different lengths, padded to 512: every position (real and padded) agrees."""
    input_ids, attention_mask = tiny.tokenizer(PROMPTS[:2], max_length=512)
    assert attention_mask.sum(1)[0] != attention_mask.sum(1)[1]
    ours = tiny.encoder(mx.array(input_ids), mx.array(attention_mask))
    with torch.no_grad():
        ref = tiny.ref_encoder(torch.from_numpy(input_ids), torch.from_numpy(attention_mask))
    ref = ref.last_hidden_state
    assert ours.shape == tuple(ref.shape) and ours.dtype == mx.float32
    ours, ref, real = as_numpy(ours), as_numpy(ref), attention_mask.astype(bool)
    assert rel_diff(ours[real], ref[real]) < 1e-4
    assert rel_diff(ours[~real], ref[~real]) < 1e-4


def test_encode_prompts_matches_diffusers(tiny: types.SimpleNamespace) -> None:
    """Against the real ``WanImageToVideoPipeline._get_t5_prompt_embeds`` (cleaning included)."""
    prompts = [PROMPTS[1], PROMPTS[0], PROMPTS[4]]
    pipe = types.SimpleNamespace(
        tokenizer=tiny.ref_tokenizer, text_encoder=tiny.ref_encoder, _execution_device=torch.device("cpu")
    )
    with torch.no_grad():
        ref = WanImageToVideoPipeline._get_t5_prompt_embeds(pipe, prompt=prompts, max_sequence_length=512)
    input_ids, attention_mask = tiny.tokenizer(prompts, max_length=512)
    seen = []

    def encoder(ids: mx.array, mask: mx.array) -> mx.array:
        seen.append(ids.shape)
        return tiny.encoder(ids, mask)

    ours = encode_prompts(encoder, input_ids, attention_mask, max_length=512)
    assert ours.shape == tuple(ref.shape) == (3, 512, 48)
    assert rel_diff(ours, ref) < 1e-4
    assert (as_numpy(ours)[attention_mask == 0] == 0).all()
    # the encoder ran on the longest prompt's tokens, not on all 512 positions
    assert seen == [(3, int(attention_mask.sum(1).max()))]


def test_encode_prompts_pads_short_inputs(tiny: types.SimpleNamespace) -> None:
    input_ids, attention_mask = tiny.tokenizer(PROMPTS[:2], max_length=40)
    ours = encode_prompts(tiny.encoder, input_ids, attention_mask, max_length=64)
    full = encode_prompts(tiny.encoder, input_ids, attention_mask, max_length=40)
    assert ours.shape == (2, 64, 48)
    assert mx.array_equal(ours[:, :40], full).item() and mx.all(ours[:, 40:] == 0).item()


@pytest.mark.parametrize(
    "dtype,torch_dtype,tol", [(mx.bfloat16, torch.bfloat16, 3e-2), (mx.float16, torch.float16, 3e-3)]
)
def test_half_precision_follows_transformers(
    tiny: types.SimpleNamespace, dtype: mx.Dtype, torch_dtype: torch.dtype, tol: float
) -> None:
    """Half-precision loading keeps ``wo`` in float32 exactly when transformers does (float16 only)."""
    ours_model = load_umt5(tiny.root / "text_encoder", dtype)
    ref_model = UMT5EncoderModel.from_pretrained(tiny.root / "text_encoder", dtype=torch_dtype).eval()
    wo = ours_model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype
    ref_wo = ref_model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype
    assert (wo == mx.float32) == (ref_wo == torch.float32)
    assert ours_model.encoder.final_layer_norm.weight.dtype == dtype

    input_ids, attention_mask = tiny.tokenizer(PROMPTS[:2], max_length=64)
    ours = ours_model(mx.array(input_ids), mx.array(attention_mask))
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(input_ids), torch.from_numpy(attention_mask)).last_hidden_state
    assert ours.dtype == dtype and ref.dtype == torch_dtype
    assert rel_diff(ours, ref) < tol


def test_xxl_width_layer_matches_transformers() -> None:
    """One layer at the real umt5-xxl widths (4096 / 64 heads x 64 / 10240), float32, with padding."""
    ref_model = build_text_encoder(None, UMT5_XXL_1LAYER_CONFIG, seed=1)
    weights = DIFFUSERS_MAP.apply({k: mx.array(v.numpy()) for k, v in ref_model.state_dict().items()})
    model = UMT5Encoder(config_from_dict(UMT5Config, UMT5_XXL_1LAYER_CONFIG))
    load_strict(model, weights, dtype=mx.float32, what="text_encoder")
    del weights

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 512, (2, 32), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 20:] = 0
    with torch.no_grad():
        ref = ref_model(input_ids, attention_mask).last_hidden_state
    ours = model(mx.array(input_ids.numpy()), mx.array(attention_mask.numpy()))
    assert rel_diff(ours, ref) < 1e-4


# --- strict loading ----------------------------------------------------------------------------------


def _edited_checkpoint(tiny: types.SimpleNamespace, folder: Path, edit) -> Path:
    shutil.copy(tiny.root / "text_encoder" / "config.json", folder)
    tensors = load_file(tiny.root / "text_encoder" / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")
    return folder


def test_tied_embedding_copy_is_ignored(tiny: types.SimpleNamespace, tmp_path: Path) -> None:
    def add_tied(t: dict) -> None:
        t["encoder.embed_tokens.weight"] = t["shared.weight"].copy()

    model = load_umt5(_edited_checkpoint(tiny, tmp_path, add_tied), mx.float32)
    assert mx.array_equal(model.shared.weight, tiny.encoder.shared.weight).item()


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda t: t.pop("encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"),
         r"missing .*encoder\.block\.1\.layer\.0\.SelfAttention\.relative_attention_bias\.weight"),
        (lambda t: t.update({"encoder.block.2.layer.0.layer_norm.weight": np.ones(48, np.float32)}),
         r"unexpected .*encoder\.block\.2\.layer\.0\.layer_norm\.weight"),
        (lambda t: t.update({"lm_head.weight": np.ones((256, 48), np.float32)}),
         r"lm_head\.weight.* not used by any rule"),
        (lambda t: t.update({"encoder.final_layer_norm.weight": np.ones(47, np.float32)}),
         r"mis-shaped .*encoder\.final_layer_norm\.weight \(47,\) != \(48,\)"),
    ],
    ids=["missing", "unexpected", "unmapped", "misshaped"],
)
def test_strict_loading_names_the_key(tiny: types.SimpleNamespace, tmp_path: Path, edit, match: str) -> None:
    with pytest.raises(WeightLoadError, match=match):
        load_umt5(_edited_checkpoint(tiny, tmp_path, edit), mx.float32)


def test_missing_config_is_a_weight_error(tiny: types.SimpleNamespace, tmp_path: Path) -> None:
    shutil.copy(tiny.root / "text_encoder" / "model.safetensors", tmp_path)
    with pytest.raises(WeightLoadError, match="config.json"):
        load_umt5(tmp_path, mx.float32)
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 48}) + "}")
    with pytest.raises(WeightLoadError, match="config.json"):
        load_umt5(tmp_path, mx.float32)
