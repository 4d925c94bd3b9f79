"""The UMT5 tokenizer of the Wan pipelines, on the ``tokenizers`` library alone (no transformers at runtime).

It reproduces what diffusers' ``_get_t5_prompt_embeds`` feeds the text encoder: ``prompt_clean`` each
prompt, then transformers' ``T5Tokenizer(padding="max_length", truncation=True, add_special_tokens=True)``
— the Unigram pieces, cut to ``max_length - 1``, then ``</s>``, then ``<pad>`` up to ``max_length``.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import re
from pathlib import Path
from typing import Any, Sequence

import ftfy
import numpy as np
from tokenizers import Tokenizer, normalizers, pre_tokenizers

from ..errors import InvalidInputError, ModelNotFoundError, WeightLoadError
from ..weights import read_config

log = logging.getLogger(__name__)


def basic_clean(text: str) -> str:
    """Repair mojibake, decode (doubly) escaped HTML entities, strip the ends."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def whitespace_clean(text: str) -> str:
    """Collapse every run of whitespace to one space."""
    return re.sub(r"\s+", " ", text).strip()


def prompt_clean(text: str) -> str:
    """diffusers' Wan ``prompt_clean``; the original Wan ``HuggingfaceTokenizer(clean='whitespace')`` agrees."""
    return whitespace_clean(basic_clean(text))


def _special_token(folder: Path, name: str, default: str) -> str:
    """The ``name`` special token ("eos_token", ...) as the tokenizer's config files declare it.

    transformers writes it to ``tokenizer_config.json`` (older checkpoints to ``special_tokens_map.json``),
    either as a string or as an ``AddedToken`` dict; without either, T5Tokenizer's default applies.
    """
    for filename in ("tokenizer_config.json", "special_tokens_map.json"):
        if (folder / filename).is_file():
            value: Any = read_config(folder, filename).get(name)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                return value
    return default


class UMT5Tokenizer:
    """Batch tokenizer giving fixed-length ``input_ids`` and ``attention_mask`` for the UMT5 encoder."""

    def __init__(self, tokenizer: Tokenizer, *, eos_id: int, pad_id: int):
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.pad_id = pad_id

    @classmethod
    def from_folder(cls, folder: str | Path) -> UMT5Tokenizer:
        """Load a transformers ``tokenizer/`` folder; only its ``tokenizer.json`` (and config) is read."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelNotFoundError(f"tokenizer folder {folder} does not exist")
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise WeightLoadError(f"tokenizer: missing {path} (a sentencepiece model alone is not supported)")
        try:
            text = path.read_text(encoding="utf-8")
            spec = json.loads(text)
            tokenizer = Tokenizer.from_str(text)
        except Exception as e:  # OSError, JSON errors, and the bare Exception tokenizers raises
            raise WeightLoadError(f"tokenizer: cannot read {path}: {str(e).splitlines()[0]}") from None

        # transformers >= 5 does not use tokenizer.json's pipeline verbatim for T5: it rebuilds the
        # tokenizer from the vocabulary, keeping only the sentencepiece ``Precompiled`` normalizer and
        # pre-tokenizing with WhitespaceSplit + Metaspace (``T5Tokenizer.__init__``). Do the same so the
        # ids match what diffusers feeds the encoder. transformers also forces the Unigram unk id to 2 and
        # turns byte fallback off; we keep the file's values (umt5-xxl: <unk>=3), which the model was
        # trained with, so ids can differ from transformers only on text the vocabulary cannot spell.
        tokenizer.normalizer = _precompiled_normalizer(spec.get("normalizer"))
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.WhitespaceSplit(),
                pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
            ]
        )
        # </s>, truncation and padding are applied in __call__.
        tokenizer.post_processor = None
        tokenizer.no_truncation()
        tokenizer.no_padding()

        ids = {}
        for name, default in (("eos_token", "</s>"), ("pad_token", "<pad>")):
            token = _special_token(folder, name, default)
            ids[name] = tokenizer.token_to_id(token)
            if ids[name] is None:
                raise WeightLoadError(f"tokenizer: {name} {token!r} is not in the vocabulary of {path}")
        log.info("loaded tokenizer %s: vocab %d", path, tokenizer.get_vocab_size())
        return cls(tokenizer, eos_id=ids["eos_token"], pad_id=ids["pad_token"])

    def __call__(
        self, prompts: str | Sequence[str], max_length: int = 512, names: Sequence[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Clean and tokenize ``prompts``.

        Returns ``(input_ids, attention_mask)``, both int64 (B, max_length): the pieces of each cleaned
        prompt, truncated to ``max_length - 1``, then ``</s>``, then padding (mask 0). A prompt that is
        cut is logged as a warning naming it (``names``, default "prompt 1", ...) and what was dropped.
        """
        if max_length < 1:
            raise InvalidInputError(f"max_length must be at least 1, got {max_length}")
        if isinstance(prompts, str):
            prompts = [prompts]
        names = names or [f"prompt {i + 1}" for i in range(len(prompts))]
        cleaned = [prompt_clean(p) for p in prompts]
        encodings = self.tokenizer.encode_batch(cleaned, add_special_tokens=False)
        input_ids = np.full((len(encodings), max_length), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(encodings), max_length), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            if len(encoding.ids) > max_length - 1:
                _log_truncation(names[row], cleaned[row], encoding.ids, encoding.offsets, max_length - 1)
            ids = encoding.ids[: max_length - 1] + [self.eos_id]
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        return input_ids, attention_mask


def _log_truncation(name: str, text: str, ids: list[int], offsets: list[tuple[int, int]], kept: int) -> None:
    """Warn that a prompt was cut after ``kept`` tokens, saying how much was dropped and where."""
    total, start = len(ids), offsets[kept][0]
    dropped = text[start:]
    log.warning(
        "the %s is %d tokens, more than the %d the model reads: the last %d tokens (%d characters) are "
        "dropped, from %r", name, total, kept, total - kept, len(dropped),
        dropped[:30] + ("..." if len(dropped) > 30 else ""),
    )


def _precompiled_normalizer(spec: dict[str, Any] | None) -> normalizers.Normalizer | None:
    """The sentencepiece ``Precompiled`` normalizer inside a tokenizer.json ``normalizer`` entry, if any."""
    if not spec:
        return None
    parts = spec["normalizers"] if spec.get("type") == "Sequence" else [spec]
    for part in parts:
        if part.get("type") == "Precompiled" and part.get("precompiled_charsmap"):
            return normalizers.Precompiled(base64.b64decode(part["precompiled_charsmap"]))
    return None
