"""The conversion cache: a Hub model is converted to MLX layout once, then loaded from here.

The cache lives in ``$MLX_I2V_CACHE`` (default ``~/.cache/mlx-i2v``), one directory per repo, revision
(the Hub commit of the snapshot), dtype, quantization and converter format version, so a new upstream
revision, another dtype or a newer converter converts afresh and never overwrites what another setting uses.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .errors import InvalidInputError
from .quantize import QuantizationConfig

log = logging.getLogger(__name__)

CACHE_ENV = "MLX_I2V_CACHE"
# Bumped whenever the converter's output changes meaning (v2: the VAE and CLIP are kept in float32
# whatever the dtype), so an older conversion is converted afresh instead of being loaded as if current.
FORMAT_VERSION = 2


def cache_root() -> Path:
    """Where converted models are kept."""
    return Path(os.environ.get(CACHE_ENV, "~/.cache/mlx-i2v")).expanduser()


def cache_dir(repo_id: str, revision: str, dtype: str, quantization: QuantizationConfig | None) -> Path:
    """The cache directory of one (repo, revision, dtype, quantization)."""
    if quantization is None:
        bits = "float"
    else:
        text = "float" if quantization.text_encoder_bits is None else f"{quantization.text_encoder_bits}"
        bits = f"q{quantization.bits}-g{quantization.group_size}-t{text}"
    return cache_root() / f"{repo_id.replace('/', '--')}--{revision[:12]}--{dtype}--{bits}--v{FORMAT_VERSION}"


def cached_conversion(
    repo_id: str, snapshot: Path, dtype: str, quantization: QuantizationConfig | None
) -> Path:
    """The MLX directory for a downloaded Hub ``snapshot``, converting it on first use.

    ``huggingface_hub`` names snapshot folders after the commit they hold, which keys the cache.
    """
    from .convert import convert_model

    target = cache_dir(repo_id, snapshot.name, dtype, quantization)
    if (target / "model_index.json").is_file():
        log.info("using converted %s from %s", repo_id, target)
        return target
    log.info("converting %s once into %s", repo_id, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        return convert_model(
            snapshot,
            target,
            dtype=dtype,
            quantize=quantization.bits if quantization is not None else None,
            group_size=quantization.group_size if quantization is not None else 64,
            text_encoder_bits=quantization.text_encoder_bits if quantization is not None else None,
        )
    except InvalidInputError:
        if (target / "model_index.json").is_file():  # another process converted it first: use theirs
            log.info("using %s, converted meanwhile by another process", target)
            return target
        raise
