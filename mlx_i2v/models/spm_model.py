"""Reading a SentencePiece ``*.model`` file without the ``sentencepiece`` or ``protobuf`` packages.

A ``.model`` file is one serialized ``ModelProto`` (google/sentencepiece ``src/sentencepiece_model.proto``).
Only what a Unigram tokenizer needs is decoded; every other field is skipped:

* ``ModelProto``: ``pieces = 1`` (repeated ``SentencePiece``), ``trainer_spec = 2``, ``normalizer_spec = 3``;
* ``SentencePiece``: ``piece = 1`` (string), ``score = 2`` (float), ``type = 3`` (enum, default NORMAL);
* ``TrainerSpec``: ``model_type = 3`` (default UNIGRAM), ``byte_fallback = 35``, ``unk_id = 40`` (default 0);
* ``NormalizerSpec``: ``precompiled_charsmap = 2`` (bytes), ``add_dummy_prefix = 3`` and
  ``remove_extra_whitespaces = 4`` (both default true).

:func:`unigram_tokenizer` turns it into a ``tokenizers`` Unigram model with the ``Precompiled`` normalizer,
which is what transformers' converters build from the same file.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Iterator

from tokenizers import Tokenizer, models, normalizers

from ..errors import WeightLoadError


class PieceType(IntEnum):
    """``SentencePiece.Type``."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


UNIGRAM = 1  # TrainerSpec.ModelType


@dataclass(frozen=True)
class SentencePieceModel:
    """The decoded fields of a ``ModelProto``; ``pieces[i]`` has id ``i``."""

    pieces: tuple[str, ...]
    scores: tuple[float, ...]
    types: tuple[PieceType, ...]
    model_type: int = UNIGRAM
    unk_id: int = 0
    byte_fallback: bool = False
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True


# --- protobuf wire format ----------------------------------------------------------------------------

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """The base-128 varint at ``pos`` and the position after it."""
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """``(field number, wire type, value)`` of each field of one message, in file order: varints as
    unsigned ints, the other wire types as their raw bytes."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(data, pos)
            yield number, wire, value
            continue
        if wire == _LENGTH:
            size, pos = _varint(data, pos)
        elif wire in (_FIXED64, _FIXED32):
            size = 8 if wire == _FIXED64 else 4
        else:  # 3 and 4 are the deprecated groups, which sentencepiece never writes
            raise ValueError(f"unsupported wire type {wire} in field {number}")
        if pos + size > len(data):
            raise ValueError(f"field {number} runs past the end of its message")
        yield number, wire, data[pos : pos + size]
        pos += size


def _int32(value: int | bytes) -> int:
    """A varint read as protobuf ``int32`` (negative numbers are 10-byte two's complement)."""
    assert isinstance(value, int)
    return value - (1 << 64) if value >= 1 << 63 else value


def _piece(data: bytes) -> tuple[str, float, PieceType]:
    piece, score, kind = "", 0.0, PieceType.NORMAL
    for number, wire, value in _fields(data):
        if number == 1 and wire == _LENGTH:
            piece = bytes(value).decode("utf-8")  # type: ignore[arg-type]
        elif number == 2 and wire == _FIXED32:
            score = struct.unpack("<f", value)[0]
        elif number == 3 and wire == _VARINT:
            kind = PieceType(_int32(value))
    return piece, score, kind


def parse_model(data: bytes) -> SentencePieceModel:
    """Decode a serialized ``ModelProto``.

    Raises:
        ValueError: malformed protobuf, a piece that is not UTF-8, or an unknown piece type.
    """
    pieces: list[tuple[str, float, PieceType]] = []
    spec: dict[str, object] = {}
    for number, wire, value in _fields(data):
        if wire != _LENGTH:
            continue
        if number == 1:
            pieces.append(_piece(value))  # type: ignore[arg-type]
        elif number == 2:
            for field, field_wire, field_value in _fields(value):  # type: ignore[arg-type]
                if field_wire == _VARINT and field in (3, 35, 40):
                    name = {3: "model_type", 35: "byte_fallback", 40: "unk_id"}[field]
                    spec[name] = bool(field_value) if field == 35 else _int32(field_value)
        elif number == 3:
            for field, field_wire, field_value in _fields(value):  # type: ignore[arg-type]
                if field == 2 and field_wire == _LENGTH:
                    spec["precompiled_charsmap"] = bytes(field_value)  # type: ignore[arg-type]
                elif field in (3, 4) and field_wire == _VARINT:
                    spec["add_dummy_prefix" if field == 3 else "remove_extra_whitespaces"] = bool(field_value)
    return SentencePieceModel(
        pieces=tuple(p for p, _, _ in pieces),
        scores=tuple(s for _, s, _ in pieces),
        types=tuple(t for _, _, t in pieces),
        **spec,  # type: ignore[arg-type]
    )


def read_model(path: str | Path) -> SentencePieceModel:
    """Read and decode a ``spiece.model`` / ``*.model`` file.

    Raises:
        WeightLoadError: unreadable or malformed file, naming it.
    """
    path = Path(path)
    try:
        model = parse_model(path.read_bytes())
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise WeightLoadError(f"cannot read sentencepiece model {path}: {e}") from None
    if not model.pieces:
        raise WeightLoadError(f"sentencepiece model {path} has no pieces")
    return model


def unigram_tokenizer(model: SentencePieceModel, extra_pieces: tuple[str, ...] = ()) -> Tokenizer:
    """A ``tokenizers`` Unigram tokenizer over the model's pieces and scores (ids as in the file), then
    ``extra_pieces`` with score 0 (T5's sentinels), normalized by the model's precompiled charsmap.

    Pre-tokenizer, post-processor and added tokens are left to the caller (they are per model family).

    Raises:
        WeightLoadError: a BPE/word/char model, byte fallback, or an unknown id out of range.
    """
    if model.model_type != UNIGRAM:
        raise WeightLoadError(f"sentencepiece model type {model.model_type} is not supported (only Unigram)")
    if model.byte_fallback:
        raise WeightLoadError("sentencepiece models with byte fallback are not supported")
    if not 0 <= model.unk_id < len(model.pieces):
        raise WeightLoadError(f"sentencepiece unk_id {model.unk_id} is not a piece id")
    vocab = list(zip(model.pieces, model.scores)) + [(piece, 0.0) for piece in extra_pieces]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=model.unk_id, byte_fallback=False))
    if model.precompiled_charsmap:
        tokenizer.normalizer = normalizers.Precompiled(model.precompiled_charsmap)
    return tokenizer
