"""Components that are loaded when their stage starts and let go when it ends."""

from __future__ import annotations

import gc
import logging
from typing import Callable, Generic, TypeVar

import mlx.core as mx

log = logging.getLogger(__name__)

T = TypeVar("T")


def free_memory() -> None:
    """Return memory MLX holds for released arrays to the system (not just to MLX's buffer cache)."""
    gc.collect()
    mx.clear_cache()


class Resident(Generic[T]):
    """A component loaded on first :meth:`get` and dropped by :meth:`release`, unless ``keep``.

    On a laptop the text encoder, the transformer and the VAE do not all fit at once beside the
    activations, and each is needed in one stage only; ``keep=True`` trades that memory for not
    reloading between generations.
    """

    def __init__(self, name: str, loader: Callable[[], T], keep: bool = False):
        self.name = name
        self._loader = loader
        self.keep = keep
        self._value: T | None = None

    def get(self) -> T:
        if self._value is None:
            log.info("loading %s", self.name)
            self._value = self._loader()
        return self._value

    @property
    def loaded(self) -> bool:
        return self._value is not None

    def release(self) -> None:
        if self._value is not None and not self.keep:
            log.info("releasing %s", self.name)
            self._value = None
            free_memory()
