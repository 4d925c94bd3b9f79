"""Torch transcriptions of the DMD few-step sampling loops (FastWan2.2-TI2V-5B, Wan2.2-TI2V-5B-Turbo); no
diffusers pipeline or scheduler implements them."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler as RefEuler

from mlx_i2v.dmd import DMDRecipe


def fastvideo_table(shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FastVideo's DMD stage table: its ``FlowMatchEulerDiscreteScheduler(shift=8.0)`` right after
    ``__init__`` (``fastvideo/models/schedulers/scheduling_flow_match_euler_discrete.py``), whose table
    code is diffusers'."""
    table = RefEuler(shift=shift)
    return table.timesteps, table.sigmas


def self_forcing_table(shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-Forcing's ``FlowMatchScheduler(shift=shift, sigma_min=0.0, extra_one_step=True)`` after
    ``set_timesteps(1000)`` (quanhaol/Wan2.2-TI2V-5B-Turbo ``utils/scheduler.py``,
    ``utils/wan_wrapper.py``)."""
    sigmas = torch.linspace(1.0, 0.0, 1001)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return sigmas * 1000, sigmas


TABLES = {"fastvideo": fastvideo_table, "self_forcing": self_forcing_table}


def reference_dmd(recipe: DMDRecipe, latents: torch.Tensor, velocity, noises: list[torch.Tensor]) -> list:
    """The sampling loop of FastVideo's ``DmdDenoisingStage.forward`` (= Turbo's
    ``Wan22FewstepInferencePipeline.inference`` on a text-to-video latent), transcribed:

    * ``pred_noise_to_pred_video`` / ``_convert_flow_pred_to_x0``: the nearest table timestep in float64,
      ``x0 = x - sigma_t * v`` in float64, cast back;
    * ``scheduler.add_noise(x0, noise, next_timestep)``: the nearest table timestep (float32 table minus the
      long timestep), ``(1 - sigma) * x0 + sigma * noise``;
    * the last step keeps ``x0``.

    ``velocity(i, x)`` stands in for the transformer; returns every step's output.
    """
    table_t, table_sigmas = TABLES[recipe.table](recipe.shift)
    timesteps = torch.tensor(recipe.timesteps, dtype=torch.long)
    outputs = []
    for i, t in enumerate(timesteps):
        noise_latents = latents.clone()
        pred_noise = velocity(i, latents)
        distance = table_t.double().unsqueeze(0) - t.reshape(1).double().unsqueeze(1)
        index = torch.argmin(distance.abs(), dim=1)
        sigma_t = table_sigmas.double()[index]
        pred_video = (noise_latents.double() - sigma_t * pred_noise.double()).to(pred_noise.dtype)
        if i < len(timesteps) - 1:
            next_timestep = timesteps[i + 1] * torch.ones([1], dtype=torch.long)
            index = torch.argmin((table_t.unsqueeze(0) - next_timestep.unsqueeze(1)).abs(), dim=1)
            sigma = table_sigmas[index]
            latents = ((1 - sigma) * pred_video + sigma * noises[i]).type_as(noises[i])
        else:
            latents = pred_video
        outputs.append(latents)
    return outputs
