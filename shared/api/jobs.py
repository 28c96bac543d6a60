"""What the Router hands SDXLPipeline: a validated, encoded request (`DenoiseJob`) and the prompt
embeddings and decoded image inputs it carries, as numpy arrays so they travel through Ray without
torch."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from shared.api.vocabulary import ImageFormat, PreviewKind, SchedulerName


@dataclass
class PromptEmbeddings:
    """SDXL conditioning for one prompt pair, as numpy arrays (batch dimension 1)."""

    prompt_embeds: np.ndarray
    pooled_prompt_embeds: np.ndarray
    negative_prompt_embeds: np.ndarray
    negative_pooled_prompt_embeds: np.ndarray


@dataclass
class NoiseInjection:
    """A resolved `noise_mask`: the mask at the job's size (float32 (H, W) in [0, 1], inverted
    already if asked) and when and how strongly noise goes in."""

    mask: np.ndarray
    strength: float
    start: float
    end: float


@dataclass
class DenoiseJob:
    """What the Router hands SDXLPipeline once the request is validated and encoded."""

    id: str
    model: str
    embeddings: PromptEmbeddings
    width: int
    height: int
    steps: int
    guidance_scale: float
    seeds: list[int]
    scheduler: SchedulerName | None = None
    preview: PreviewKind = "none"
    preview_every: int = 1
    stream_steps: bool = True  # False: nobody reads step events, so the replica keeps them
    preview_max_side: int = 256
    output_format: ImageFormat = "png"
    created_at: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    # Image inputs, decoded and fitted to (height, width) by the Router's intake.
    init_image: np.ndarray | None = None  # uint8 (H, W, 3): img2img / inpainting source
    strength: float = 1.0
    mask: np.ndarray | None = None  # uint8 (H, W), white = repaint
    start_image: np.ndarray | None = None  # uint8 (H, W, 3)
    start_noise: float = 1.0
    noise_mask: NoiseInjection | None = None
    image_embeds: np.ndarray | None = None  # (1, dim) CLIP image embedding for the IP-Adapter
    image_prompt_scale: float = 1.0
