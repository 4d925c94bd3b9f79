"""What a model family brings to the one pipeline (:class:`~mlx_i2v.pipeline.Pipeline`), as data and small
strategies: how prompts become the transformer's text context, how a transformer pass runs on channels-last
latents, how latents are decoded to frames, how many video frames a latent frame holds, and which of the
pipeline's optional features the family has.

The families themselves are defined next to their variants (:mod:`mlx_i2v.families`): Wan in
:mod:`mlx_i2v.families.wan.variants`, LTX-Video in :mod:`mlx_i2v.families.ltx.variants`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple, Protocol, Sequence

import mlx.core as mx

from .errors import InvalidInputError
from .models.umt5 import MaskedPromptEncoding, encode_masked_prompts, encode_prompts

if TYPE_CHECKING:
    from .denoise import Forward
    from .pipeline import Settings

# The pipeline's optional features, as a family's ``unsupported`` names them (and its error messages say).
FEATURES = {
    "restyle": "restyling a clip (video=)",
    "extend": "extending a clip",
    "loop": "a loop (loop=True)",
    "motion": "motion amplitude (motion=)",
    "cache": "step caching (cache=)",
    "loras": "LoRAs",
    "parallel": "parallel ranks",
    "flow_shift": "flow_shift (the schedule shifts with the sequence length)",
    "last_image": "a last image (last_image=)",
    "keyframes": "keyframes at other frames (keyframes=)",
    "upscale": "the upsample-and-refine recipe (upscale=)",
}


class MaskedText(NamedTuple):
    """Prompt rows with their padding mask, for transformers that mask padding in cross-attention.

    Attributes:
        states: (B, L, d_model) encoder outputs.
        mask: (B, L) bool, True for real tokens.
    """

    states: mx.array
    mask: mx.array


class PromptEncoder(Protocol):
    """Prompts -> the text rows the transformer's ``embed_context`` takes (one row per prompt), each of
    ``max_length`` tokens."""

    max_length: int

    def __call__(self, tokenizer: Any, encoder: Any, prompts: list[str], names: Sequence[str] | None) -> Any:
        """``names`` label prompts in truncation warnings. Returns an array (B, L, D) or :class:`MaskedText`."""
        ...


@dataclass(frozen=True)
class PaddedPrompts:
    """Wan: every prompt padded to ``max_length`` tokens, cut to its length and zero-padded after the
    encoder (diffusers' Wan ``_get_t5_prompt_embeds``); the transformer attends to every position."""

    max_length: int = 512

    def __call__(self, tokenizer, encoder, prompts, names):
        ids, mask = tokenizer(prompts, max_length=self.max_length, names=names)
        return encode_prompts(encoder, mx.array(ids), mx.array(mask), max_length=self.max_length)


@dataclass(frozen=True)
class MaskedPrompts:
    """LTX-Video: prompts padded to the pipeline's ``max_sequence_length`` and returned with their mask
    (see :func:`~mlx_i2v.models.umt5.encode_masked_prompts`)."""

    encoding: MaskedPromptEncoding

    @property
    def max_length(self) -> int:
        """Tokens per prompt row."""
        return self.encoding.max_length

    def __call__(self, tokenizer, encoder, prompts, names):
        ids, mask = tokenizer(prompts, max_length=self.max_length, names=names)
        states, mask = encode_masked_prompts(encoder, ids, mask, mask_encoder=self.encoding.mask_encoder)
        return MaskedText(states, mask)


# decode(vae, latents (1, T, h, w, C) normalised, settings, tiling) -> chunks (1, F, H, W, 3) in about [-1, 1]
LatentDecoder = Callable[[Any, mx.array, "Settings", Any], Iterator[mx.array]]


@dataclass(frozen=True)
class Family:
    """A model family's strategies (see the module docstring).

    Attributes:
        name: as error messages name it ("Wan", "LTX-Video").
        frame_stride: video frames per latent frame after the first (clips are ``stride * k + 1`` frames).
        forward: ``forward(dims, settings, keyframes=None)``: the transformer pass of a generation with these
            settings and :class:`~mlx_i2v.conditioning.Keyframes` (a :class:`~mlx_i2v.denoise.Forward`).
        decode: see :data:`LatentDecoder`.
        unsupported: the :data:`FEATURES` it does not have (refused with one line, before loading).
        latent_rgb: (latent channels, :class:`~mlx_i2v.preview.LatentRGB`) pairs for step previews, per VAE.
    """

    name: str
    frame_stride: int
    forward: Callable[..., "Forward"]
    decode: LatentDecoder
    unsupported: frozenset[str] = frozenset()
    latent_rgb: tuple[tuple[int, Any], ...] = ()

    def preview_projection(self, channels: int) -> Any:
        """The latent-to-RGB map of this family's VAE with ``channels`` latent channels, or None."""
        return dict(self.latent_rgb).get(channels)

    def require(self, feature: str) -> None:
        """Raise :class:`InvalidInputError` if this family does not have ``feature`` (a :data:`FEATURES` key)."""
        if feature in self.unsupported:
            raise InvalidInputError(f"{FEATURES[feature]}: not supported on {self.name} models yet")

    def round_frames(self, num_frames: int) -> int:
        """The nearest ``frame_stride * k + 1`` frame count (at least 1)."""
        s = self.frame_stride
        return max(round((num_frames - 1) / s), 0) * s + 1
