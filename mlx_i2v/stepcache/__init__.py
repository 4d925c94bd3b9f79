"""Step caching: skip a denoising step's transformer blocks when a rule says they would barely change
the result, reusing the residual they produced the last time they ran.

``StepCache`` is the :class:`~mlx_i2v.denoise.Forward` (the core); ``FirstBlockCache``, ``MagCache`` and
``TeaCache`` are its decision rules; ``cache_method`` picks one with the variant's published calibration.
"""

from .calibrations import MAGCACHE, METHODS, TEACACHE, cache_method, check_calibration, resolve_cache
from .core import CacheMethod, Decision, Probe, StepCache, kept_bytes
from .methods import FirstBlockCache, MagCache, TeaCache, nearest_interp

__all__ = [
    "StepCache",
    "CacheMethod",
    "Decision",
    "Probe",
    "kept_bytes",
    "FirstBlockCache",
    "MagCache",
    "TeaCache",
    "nearest_interp",
    "cache_method",
    "check_calibration",
    "resolve_cache",
    "METHODS",
    "MAGCACHE",
    "TEACACHE",
]
