"""CLIP image embeddings for IP-Adapter image prompts and /v1/embeddings, without a pipeline.

`ImageEncoder.encode` computes what diffusers' `StableDiffusionXLPipeline.encode_image(image,
device, 1)` returns as `image_embeds` for plain (non-plus) IP-Adapters: the image processor's
pixel values through CLIPVisionModelWithProjection, its projected `image_embeds`. A whole batch
of images goes through the encoder in one forward pass (ClipEncoder batches with `@serve.batch`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image


class ImageEncoder:
    """A CLIP vision encoder and its image processor. The module is injected already on
    `device` in `dtype`; results are always float32 numpy."""

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        device: str | torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.device = torch.device(device)
        self.dtype = dtype

    @property
    def dim(self) -> int:
        """The size of one image embedding (the encoder's projection_dim)."""
        return int(self.model.config.projection_dim)

    @torch.inference_mode()
    def encode(self, images: list[np.ndarray]) -> np.ndarray:
        """uint8 HWC RGB arrays -> (n, dim) float32 `image_embeds`, one row per image."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        # Through PIL, as diffusers' callers pass images, so the processor takes the same path
        # (given arrays, it would guess whether channels come first or last).
        pil = [Image.fromarray(np.ascontiguousarray(image)) for image in images]
        pixels = self.processor(pil, return_tensors="pt").pixel_values
        embeds = self.model(pixels.to(device=self.device, dtype=self.dtype)).image_embeds
        return embeds.float().cpu().numpy()
