"""Device-dependent defaults: which float dtype to compute in, and how the CPU backend allocates."""

from __future__ import annotations

import ctypes
import logging
import os
import sys

import mlx.core as mx

from .errors import InvalidInputError

log = logging.getLogger(__name__)

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def has_gpu() -> bool:
    """True when MLX runs on a GPU (Metal on a Mac, CUDA elsewhere)."""
    return mx.default_device().type == mx.DeviceType.gpu


def default_dtype() -> mx.Dtype:
    """bfloat16 on a GPU; float32 on the CPU, where MLX has no fast half-precision matmul."""
    return mx.bfloat16 if has_gpu() else mx.float32


def default_vae_dtype() -> mx.Dtype:
    """float32 whatever the compute dtype: diffusers' Wan docs load the VAE (and the CLIP image encoder)
    in float32 beside a bfloat16 transformer, and a half-precision VAE is the largest loss of a bfloat16
    run (see benchmarks/README.md, "bfloat16 parity")."""
    return mx.float32


def resolve_dtype(name: str | mx.Dtype | None, *, what: str = "dtype", default: mx.Dtype | None = None) -> mx.Dtype:
    """Map "float32" / "bfloat16" / "float16" (or an ``mx.Dtype``) to a dtype; None gives ``default``
    (by default :func:`default_dtype`). ``what`` names the argument in the error."""
    if name is None:
        return default_dtype() if default is None else default
    if isinstance(name, mx.Dtype):
        if name not in DTYPES.values():
            raise InvalidInputError(f"unsupported {what} {name}; use one of {', '.join(DTYPES)}")
        return name
    try:
        return DTYPES[str(name)]
    except KeyError:
        raise InvalidInputError(f"unsupported {what} {name!r}; use one of {', '.join(DTYPES)}") from None


def dtype_name(dtype: mx.Dtype) -> str:
    """The inverse of :func:`resolve_dtype`."""
    return next(k for k, v in DTYPES.items() if v == dtype)


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """On Linux with MLX's CPU backend, let glibc's malloc keep freed memory for reuse.

    MLX's CPU allocator has no buffer cache on Linux, and glibc serves every block over 32 MB with a
    fresh ``mmap``, which the kernel then faults in page by page: a memory-bound element-wise pass over
    a 200 MB array took 0.19 s that way and 0.03 s on reused memory (2-core EPYC). Without ``mmap`` and
    with trimming only past 2 GB of free heap top, freed arrays are reused instead. This is process-wide
    (glibc's own settings, as ``MALLOC_MMAP_MAX_=0`` would set them), so it is skipped on a GPU, off
    glibc, or when ``MLX_I2V_KEEP_FREED_MEMORY=0``.

    Returns:
        Whether malloc was reconfigured.
    """
    if sys.platform != "linux" or has_gpu() or os.environ.get("MLX_I2V_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        applied = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    if applied:
        log.debug("glibc malloc keeps freed memory for reuse (MLX CPU backend)")
    return applied
