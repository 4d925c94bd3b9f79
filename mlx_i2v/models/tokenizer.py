"""The T5-family tokenizers, on the ``tokenizers`` library alone (no transformers at run time).

They reproduce what diffusers' ``_get_t5_prompt_embeds`` feeds the text encoder: transformers'
``T5Tokenizer(padding="max_length", truncation=True, add_special_tokens=True)`` — the Unigram pieces, cut
to ``max_length - 1``, then ``</s>``, then ``<pad>`` up to ``max_length``. The Wan pipelines first run
``prompt_clean`` on each prompt (:class:`UMT5Tokenizer`); the LTX pipelines tokenize the prompt as it is
(:class:`T5Tokenizer`).

A ``tokenizer/`` folder holds either ``tokenizer.json`` (the Wan repos, anything saved by transformers 5)
or only the SentencePiece ``spiece.model`` (the LTX-Video repos, saved by transformers 4's slow
``T5Tokenizer``: ``spiece.model``, ``tokenizer_config.json``, ``special_tokens_map.json``,
``added_tokens.json``). Both give the tokenizer transformers 5 builds from them.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import ftfy
import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers

from ..errors import InvalidInputError, ModelNotFoundError, WeightLoadError
from ..weights import read_config
from .spm_model import PieceType, read_model, unigram_tokenizer

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


class T5Tokenizer:
    """Batch tokenizer giving fixed-length ``input_ids`` and ``attention_mask`` for a T5-family encoder;
    prompts are tokenized as they are (the LTX pipelines)."""

    # Applied to each prompt before tokenizing; None for none.
    clean: Callable[[str], str] | None = None

    def __init__(self, tokenizer: Tokenizer, *, eos_id: int, pad_id: int):
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.pad_id = pad_id

    @classmethod
    def from_folder(cls, folder: str | Path) -> T5Tokenizer:
        """Load a transformers ``tokenizer/`` folder: its ``tokenizer.json``, else its ``spiece.model``,
        and the special tokens its config files name."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelNotFoundError(f"tokenizer folder {folder} does not exist")
        if (folder / "tokenizer.json").is_file():
            tokenizer = _from_tokenizer_json(folder / "tokenizer.json")
        elif (folder / "spiece.model").is_file():
            tokenizer = t5_tokenizer_from_sentencepiece(folder)
        else:
            raise WeightLoadError(f"tokenizer: {folder} has neither tokenizer.json nor spiece.model")
        # </s>, truncation and padding are applied in __call__.
        tokenizer.post_processor = None
        tokenizer.no_truncation()
        tokenizer.no_padding()

        ids = {}
        for name, default in (("eos_token", "</s>"), ("pad_token", "<pad>")):
            token = _special_token(folder, name, default)
            ids[name] = tokenizer.token_to_id(token)
            if ids[name] is None:
                raise WeightLoadError(f"tokenizer: {name} {token!r} is not in the vocabulary of {folder}")
        log.info("loaded tokenizer %s: vocab %d", folder, tokenizer.get_vocab_size())
        return cls(tokenizer, eos_id=ids["eos_token"], pad_id=ids["pad_token"])

    def __call__(
        self, prompts: str | Sequence[str], max_length: int = 512, names: Sequence[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize ``prompts`` (after :attr:`clean`, if any).

        Returns ``(input_ids, attention_mask)``, both int64 (B, max_length): the pieces of each prompt,
        truncated to ``max_length - 1``, then ``</s>``, then padding (mask 0). A prompt that is cut is
        logged as a warning naming it (``names``, default "prompt 1", ...) and what was dropped.
        """
        if max_length < 1:
            raise InvalidInputError(f"max_length must be at least 1, got {max_length}")
        if isinstance(prompts, str):
            prompts = [prompts]
        names = names or [f"prompt {i + 1}" for i in range(len(prompts))]
        cleaned = [self.clean(p) for p in prompts] if self.clean is not None else list(prompts)
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


class UMT5Tokenizer(T5Tokenizer):
    """The Wan pipelines' tokenizer: each prompt is cleaned with ``prompt_clean`` first."""

    clean = staticmethod(prompt_clean)


# transformers >= 5 does not use a T5 tokenizer's files verbatim: ``T5Tokenizer.__init__`` rebuilds it
# from the vocabulary, keeping only the sentencepiece ``Precompiled`` normalizer and pre-tokenizing with
# WhitespaceSplit + Metaspace. Both loaders below do the same, so the ids match what diffusers feeds the
# encoder.
_PRE_TOKENIZER = pre_tokenizers.Sequence(
    [
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ]
)


def _from_tokenizer_json(path: Path) -> Tokenizer:
    """A tokenizer.json with transformers' T5 pipeline. transformers also forces the Unigram unk id to 2
    and turns byte fallback off; we keep the file's values (umt5-xxl: <unk>=3), which the model was
    trained with, so ids can differ from transformers only on text the vocabulary cannot spell."""
    try:
        text = path.read_text(encoding="utf-8")
        spec = json.loads(text)
        tokenizer = Tokenizer.from_str(text)
    except Exception as e:  # OSError, JSON errors, and the bare Exception tokenizers raises
        raise WeightLoadError(f"tokenizer: cannot read {path}: {str(e).splitlines()[0]}") from None
    tokenizer.normalizer = _precompiled_normalizer(spec.get("normalizer"))
    tokenizer.pre_tokenizer = _PRE_TOKENIZER
    return tokenizer


def t5_tokenizer_from_sentencepiece(folder: str | Path) -> Tokenizer:
    """The tokenizer transformers 5 builds for a T5 ``tokenizer/`` folder without tokenizer.json
    (``T5Tokenizer.from_pretrained`` -> ``T5Converter.convert_from_spm``); ``Tokenizer.save`` writes it
    as the tokenizer.json transformers would.

    The vocabulary is ``spiece.model``'s pieces, then the ``extra_ids`` sentinels (tokenizer_config.json,
    default 100) from ``<extra_id_{n-1}>`` down to ``<extra_id_0>``. Special tokens (matched in the raw
    text before anything else): the control and unknown pieces, ``eos``/``unk``/``pad``, the sentinels,
    the config's ``additional_special_tokens`` and its ``added_tokens_decoder`` entries, whose ids must
    agree with the vocabulary. User-defined pieces stay ordinary pieces of the Unigram model, which is how
    transformers (and sentencepiece itself) segment around them.

    Raises:
        WeightLoadError: an unreadable or non-Unigram model, or configs that contradict it.
    """
    folder = Path(folder)
    model = read_model(folder / "spiece.model")
    has_config = (folder / "tokenizer_config.json").is_file()
    config = read_config(folder, "tokenizer_config.json") if has_config else {}
    extra_ids = config.get("extra_ids", 100)
    if type(extra_ids) is not int or extra_ids < 0:
        raise WeightLoadError(f"tokenizer: extra_ids={extra_ids!r} in {folder / 'tokenizer_config.json'}")
    tokenizer = unigram_tokenizer(model, tuple(f"<extra_id_{i}>" for i in reversed(range(extra_ids))))
    tokenizer.pre_tokenizer = _PRE_TOKENIZER
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)

    kinds = dict(zip(model.pieces, model.types))
    special = [p for p, kind in kinds.items() if kind in (PieceType.CONTROL, PieceType.UNKNOWN)]
    special += [_special_token(folder, name, default) for name, default in _T5_SPECIAL_TOKENS]
    special += [f"<extra_id_{i}>" for i in range(extra_ids)]
    special += [_content(t) for t in config.get("additional_special_tokens") or ()]
    unique = dict.fromkeys(special)  # in order, without repeats
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in unique])
    _add_decoder_tokens(tokenizer, config.get("added_tokens_decoder") or {}, folder)
    return tokenizer


_T5_SPECIAL_TOKENS = (("eos_token", "</s>"), ("unk_token", "<unk>"), ("pad_token", "<pad>"))


def _content(token: Any) -> str:
    """An ``AddedToken`` as config files store it: a string or a dict with ``content``."""
    content = token.get("content") if isinstance(token, dict) else token
    if not isinstance(content, str):
        raise WeightLoadError(f"tokenizer: malformed added token {token!r} in tokenizer_config.json")
    return content


def _add_decoder_tokens(tokenizer: Tokenizer, decoder: dict[str, Any], folder: Path) -> None:
    """Register tokenizer_config.json's ``added_tokens_decoder`` (id -> token) with its flags; an entry
    already in the vocabulary must have the id the file gives it, a new one must come next in id order."""
    if not isinstance(decoder, dict) or not all(str(key).isdigit() for key in decoder):
        where = folder / "tokenizer_config.json"
        raise WeightLoadError(f"tokenizer: malformed added_tokens_decoder in {where}")
    for key in sorted(decoder, key=int):
        entry = decoder[key]
        content, flags = _content(entry), entry if isinstance(entry, dict) else {}
        token = AddedToken(
            content,
            single_word=flags.get("single_word", False),
            lstrip=flags.get("lstrip", False),
            rstrip=flags.get("rstrip", False),
            normalized=flags.get("normalized", False),
            special=flags.get("special", True),
        )
        if tokenizer.token_to_id(content) is None:
            (tokenizer.add_special_tokens if token.special else tokenizer.add_tokens)([token])
        found = tokenizer.token_to_id(content)
        if found != int(key):
            raise WeightLoadError(
                f"tokenizer: {content!r} is id {key} in {folder / 'tokenizer_config.json'} but {found} "
                "with spiece.model"
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
