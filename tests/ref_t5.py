"""Reference T5 text components of the LTX-Video pipelines, built with transformers and sentencepiece.

The LTX-Video diffusers repos ship google/t5-v1_1-xxl: ``text_encoder/`` is a ``T5EncoderModel`` and
``tokenizer/`` was saved by transformers 4's slow ``T5Tokenizer`` (diffusers
``scripts/convert_ltx_to_diffusers.py``), so it holds ``spiece.model``, ``tokenizer_config.json``,
``special_tokens_map.json`` and ``added_tokens.json`` but no ``tokenizer.json``. The tiny builders keep
that layout and every state-dict key name; only widths, depth and vocabulary shrink.
"""

from __future__ import annotations

import json
from pathlib import Path

import sentencepiece as spm
import torch
from ref_text import CORPUS
from transformers import T5Config, T5EncoderModel

TINY_T5_CONFIG = dict(
    vocab_size=256,
    d_model=64,
    d_kv=16,
    d_ff=128,
    num_layers=3,  # layers 1 and 2 reuse layer 0's position bias
    num_heads=4,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
    dropout_rate=0.0,
)

# t5-v1_1-xxl widths (d_model 4096, 64 heads of 64, d_ff 10240) with one layer and a small vocabulary.
T5_XXL_1LAYER_CONFIG = dict(
    TINY_T5_CONFIG, vocab_size=512, d_model=4096, d_kv=64, d_ff=10240, num_layers=1, num_heads=64
)

# google/t5-v1_1-xxl's encoder: what its config.json says (the decoder fields do not matter here).
T5_XXL_CONFIG = dict(
    T5_XXL_1LAYER_CONFIG, vocab_size=32128, num_layers=24, num_decoder_layers=24, dropout_rate=0.1
)

SPM_VOCAB_SIZE = 120  # the most pieces sentencepiece finds in CORPUS is 145
EXTRA_IDS = 100


def build_t5_encoder(path: str | Path | None, config: dict, *, seed: int = 0) -> T5EncoderModel:
    """Save a seeded, randomly initialised ``T5EncoderModel`` to ``path`` (unless None) and return it
    (float32, eval mode)."""
    torch.manual_seed(seed)
    model = T5EncoderModel(T5Config(**config)).eval()
    if path is not None:
        model.save_pretrained(path)
    return model


def train_spiece_model(
    path: Path, *, user_defined_symbols: tuple[str, ...] = (), model_type: str = "unigram"
) -> Path:
    """Train a small SentencePiece model on :data:`ref_text.CORPUS` with T5's special ids (<pad>=0,
    </s>=1, <unk>=2, no <s>) and its default ``nmt_nfkc`` normalization; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    corpus = path.with_suffix(".txt")
    corpus.write_text("\n".join(CORPUS * 3), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(path.with_suffix("")),
        vocab_size=SPM_VOCAB_SIZE,
        model_type=model_type,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        user_defined_symbols=list(user_defined_symbols),
        num_threads=1,
        minloglevel=2,
    )
    corpus.unlink()
    return path


def build_t5_tokenizer(path: str | Path, *, user_defined_symbols: tuple[str, ...] = ()) -> Path:
    """A ``tokenizer/`` folder as the LTX repos have it: a trained ``spiece.model`` and the config files
    transformers 4's slow ``T5Tokenizer.save_pretrained`` writes (sentinels ``<extra_id_0>`` =
    last id ... ``<extra_id_99>`` = first id after the pieces). Returns the folder."""
    path = Path(path)
    model = train_spiece_model(path / "spiece.model", user_defined_symbols=user_defined_symbols)
    pieces = spm.SentencePieceProcessor(model_file=str(model)).get_piece_size()
    sentinels = [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]
    sentinel_ids = {token: pieces + EXTRA_IDS - 1 - i for i, token in enumerate(sentinels)}

    def added(content: str) -> dict:
        flags = dict(lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
        return dict(content=content, **flags)

    decoder = {"0": added("<pad>"), "1": added("</s>"), "2": added("<unk>")}
    decoder |= {str(i): added(token) for token, i in sorted(sentinel_ids.items(), key=lambda kv: kv[1])}
    specials = dict(eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    specials["additional_special_tokens"] = sentinels
    config = dict(
        specials,
        added_tokens_decoder=decoder,
        clean_up_tokenization_spaces=True,
        extra_ids=EXTRA_IDS,
        legacy=True,
        model_max_length=128,
        sp_model_kwargs={},
        tokenizer_class="T5Tokenizer",
    )
    for name, content in (
        ("tokenizer_config.json", config),
        ("special_tokens_map.json", specials),
        ("added_tokens.json", sentinel_ids),
    ):
        (path / name).write_text(json.dumps(content, indent=2), encoding="utf-8")
    return path
