"""Image codecs: arrays to PIL, PIL to base64 PNG/JPEG/WebP, sizes fitted within a square.

Torch-free on purpose, so the Router can use it without importing torch.
Pixel conversion follows diffusers' `VaeImageProcessor.numpy_to_pil` (`(x * 255).round()`), so
an image encoded here has the same pixels as the one diffusers would return.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from shared.api.vocabulary import IMAGE_FORMATS
from shared.errors import InvalidRequestError

_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
_MODES_BY_CHANNELS = {1: "L", 3: "RGB", 4: "RGBA"}


def encode_image(img: Image.Image, fmt: str, quality: int = 90) -> str:
    """Encode `img` as `fmt` (png, jpeg or webp) and return the bytes as base64 text."""
    fmt = fmt.lower()
    if fmt not in _PIL_FORMATS:
        raise InvalidRequestError(
            f"output_format must be one of {', '.join(IMAGE_FORMATS)}; got {fmt!r}",
            param="output_format",
        )
    if fmt == "jpeg" and img.mode not in ("RGB", "L"):
        # JPEG has no alpha channel; Pillow refuses RGBA rather than dropping it.
        img = img.convert("RGB")
    buffer = io.BytesIO()
    options: dict[str, int] = {} if fmt == "png" else {"quality": quality}
    img.save(buffer, format=_PIL_FORMATS[fmt], **options)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def to_pil(array: np.ndarray) -> Image.Image:
    """One HWC (or HW) image as PIL: uint8 as is, floats in [0, 1] scaled like diffusers."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in _MODES_BY_CHANNELS):
        raise ValueError(f"expected an HW, HWC image with 1, 3 or 4 channels; got {array.shape}")
    if array.dtype != np.uint8:
        array = float_to_uint8(array)
    mode = "L" if array.ndim == 2 else _MODES_BY_CHANNELS[array.shape[-1]]
    return Image.fromarray(np.ascontiguousarray(array), mode=mode)


def float_to_uint8(array: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] to bytes exactly as diffusers' numpy_to_pil does; refuses NaN/inf."""
    if not np.isfinite(array).all():
        raise ValueError("image contains NaN or infinite values")
    return (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)


def fit_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled down to fit a `max_side` square, keeping aspect; never scaled up."""
    longest = max(width, height)
    if longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))
