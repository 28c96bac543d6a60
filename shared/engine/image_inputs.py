"""Image-conditioned starts and per-step corrections: img2img, inpainting (4- and 9-channel
UNets), start image + noise, and noise-injection masks.

Each reproduces diffusers' own pipelines where one exists (`StableDiffusionXLImg2ImgPipeline`,
`StableDiffusionXLInpaintPipeline`): the same preprocessing, the same VAE sampling with the same
generators in the same order, the same `add_noise` calls, so our pixels equal theirs. The engine
asks this module for a request's initial latents and, after every scheduler step, for the
request's corrections; everything here is per request, so requests with and without image inputs
share one UNet call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from shared.api.jobs import DenoiseJob
from shared.engine.previews import VAEDecoder

# Noise-injection generators are seeded apart from the request's own, so injecting noise does not
# change the noise every other part of the request draws (the golden-ratio constant spreads seeds).
INJECTION_SEED_OFFSET = 0x9E3779B97F4A7C15
SEED_MODULUS = 2**63


def pixels_to_tensor(pixels: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (H, W, 3) → float32 (1, 3, H, W) in [-1, 1], as diffusers' VaeImageProcessor."""
    # (1, H, W, 3) permuted, exactly diffusers' numpy_to_pt layout: convolutions pick their
    # kernels by strides, and a flat region through GroupNorm amplifies the last-bit differences.
    unit = torch.from_numpy(np.asarray(pixels, dtype=np.float32)[None] / 255.0)
    return (unit.permute(0, 3, 1, 2) * 2.0 - 1.0).to(device)


def mask_to_tensor(mask: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (H, W), white = repaint → binarised float32 (1, 1, H, W), as diffusers' mask
    processor (`do_binarize`: 1 where the value is at least one half)."""
    unit = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]
    return (unit >= 0.5).to(torch.float32).to(device)


class ImageLatents:
    """VAE encoding as diffusers' pipelines do it: float32, a latent-distribution sample drawn
    with the given generator, then scaled (and shifted where the VAE has latent statistics)."""

    def __init__(self, vae: VAEDecoder, dtype: torch.dtype) -> None:
        self.vae = vae
        self.dtype = dtype

    def encode(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        posterior = self.vae.vae.encode(image.to(self.vae.device, torch.float32)).latent_dist
        latents = posterior.sample(generator=generator)
        if self.vae.latents_mean is not None and self.vae.latents_std is not None:
            latents = (latents - self.vae.latents_mean) * self.vae.scaling_factor
            latents = latents / self.vae.latents_std
        else:
            latents = latents * self.vae.scaling_factor
        return latents.to(self.dtype)

    def encode_each(self, image: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """One sample per generator (img2img draws each image's latents with its own)."""
        return torch.cat([self.encode(image, generator) for generator in generators])


@dataclass
class Inpainting:
    """A request's inpainting state. With a 9-channel UNet the mask and the masked image's
    latents are extra UNet inputs every step; with a 4-channel one the known region is put back
    after every step, noised to the next timestep (`blend`)."""

    mask: torch.Tensor  # (n, 1, h, w) at latent size, 1 = repaint
    masked_latents: torch.Tensor | None  # (n, 4, h, w): the 9-channel UNet's extra input
    image_latents: torch.Tensor | None  # (n, 4, h, w): the 4-channel blend's known region
    noise: torch.Tensor | None  # the initial noise, which the blend re-noises the image with

    def unet_input(self, model_input: torch.Tensor, cfg: bool) -> torch.Tensor:
        if self.masked_latents is None:
            return model_input
        extra = torch.cat([self.mask, self.masked_latents], dim=1)
        return torch.cat([model_input, torch.cat([extra] * 2) if cfg else extra], dim=1)

    def blend(
        self, latents: torch.Tensor, scheduler: SchedulerMixin, next_timestep: torch.Tensor | None
    ) -> torch.Tensor:
        if self.image_latents is None or self.noise is None:
            return latents
        known = self.image_latents
        if next_timestep is not None:
            known = scheduler.add_noise(known, self.noise, next_timestep.reshape(1))
        return (1 - self.mask) * known + self.mask * latents


@dataclass
class NoiseInjector:
    """Seeded noise, scaled to the current noise level, added inside a mask between two
    fractions of the schedule: `latents += strength * sigma * mask * noise`."""

    mask: torch.Tensor  # (1, 1, h, w) at latent size, in [0, 1]
    strength: float
    start: float
    end: float
    generators: list[torch.Generator]

    def active(self, done: int, total: int) -> bool:
        """After step `done` of `total` (never after the last one: that is the image)."""
        return done < total and self.start <= done / total < self.end

    def apply(self, latents: torch.Tensor, level: float) -> torch.Tensor:
        shape = (1, *latents.shape[1:])
        noise = torch.cat(
            [
                randn_tensor(shape, generator=g, device=latents.device, dtype=latents.dtype)
                for g in self.generators
            ]
        )
        return latents + (self.strength * level) * self.mask * noise


def noise_level(scheduler: SchedulerMixin, timestep: torch.Tensor) -> float:
    """The noise scale of latents at `timestep` in the scheduler's own parameterisation: sigma
    for the sigma-space samplers (Euler and its kin, after a step their `step_index` points at
    the next sigma); sqrt(1 - alpha_bar) for the variance-preserving ones (DDIM, DPM-Solver,
    UniPC)."""
    sigmas = getattr(scheduler, "sigmas", None)
    step_index = getattr(scheduler, "step_index", None)
    sigma_space = getattr(scheduler, "init_noise_sigma", 1.0) != 1.0
    if sigma_space and sigmas is not None and step_index is not None and step_index < len(sigmas):
        return float(sigmas[step_index])
    alphas = scheduler.alphas_cumprod
    index = int(timestep.round().long().clamp(0, len(alphas) - 1))
    return math.sqrt(1.0 - float(alphas[index]))


def injection_generators(seeds: list[int]) -> list[torch.Generator]:
    return [
        torch.Generator("cpu").manual_seed((seed + INJECTION_SEED_OFFSET) % SEED_MODULUS)
        for seed in seeds
    ]


def latent_mask(mask: np.ndarray, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """A float mask (H, W) in [0, 1] averaged down to the latent grid (1, 1, h, w)."""
    tensor = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
    return F.interpolate(tensor, size=size, mode="area").to(device)


def start_latents(
    job: DenoiseJob,
    encoder: ImageLatents,
    generators: list[torch.Generator],
    shape: tuple[int, ...],
    init_noise_sigma: float,
) -> torch.Tensor:
    """Start image + noise: the full schedule starts from
    `init_noise_sigma * (sqrt(1 - s) * z + sqrt(s) * noise)`, with z the image's scaled VAE
    latents (unit variance by the VAE's scaling factor, like the noise) and s = start_noise."""
    assert job.start_image is not None
    device = encoder.vae.device
    image = pixels_to_tensor(job.start_image, device)
    latents = encoder.encode_each(image, generators)
    noise = randn_tensor(shape, generator=generators, device=latents.device, dtype=latents.dtype)
    share = job.start_noise
    return init_noise_sigma * (math.sqrt(1.0 - share) * latents + math.sqrt(share) * noise)
