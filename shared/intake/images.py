"""Image intake: the one place an image a user sends (init image, mask, start image, image
prompt, edit image) is decoded, checked against the limits, normalised and fitted to a size.

Torch-free (numpy + Pillow) so the Router can run it at the edge. Every check that can be made
before decoding is: the base64 length before `b64decode`, the format from magic bytes before
Pillow sees the file, then the file's structure (`image_caps`: size, aspect, scans, chunks,
metadata, frames) before `Image.open`. So an oversized string, a decompression bomb, a thousand-
scan JPEG or a file in another format costs milliseconds and no memory.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re

import numpy as np
from PIL import Image, ImageFilter, ImageOps
from PIL.PngImagePlugin import MAX_TEXT_CHUNK, MAX_TEXT_MEMORY

from shared.config.models import LimitsConfig
from shared.errors import (
    InvalidRequestError,
    MalformedRequestError,
    PayloadTooLargeError,
    ServeError,
    UnsupportedMediaTypeError,
)
from shared.intake.image_caps import check_decode_cost, check_size, too_large

ACCEPTED = "PNG, JPEG or WebP"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
# Characters searched for a URL scheme or a data: URL header: a long string is never scanned.
_HEAD = 256
_MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}
# Formats we refuse, named in the message so the user knows what they sent.
_KNOWN_OTHERS = {b"GIF8": "a GIF", b"BM": "a BMP", b"II*\x00": "a TIFF", b"MM\x00*": "a TIFF"}


def decode_image(data: str, *, param: str, limits: LimitsConfig) -> Image.Image:
    """Decode base64 text or a `data:image/...;base64,` URL into a loaded PIL image.

    Remote URLs are refused (the server fetches nothing on a user's behalf). The result has EXIF
    orientation applied and mode "RGBA" if the file has alpha, "L" if grayscale, else "RGB".
    An animated PNG or WebP gives its first frame. Errors name `param`: 422 `empty_image`,
    422 `remote_image_not_allowed`, 413 `image_too_large`, 415 `unsupported_image`, 400
    `invalid_image`, and `check_decode_cost`'s: 422 `image_aspect_ratio`, `image_too_small`,
    `too_many_scans`, `too_many_chunks`, `too_many_frames`, 413 `image_metadata_too_large`.
    """
    start = _payload_start(data, param)
    length = len(data) - start
    # Upper bound of the decoded size (whitespace counts), computed without touching the text.
    decoded = length * 3 // 4 - data[-2:].count("=")
    if decoded > limits.max_image_bytes:
        raise PayloadTooLargeError(
            f"{param} is about {decoded:,} bytes; the limit is {limits.max_image_bytes:,} bytes",
            code="image_too_large",
            param=param,
        )
    raw = _b64decode(data[start:], param)
    if not raw:
        raise _empty(param, data)
    fmt = _sniff(raw, param)
    # Before Image.open: Pillow walks PNG chunks and JPEG headers in Python and allocates a WebP
    # canvas while opening, so a bad file must be refused from its bytes alone.
    check_decode_cost(raw, fmt, param, limits)
    try:
        img = Image.open(io.BytesIO(raw), formats=[fmt])
    except Image.DecompressionBombError:
        # Over twice Pillow's MAX_IMAGE_PIXELS; Pillow only warns between 1x and 2x, but
        # LimitsConfig caps max_image_pixels below 1x, so such an image fails check_size.
        over = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise too_large(param, limits, f"over {over:,} pixels (a decompression bomb)") from None
    except Exception as exc:
        raise _pillow_error(exc, param, f"is not a readable {fmt} file") from None
    # The header walk found the same size; this covers a header it could not find.
    check_size(img.size, param, limits)
    try:
        # LOAD_TRUNCATED_IMAGES is left False (Pillow's default): a truncated file raises here
        # instead of loading with its missing rows painted gray.
        img.load()
        return _normalise_mode(ImageOps.exif_transpose(img))
    except Exception as exc:
        raise _pillow_error(exc, param, f"is a corrupt or truncated {fmt} file") from None


def fit_image(img: Image.Image, width: int, height: int) -> Image.Image:
    """The resize rule: fit `img` to exactly `width`x`height`, covering it, keeping aspect.

    An image already that size is returned unchanged (no resampling, so its pixels are exact).
    Otherwise it is scaled with Lanczos, keeping its aspect ratio, to the smallest size that
    covers `width`x`height`, and the overflow is cropped equally from both sides (a center crop).
    Nothing is stretched and no borders are added.
    """
    if img.size == (width, height):
        return img
    # ImageOps.fit resizes the largest centred box of the target's aspect in one Lanczos pass,
    # which is the same scale-to-cover + center-crop without rounding an intermediate size.
    return ImageOps.fit(img, (width, height), Image.Resampling.LANCZOS)


def size_from_image(img: Image.Image, limits: LimitsConfig) -> tuple[int, int]:
    """The (width, height) a request takes from its input image when it gives none.

    The image's own size, scaled down (never up), keeping aspect, to fit `limits.max_side` and
    `limits.max_pixels`; each side is then floored to a multiple of 8 and raised to at least
    `min_side` (rounded up to a multiple of 8). Only a very long, thin image is distorted by
    that last clamp.
    """
    w, h = img.size
    scale = min(1.0, limits.max_side / max(w, h), math.sqrt(limits.max_pixels / (w * h)))
    low = -(-limits.min_side // 8) * 8
    sides = [max(low, int(side * scale) // 8 * 8) for side in (w, h)]
    # Float rounding in the sqrt may leave a product a hair over max_pixels; shave the long side.
    while sides[0] * sides[1] > limits.max_pixels and max(sides) - 8 >= low:
        sides[sides.index(max(sides))] -= 8
    return sides[0], sides[1]


def rgb_pixels(img: Image.Image) -> np.ndarray:
    """uint8 (H, W, 3). Alpha is composited over white: the colour stored under a transparent
    pixel is arbitrary (often black, or leftovers of an eraser), so white, the canvas viewers
    show, is what the user saw. Use `alpha_channel` where the transparency itself matters."""
    if _has_alpha(img):
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img.convert("RGBA"))
    return np.array(img.convert("RGB"))


def alpha_channel(img: Image.Image) -> np.ndarray | None:
    """uint8 (H, W) alpha (0 = transparent), or None when the image has no alpha."""
    if not _has_alpha(img):
        return None
    return np.array(img.convert("RGBA").getchannel("A"))


def mask_pixels(img: Image.Image, blur: float = 0.0) -> np.ndarray:
    """uint8 (H, W) mask, white = repaint, as diffusers' mask processor makes it.

    With `blur > 0`, `VaeImageProcessor.blur` (a Gaussian blur of that radius) then
    `convert_to_grayscale` (`convert("L")`, ITU-R 601 luminance); alpha is dropped first, as
    diffusers' `load_image` does, so the same file gives diffusers' mask for the same blur.
    """
    if blur < 0:
        raise ValueError(f"blur must be >= 0; got {blur}")
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    if blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    return np.array(img.convert("L"))


def decode_rgb(
    data: str, *, param: str, limits: LimitsConfig, width: int, height: int
) -> np.ndarray:
    """decode_image → fit_image → rgb_pixels: uint8 (height, width, 3)."""
    return rgb_pixels(fit_image(decode_image(data, param=param, limits=limits), width, height))


def decode_mask(
    data: str, *, param: str, limits: LimitsConfig, width: int, height: int, blur: float = 0.0
) -> np.ndarray:
    """decode_image → fit_image → mask_pixels: uint8 (height, width), white = repaint."""
    img = fit_image(decode_image(data, param=param, limits=limits), width, height)
    return mask_pixels(img, blur)


def _payload_start(data: str, param: str) -> int:
    """Offset of the base64 text in `data`; refuses URLs. Looks only at the first characters."""
    head = data[:_HEAD]
    stripped = head.lstrip()
    offset = len(head) - len(stripped)
    if _SCHEME.match(stripped) or stripped.startswith("//"):
        raise InvalidRequestError(
            f"{param} must be base64 image data or a data: URL (data:image/png;base64,...); "
            "remote URLs are not fetched",
            code="remote_image_not_allowed",
            param=param,
        )
    if stripped[:5].lower() != "data:":
        return offset
    comma = stripped.find(",")
    if comma < 0 or not stripped[:comma].lower().endswith(";base64"):
        raise _invalid(param, "is a data: URL that is not base64 (data:image/png;base64,...)")
    return offset + comma + 1


def _b64decode(text: str, param: str) -> bytes:
    # `base64 file.png` wraps lines at 76 characters, so whitespace is dropped; anything else
    # outside the alphabet is refused (validate=True) rather than silently skipped.
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise _invalid(param, "is not valid base64") from None


def _sniff(raw: bytes, param: str) -> str:
    """The Pillow format name from the file's magic bytes; anything else is refused (415)."""
    for magic, fmt in _MAGIC.items():
        if raw.startswith(magic):
            return fmt
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "WEBP"
    if raw.lstrip()[:1] == b"<":
        got = "SVG, XML or HTML text"
    elif raw[4:8] == b"ftyp":
        got = "a HEIC or AVIF file"
    else:
        got = next((n for m, n in _KNOWN_OTHERS.items() if raw.startswith(m)), "an unknown format")
    raise UnsupportedMediaTypeError(
        f"{param} must be a {ACCEPTED} image; got {got}", code="unsupported_image", param=param
    )


def _empty(param: str, data: str) -> InvalidRequestError:
    what = "an empty string" if not data.strip() else "a data: URL with no data"
    return InvalidRequestError(
        f"{param} is {what}; send base64 image data, or leave the field out (null) to give no "
        "image",
        code="empty_image",
        param=param,
    )


def _pillow_error(exc: Exception, param: str, what: str) -> ServeError:
    """Pillow's exception as ours: its text and ICC limits (MAX_TEXT_CHUNK for one inflated
    chunk, MAX_TEXT_MEMORY for all text) are a metadata bomb (413); anything else is a bad file."""
    if isinstance(exc, ValueError) and "MAX_TEXT_" in str(exc):
        return PayloadTooLargeError(
            f"{param} carries compressed text or ICC profiles that inflate past the decoder's "
            f"limits ({MAX_TEXT_CHUNK:,} bytes each, {MAX_TEXT_MEMORY:,} in all); strip the "
            "metadata and send it again",
            code="image_metadata_too_large",
            param=param,
        )
    return _invalid(param, what)


def _invalid(param: str, what: str) -> MalformedRequestError:
    return MalformedRequestError(
        f"{param} {what}; send a base64-encoded {ACCEPTED} image", code="invalid_image", param=param
    )


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or img.has_transparency_data


def _normalise_mode(img: Image.Image) -> Image.Image:
    """RGBA if the image has alpha (incl. a palette or tRNS transparency), L if grayscale,
    RGB otherwise (CMYK, YCbCr, palette)."""
    if _has_alpha(img):
        return img if img.mode == "RGBA" else img.convert("RGBA")
    if img.mode.startswith("I"):
        # 16-bit grayscale PNG: Pillow's I;16 → L clips at 255 instead of scaling.
        wide = np.asarray(img, dtype=np.float64)
        return Image.fromarray((np.clip(wide, 0, 65535) / 257).round().astype(np.uint8))
    if img.mode in ("L", "RGB"):
        return img
    return img.convert("L" if img.mode == "1" else "RGB")
