"""T5 v1.1 text encoder and tokenizer of the LTX-Video pipelines against transformers / diffusers."""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import sentencepiece as spm
import torch
from diffusers.pipelines.ltx.pipeline_ltx import LTXPipeline
from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXConditionPipeline
from mlx.utils import tree_flatten
from ref_t5 import (
    T5_XXL_1LAYER_CONFIG,
    T5_XXL_CONFIG,
    TINY_T5_CONFIG,
    build_t5_encoder,
    build_t5_tokenizer,
    train_spiece_model,
)
from ref_text import CORPUS, build_tiny_text_encoder
from safetensors.numpy import load_file, save_file
from transformers import AutoTokenizer, T5Config, T5EncoderModel
from transformers.convert_slow_tokenizer import import_protobuf

from mlx_i2v.errors import WeightLoadError
from mlx_i2v.models.spm_model import read_model
from mlx_i2v.models.tokenizer import T5Tokenizer, UMT5Tokenizer, t5_tokenizer_from_sentencepiece
from mlx_i2v.models.umt5 import (
    LTX_CONDITION_PROMPTS,
    LTX_PROMPTS,
    T5_MAP,
    T5_TEXT_ENCODER,
    MaskedPromptEncoding,
    T5Encoder,
    UMT5Config,
    encode_masked_prompts,
    load_t5,
    load_umt5,
)
from mlx_i2v.quantize import Quantization
from mlx_i2v.weights import config_from_dict, load_strict

PROMPTS = [
    "A cat surfing a wave at sunset, cinematic lighting.",
    "  two   people\tdancing\n\nin the rain &amp;amp; neon &lt;3  ",  # LTX does not clean prompts
    "Café crème ﬁne ① ＡＢＣ 𝐜𝐚𝐭 e\u0301 zero\u200bwidth no\u00a0break ideo\u3000space \u2028end",
    "The camera doesnâ€™t pan — it stays on the lake. 猫がサーフィン 🐒 مرحبا",
    " ".join(CORPUS * 4),  # longer than 256 tokens: exercises truncation
    "",
    "specials in text: </s> <pad> <unk> <extra_id_0> <extra_id_99>x<extra_id_5>",
]
PROMPT_IDS = ["plain", "whitespace-html", "unicode", "mojibake-cjk", "long", "empty", "specials"]


def rel_diff(ours: mx.array | np.ndarray, ref: torch.Tensor | np.ndarray) -> float:
    """max |ours - ref| / max |ref|, in float32."""
    ours = np.asarray(ours, dtype=np.float32)
    ref = ref.detach().float().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref, np.float32)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def reference_ids(tokenizer, prompts: list[str], max_length: int) -> dict:
    """What diffusers' LTX ``_get_t5_prompt_embeds`` asks of the tokenizer (no prompt cleaning)."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="np",
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> types.SimpleNamespace:
    """The tiny T5 tokenizer (spiece.model only) and encoder, saved once: folders, references and ours."""
    root = tmp_path_factory.mktemp("t5")
    ref_encoder = build_t5_encoder(root / "text_encoder", TINY_T5_CONFIG)
    build_t5_tokenizer(root / "tokenizer")
    assert not (root / "tokenizer" / "tokenizer.json").exists()
    return types.SimpleNamespace(
        root=root,
        ref_encoder=ref_encoder,
        ref_tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"),
        tokenizer=T5Tokenizer.from_folder(root / "tokenizer"),
        encoder=load_t5(root / "text_encoder", mx.float32),
    )


# --- sentencepiece model file ------------------------------------------------------------------------


def test_spiece_reader_matches_protobuf(tiny: types.SimpleNamespace) -> None:
    """Our wire-format reader against the protobuf package parsing the same file."""
    path = tiny.root / "tokenizer" / "spiece.model"
    proto = import_protobuf().ModelProto()
    proto.ParseFromString(path.read_bytes())
    ours = read_model(path)
    assert ours.pieces == tuple(p.piece for p in proto.pieces)
    assert ours.scores == tuple(p.score for p in proto.pieces)
    assert tuple(int(t) for t in ours.types) == tuple(p.type for p in proto.pieces)
    assert ours.types[:3] == (3, 3, 2)  # <pad>, </s> control; <unk> unknown
    assert (ours.model_type, ours.unk_id, ours.byte_fallback) == (
        proto.trainer_spec.model_type,
        proto.trainer_spec.unk_id,
        proto.trainer_spec.byte_fallback,
    )
    spec = proto.normalizer_spec
    assert len(ours.precompiled_charsmap) > 1000 and ours.precompiled_charsmap == spec.precompiled_charsmap
    assert (ours.add_dummy_prefix, ours.remove_extra_whitespaces) == (
        spec.add_dummy_prefix,
        spec.remove_extra_whitespaces,
    )


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda data: data[:-7], "runs past the end|truncated"),
        (lambda data: b"\x0f" + data, "wire type"),
    ],
    ids=["truncated", "bad-wire-type"],
)
def test_malformed_spiece_model(tiny: types.SimpleNamespace, tmp_path: Path, edit, match: str) -> None:
    shutil.copytree(tiny.root / "tokenizer", tmp_path, dirs_exist_ok=True)
    path = tmp_path / "spiece.model"
    path.write_bytes(edit(path.read_bytes()))
    with pytest.raises(WeightLoadError, match=rf"spiece\.model: .*({match})"):
        T5Tokenizer.from_folder(tmp_path)


def test_bpe_model_is_refused(tmp_path: Path) -> None:
    train_spiece_model(tmp_path / "spiece.model", model_type="bpe")
    with pytest.raises(WeightLoadError, match="only Unigram"):
        T5Tokenizer.from_folder(tmp_path)


# --- tokenizer ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_length", [128, 256, 9, 1])
def test_tokenizer_matches_transformers(tiny: types.SimpleNamespace, max_length: int) -> None:
    """Against transformers' T5Tokenizer built from the same spiece.model and configs."""
    input_ids, attention_mask = tiny.tokenizer(PROMPTS, max_length=max_length)
    ref = reference_ids(tiny.ref_tokenizer, PROMPTS, max_length)
    assert input_ids.shape == attention_mask.shape == (len(PROMPTS), max_length)
    np.testing.assert_array_equal(input_ids, ref["input_ids"])
    np.testing.assert_array_equal(attention_mask, ref["attention_mask"])


def test_tokenizer_layout(tiny: types.SimpleNamespace) -> None:
    """Truncation happens, unknown pieces and text specials occur, and sentinels have T5's ids."""
    input_ids, attention_mask = tiny.tokenizer(PROMPTS, max_length=256)
    lengths = dict(zip(PROMPT_IDS, attention_mask.sum(1)))
    assert lengths["long"] == 256 and input_ids[PROMPT_IDS.index("long"), -1] == tiny.tokenizer.eos_id
    assert lengths["empty"] == 1
    assert (input_ids[PROMPT_IDS.index("mojibake-cjk")] == 2).any()  # <unk>
    vocab = tiny.tokenizer.tokenizer
    pieces = len(read_model(tiny.root / "tokenizer" / "spiece.model").pieces)
    assert vocab.token_to_id("<extra_id_0>") == pieces + 99 and vocab.token_to_id("<extra_id_99>") == pieces
    # The charsmap (nmt_nfkc) is applied: ligatures, full-width and bold letters fold to plain ones.
    folded, plain = tiny.tokenizer(["ﬁne ＡＢＣ 𝐜𝐚𝐭", "fine ABC cat"], 16)[0]
    np.testing.assert_array_equal(folded, plain)
    specials = input_ids[PROMPT_IDS.index("specials")]
    for token in ("</s>", "<pad>", "<unk>", "<extra_id_0>", "<extra_id_5>", "<extra_id_99>"):
        assert vocab.token_to_id(token) in specials, token


def test_tokenizer_matches_sentencepiece(tiny: types.SimpleNamespace) -> None:
    """On ordinary prompts the pieces are sentencepiece's own, followed by </s>."""
    processor = spm.SentencePieceProcessor(model_file=str(tiny.root / "tokenizer" / "spiece.model"))
    prompts = [PROMPTS[0], *CORPUS[:6]]
    input_ids, attention_mask = tiny.tokenizer(prompts, max_length=128)
    for row, prompt in enumerate(prompts):
        ids = input_ids[row, : attention_mask[row].sum()].tolist()
        assert ids == processor.encode(prompt) + [1], prompt


def test_ltx_tokenizer_does_not_clean(tiny: types.SimpleNamespace) -> None:
    """LTX feeds prompts as they are; the Wan tokenizer on the same files cleans them first."""
    raw, _ = tiny.tokenizer(PROMPTS[1], max_length=32)
    cleaned, _ = UMT5Tokenizer.from_folder(tiny.root / "tokenizer")(PROMPTS[1], max_length=32)
    ref = reference_ids(tiny.ref_tokenizer, [PROMPTS[1]], 32)["input_ids"]
    np.testing.assert_array_equal(raw, ref)
    assert not np.array_equal(raw, cleaned)


def test_written_tokenizer_json_round_trips(tiny: types.SimpleNamespace, tmp_path: Path) -> None:
    """What a converter writes (tokenizer.json from spiece.model) loads to the same ids, in our loader and
    in transformers."""
    t5_tokenizer_from_sentencepiece(tiny.root / "tokenizer").save(str(tmp_path / "tokenizer.json"))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny.root / "tokenizer" / name, tmp_path)
    want = tiny.tokenizer(PROMPTS, max_length=128)
    ours = T5Tokenizer.from_folder(tmp_path)(PROMPTS, max_length=128)
    ref = reference_ids(AutoTokenizer.from_pretrained(tmp_path), PROMPTS, 128)
    for got in (ours, (ref["input_ids"], ref["attention_mask"])):
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_user_defined_pieces_match_transformers(tmp_path: Path) -> None:
    """A model with user-defined pieces: they stay Unigram pieces, segmented as transformers and
    sentencepiece segment them (a "▁" piece of their own before them)."""
    folder = build_t5_tokenizer(tmp_path, user_defined_symbols=("<cam>", "zoom"))
    prompts = ["a <cam> pans; zoom in, zoomzoom <cam>x", PROMPTS[0]]
    ours = T5Tokenizer.from_folder(folder)(prompts, max_length=40)
    ref = reference_ids(AutoTokenizer.from_pretrained(folder), prompts, 40)
    np.testing.assert_array_equal(ours[0], ref["input_ids"])
    np.testing.assert_array_equal(ours[1], ref["attention_mask"])
    processor = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    assert ours[0][0, : ours[1][0].sum()].tolist() == processor.encode(prompts[0]) + [1]


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda d: d["1"].update(content="<unk>"), r"'<unk>' is id 1 in .*tokenizer_config\.json but 2"),
        (lambda d: d.update({"one": d.pop("1")}), "malformed added_tokens_decoder"),
        (lambda d: d["1"].pop("content"), "malformed added token"),
    ],
    ids=["contradicting-id", "key-not-an-id", "no-content"],
)
def test_bad_added_tokens_are_an_error(tiny: types.SimpleNamespace, tmp_path: Path, edit, match: str) -> None:
    shutil.copytree(tiny.root / "tokenizer", tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    edit(config["added_tokens_decoder"])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(WeightLoadError, match=match):
        T5Tokenizer.from_folder(tmp_path)


def test_neither_tokenizer_file_is_an_error(tiny: types.SimpleNamespace, tmp_path: Path) -> None:
    shutil.copy(tiny.root / "tokenizer" / "tokenizer_config.json", tmp_path)
    with pytest.raises(WeightLoadError, match="neither tokenizer.json nor spiece.model"):
        T5Tokenizer.from_folder(tmp_path)


# --- encoder -----------------------------------------------------------------------------------------


def test_real_config_builds_the_t5_v1_1_xxl_encoder() -> None:
    """The full-size encoder from t5-v1_1-xxl's config (built lazily, nothing allocated) has exactly the
    parameters, names and shapes of transformers' T5EncoderModel (on the meta device): 4.76 B."""
    config = T5Config(**T5_XXL_CONFIG).to_dict()
    model = T5_TEXT_ENCODER.build(config)
    assert isinstance(model, T5Encoder)
    ours = {k: v.shape for k, v in tree_flatten(model.parameters())}
    with torch.device("meta"):
        ref = T5EncoderModel(T5Config(**config))
    ref_state = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k != "encoder.embed_tokens.weight"}
    assert set(T5_MAP.apply(ref_state)) == set(ours)
    assert all(tuple(ours[k]) == shape for k, shape in T5_MAP.apply(ref_state).items())
    assert 4.75e9 < sum(np.prod(s) for s in ours.values()) < 4.77e9
    assert [b.layer[0].SelfAttention.has_relative_attention_bias for b in model.encoder.block[:3]] == [
        True,
        False,
        False,
    ]


@pytest.mark.parametrize(
    "pipeline,encoding",
    [(LTXPipeline, LTX_PROMPTS), (LTXConditionPipeline, LTX_CONDITION_PROMPTS)],
    ids=["ltx-unmasked-128", "condition-masked-256"],
)
def test_encode_matches_diffusers(
    tiny: types.SimpleNamespace, pipeline: type, encoding: MaskedPromptEncoding
) -> None:
    """Against the real ``_get_t5_prompt_embeds`` of both LTX pipeline kinds: embeddings at real and padded
    positions, and the mask."""
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[4]]
    pipe = types.SimpleNamespace(
        tokenizer=tiny.ref_tokenizer, text_encoder=tiny.ref_encoder, _execution_device=torch.device("cpu")
    )
    with torch.no_grad():
        ref, ref_mask = pipeline._get_t5_prompt_embeds(pipe, prompt=prompts)
    input_ids, attention_mask = tiny.tokenizer(prompts, max_length=encoding.max_length)
    ours, mask = encode_masked_prompts(
        tiny.encoder, input_ids, attention_mask, mask_encoder=encoding.mask_encoder
    )
    assert ours.shape == tuple(ref.shape) == (3, encoding.max_length, 64) and ours.dtype == mx.float32
    assert mask.dtype == mx.bool_ and np.array_equal(np.array(mask), ref_mask.numpy())
    real = np.array(mask)
    assert 0 < real.sum() < real.size
    assert rel_diff(np.array(ours)[real], ref.numpy()[real]) < 1e-5
    assert rel_diff(np.array(ours)[~real], ref.numpy()[~real]) < 1e-5


def test_masking_the_encoder_matters(tiny: types.SimpleNamespace) -> None:
    """The two LTX pipeline kinds really differ at the real tokens of a padded prompt."""
    input_ids, attention_mask = tiny.tokenizer(PROMPTS[0], max_length=64)
    masked, _ = encode_masked_prompts(tiny.encoder, input_ids, attention_mask, mask_encoder=True)
    unmasked, _ = encode_masked_prompts(tiny.encoder, input_ids, attention_mask, mask_encoder=False)
    real = attention_mask[0] > 0
    assert rel_diff(np.array(masked)[0, real], np.array(unmasked)[0, real]) > 1e-3


def test_xxl_width_layer_matches_transformers() -> None:
    """One layer at the real t5-v1_1-xxl widths (4096 / 64 heads x 64 / 10240), float32, with padding."""
    ref_model = build_t5_encoder(None, T5_XXL_1LAYER_CONFIG, seed=1)
    weights = T5_MAP.apply({k: mx.array(v.numpy()) for k, v in ref_model.state_dict().items()})
    model = T5Encoder(config_from_dict(UMT5Config, T5_XXL_1LAYER_CONFIG))
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


def test_quantized_load_runs(tiny: types.SimpleNamespace) -> None:
    """8-bit on load quantizes the UMT5 recipe's layers (every block's, not the shared bias) and stays
    close to float."""
    model = load_t5(tiny.root / "text_encoder", mx.float32, quantize=Quantization(8, 64))
    assert isinstance(model.shared, nn.QuantizedEmbedding)
    for block in model.encoder.block:
        assert isinstance(block.layer[0].SelfAttention.q, nn.QuantizedLinear)
        assert isinstance(block.layer[1].DenseReluDense.wo, nn.QuantizedLinear)
    assert type(model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias) is nn.Embedding

    input_ids, attention_mask = tiny.tokenizer(PROMPTS[:2], max_length=32)
    quantized, _ = encode_masked_prompts(model, input_ids, attention_mask, mask_encoder=True)
    full, _ = encode_masked_prompts(tiny.encoder, input_ids, attention_mask, mask_encoder=True)
    assert np.isfinite(np.array(quantized)).all()
    assert 0 < rel_diff(quantized, np.array(full)) < 3e-2


# --- strict loading ----------------------------------------------------------------------------------


def test_families_are_not_mixed_up(tiny: types.SimpleNamespace, tmp_path: Path) -> None:
    build_tiny_text_encoder(tmp_path / "umt5")
    with pytest.raises(WeightLoadError, match="model_type 'umt5', expected 't5'"):
        load_t5(tmp_path / "umt5", mx.float32)
    with pytest.raises(WeightLoadError, match="model_type 't5', expected 'umt5'"):
        load_umt5(tiny.root / "text_encoder", mx.float32)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda t: t.pop("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
         r"missing .*encoder\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight"),
        (lambda t: t.update({"encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight":
                             np.zeros((32, 4), np.float32)}),
         r"unexpected .*encoder\.block\.1\.layer\.0\.SelfAttention\.relative_attention_bias\.weight"),
    ],
    ids=["missing-layer-0-bias", "bias-in-layer-1"],
)
def test_only_layer_0_holds_the_bias(tiny: types.SimpleNamespace, tmp_path: Path, edit, match: str) -> None:
    shutil.copy(tiny.root / "text_encoder" / "config.json", tmp_path)
    tensors = load_file(tiny.root / "text_encoder" / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(WeightLoadError, match=match):
        load_t5(tmp_path, mx.float32)
