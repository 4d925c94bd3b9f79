"""Bytes each rank receives per denoising step, counted from what the strategies exchange.

Per pass of ``B`` rows over ``L`` tokens split into ``K`` shards of ``s = ceil(L / K)``:

* every self-attention gathers the shard's keys and values: ``(K - 1) * 2 * B * s * dim`` values, once
  per block;
* the head's output is gathered once: ``(K - 1) * B * s * pt*ph*pw*C_out`` values;

all in the compute dtype. A guided step with the branches split over a pair adds one swap of the
float32 velocity ``(1, T, h, w, C_out)``. These are the counts for the whole group, a split group
(NCCL, MPI) or a neighbour pair (every subgroup of 1, 2 and 4 ranks on a ring); where a ring backend
must gather the whole group to keep a subgroup's pieces (6 or more ranks with CFG), the gathers
receive ``N - 1`` pieces instead of ``K - 1``.
"""

from __future__ import annotations

import math

import mlx.core as mx

from ..seams import PatchedConfig
from .layout import Layout

FLOAT32 = 4


def step_bytes(
    config: PatchedConfig, latent: tuple[int, int, int], layout: Layout, guided: bool, dtype: mx.Dtype
) -> dict[str, int]:
    """Bytes one rank receives in one denoising step, by kind ("keys/values", "output", "guidance").

    Args:
        config: the transformer.
        latent: the latent grid (T, h, w).
        layout: how the ranks share the step.
        guided: whether this step runs classifier-free guidance (two branches).
        dtype: the compute dtype.
    """
    pt, ph, pw = config.patch_size
    T, h, w = latent
    tokens = (T // pt) * (h // ph) * (w // pw)
    K = layout.sequence
    rows = 2 if guided and layout.guidance == 1 else 1  # both branches batched on this rank
    shard = math.ceil(tokens / K)
    item = dtype.size
    out = {
        "keys/values": config.num_layers * (K - 1) * 2 * rows * shard * config.inner_dim * item,
        "output": (K - 1) * rows * shard * config.patch_volume * config.out_channels * item,
        "guidance": (layout.guidance - 1) * T * h * w * config.out_channels * FLOAT32 if guided else 0,
    }
    return out
