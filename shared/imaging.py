"""Image codecs and guards: arrays to PIL, PIL to base64 PNG/JPEG/WebP and back, downscaling.

Torch-free on purpose, so the Router can decode and check client images without importing torch.
Pixel conversion follows diffusers' `VaeImageProcessor.numpy_to_pil` (`(x * 255).round()`), so
an image encoded here has the same pixels as the one diffusers would return.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from PIL import Image

from shared.errors import InvalidRequestError

IMAGE_FORMATS = ("png", "jpeg", "webp")
MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
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


def decode_b64_image(
    b64: str, *, max_pixels: int | None = None, param: str = "image"
) -> Image.Image:
    """Decode base64 (or a `data:image/...;base64,` URL) into a fully loaded PIL image.

    The pixel count is checked from the header before any pixel data is decoded, so a small
    compressed file cannot expand into an out-of-memory image.
    """
    if b64.startswith("data:"):
        _, _, b64 = b64.partition(",")
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequestError(
            f"{param} is not valid base64", code="invalid_image", param=param
        ) from exc
    try:
        img = Image.open(io.BytesIO(raw))
        _check_pixels(img, max_pixels, param)
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidRequestError(
            f"{param} is not a readable PNG, JPEG or WebP image ({exc})",
            code="invalid_image",
            param=param,
        ) from exc
    return img


def _check_pixels(img: Image.Image, max_pixels: int | None, param: str) -> None:
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        raise InvalidRequestError(
            f"{param} has {width}x{height} = {width * height} pixels; at most {max_pixels} allowed",
            code="image_too_large",
            param=param,
        )


def fit_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled down to fit a `max_side` square, keeping aspect; never scaled up."""
    longest = max(width, height)
    if longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def fit_within(img: Image.Image, max_side: int) -> Image.Image:
    """`img` downscaled so no side exceeds `max_side`; returned unchanged if it already fits."""
    size = fit_size(img.width, img.height, max_side)
    if size == img.size:
        return img
    return img.resize(size, Image.Resampling.LANCZOS)
