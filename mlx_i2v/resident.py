"""Components that are loaded when their stage starts and let go when it ends."""

from __future__ import annotations

import gc
import logging
import threading
import time
from typing import Callable, Generic, TypeVar

import mlx.core as mx

log = logging.getLogger(__name__)

T = TypeVar("T")


# Per thread: a Mac app may run generations on several worker threads.
_LOADING = threading.local()


def loading_seconds() -> float:
    """Seconds this thread has spent in component loaders (:func:`timed_load`) since it started."""
    return getattr(_LOADING, "seconds", 0.0)


def timed_load(loader: Callable[[], T]) -> T:
    """``loader()``, its time added to :func:`loading_seconds`: components load inside the stage that
    first needs them, and the pipeline reports how much of each stage was loading."""
    tic = time.perf_counter()
    try:
        return loader()
    finally:
        _LOADING.seconds = loading_seconds() + time.perf_counter() - tic


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
            self._value = timed_load(self._loader)
        return self._value

    @property
    def loaded(self) -> bool:
        return self._value is not None

    def release(self) -> None:
        if self._value is not None and not self.keep:
            log.info("releasing %s", self.name)
            self._value = None
            free_memory()
