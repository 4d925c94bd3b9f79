"""Reference text components built with transformers, shared by the text tests and later pipeline tests.

The tiny encoder keeps every state-dict key name of the umt5-xxl encoder diffusers ships for Wan
(``text_encoder/`` is a ``UMT5EncoderModel``); only widths, depth and vocabulary are shrunk. The tiny
tokenizer is a Unigram model estimated offline from a few sentences, saved the way the Wan repos save
``tokenizer/`` (a T5 tokenizer with ``tokenizer.json``).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel

TINY_UMT5_CONFIG = dict(
    vocab_size=256,
    d_model=48,
    d_kv=12,
    d_ff=96,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
    dropout_rate=0.0,
)

# umt5-xxl widths (d_model 4096, 64 heads of 64, d_ff 10240) with one layer and a small vocabulary.
UMT5_XXL_1LAYER_CONFIG = dict(
    TINY_UMT5_CONFIG, vocab_size=512, d_model=4096, d_kv=64, d_ff=10240, num_layers=1, num_heads=64
)

# Training text for the tiny tokenizer: prompts of the kind Wan sees.
CORPUS = """\
A cat surfing a wave at sunset, cinematic lighting, slow motion.
A dog running through a field of flowers on a bright summer day.
Two people dancing in the rain on a city street at night, neon reflections.
A monkey dancing on a tree branch in the jungle, playful and energetic.
The camera slowly pans across a quiet mountain lake covered in morning mist.
An astronaut walks on the surface of the moon while the earth rises behind him.
A small boat sails across the ocean during a storm with huge waves.
Children play football in a park while their parents watch from a bench.
Bright tones, overexposed, static, blurred details, subtitles, worst quality, low quality.
Jumping quickly over the lazy fox, 4K, 60 fps, HDR: extremely vivid colors & sharp edges!
""".splitlines()


def build_text_encoder(path: str | Path | None, config: dict, *, seed: int = 0) -> UMT5EncoderModel:
    """Save a seeded, randomly initialised ``UMT5EncoderModel`` to ``path`` (unless None) and return it
    (float32, eval mode)."""
    torch.manual_seed(seed)
    model = UMT5EncoderModel(UMT5Config(**config)).eval()
    if path is not None:
        model.save_pretrained(path)
    return model


def build_tiny_text_encoder(path: str | Path) -> UMT5EncoderModel:
    """The tiny ``text_encoder`` of the Wan test pipelines (d_model 48, 2 layers, vocab 256)."""
    return build_text_encoder(path, TINY_UMT5_CONFIG)


def build_tiny_tokenizer(path: str | Path) -> T5TokenizerFast:
    """A small Unigram tokenizer (<pad>=0, </s>=1, <unk>=2, T5's Metaspace pre-tokenizer) wrapped in
    transformers' T5 tokenizer and saved to ``path`` (writes ``tokenizer.json``).

    The pieces are every character and every whitespace-separated word (``▁``-prefixed, punctuation
    split off) of :data:`CORPUS`, scored by their log frequency. ``tokenizers``' UnigramTrainer would do,
    but its EM is not reproducible from run to run (scores and hence ids change), and tests need fixed ids.
    """
    counts: Counter[str] = Counter()
    for line in CORPUS:
        counts.update(line.replace(" ", ""))
        counts.update("▁" + word.strip(",.!:&") for word in line.split() if word.strip(",.!:&"))
    counts["▁"] = sum(len(line.split()) for line in CORPUS)
    total = sum(counts.values())
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(piece, math.log(count / total)) for piece, count in sorted(counts.items())]
    assert len(vocab) <= TINY_UMT5_CONFIG["vocab_size"], len(vocab)
    backend = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer = T5TokenizerFast(
        tokenizer_object=backend,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=512,
    )
    tokenizer.save_pretrained(path)
    return tokenizer
