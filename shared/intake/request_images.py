"""A request's image inputs, from base64 to the arrays a `DenoiseJob` carries. Torch-free: the
Router runs it (in a worker thread) before anything is queued, so a bad image is a 4xx and costs
no replica time.

Every image goes through `shared.intake.images` (formats by their bytes, pixel caps from the header,
EXIF orientation). A request that gives no width/height takes them from its init or start image,
else its first control image (`size_from_image`); the images are then fitted to the request's
size by `fit_image`'s rule (scale to cover, crop the centre), and control images preprocessed
into control maps (`shared.intake.control_maps`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from shared.api.jobs import ControlInput, NoiseInjection
from shared.api.schemas import GenerateRequest
from shared.config import LimitsConfig
from shared.errors import InvalidRequestError
from shared.intake.control_maps import control_map
from shared.intake.images import (
    decode_image,
    fit_image,
    mask_pixels,
    rgb_pixels,
    size_from_image,
)
from shared.intake.noise_masks import pattern_mask
from shared.intake.resolve import check_controlnet_count

IMG2IMG_STRENGTH = 0.8  # A1111's and most UIs' default; diffusers' img2img example uses 0.3-0.8
INPAINT_STRENGTH = 1.0  # repaint the masked region from noise (9-channel models expect it)
START_NOISE = 0.7
# Twice CLIP's 224 px input: images larger than this gain nothing from crossing at full size.
CLIP_MAX_SHORT_SIDE = 448


@dataclass
class DecodedImages:
    """The request's images, decoded and checked but not yet fitted to its size."""

    init_image: Image.Image | None = None
    mask: Image.Image | None = None
    start_image: Image.Image | None = None
    noise_mask: Image.Image | None = None
    image_prompt: Image.Image | None = None
    controlnets: list[Image.Image] = field(default_factory=list)  # by `controlnet` index

    @property
    def source(self) -> Image.Image | None:
        """The image whose size a request without width/height takes."""
        return self.init_image or self.start_image or next(iter(self.controlnets), None)


def decode_images(request: GenerateRequest, limits: LimitsConfig) -> DecodedImages:
    """Decode every image field; a bad one raises its 4xx naming the field."""
    check_controlnet_count(request, limits)  # before decoding what the limit refuses anyway
    decoded = DecodedImages()
    for param, data in request.image_fields.items():
        image = decode_image(data, param=param, limits=limits)
        if param.startswith("controlnet."):  # `controlnet.{i}.image`, in index order
            decoded.controlnets.append(image)
        else:
            setattr(decoded, param.replace(".image", ""), image)
    init, mask = decoded.init_image, decoded.mask
    if init is not None and mask is not None and init.size != mask.size:
        raise InvalidRequestError(
            f"mask must have the init_image's size ({init.width}x{init.height}); got "
            f"{mask.width}x{mask.height}",
            code="mask_size_mismatch",
            param="mask",
        )
    return decoded


def with_image_size(
    request: GenerateRequest, decoded: DecodedImages, limits: LimitsConfig
) -> GenerateRequest:
    """The request with the sides it leaves out taken from its init/start image, if any."""
    source = decoded.source
    if source is None or (request.width is not None and request.height is not None):
        return request
    width, height = size_from_image(source, limits)
    return request.model_copy(
        update={"width": request.width or width, "height": request.height or height}
    )


def job_images(request: GenerateRequest, decoded: DecodedImages) -> dict[str, Any]:
    """`DenoiseJob` fields for the request's image inputs, fitted to its (resolved) size."""
    width, height = request.width, request.height
    assert width is not None and height is not None
    fields: dict[str, Any] = {}
    if decoded.init_image is not None:
        fields["init_image"] = rgb_pixels(fit_image(decoded.init_image, width, height))
        default = INPAINT_STRENGTH if decoded.mask is not None else IMG2IMG_STRENGTH
        fields["strength"] = request.strength if request.strength is not None else default
    if decoded.mask is not None:
        fields["mask"] = mask_pixels(fit_image(decoded.mask, width, height), request.mask_blur)
    if decoded.start_image is not None:
        fields["start_image"] = rgb_pixels(fit_image(decoded.start_image, width, height))
        fields["start_noise"] = (
            request.start_noise if request.start_noise is not None else (START_NOISE)
        )
    spec = request.noise_mask
    if spec is not None:
        if decoded.noise_mask is not None:
            mask = mask_pixels(fit_image(decoded.noise_mask, width, height)) / np.float32(255)
        else:
            assert spec.pattern is not None
            mask = pattern_mask(spec.pattern, width, height)
        mask = (1 - mask if spec.invert else mask).astype(np.float32)
        fields["noise_mask"] = NoiseInjection(mask, spec.strength, spec.start, spec.end)
    if request.controlnet:
        fields["controlnets"] = control_inputs(request, decoded)
    return fields


def control_inputs(request: GenerateRequest, decoded: DecodedImages) -> list[ControlInput]:
    """The request's ControlNets with their control maps at its (resolved) size. Canny runs
    here: call it off the event loop."""
    width, height = request.width, request.height
    assert width is not None and height is not None
    controls = []
    for spec, image in zip(request.controlnet, decoded.controlnets, strict=True):
        pixels = rgb_pixels(fit_image(image, width, height))
        edges = control_map(pixels, spec.preprocessor, spec.low_threshold, spec.high_threshold)
        controls.append(ControlInput(spec.id, edges, spec.scale, spec.start, spec.end))
    return controls


def clip_pixels(image: Image.Image) -> np.ndarray:
    """An image for a CLIP vision encoder (image prompts, embeddings) as uint8 RGB: at its own
    size when its shorter side is at most `CLIP_MAX_SHORT_SIDE`, else reduced to that (Lanczos,
    keeping its aspect), so a 16-megapixel upload crosses to ClipEncoder as well under a
    megapixel. The encoder's processor then resizes it to its own input (224 px for CLIP)."""
    short = min(image.size)
    if short > CLIP_MAX_SHORT_SIDE:
        scale = CLIP_MAX_SHORT_SIDE / short
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    return rgb_pixels(image)


def image_prompt_pixels(decoded: DecodedImages) -> np.ndarray | None:
    """The image prompt as `clip_pixels` gives it; None without one."""
    return clip_pixels(decoded.image_prompt) if decoded.image_prompt is not None else None
