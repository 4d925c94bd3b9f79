"""The BLAS's thread count on MLX's CPU backend, where it can be set.

MLX hands float32 matmuls to the BLAS it is linked with. On Linux that is Debian's OpenBLAS when it is
preloaded as the README says; its ``openblas_set_num_threads`` is then in the process. Nothing else
(MLX's bundled reference BLAS, Accelerate) is touched. The setting is process-wide, so holds nest and are
counted: the first sets one thread, the last restores the count it found.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

_LOCK = threading.Lock()
_holds = 0
_restore = 0


def cpu_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@functools.cache
def _openblas() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    """OpenBLAS's get / set thread count when it is loaded into the process's global symbols, else None."""
    try:
        process = ctypes.CDLL(None)
        get, set_ = process.openblas_get_num_threads, process.openblas_set_num_threads
    except (OSError, AttributeError):
        return None
    get.restype, get.argtypes = ctypes.c_int, []
    set_.restype, set_.argtypes = None, [ctypes.c_int]
    return get, set_


def can_hold_to_one_thread() -> bool:
    """Whether :func:`one_thread` can set the BLAS's thread count (OpenBLAS is in the process)."""
    return _openblas() is not None


@contextmanager
def one_thread() -> Iterator[None]:
    """Within it the BLAS runs each call on the calling thread alone (where :func:`can_hold_to_one_thread`;
    elsewhere it changes nothing). Matmuls must be evaluated inside it to run so."""
    global _holds, _restore
    blas = _openblas()
    if blas is None:
        yield
        return
    get, set_ = blas
    with _LOCK:
        if _holds == 0:
            _restore = get()
            set_(1)
        _holds += 1
    try:
        yield
    finally:
        with _LOCK:
            _holds -= 1
            if _holds == 0:
                set_(_restore)
