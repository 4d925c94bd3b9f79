"""Writing an MLX model directory, all or nothing.

Everything is written into ``.OUTPUT.partial-<pid>-<token>`` beside OUTPUT and renamed to OUTPUT when
complete (:func:`mlx_i2v.outputs.staged_output`); any failure, KeyboardInterrupt and the CLI's SIGTERM and
SIGHUP included, removes it, so OUTPUT is either absent or whole, and the rename never replaces an
OUTPUT that another conversion finished meanwhile (unless forced). The free disk
space is checked against an estimate of the output before anything is written.

Each weight component is saved in MLX layout: ``config.json`` (its diffusers-style config, plus a
``"quantization"`` entry when quantized) and ``model.safetensors`` with the metadata
:data:`~mlx_i2v.components.MLX_FORMAT`, or above 5 GB ``model-0000i-of-0000n.safetensors`` shards and a
``model.safetensors.index.json``, which :func:`~mlx_i2v.weights.read_safetensors` follows.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import mlx.core as mx
import mlx.nn as nn

from mlx_i2v.components import MLX_FORMAT
from mlx_i2v.errors import InvalidInputError
from mlx_i2v.lora.baked import save_factors, split_state
from mlx_i2v.outputs import staged_output
from mlx_i2v.quantize import model_quantization

from .plan import Plan

log = logging.getLogger(__name__)

# Room left beyond the estimate: file systems round up, and a full disk breaks more than this conversion.
FREE_SPACE_MARGIN = 256 * 1024**2
MAX_SHARD_BYTES = 5 * 1024**3  # shards of the size the Hub repos use; a larger tensor gets a shard of its own


def check_free_space(folder: Path, needed: int) -> None:
    """Raise :class:`InvalidInputError` unless ``folder``'s file system has ``needed`` bytes (plus a
    margin) free."""
    free = shutil.disk_usage(folder).free
    if free < needed + FREE_SPACE_MARGIN:
        raise InvalidInputError(
            f"not enough free disk space in {folder}: the output needs about {needed / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB are free"
        )


def refuse_existing(output: Path, *, force: bool) -> None:
    """Raise :class:`InvalidInputError` if ``output`` exists and may not be replaced."""
    if os.path.lexists(output) and not force:
        raise InvalidInputError(f"{output} already exists; pass --force (force=True) to replace it")


@contextmanager
def atomic_directory(output: Path, *, force: bool) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``output`` that becomes ``output`` when the block
    completes; on any exception it is removed and ``output`` is left as it was. The final rename
    fails if another process created ``output`` meanwhile (unless ``force``), so a conversion never
    silently replaces one that finished first.

    Raises:
        InvalidInputError: ``output`` exists (at the start or at the end) and ``force`` is False.
    """
    refuse_existing(output, force=force)
    output.parent.mkdir(parents=True, exist_ok=True)
    with staged_output(output, overwrite=force, directory=True, replaceable=lambda found: True) as staged:
        staged.path.mkdir()
        yield staged.path


def write_json(path: Path, content: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _shards(state: Mapping[str, mx.array], max_bytes: int) -> list[dict[str, mx.array]]:
    """``state`` in name order, split into consecutive groups of at most ``max_bytes`` (a larger tensor
    gets a shard of its own)."""
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for name in sorted(state):
        nbytes = state[name].nbytes
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = state[name]
        size += nbytes
    return shards


def save_component(
    model: nn.Module, folder: Path, config: Mapping[str, Any], *, max_shard_bytes: int = MAX_SHARD_BYTES
) -> list[Path]:
    """Save ``model`` (float or quantized) in MLX layout with its ``config``; returns the files written.
    LoRA factors of quantized linears go to ``loras/factors.safetensors`` (:mod:`mlx_i2v.lora.baked`)."""
    folder.mkdir(parents=True, exist_ok=True)
    state, factors, scales = split_state(model)  # a quantized model's LoRA factors are saved beside it
    shards = _shards(state, max_shard_bytes)
    written: list[Path] = []
    if len(shards) == 1:
        written.append(folder / "model.safetensors")
        mx.save_safetensors(str(written[0]), shards[0], metadata=MLX_FORMAT)
    else:
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards, 1):
            written.append(folder / f"model-{i:05d}-of-{len(shards):05d}.safetensors")
            mx.save_safetensors(str(written[-1]), shard, metadata=MLX_FORMAT)
            weight_map.update(dict.fromkeys(shard, written[-1].name))
        written.append(folder / "model.safetensors.index.json")
        index = {"metadata": {"total_size": sum(v.nbytes for v in state.values())}, "weight_map": weight_map}
        write_json(written[-1], index)
    config = {k: v for k, v in config.items() if k != "quantization"}
    quantization = model_quantization(model)
    if quantization is not None:
        config["quantization"] = quantization.to_dict()
    written.append(folder / "config.json")
    write_json(written[-1], config)
    if factors:
        written.append(save_factors(folder, factors, scales))
    return written


def write_plan(plan: Plan, output: Path, *, dtype: mx.Dtype, force: bool) -> Path:
    """Check the free space, then write ``plan`` atomically to ``output``, one weight component at a
    time (each released before the next is loaded)."""
    refuse_existing(output, force=force)
    copies = {name: copy_listing(folder) for name, folder in plan.copies.items()}  # a broken folder fails now
    needed = plan.estimated_bytes(dtype)
    parent = output.absolute().parent
    check_free_space(next(p for p in (parent, *parent.parents) if p.exists()), needed)
    log.info("writing %s (about %.2f GB)", output, needed / 1e9)
    with atomic_directory(output, force=force) as partial:
        for i, job in enumerate(plan.weights, 1):
            log.info("[%d/%d] converting %s", i, len(plan.weights), job.name)
            model, config = job.load()
            files = save_component(model, partial / job.name, config)
            del model
            gc.collect()
            mx.clear_cache()
            size = sum(f.stat().st_size for f in files)
            log.info("[%d/%d] saved %s: %d files, %.2f GB", i, len(plan.weights), job.name, len(files), size / 1e9)
            if job.companions is not None:
                for relative, content in job.companions(config).items():
                    write_json(partial / relative, content)
        for name, files in copies.items():
            copy_files(files, partial / name)
        for relative, content in plan.files.items():
            write_json(partial / relative, content)
        write_json(partial / "model_index.json", plan.index)
    log.info("wrote %s", output)
    return output


def copy_listing(folder: Path) -> list[tuple[Path, Path]]:
    """Every file under ``folder`` as (source, path relative to ``folder``), symlinks followed (the Hub
    cache links every file to a blob), in name order.

    Raises:
        InvalidInputError: a symlink loop (a folder that leads back to one above it, or a link to itself),
            a dangling link, an unreadable entry, or something that is neither file nor folder; named.
    """
    files: list[tuple[Path, Path]] = []

    def walk(directory: Path, relative: Path, ancestors: frozenset[tuple[int, int]]) -> None:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as e:
            raise InvalidInputError(f"cannot read {directory}: {e.strerror or e}") from None
        for entry in entries:
            path = Path(entry.path)
            try:
                info = os.stat(path)  # follows symlinks: a loop or a dangling link fails here
            except OSError as e:
                raise InvalidInputError(f"cannot read {path}: {e.strerror or e}") from None
            if stat.S_ISDIR(info.st_mode):
                key = (info.st_dev, info.st_ino)
                if key in ancestors:
                    raise InvalidInputError(f"symlink loop at {path}: it leads back to a folder above it")
                walk(path, relative / entry.name, ancestors | {key})
            elif not stat.S_ISREG(info.st_mode):
                raise InvalidInputError(f"{path} is neither a file nor a folder")
            elif not os.access(path, os.R_OK):
                raise InvalidInputError(f"cannot read {path}: permission denied")
            else:
                files.append((path, relative / entry.name))

    try:
        top = os.stat(folder)
    except OSError as e:
        raise InvalidInputError(f"cannot read {folder}: {e.strerror or e}") from None
    walk(folder, Path(), frozenset({(top.st_dev, top.st_ino)}))
    return files


def copy_files(files: list[tuple[Path, Path]], destination: Path) -> None:
    """Copy :func:`copy_listing`'s files (contents and permission bits) under ``destination``."""
    destination.mkdir(parents=True, exist_ok=True)
    for source, relative in files:
        (destination / relative).parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copy2(source, destination / relative)
        except OSError as e:
            raise InvalidInputError(f"cannot copy {source}: {e.strerror or e}") from None
