"""Helpers for the step-cache tests: recording our StepCache's decisions and diffusers' First-Block ones."""

from __future__ import annotations

import pytest

from mlx_i2v import pipeline as pipeline_module
from mlx_i2v.stepcache import StepCache


def record_step_caches(monkeypatch):
    """Make every generation's StepCache recordable; returns a function giving the last one that decided."""
    caches: list[StepCache] = []

    class Recording(StepCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            caches.append(self)

    monkeypatch.setattr(pipeline_module, "StepCache", Recording)
    return lambda: [c for c in caches if c.decisions][-1]


def spy_first_block(monkeypatch) -> list:
    """Record each diffusers First-Block decision: (context, computed, relative change of block 0)."""
    from diffusers.hooks.first_block_cache import FBCHeadBlockHook

    log = []
    decide = FBCHeadBlockHook._should_compute_remaining_blocks

    def spy(self, residual):
        previous = self.state_manager.get_state().head_block_residual
        diff = None if previous is None else ((residual - previous).abs().mean() / previous.abs().mean()).item()
        computed = decide(self, residual)
        log.append((self.state_manager.context.name, computed, diff))
        return computed

    monkeypatch.setattr(FBCHeadBlockHook, "_should_compute_remaining_blocks", spy)
    return log


def assert_same_indicators(ours: list, log: list, threshold: float) -> None:
    """Our decisions' indicators equal diffusers' logged ones (None where neither compared), and none lies
    so close to the threshold that the decision rests on rounding."""
    for d, (_, _, diff) in zip(ours, log, strict=True):
        assert (d.indicator is None) == (diff is None)
        if diff is not None:
            assert d.indicator == pytest.approx(diff, rel=1e-4)
            assert abs(diff - threshold) > 2e-4
