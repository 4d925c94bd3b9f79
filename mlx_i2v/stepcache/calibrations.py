"""Published step-cache calibrations for the Wan variants we support, and the choice of a method.

The numbers are copied verbatim from their sources (repository, commit, path and line are given next to
each). We cannot calibrate here: that needs the real weights. A variant without a published calibration
has none; a calibration is used for another variant only when a caller passes it explicitly, and then
with a logged warning (:func:`check_calibration`).

================================  ==========================================  ===========================
variant                           MagCache ratios                             TeaCache coefficients
================================  ==========================================  ===========================
wan2.2-ti2v-5b                    MagCache4Wan2.2 TI2V-5B, i2v and t2v lists  LightX2V wan_ti2v_tea_720p
wan2.1-i2v-14b-480p               MagCache4Wan2.1 I2V-14B-480P                TeaCache4Wan2.1 I2V-480P
wan2.1-i2v-14b-720p               MagCache4Wan2.1 I2V-14B-720P                TeaCache4Wan2.1 I2V-720P
wan2.1-flf2v-14b-720p             none published                              none published
wan2.2-i2v-a14b                   MagCache4Wan2.2 I2V-A14B                    none published
================================  ==========================================  ===========================
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

from ..errors import InvalidInputError
from .core import CacheMethod
from .methods import FirstBlockCache, MagCache, TeaCache

log = logging.getLogger(__name__)

METHODS = ("first-block", "magcache", "teacache")


@dataclass(frozen=True)
class MagCacheCalibration:
    """One published MagCache calibration and the settings its authors recommend with it.

    ``published`` is the source's list as printed: (cond, uncond) magnitude ratios for steps 1..N-1
    interleaved; the source prepends ``[1.0] * 2`` for step 0. Following diffusers' documentation for
    pipelines that run the branches as separate calls ("use the first array (Conditional)"), one curve,
    the conditional one, serves both branches.
    """

    variant: str
    published: tuple[float, ...]
    source: str
    threshold: float
    max_skip_steps: int
    retention_ratio: float
    experts: tuple[int, ...] | None = None  # the experts the authors cache (None: all)

    @property
    def ratios(self) -> tuple[float, ...]:
        """The conditional curve, one ratio per step of the calibration run (the first 1.0)."""
        return ((1.0, 1.0) + self.published)[0::2]

    def method(self, name: str, threshold: float | None = None) -> MagCache:
        """A :class:`MagCache` on this curve with the recommended settings (``threshold`` overrides)."""
        return MagCache(
            self.ratios, self.threshold if threshold is None else threshold, self.max_skip_steps,
            self.retention_ratio, self.experts, calibration=name,
        )  # fmt: skip


@dataclass(frozen=True)
class TeaCacheCalibration:
    """One published TeaCache polynomial (highest power first) per indicator: ``ret_steps`` on ``e0``
    (``use_ret_steps``) and ``plain`` on ``e``; either may be missing. ``default_ret_steps`` and
    ``threshold`` are the authors' recommended setting."""

    variant: str
    ret_steps: tuple[float, ...] | None
    plain: tuple[float, ...] | None
    source: str
    default_ret_steps: bool
    threshold: float

    def method(self, name: str, threshold: float | None = None, use_ret_steps: bool | None = None) -> TeaCache:
        """A :class:`TeaCache` with this polynomial and the recommended settings (arguments override)."""
        ret = self.default_ret_steps if use_ret_steps is None else use_ret_steps
        coefficients = self.ret_steps if ret else self.plain
        if coefficients is None:
            kind = "with" if ret else "without"
            raise InvalidInputError(f"{name} has no published TeaCache coefficients {kind} retention steps")
        return TeaCache(coefficients, self.threshold if threshold is None else threshold, ret, calibration=name)


# --- MagCache -----------------------------------------------------------------------------------------
# Calibrated by the MagCache authors with SDPA attention at the original Wan code's default settings
# (UniPC, 50 steps for TI2V-5B at 1280x704, 40 steps for the I2V models). Recommended settings from the
# READMEs next to the scripts: "E006K2R02" = threshold 0.06, K 2, retention 0.2.
MAGCACHE_WAN21 = "Zehong-Ma/MagCache@e1862e09110943638562513e0128c3c7f790540a MagCache4Wan2.1/magcache_generate.py"
MAGCACHE_WAN22 = "Zehong-Ma/MagCache@e1bc90d9412840fc7ec70048ece9e36b7791720a MagCache4Wan2.2/magcache_generate.py"

MAGCACHE: dict[str, MagCacheCalibration] = {
    # MagCache4Wan2.2 line 738 (``--task ti2v-5B`` with an image); README: E006K2R02, TI2V-5B 720p
    # on one L20 10 min 39 s -> 5 min 24 s.
    "wan2.2-ti2v-5b": MagCacheCalibration(
        "wan2.2-ti2v-5b",
        (
            0.99512, 0.99559, 0.99559, 0.99561, 0.99595, 0.99577, 0.99512, 0.99512, 0.99546, 0.99534, 0.99543, 0.99531,
            0.99496, 0.99491, 0.99504, 0.99499, 0.99444, 0.99449, 0.99481, 0.99481, 0.99435, 0.99435, 0.9943, 0.99431,
            0.99411, 0.99406, 0.99373, 0.99376, 0.99413, 0.99405, 0.99363, 0.99359, 0.99335, 0.99331, 0.99244, 0.99243,
            0.99229, 0.99229, 0.99239, 0.99236, 0.99163, 0.9916, 0.99149, 0.99151, 0.99191, 0.99192, 0.9898, 0.98981,
            0.9899, 0.98987, 0.98849, 0.98849, 0.98846, 0.98846, 0.98861, 0.98861, 0.9874, 0.98738, 0.98588, 0.98589,
            0.98539, 0.98534, 0.98444, 0.98439, 0.9831, 0.98309, 0.98119, 0.98118, 0.98001, 0.98, 0.97862, 0.97859,
            0.97555, 0.97558, 0.97392, 0.97388, 0.97152, 0.97145, 0.96871, 0.9687, 0.96435, 0.96434, 0.96129, 0.96127,
            0.95639, 0.95638, 0.95176, 0.95175, 0.94446, 0.94452, 0.93972, 0.93974, 0.93575, 0.9359, 0.93537, 0.93552,
            0.96655, 0.96616,
        ),
        source=f"{MAGCACHE_WAN22}:738",
        threshold=0.06, max_skip_steps=2, retention_ratio=0.2,
    ),
    # MagCache4Wan2.2 line 736 (``--task ti2v-5B`` without an image); same settings.
    "wan2.2-ti2v-5b/t2v": MagCacheCalibration(
        "wan2.2-ti2v-5b",
        (
            0.99505, 0.99389, 0.99441, 0.9957, 0.99558, 0.99551, 0.99499, 0.9945, 0.99534, 0.99548, 0.99468, 0.9946,
            0.99463, 0.99458, 0.9946, 0.99453, 0.99408, 0.99404, 0.9945, 0.99441, 0.99409, 0.99398, 0.99403, 0.99397,
            0.99382, 0.99377, 0.99349, 0.99343, 0.99377, 0.99378, 0.9933, 0.99328, 0.99303, 0.99301, 0.99217, 0.99216,
            0.992, 0.99201, 0.99201, 0.99202, 0.99133, 0.99132, 0.99112, 0.9911, 0.99155, 0.99155, 0.98958, 0.98957,
            0.98959, 0.98958, 0.98838, 0.98835, 0.98826, 0.98825, 0.9883, 0.98828, 0.98711, 0.98709, 0.98562, 0.98561,
            0.98511, 0.9851, 0.98414, 0.98412, 0.98284, 0.98282, 0.98104, 0.98101, 0.97981, 0.97979, 0.97849, 0.97849,
            0.97557, 0.97554, 0.97398, 0.97395, 0.97171, 0.97166, 0.96917, 0.96913, 0.96511, 0.96507, 0.96263, 0.96257,
            0.95839, 0.95835, 0.95483, 0.95475, 0.94942, 0.94936, 0.9468, 0.94678, 0.94583, 0.94594, 0.94843, 0.94872,
            0.96949, 0.97015,
        ),
        source=f"{MAGCACHE_WAN22}:736",
        threshold=0.06, max_skip_steps=2, retention_ratio=0.2,
    ),
    # MagCache4Wan2.1 line 1002 ('480P' checkpoints); README: E024K6R02, I2V 480P 13 min 20 s ->
    # 4 min 23 s (E012K4R02: 4 min 43 s).
    "wan2.1-i2v-14b-480p": MagCacheCalibration(
        "wan2.1-i2v-14b-480p",
        (
            0.98783, 0.98993, 0.97559, 0.97593, 0.98311, 0.98319, 0.98202, 0.98225, 0.9888, 0.98878, 0.98762, 0.98759,
            0.98957, 0.98971, 0.99052, 0.99043, 0.99383, 0.99384, 0.98857, 0.9886, 0.99065, 0.99068, 0.98845, 0.98847,
            0.99057, 0.99057, 0.98957, 0.98961, 0.98601, 0.9861, 0.98823, 0.98823, 0.98756, 0.98759, 0.98808, 0.98814,
            0.98721, 0.98724, 0.98571, 0.98572, 0.98543, 0.98544, 0.98157, 0.98165, 0.98411, 0.98413, 0.97952, 0.97953,
            0.98149, 0.9815, 0.9774, 0.97742, 0.97825, 0.97826, 0.97355, 0.97361, 0.97085, 0.97087, 0.97056, 0.97055,
            0.96588, 0.96587, 0.96113, 0.96124, 0.9567, 0.95681, 0.94961, 0.94969, 0.93973, 0.93988, 0.93217, 0.93224,
            0.91878, 0.91896, 0.90955, 0.90954, 0.92617, 0.92616,
        ),
        source=f"{MAGCACHE_WAN21}:1002",
        threshold=0.24, max_skip_steps=6, retention_ratio=0.2,
    ),
    # MagCache4Wan2.1 line 1004 ('720P' checkpoints); README: E024K6R02, I2V 720P 30 min 40 s ->
    # 10 min 03 s (E012K4R02: 11 min 35 s).
    "wan2.1-i2v-14b-720p": MagCacheCalibration(
        "wan2.1-i2v-14b-720p",
        (
            0.99428, 0.99498, 0.98588, 0.98621, 0.98273, 0.98281, 0.99018, 0.99023, 0.98911, 0.98917, 0.98646, 0.98652,
            0.99454, 0.99456, 0.9891, 0.98909, 0.99124, 0.99127, 0.99102, 0.99103, 0.99215, 0.99212, 0.99515, 0.99515,
            0.99576, 0.99572, 0.99068, 0.99072, 0.99097, 0.99097, 0.99166, 0.99169, 0.99041, 0.99042, 0.99201, 0.99198,
            0.99101, 0.99101, 0.98599, 0.98603, 0.98845, 0.98844, 0.98848, 0.98851, 0.98862, 0.98857, 0.98718, 0.98719,
            0.98497, 0.98497, 0.98264, 0.98263, 0.98389, 0.98393, 0.97938, 0.9794, 0.97535, 0.97536, 0.97498, 0.97499,
            0.973, 0.97301, 0.96827, 0.96828, 0.96261, 0.96263, 0.95335, 0.9534, 0.94649, 0.94655, 0.93397, 0.93414,
            0.91636, 0.9165, 0.89088, 0.89109, 0.8679, 0.86768,
        ),
        source=f"{MAGCACHE_WAN21}:1004",
        threshold=0.24, max_skip_steps=6, retention_ratio=0.2,
    ),
    # MagCache4Wan2.2 line 771 (``--task i2v-A14B``), one list over both experts (the 0.91 pair is
    # the switch). The script never caches the high-noise expert for I2V (``mode="i2v"``), so neither do
    # we. README: E006K2R01, I2V-A14B 480p 26 min 43 s -> 20 min 05 s ("in work").
    "wan2.2-i2v-a14b": MagCacheCalibration(
        "wan2.2-i2v-a14b",
        (
            0.99191, 0.99144, 0.99356, 0.99337, 0.99326, 0.99285, 0.99251, 0.99264, 0.99393, 0.99366, 0.9943, 0.9943,
            0.99276, 0.99288, 0.99389, 0.99393, 0.99274, 0.99289, 0.99316, 0.9931, 0.99379, 0.99377, 0.99268, 0.99271,
            0.99222, 0.99227, 0.99175, 0.9916, 0.91076, 0.91046, 0.98931, 0.98933, 0.99087, 0.99088, 0.98852, 0.98855,
            0.98895, 0.98896, 0.98806, 0.98808, 0.9871, 0.98711, 0.98613, 0.98618, 0.98434, 0.98435, 0.983, 0.98307,
            0.98185, 0.98187, 0.98131, 0.98131, 0.9783, 0.97835, 0.97619, 0.9762, 0.97264, 0.9727, 0.97088, 0.97098,
            0.96568, 0.9658, 0.96045, 0.96055, 0.95322, 0.95335, 0.94579, 0.94594, 0.93297, 0.93311, 0.91699, 0.9172,
            0.89174, 0.89202, 0.8541, 0.85446, 0.79823, 0.79902,
        ),
        source=f"{MAGCACHE_WAN22}:771",
        threshold=0.06, max_skip_steps=2, retention_ratio=0.1, experts=(1,),
    ),
}

# --- TeaCache -----------------------------------------------------------------------------------------
TEACACHE4WAN = "ali-vilab/TeaCache@8ae350344216bc9b20fddba6a89ad0be03f6efd1 TeaCache4Wan2.1/teacache_generate.py"
LIGHTX2V_TI2V = (
    "ModelTC/LightX2V@3f06227a32252ea4ecdb2007529669c56af0e393 configs/caching/teacache/wan_ti2v_tea_720p.json"
)

TEACACHE: dict[str, TeaCacheCalibration] = {
    # 50 steps, 1280x704, 121 frames; only the polynomial on ``e`` ("use_ret_steps": false), thresh 0.26.
    "wan2.2-ti2v-5b": TeaCacheCalibration(
        "wan2.2-ti2v-5b",
        ret_steps=None,
        plain=(1.57472669e05, -1.15702395e05, 3.10761669e04, -3.83116651e03, 2.21608777e02, -4.81179567e00),
        source=LIGHTX2V_TI2V, default_ret_steps=False, threshold=0.26,
    ),
    # teacache_generate.py:967 (ret steps) and :974 ('480P'); README: with ret steps 0.20 -> 385 s to 212 s.
    "wan2.1-i2v-14b-480p": TeaCacheCalibration(
        "wan2.1-i2v-14b-480p",
        ret_steps=(2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01),
        plain=(-3.02331670e02, 2.23948934e02, -5.25463970e01, 5.87348440e00, -2.01973289e-01),
        source=TEACACHE4WAN, default_ret_steps=True, threshold=0.2,
    ),
    # teacache_generate.py:969 and :976 ('720P'); README: with ret steps 0.20 -> 903 s to 430 s.
    "wan2.1-i2v-14b-720p": TeaCacheCalibration(
        "wan2.1-i2v-14b-720p",
        ret_steps=(8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-02),
        plain=(-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683),
        source=TEACACHE4WAN, default_ret_steps=True, threshold=0.2,
    ),
}


def cache_method(name: str, variant: str, *, threshold: float | None = None, has_image: bool = True) -> CacheMethod:
    """The step-cache method ``name`` ("first-block", "magcache" or "teacache") for ``variant``, with
    its published calibration and recommended settings; ``threshold`` overrides the recommended one.

    Raises:
        InvalidInputError: an unknown method, or no published calibration for this variant.
    """
    if name == "first-block":
        return FirstBlockCache() if threshold is None else FirstBlockCache(threshold)
    if name not in METHODS:
        raise InvalidInputError(f"unknown cache method {name!r}; choose one of {', '.join(METHODS)}")
    table = MAGCACHE if name == "magcache" else TEACACHE
    key = variant if has_image or f"{variant}/t2v" not in table else f"{variant}/t2v"
    if key not in table:
        have = ", ".join(sorted({c.variant for c in table.values()}))
        raise InvalidInputError(
            f"no published {name} calibration for {variant} (published for: {have}); use --cache first-block"
        )
    return table[key].method(key, threshold)


def check_calibration(method: CacheMethod, variant: str) -> None:
    """Log a warning when ``method`` carries a calibration measured on another variant (or none)."""
    calibration = getattr(method, "calibration", None)
    if calibration is None:  # a method that measures the model itself (First-Block-Cache)
        return
    table = MAGCACHE if method.name == "magcache" else TEACACHE
    measured = table[calibration].variant if calibration in table else None
    if measured != variant:
        log.warning(
            "%s calibration %r was not measured on %s: skip decisions may not fit this model",
            method.name, calibration, variant,
        )  # fmt: skip


def resolve_cache(
    cache: str | CacheMethod | None, threshold: float | None, variant: str, *, has_image: bool = True
) -> CacheMethod | None:
    """What a generation's ``cache`` / ``cache_threshold`` arguments mean: None (no cache), a method name
    (see :func:`cache_method`), or a method object used as given (``threshold`` replaces its own).

    Raises:
        InvalidInputError: a threshold without a method, a non-finite threshold, an unknown method, or
            no published calibration for ``variant``.
    """
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise InvalidInputError(f"cache_threshold must be a finite number, got {threshold!r}")
        threshold = float(threshold)
    if cache is None:
        if threshold is not None:
            raise InvalidInputError("cache_threshold needs a cache method (cache=...)")
        return None
    if isinstance(cache, str):
        return cache_method(cache, variant, threshold=threshold, has_image=has_image)
    if threshold is not None and not hasattr(cache, "threshold"):
        raise InvalidInputError(f"cache method {cache.name!r} takes no threshold")
    method = cache if threshold is None else replace(cache, threshold=threshold)
    check_calibration(method, variant)
    return method
