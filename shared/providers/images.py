"""Provider image payloads → our `GeneratedImage`/`EncodedImage`: decode, check, describe.

Providers hand images back as base64, as `data:` URIs or as bytes downloaded from a URL. Every one
is opened with Pillow before it is accepted, so a truncated or non-image payload becomes
`ProviderBadResponseError` here instead of a broken picture at the client. Images are passed on
in the format the provider produced (never silently re-encoded); `format` says which.
"""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image, UnidentifiedImageError

from shared.api.schemas import EncodedImage, GeneratedImage
from shared.providers.errors import ProviderBadResponseError

_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp", "GIF": "gif"}


def b64_payload(text: str) -> bytes:
    """Bytes of a base64 string or a `data:<mime>;base64,` URI."""
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise ProviderBadResponseError(f"image data URI is not base64 ({header[:60]!r})")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProviderBadResponseError(f"image payload is not valid base64: {exc}") from None


def describe(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) of an encoded image, after checking that it decodes."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, size = image.format, image.size
            image.verify()
    except (
        UnidentifiedImageError,
        Image.DecompressionBombError,
        OSError,
        SyntaxError,
        ValueError,
    ) as exc:
        raise ProviderBadResponseError(f"provider image does not decode: {exc}") from None
    if fmt not in _FORMATS:
        raise ProviderBadResponseError(f"provider image has unsupported format {fmt}")
    return _FORMATS[fmt], size[0], size[1]


def generated_image(data: bytes, seed: int | None = None) -> GeneratedImage:
    """A final image as our schema: base64 of the provider's bytes plus what they are."""
    fmt, width, height = describe(data)
    b64 = base64.b64encode(data).decode("ascii")
    return GeneratedImage(b64=b64, format=fmt, width=width, height=height, seed=seed)


def preview_image(data: bytes) -> EncodedImage:
    """A partial/preview image as our schema."""
    fmt, width, height = describe(data)
    return EncodedImage(
        b64=base64.b64encode(data).decode("ascii"), format=fmt, width=width, height=height
    )
