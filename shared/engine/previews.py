"""Latent → pixel decoders: the full VAE (also the engine's final decode), TAESD, and the latent
RGB projection, plus rendering their output as small JPEG step previews.

Every decoder maps SDXL latents (B, 4, h, w), as the UNet sees them (scaled), to uint8 NHWC
pixels, and refuses non-finite output with GenerationError: a NaN image is never a success.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from PIL import Image

from shared.api.schemas import EncodedImage
from shared.errors import GenerationError
from shared.imaging import encode_image, fit_size, float_to_uint8, to_pil

PREVIEW_FORMAT = "jpeg"
PREVIEW_QUALITY = 75

# ComfyUI's SDXL latent_rgb_factors (rows: latent channels, columns: R, G, B) and bias.
SDXL_LATENT_RGB_FACTORS = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
SDXL_LATENT_RGB_BIAS = (0.1084, -0.0175, -0.0011)


def place_module(
    module: torch.nn.Module, device: torch.device, dtype: torch.dtype
) -> torch.nn.Module:
    """`module` in eval mode on `device` in `dtype`. The dtype is passed to `.to` only when it
    differs: diffusers 0.42's ModelMixin.to logs a float32-modules warning on any dtype argument."""
    module = module.to(device=device)
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype=dtype)
    return module.eval()


class PreviewDecoder(Protocol):
    """Turns latents (B, C, h, w) into uint8 pixels (B, H, W, 3)."""

    def __call__(self, latents: torch.Tensor) -> np.ndarray: ...


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """Decoder output in [-1, 1] (B, 3, H, W) to uint8 NHWC, as diffusers' VaeImageProcessor."""
    if not torch.isfinite(images).all():
        raise GenerationError(
            "the decoder produced NaN or infinite pixels (an fp16 VAE overflow or broken "
            "weights); use a bf16/fp32 VAE or an fp16-fix VAE",
            code="nan_output",
        )
    unit = (images * 0.5 + 0.5).clamp(0, 1)
    return float_to_uint8(unit.cpu().permute(0, 2, 3, 1).float().numpy())


class VAEDecoder:
    """The full VAE decode, always in float32: SDXL's VAE overflows in fp16. diffusers upcasts
    per call when `force_upcast` is set; one float32 copy avoids flipping a shared module's dtype
    under concurrent requests."""

    def __init__(self, vae: AutoencoderKL, device: torch.device) -> None:
        self.vae = place_module(vae, device, torch.float32)
        self.device = device
        config = vae.config
        self.scaling_factor = float(config.scaling_factor)
        mean = getattr(config, "latents_mean", None)
        std = getattr(config, "latents_std", None)
        stats = (mean, std) if mean is not None and std is not None else None
        self.latents_mean = _channel_tensor(stats[0], self.device) if stats else None
        self.latents_std = _channel_tensor(stats[1], self.device) if stats else None

    def __call__(self, latents: torch.Tensor) -> np.ndarray:
        return to_pixels(self.decode(latents))

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] (B, 3, H, W), unchecked: callers check each image's finiteness."""
        latents = latents.to(device=self.device, dtype=torch.float32)
        if self.latents_mean is not None and self.latents_std is not None:
            latents = latents * self.latents_std / self.scaling_factor + self.latents_mean
        else:
            latents = latents / self.scaling_factor
        return self.vae.decode(latents, return_dict=False)[0]


def _channel_tensor(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)


class TinyVAEDecoder:
    """TAESD(-XL): a few ms per preview; it takes the scaled latents directly (scaling_factor 1)."""

    def __init__(self, tiny: AutoencoderTiny, device: torch.device, dtype: torch.dtype) -> None:
        self.tiny = place_module(tiny, device, dtype)
        self.device, self.dtype = device, dtype
        self.scaling_factor = float(tiny.config.scaling_factor)

    @torch.inference_mode()
    def __call__(self, latents: torch.Tensor) -> np.ndarray:
        latents = latents.to(device=self.device, dtype=self.dtype) / self.scaling_factor
        return to_pixels(self.tiny.decode(latents, return_dict=False)[0].float())


class LatentRGBDecoder:
    """A linear map of the 4 latent channels to RGB: free, blurry, at latent resolution (h/8)."""

    def __init__(
        self,
        factors: tuple[tuple[float, ...], ...] = SDXL_LATENT_RGB_FACTORS,
        bias: tuple[float, ...] = SDXL_LATENT_RGB_BIAS,
    ) -> None:
        self.weight = torch.tensor(factors, dtype=torch.float32).T.contiguous()
        self.bias = torch.tensor(bias, dtype=torch.float32)

    @torch.inference_mode()
    def __call__(self, latents: torch.Tensor) -> np.ndarray:
        channels_last = latents.float().movedim(1, -1)
        weight, bias = self.weight.to(latents.device), self.bias.to(latents.device)
        rgb = torch.nn.functional.linear(channels_last, weight, bias)
        return to_pixels(rgb.movedim(-1, 1))


def render_previews(
    decoder: PreviewDecoder, latents: torch.Tensor, size: tuple[int, int], max_side: int
) -> list[EncodedImage]:
    """One JPEG per image in the batch, the output `size` (w, h) fitted within `max_side`.

    Latent previews come out at 1/8 scale and are scaled up to that size, so every preview kind
    has the same dimensions for the same request.
    """
    width, height = fit_size(size[0], size[1], max_side)
    previews = []
    for pixels in decoder(latents):
        img = to_pil(pixels)
        if img.size != (width, height):
            img = img.resize((width, height), Image.Resampling.BILINEAR)
        b64 = encode_image(img, PREVIEW_FORMAT, quality=PREVIEW_QUALITY)
        previews.append(EncodedImage(b64=b64, format=PREVIEW_FORMAT, width=width, height=height))
    return previews
