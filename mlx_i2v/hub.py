"""Finding a model: a local diffusers-layout directory or a Hugging Face Hub repo id."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from .errors import ModelNotFoundError

log = logging.getLogger(__name__)

# What a Wan or LTX-Video repo needs, in the diffusers layout or the Wan-AI original one (``*.pth``
# VAE/T5/CLIP, ``google/umt5-xxl/`` tokenizer, A14B's ``high/low_noise_model/``); READMEs, example assets
# and duplicate ``.bin`` copies of the weights are never downloaded. (``*`` matches ``/`` in these patterns.)
ALLOW_PATTERNS = (
    "model_index.json",
    "config.json",
    "*/config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "*.pth",
    "scheduler/scheduler_config.json",
    "*tokenizer.json",
    "*tokenizer_config.json",
    "*special_tokens_map.json",
    "*spiece.model",  # the LTX-Video repos' T5 tokenizer (no tokenizer.json)
    "*added_tokens.json",
    "image_processor/preprocessor_config.json",
)

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_model(model: str | Path, *, revision: str | None = None) -> Path:
    """Return the local directory holding ``model``.

    ``model`` is a directory with a ``model_index.json`` or a Hub repo id ("Wan-AI/Wan2.2-TI2V-5B-Diffusers"),
    fetched with ``huggingface_hub.snapshot_download`` (only the files listed in ``ALLOW_PATTERNS``) or
    taken from the local Hugging Face cache when the Hub cannot be reached. A Hub snapshot is returned as
    downloaded (either layout); :func:`mlx_i2v.cache.cached_conversion` turns it into an MLX directory.
    """
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"{path} is not a diffusers-layout or converted model directory (no model_index.json); "
                "convert an original Wan-AI checkpoint with `mlx-i2v convert`"
            )
        return path
    if not is_hub_id(model):
        raise ModelNotFoundError(f"model directory not found: {path}")
    return _download(str(model), revision)


def is_hub_id(model: str | Path) -> bool:
    """True for "owner/name" strings that do not name an existing local path."""
    name = str(model)
    return bool(_REPO_ID.match(name)) and not name.startswith((".", "/", "~")) and not Path(name).expanduser().exists()


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=list(ALLOW_PATTERNS))
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"no such model on the Hugging Face Hub: {repo_id}") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        log.debug("snapshot_download(%s) failed: %s", repo_id, e)
        raise ModelNotFoundError(
            f"cannot reach the Hugging Face Hub and {repo_id} is not in the local cache; on a connected machine run "
            f"`hf download {repo_id} --local-dir DIR`, copy DIR here and pass it as the model"
        ) from None
    path = Path(folder)
    if not (path / "model_index.json").is_file() and not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{repo_id} is neither a diffusers-layout nor a Wan-AI original repository")
    return path
