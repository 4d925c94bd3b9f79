"""Device-dependent defaults: which float dtype to compute in."""

from __future__ import annotations

import mlx.core as mx

from .errors import InvalidInputError

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def has_gpu() -> bool:
    """True when MLX runs on a GPU (Metal on a Mac, CUDA elsewhere)."""
    return mx.default_device().type == mx.DeviceType.gpu


def default_dtype() -> mx.Dtype:
    """bfloat16 on a GPU; float32 on the CPU, where MLX has no fast half-precision matmul."""
    return mx.bfloat16 if has_gpu() else mx.float32


def resolve_dtype(name: str | mx.Dtype | None) -> mx.Dtype:
    """Map "float32" / "bfloat16" / "float16" (or an ``mx.Dtype``, or None for the default) to a dtype."""
    if name is None:
        return default_dtype()
    if isinstance(name, mx.Dtype):
        if name not in DTYPES.values():
            raise InvalidInputError(f"unsupported dtype {name}; use one of {', '.join(DTYPES)}")
        return name
    try:
        return DTYPES[str(name)]
    except KeyError:
        raise InvalidInputError(f"unsupported dtype {name!r}; use one of {', '.join(DTYPES)}") from None


def dtype_name(dtype: mx.Dtype) -> str:
    """The inverse of :func:`resolve_dtype`."""
    return next(k for k, v in DTYPES.items() if v == dtype)
