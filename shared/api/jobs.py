"""What the Router hands SDXLPipeline: a validated, encoded request (`DenoiseJob`) and the prompt
embeddings and decoded image inputs it carries, as numpy arrays so they travel through Ray without
torch."""

from __future__ import annotations

from collections.abc import Iterable
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
class ControlInput:
    """One ControlNet of a job: the model's `controlnets:` id, its control map (uint8 (H, W, 3),
    preprocessed and fitted to the job's size by the Router) and when and how strongly it
    steers: `scale` on the steps whose fraction of the schedule lies within [start, end]."""

    id: str
    image: np.ndarray
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0


@dataclass
class RefinerHandoff:
    """A job's refiner stage (SDXL's ensemble of experts): the base stops at `switch_at` of the
    schedule and the model's refiner finishes it. `embeddings` are the prompt pair encoded with
    the refiner's rule for an empty negative (the refiner reads their text-encoder-2 part); None
    means the job's own embeddings serve."""

    switch_at: float = 0.8
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    embeddings: PromptEmbeddings | None = None


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
    loras: tuple[tuple[str, float], ...] = ()  # (LoRA id, scale) pairs
    controlnets: list[ControlInput] = field(default_factory=list)
    refiner: RefinerHandoff | None = None


LoraSet = tuple[tuple[str, float], ...]
# Between a model id and its LoRA ids in a multiplexed model id ("tiny#loras=a,b").
LORA_SET_MARK = "#loras="


def lora_set(loras: Iterable[tuple[str, float]]) -> LoraSet:
    """A LoRA set as the step batcher's key: sorted by id, scale-0 entries dropped (a LoRA at
    weight 0 adds exactly nothing, so those requests batch with plain ones)."""
    return tuple(sorted((lora_id, float(scale)) for lora_id, scale in loras if scale != 0))


def multiplexed_id(model: str, loras: Iterable[tuple[str, float]]) -> str:
    """The id Serve multiplexes SDXLPipeline on: the model, plus the ids of the LoRAs a request
    applies, so requests of one LoRA set prefer the replica that already holds its adapters
    (scales do not matter for that: adapters are loaded per id)."""
    ids = [lora_id for lora_id, _ in lora_set(loras)]
    return f"{model}{LORA_SET_MARK}{','.join(ids)}" if ids else model


def base_model(multiplexed: str) -> str:
    """The model id of a multiplexed id."""
    return multiplexed.split(LORA_SET_MARK, 1)[0]
