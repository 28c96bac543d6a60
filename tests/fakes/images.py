"""Real, tiny images for the fakes to return: solid colours that Pillow encodes in milliseconds."""

from __future__ import annotations

import base64
import io
from functools import lru_cache

from PIL import Image

PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


@lru_cache(maxsize=128)
def make_image(width: int, height: int, fmt: str = "png", seed: int = 0) -> bytes:
    """An encoded `width`x`height` image whose colour is a function of `seed`."""
    colour = (seed * 67 % 256, seed * 131 % 256, seed * 197 % 256)
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format=PIL_FORMATS[fmt])
    return buffer.getvalue()


def make_b64(width: int, height: int, fmt: str = "png", seed: int = 0) -> str:
    return base64.b64encode(make_image(width, height, fmt, seed)).decode("ascii")
