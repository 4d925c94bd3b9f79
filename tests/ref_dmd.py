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


def dmd_step(
    recipe: DMDRecipe, i: int, latents: torch.Tensor, pred_noise: torch.Tensor, noise: torch.Tensor | None
) -> torch.Tensor:
    """Step ``i`` of FastVideo's ``DmdDenoisingStage.forward`` (= Turbo's ``Wan22FewstepInferencePipeline.inference``
    on a text-to-video latent), transcribed:

    * ``pred_noise_to_pred_video`` / ``_convert_flow_pred_to_x0``: the nearest table timestep in float64,
      ``x0 = x - sigma_t * v`` in float64, cast back;
    * ``scheduler.add_noise(x0, noise, next_timestep)``: the nearest table timestep (float32 table minus the
      long timestep), ``(1 - sigma) * x0 + sigma * noise``;
    * the last step keeps ``x0`` (``noise`` is unused there).
    """
    table_t, table_sigmas = TABLES[recipe.table](recipe.shift)
    timesteps = torch.tensor(recipe.timesteps, dtype=torch.long)
    t = timesteps[i]
    distance = table_t.double().unsqueeze(0) - t.reshape(1).double().unsqueeze(1)
    index = torch.argmin(distance.abs(), dim=1)
    sigma_t = table_sigmas.double()[index]
    pred_video = (latents.double() - sigma_t * pred_noise.double()).to(pred_noise.dtype)
    if i == len(timesteps) - 1:
        return pred_video
    next_timestep = timesteps[i + 1] * torch.ones([1], dtype=torch.long)
    index = torch.argmin((table_t.unsqueeze(0) - next_timestep.unsqueeze(1)).abs(), dim=1)
    sigma = table_sigmas[index]
    return ((1 - sigma) * pred_video + sigma * noise).type_as(noise)


def reference_dmd(recipe: DMDRecipe, latents: torch.Tensor, velocity, noises: list[torch.Tensor]) -> list:
    """The whole loop of :func:`dmd_step`; ``velocity(i, x)`` stands in for the transformer. Returns every
    step's output."""
    outputs = []
    for i in range(len(recipe.timesteps)):
        latents = dmd_step(recipe, i, latents, velocity(i, latents), noises[i] if i < len(noises) else None)
        outputs.append(latents)
    return outputs


class ReferenceDMDScheduler(RefEuler):
    """:func:`dmd_step` in the shape of a diffusers scheduler, so that diffusers' Wan pipelines run the DMD
    loop around the transformer (conditioning, timesteps, guidance and decoding theirs): ``set_timesteps``
    gives the recipe's timesteps whatever the step count (as float32, which the transformer casts them to
    anyway), ``step`` re-noises with
    the given ``noises`` in turn. Build it with :meth:`for_recipe`."""

    def for_recipe(self, recipe: DMDRecipe, noises: list[torch.Tensor]) -> ReferenceDMDScheduler:
        self.recipe, self.noises = recipe, noises
        return self

    def set_timesteps(self, num_inference_steps=None, device=None, **kwargs) -> None:
        self.timesteps = torch.tensor(self.recipe.timesteps, dtype=torch.float32)
        self._step_index = 0

    def step(self, model_output, timestep, sample, return_dict=False, **kwargs):
        i = self._step_index
        assert timestep == self.timesteps[i]
        noise = self.noises[i] if i < len(self.noises) else None
        self._step_index += 1
        return (dmd_step(self.recipe, i, sample, model_output, noise),)
