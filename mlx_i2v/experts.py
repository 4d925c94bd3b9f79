"""The denoiser(s) of every family: one transformer, or two experts switched at a boundary timestep
(Wan2.2-A14B)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import mlx.nn as nn

from .resident import free_memory, timed_load

log = logging.getLogger(__name__)

Loader = Callable[[], nn.Module]


@dataclass
class Experts:
    """Transformers indexed 0 (the only one, or A14B's high-noise expert) and 1 (A14B's low-noise expert).

    Timesteps at or above ``boundary`` (``boundary_ratio * num_train_timesteps``, 900 for A14B) go to
    expert 0, the rest to expert 1, as diffusers' ``WanImageToVideoPipeline`` does. Unless
    ``keep_resident``, at most one expert is in memory: the other is released before the next is loaded,
    which halves A14B's weight memory (26.6 GiB instead of 53 in bf16) at the cost of one load per switch.
    ``keep_between_calls`` keeps the last expert loaded after a generation instead of releasing it.
    """

    loaders: list[Loader]
    boundary: float | None = None
    keep_resident: bool = False
    keep_between_calls: bool = False
    _resident: dict[int, nn.Module] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if len(self.loaders) > 1 and self.boundary is None:
            raise ValueError("two experts need a boundary timestep")

    def index_for(self, t: float) -> int:
        """Which expert denoises timestep ``t``."""
        return 0 if self.boundary is None or t >= self.boundary else 1

    def get(self, index: int) -> nn.Module:
        """The expert ``index``, loading it (and first releasing the other, unless kept resident)."""
        if index not in self._resident:
            if not self.keep_resident:
                self.release()
            log.info("loading transformer expert %d", index)
            self._resident[index] = timed_load(self.loaders[index])
        return self._resident[index]

    def resident(self) -> list[int]:
        """Indices of the experts currently in memory."""
        return sorted(self._resident)

    def loaded(self) -> dict[int, nn.Module]:
        """The experts currently in memory, by index."""
        return dict(self._resident)

    def release(self) -> None:
        """Drop every resident expert and return its memory to the system."""
        if self._resident:
            self._resident.clear()
            free_memory()

    def done(self) -> None:
        """The denoising stage is over: release the experts unless they are kept between calls."""
        if not self.keep_between_calls:
            self.release()
