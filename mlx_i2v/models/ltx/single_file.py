"""Splitting a Lightricks single-file LTX-Video checkpoint (``ltxv-*.safetensors``) into its components.

Those files bundle the transformer, under ``model.diffusion_model.`` (Lightricks/LTX-Video
``transformer3d.py`` keeps exactly those keys), and the VAE, under ``vae.`` (diffusers'
``convert_ltx_vae_checkpoint_to_diffusers`` takes the keys containing "vae."); the file's
``__metadata__["config"]`` holds both configs in LTX's own format. diffusers also accepts
transformer keys without the prefix (``CHECKPOINT_KEY_NAMES["ltx-video"]`` lists both
``patchify_proj.weight`` and ``model.diffusion_model.patchify_proj.weight``, and its converter takes every
key without "vae" as the transformer's). Each part then goes through its component's ``ORIGINAL_MAP``.
"""

from __future__ import annotations

from typing import Mapping

import mlx.core as mx

from ...errors import WeightLoadError

# component -> the key prefix it has in the single file
SINGLE_FILE_PREFIXES = {"transformer": "model.diffusion_model.", "vae": "vae."}


def _names(keys: list[str], limit: int = 6) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def split_single_file(tensors: Mapping[str, mx.array]) -> dict[str, dict[str, mx.array]]:
    """Split a single-file checkpoint by key prefix, removing the prefix.

    Returns:
        ``{"transformer": {...}, "vae": {...}}`` (a component absent from the file maps to an empty dict).
        Unprefixed keys are the transformer's when the file has no ``model.diffusion_model.`` key at all.

    Raises:
        WeightLoadError: unprefixed keys beside prefixed transformer keys (they belong to no component),
            named.
    """
    parts: dict[str, dict[str, mx.array]] = {name: {} for name in SINGLE_FILE_PREFIXES}
    rest: dict[str, mx.array] = {}
    for key, value in tensors.items():
        for name, prefix in SINGLE_FILE_PREFIXES.items():
            if key.startswith(prefix):
                parts[name][key[len(prefix) :]] = value
                break
        else:
            rest[key] = value
    if rest and parts["transformer"]:
        prefixes = ", ".join(repr(p) for p in SINGLE_FILE_PREFIXES.values())
        raise WeightLoadError(
            f"single-file checkpoint: {len(rest)} tensors ({_names(list(rest))}) have none of the component "
            f"prefixes {prefixes}"
        )
    if rest:
        parts["transformer"] = rest
    return parts
