"""Weight-only quantization (MLX affine) of the Wan and LTX-Video transformers and the T5-family text encoders.

Which layers are quantized is decided by module path (a saved quantized model is rebuilt from the
``.scales`` tensors its checkpoint holds, so it loads whatever this recipe was when it was saved):

* Wan transformer: every block's self- and cross-attention linears (``to_q``, ``to_k``, ``to_v``,
  ``to_out.0``, and the I2V image branch's ``add_k_proj`` / ``add_v_proj``) and feed-forward linears
  (``ffn.net.0.proj``, ``ffn.net.2``), plus the conditioning embedders' linears (time MLP, ``time_proj``,
  text projection, image embedder feed-forward). The patch embedding, ``proj_out``, all norms, the
  modulation tables and ``pos_embed`` stay in the float dtype.
* LTX-Video transformer: the same under its names: every block's ``attn1``/``attn2`` ``to_q``, ``to_k``,
  ``to_v``, ``to_out.0`` and ``ff.net.0.proj``/``ff.net.2``, the time MLP and its 6*dim projection
  (``time_embed``) and the caption projection. ``proj_in``, ``proj_out``, the q/k norms and the
  modulation tables stay float.
* UMT5 (Wan) and T5 v1.1 (LTX-Video), one recipe: the attention projections ``q``/``k``/``v``/``o``,
  the gated FFN's ``wi_0``/``wi_1``/``wo`` and the token embedding ``shared``. ``shared`` is 1.05 B of
  umt5-xxl's 5.7 B parameters, read one row per token, so at 8 bits it saves 1 GB for a dequantized
  gather and a 6.5e-3 relative error in the embeddings (benchmarks/quantization_quality.py); T5's
  32k-row ``shared`` is 0.13 B. The ``relative_attention_bias`` tables (32 x heads) and the norms stay
  float.
* CLIP and the VAE are never quantized.

MLX quantizes a weight in groups along its input dimension, so a selected layer whose input size is not a
multiple of the group size stays float (as mlx-lm does). Every Wan and umt5-xxl width is a multiple of
128, so this only ever applies to small test models; it is logged.

On disk a quantized component is its diffusers ``config.json`` plus a ``"quantization"`` entry in
mlx-lm's format, ``{"group_size": 64, "bits": 4, "mode": "affine"}``, beside safetensors holding the
model's own parameters under their MLX names and layout (quantized linears as ``weight`` uint32,
``scales`` and ``biases`` in the float dtype); ``mlx_i2v.convert.writer.save_component`` writes it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Collection, Mapping

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import InvalidInputError, WeightLoadError

log = logging.getLogger(__name__)

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64
DEFAULT_TEXT_ENCODER_BITS = 8
MODE = "affine"  # a scale and a bias per group; MLX's other modes (mxfp4, nvfp4, mxfp8) fix the group size

# Full-match regexes over module paths as ``Module.leaf_modules`` spells them.
TRANSFORMER_LINEARS = (
    r"blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0|add_k_proj|add_v_proj)",
    r"blocks\.\d+\.ffn\.net\.(0\.proj|2)",
    r"condition_embedder\.(time_embedder\.linear_[12]|time_proj|text_embedder\.linear_[12])",
    r"condition_embedder\.image_embedder\.ff\.net\.(0\.proj|2)",
)
# LTX-Video (``LTXVideoTransformer3DModel``): the same recipe under diffusers' LTX names.
LTX_TRANSFORMER_LINEARS = (
    r"transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
    r"transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)",
    r"time_embed\.(emb\.timestep_embedder\.linear_[12]|linear)",
    r"caption_projection\.linear_[12]",
)
TEXT_ENCODER_LAYERS = (
    r"encoder\.block\.\d+\.layer\.0\.SelfAttention\.[qkvo]",
    r"encoder\.block\.\d+\.layer\.1\.DenseReluDense\.(wi_0|wi_1|wo)",
    r"shared",
)
TEXT_ENCODERS = ("UMT5Encoder", "T5Encoder")
# Keyed by class name rather than class so the model modules can import this one without a cycle.
_SELECTIONS = {
    "WanTransformer3DModel": TRANSFORMER_LINEARS,
    "LTXVideoTransformer3DModel": LTX_TRANSFORMER_LINEARS,
    **dict.fromkeys(TEXT_ENCODERS, TEXT_ENCODER_LAYERS),
}
TRANSFORMER_CLASSES = ("WanTransformer3DModel", "LTXVideoTransformer3DModel")

QUANTIZED_TYPES = (nn.QuantizedLinear, nn.QuantizedEmbedding)

# Shard size of saved checkpoints, as transformers/diffusers default to.


def _check(bits: Any, group_size: Any) -> None:
    """Raise :class:`InvalidInputError` unless bits and group size are supported (bools are not ints)."""
    if type(bits) is not int or bits not in BITS:
        raise InvalidInputError(f"quantization bits must be one of {BITS}, got {bits!r}")
    if type(group_size) is not int or group_size not in GROUP_SIZES:
        raise InvalidInputError(f"quantization group size must be one of {GROUP_SIZES}, got {group_size!r}")


@dataclass(frozen=True)
class Quantization:
    """How one component is quantized: the ``"quantization"`` entry of its config.json."""

    bits: int
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self) -> None:
        _check(self.bits, self.group_size)

    def to_dict(self) -> dict[str, Any]:
        """mlx-lm's config.json entry: ``{"group_size": 64, "bits": 4, "mode": "affine"}``."""
        return {"group_size": self.group_size, "bits": self.bits, "mode": MODE}

    @classmethod
    def from_dict(cls, data: Any, *, what: str = "model") -> Quantization:
        """Parse a stored entry; a malformed one is a :class:`WeightLoadError` naming ``what``."""
        if not isinstance(data, Mapping) or data.get("mode", MODE) != MODE or "bits" not in data:
            raise WeightLoadError(f"{what}: unsupported quantization entry {data!r} in config.json")
        try:
            return cls(bits=data["bits"], group_size=data.get("group_size", DEFAULT_GROUP_SIZE))
        except InvalidInputError as e:
            raise WeightLoadError(f"{what}: config.json: {e}") from None


@dataclass(frozen=True)
class QuantizationConfig:
    """A request to quantize a pipeline: the transformer(s) at ``bits``, the UMT5 encoder at
    ``text_encoder_bits`` (None keeps it float), both with ``group_size``. CLIP and the VAE stay float."""

    bits: int
    group_size: int = DEFAULT_GROUP_SIZE
    text_encoder_bits: int | None = DEFAULT_TEXT_ENCODER_BITS

    def __post_init__(self) -> None:
        _check(self.bits, self.group_size)
        if self.text_encoder_bits is not None:
            _check(self.text_encoder_bits, self.group_size)

    @property
    def transformer(self) -> Quantization:
        """The setting of the transformer(s)."""
        return Quantization(self.bits, self.group_size)

    @property
    def text_encoder(self) -> Quantization | None:
        """The setting of the UMT5 encoder, None to keep it float."""
        if self.text_encoder_bits is None:
            return None
        return Quantization(self.text_encoder_bits, self.group_size)

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "text_encoder_bits": self.text_encoder_bits}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantizationConfig:
        return cls(
            bits=data["bits"],
            group_size=data.get("group_size", DEFAULT_GROUP_SIZE),
            text_encoder_bits=data.get("text_encoder_bits", DEFAULT_TEXT_ENCODER_BITS),
        )


# --- selecting and converting layers -----------------------------------------------------------------


def _selection(model: nn.Module) -> tuple[re.Pattern[str], ...]:
    try:
        patterns = _SELECTIONS[type(model).__name__]
    except KeyError:
        raise TypeError(f"no quantization recipe for {type(model).__name__}") from None
    return tuple(re.compile(p) for p in patterns)


def selected_layers(model: nn.Module, group_size: int = DEFAULT_GROUP_SIZE) -> set[str]:
    """Paths of the layers the recipe quantizes in ``model`` (a float one, possibly built lazily) at
    ``group_size``: selected by the recipe and with an input width that is a multiple of it."""
    patterns = _selection(model)
    return {
        path
        for path, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Embedding))
        and any(p.fullmatch(path) for p in patterns)
        and m.weight.shape[-1] % group_size == 0
    }


def _convert(model: nn.Module, q: Quantization, saved: Collection[str] | None = None) -> list[str]:
    """Swap layers of ``model`` for quantized ones, lazily; returns their paths.

    The layers are those the recipe selects or, given the tensor names of a saved checkpoint, those with a
    ``<path>.scales`` tensor in it.

    Raises:
        InvalidInputError: ``model`` already holds quantized layers.
        WeightLoadError: a saved layer whose input size is not a multiple of the group size.
    """
    if any(isinstance(m, QUANTIZED_TYPES) for _, m in model.named_modules()):
        raise InvalidInputError(f"{type(model).__name__} is already quantized")
    patterns = _selection(model)
    chosen: list[str] = []
    skipped: list[str] = []

    def predicate(path: str, module: nn.Module) -> bool:
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            return False
        if saved is not None:
            if f"{path}.scales" not in saved:
                return False
            if module.weight.shape[-1] % q.group_size:
                raise WeightLoadError(f"{path} cannot have been quantized with group size {q.group_size}")
        elif not any(p.fullmatch(path) for p in patterns):
            return False
        elif module.weight.shape[-1] % q.group_size:
            skipped.append(f"{path} ({module.weight.shape[-1]} inputs)")
            return False
        chosen.append(path)
        return True

    nn.quantize(model, group_size=q.group_size, bits=q.bits, mode=MODE, class_predicate=predicate)
    if skipped:
        log.info(
            "%s: %d layers stay float, their input size is not a multiple of group size %d: %s",
            type(model).__name__,
            len(skipped),
            q.group_size,
            ", ".join(skipped),
        )
    return chosen


def _quantize(model: nn.Module, q: Quantization, expected: tuple[str, ...]) -> list[str]:
    if type(model).__name__ not in expected:
        raise TypeError(f"expected a {' or '.join(expected)}, got {type(model).__name__}")
    before = parameter_bytes(model)
    chosen = _convert(model, q)
    # Materialise now so the float weights the quantized ones were computed from can be freed.
    mx.eval(model.parameters())
    log.info(
        "quantized %d layers of %s to %d bits (group size %d): %.2f GB -> %.2f GB",
        len(chosen),
        type(model).__name__,
        q.bits,
        q.group_size,
        before / 1e9,
        parameter_bytes(model) / 1e9,
    )
    return chosen


def quantize_transformer(model: nn.Module, bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> list[str]:
    """Quantize a loaded ``WanTransformer3DModel`` or ``LTXVideoTransformer3DModel`` in place (see the
    module docstring for which layers).

    Scales and biases take each layer's current dtype, so quantize after loading in the compute dtype;
    the float32 time MLP keeps float32 scales. Returns the quantized layers' paths.

    Raises:
        InvalidInputError: unsupported bits or group size, or a model that is already quantized.
    """
    return _quantize(model, Quantization(bits, group_size), TRANSFORMER_CLASSES)


def quantize_text_encoder(
    model: nn.Module, bits: int = DEFAULT_TEXT_ENCODER_BITS, group_size: int = DEFAULT_GROUP_SIZE
) -> list[str]:
    """Quantize a loaded ``UMT5Encoder`` or ``T5Encoder`` in place: q/k/v/o, wi_0/wi_1/wo and ``shared``.
    Returns the quantized layers' paths.

    Raises:
        InvalidInputError: unsupported bits or group size, or a model that is already quantized.
    """
    return _quantize(model, Quantization(bits, group_size), TEXT_ENCODERS)


def prepare_for_quantized_load(
    model: nn.Module, quantization: Quantization, saved: Collection[str] | None = None
) -> list[str]:
    """Give a freshly built float model the structure of its saved quantized form, before
    :func:`~mlx_i2v.weights.load_strict`, so the expected parameters include ``scales`` / ``biases``.

    Args:
        model: a just-constructed transformer or text encoder (no weights loaded).
        quantization: the checkpoint's :func:`stored_quantization`.
        saved: the checkpoint's tensor names; the layers with a ``<path>.scales`` tensor are converted.
            None converts the layers :func:`quantize_transformer` / :func:`quantize_text_encoder` would
            (for size estimates).

    Nothing is evaluated: the placeholder quantized weights stay lazy and are replaced by the loaded ones
    unseen, so this costs no time or memory even at full size. Returns the converted layers' paths.
    """
    return _convert(model, quantization, saved)


# --- inspecting ------------------------------------------------------------------------------------


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of all parameters (frozen included) as currently typed; reads shapes only, so it is free
    on a lazily built model."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def model_quantization(model: nn.Module) -> Quantization | None:
    """The quantization of ``model``'s quantized layers, None if it has none.

    Raises:
        InvalidInputError: layers quantized with different settings (not something this module makes).
    """
    found = {
        (m.bits, m.group_size, m.mode) for _, m in model.named_modules() if isinstance(m, QUANTIZED_TYPES)
    }
    if not found:
        return None
    if len(found) > 1 or next(iter(found))[2] != MODE:
        raise InvalidInputError(f"{type(model).__name__} mixes quantization settings {sorted(found)}")
    bits, group_size, _ = found.pop()
    return Quantization(bits, group_size)


def stored_quantization(
    config: Mapping[str, Any], *, what: str, requested_bits: int | None = None
) -> Quantization | None:
    """The ``"quantization"`` entry of a component's config.json, or None for a float checkpoint.

    ``requested_bits`` is what the caller asked for (``load_pipeline(quantize=N)``); a checkpoint already
    quantized to other bits cannot be re-quantized, so that is an error rather than a silent mismatch.

    Raises:
        WeightLoadError: a malformed entry.
        InvalidInputError: the checkpoint is quantized to bits other than ``requested_bits``.
    """
    if "quantization" not in config:
        return None
    stored = Quantization.from_dict(config["quantization"], what=what)
    if requested_bits is not None and requested_bits != stored.bits:
        raise InvalidInputError(
            f"{what} is already quantized to {stored.bits} bits; load it with quantize={stored.bits} "
            f"or without quantize (it cannot be re-quantized to {requested_bits} bits)"
        )
    return stored


# --- saving ----------------------------------------------------------------------------------------


def model_state(model: nn.Module) -> dict[str, mx.array]:
    """Every parameter of ``model`` under its dotted MLX name, in MLX layout."""
    return dict(tree_flatten(model.parameters()))


def quantized_layer_paths(model: nn.Module) -> list[str]:
    """Paths of ``model``'s quantized layers, in module order."""
    return [name for name, m in model.named_modules()[::-1] if isinstance(m, QUANTIZED_TYPES)]

