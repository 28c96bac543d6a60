"""SDXL's ensemble of experts: the base denoises the high-noise part of the schedule and the
refiner, a second UNet, the rest.

It reproduces diffusers' handoff between `StableDiffusionXLPipeline(denoising_end=switch_at,
output_type="latent")` and `StableDiffusionXLImg2ImgPipeline(denoising_start=switch_at)` with
the refiner's UNet and scheduler:

- the base keeps the timesteps at or above the cutoff `round(T - switch_at * T)` (T: the
  scheduler's training timesteps), the refiner those below it on its own schedule of the same
  step count (one more for a second-order sampler when the count is even), and the refiner
  starts from the base's latents as they are (no noise added);
- the refiner is conditioned by text encoder 2 alone (the last `cross_attention_dim` features
  of SDXL's concatenated prompt embeddings, which are encoder 2's, and its pooled vector) and
  by time ids that carry an aesthetic score in place of the target size:
  `(height, width, 0, 0, aesthetic_score)`, `negative_aesthetic_score` on the negative rows.

diffusers repeats `[negative, positive]` time ids per image, which pairs them with the wrong rows
once a request has several images; here each row gets its own (equal for one image).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from shared.engine.previews import place_module


@dataclass
class Refiner:
    """The refiner's UNet on the engine's device and its scheduler config."""

    unet: UNet2DConditionModel
    scheduler_config: dict[str, Any]

    @classmethod
    def place(
        cls,
        unet: UNet2DConditionModel,
        scheduler_config: dict[str, Any],
        device: torch.device,
        dtype: torch.dtype,
    ) -> Refiner:
        return cls(place_module(unet, device, dtype), dict(scheduler_config))

    @property
    def text_features(self) -> int:
        """How many trailing prompt-embedding features are text encoder 2's (what it reads)."""
        return int(self.unet.config.cross_attention_dim)


def cutoff(scheduler: SchedulerMixin, switch_at: float) -> int:
    """The discrete timestep where the base hands over (diffusers' `discrete_timestep_cutoff`)."""
    trained = scheduler.config.num_train_timesteps
    return round(trained - switch_at * trained)


def base_steps(timesteps: torch.Tensor, scheduler: SchedulerMixin, switch_at: float) -> int:
    """How many of the base's timesteps it runs before the handoff (`denoising_end`)."""
    return int((timesteps >= cutoff(scheduler, switch_at)).sum())


def refiner_start(scheduler: SchedulerMixin, switch_at: float) -> int:
    """Index of the refiner's first timestep in its full schedule (`denoising_start`)."""
    timesteps = scheduler.timesteps
    count = int((timesteps < cutoff(scheduler, switch_at)).sum())
    if scheduler.order == 2 and count % 2 == 0:
        count += 1
    return len(timesteps) - count


def time_ids(
    height: int, width: int, score: float, negative_score: float, count: int, cfg: bool
) -> torch.Tensor:
    """The refiner's micro-conditioning rows: negatives first under guidance, one per image."""
    positive = torch.tensor([[height, width, 0, 0, score]]).repeat(count, 1)
    if not cfg:
        return positive
    negative = torch.tensor([[height, width, 0, 0, negative_score]]).repeat(count, 1)
    return torch.cat([negative, positive])
