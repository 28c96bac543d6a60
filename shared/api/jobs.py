"""What the Router hands SDXLPipeline: a validated, encoded request (`DenoiseJob`) and the prompt
embeddings it carries, as numpy arrays so they travel through Ray without torch."""

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
