"""Image intake (shared/intake/images.py): every bad input is refused with the right status and
code, fast and without decoding it; good inputs come back normalised, fitted and as diffusers'
masks."""

from __future__ import annotations

import base64
import io
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from shared.config.models import LimitsConfig
from shared.errors import ServeError
from shared.intake.images import (
    alpha_channel,
    decode_image,
    decode_mask,
    decode_rgb,
    fit_image,
    mask_pixels,
    rgb_pixels,
    size_from_image,
)

LIMITS = LimitsConfig()
FAST_S = 0.05  # "answered in milliseconds": generous for a loaded CI box, far below a decode


def encode(img: Image.Image, fmt: str, **options: object) -> str:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **options)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def noise(width: int, height: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def png_claiming(width: int, height: int) -> str:
    """A real 1x1 PNG whose IHDR claims width x height, with a valid CRC so Pillow trusts it."""
    raw = bytearray(base64.b64decode(encode(Image.new("RGB", (1, 1)), "PNG")))
    raw[16:24] = struct.pack(">II", width, height)  # IHDR data starts after signature+len+type
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    return base64.b64encode(bytes(raw)).decode("ascii")


def webp_claiming(width: int, height: int) -> str:
    """A lossless WebP whose VP8L header claims width x height."""
    raw = bytearray(base64.b64decode(encode(Image.new("RGB", (8, 8)), "WEBP", lossless=True)))
    assert raw[12:16] == b"VP8L"
    bits = struct.unpack("<I", raw[21:25])[0] & ~((1 << 28) - 1)
    raw[21:25] = struct.pack("<I", bits | (width - 1) | (height - 1) << 14)
    return base64.b64encode(bytes(raw)).decode("ascii")


def refused(data: str, status: int, code: str, limits: LimitsConfig = LIMITS) -> ServeError:
    start = time.perf_counter()
    with pytest.raises(ServeError) as caught:
        decode_image(data, param="init_image", limits=limits)
    elapsed = time.perf_counter() - start
    error = caught.value
    assert (error.status, error.code, error.param) == (status, code, "init_image"), error.message
    assert elapsed < FAST_S, f"took {elapsed * 1000:.0f} ms"
    # Messages teach without leaking internals: no exception reprs, no paths.
    assert "Error" not in error.message and "/" not in error.message.replace("data:image/", "")
    return error


def test_a_decompression_bomb_is_refused_from_its_header() -> None:
    tracemalloc.start()
    error = refused(png_claiming(50_000, 50_000), 413, "image_too_large")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1_000_000
    assert "16,777,216" in error.message


def test_the_configured_pixel_limit_is_checked_before_decoding() -> None:
    # 5000x5000 is under Pillow's own bomb threshold, so only our header check stops it.
    error = refused(png_claiming(5000, 5000), 413, "image_too_large")
    assert "5000x5000" in error.message and "16,777,216" in error.message


def test_a_webp_canvas_is_checked_before_pillow_allocates_it() -> None:
    error = refused(webp_claiming(10_000, 10_000), 413, "image_too_large")
    assert "10000x10000" in error.message
    small = LimitsConfig(max_image_pixels=1000)
    refused(webp_claiming(40, 40), 413, "image_too_large", limits=small)


def test_a_huge_base64_string_costs_nothing() -> None:
    data = "A" * 30_000_000
    tracemalloc.start()
    error = refused(data, 413, "image_too_large")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 5_000_000
    assert "10,000,000" in error.message


def test_truncated_and_corrupt_files_are_invalid() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    jpeg = base64.b64decode(encode(Image.fromarray(noise(256, 256)), "JPEG"))
    truncated = base64.b64encode(jpeg[: len(jpeg) // 2]).decode()
    assert "truncated" in refused(truncated, 400, "invalid_image").message
    png = base64.b64decode(encode(Image.fromarray(noise(64, 64)), "PNG"))
    refused(base64.b64encode(png[:-40]).decode(), 400, "invalid_image")
    refused(base64.b64encode(png[:40]).decode(), 400, "invalid_image")
    refused(base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 50).decode(), 400, "invalid_image")


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (base64.b64encode(b'<svg xmlns="http://www.w3.org/2000/svg"/>').decode(), "SVG"),
        (encode(Image.new("P", (4, 4)), "GIF"), "GIF"),
        (encode(Image.new("RGB", (4, 4)), "BMP"), "BMP"),
        (encode(Image.new("RGB", (4, 4)), "TIFF"), "TIFF"),
        (base64.b64encode(b"\0\0\0\x18ftypheic" + b"\0" * 16).decode(), "HEIC"),
    ],
)
def test_other_formats_are_unsupported(data: str, named: str) -> None:
    error = refused(data, 415, "unsupported_image")
    assert named in error.message and "PNG, JPEG or WebP" in error.message


@pytest.mark.parametrize(
    "data", ["", "   ", "\n", "data:image/png;base64,", "DATA:image/webp;BASE64, \n"]
)
def test_an_empty_image_is_its_own_error(data: str) -> None:
    # Was 415 `unsupported_image` ("got an empty file"): callers now pass "" through, and an
    # empty field is a mistake about the field (leave it out), not about the file's format.
    error = refused(data, 422, "empty_image")
    assert "null" in error.message


@pytest.mark.parametrize(
    "data",
    [
        "http://example.com/cat.png",
        "https://example.com/cat.png",
        "  HTTPS://example.com/cat.png",
        "ftp://example.com/cat.png",
        "s3://bucket/cat.png",
        "file:///etc/passwd",
        "gs://bucket/cat.png",
        "//example.com/cat.png",
    ],
)
def test_remote_urls_are_not_fetched(data: str) -> None:
    error = refused(data, 422, "remote_image_not_allowed")
    assert "base64" in error.message and "data:" in error.message


@pytest.mark.parametrize(
    "data",
    [
        "data:image/png,rawtext",
        "data:image/png;charset=utf-8,rawtext",
        "data:image/png;base64",
        "not base64 at all!",
        "iVBORw0KGgo",  # bad padding
        "iVBO-w0K_go=",  # the URL-safe alphabet
        "ümlaut==",
    ],
)
def test_bad_base64_and_data_urls_are_invalid(data: str) -> None:
    refused(data, 400, "invalid_image")


def test_png_jpeg_and_webp_round_trip() -> None:
    pixels = noise(48, 32)
    for fmt, options in (("PNG", {}), ("WEBP", {"lossless": True})):
        data = encode(Image.fromarray(pixels), fmt, **options)
        img = decode_image(data, param="p", limits=LIMITS)
        assert img.mode == "RGB" and np.array_equal(np.array(img), pixels)
    jpeg = decode_image(encode(Image.fromarray(pixels), "JPEG"), param="p", limits=LIMITS)
    assert (jpeg.mode, jpeg.size) == ("RGB", (48, 32))


def test_data_urls_and_wrapped_base64_are_accepted() -> None:
    pixels = noise(16, 16)
    data = encode(Image.fromarray(pixels), "PNG")
    wrapped = "\n".join(data[i : i + 76] for i in range(0, len(data), 76)) + "\n"
    # The declared media type is not trusted: the magic bytes decide.
    for text in (f"data:image/png;base64,{data}", f"DATA:image/jpeg;BASE64,{data}", wrapped):
        img = decode_image(text, param="p", limits=LIMITS)
        assert np.array_equal(np.array(img), pixels)


def test_exif_orientation_is_applied() -> None:
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img = decode_image(
        encode(Image.fromarray(pixels), "JPEG", exif=exif.tobytes(), quality=95),
        param="p",
        limits=LIMITS,
    )
    assert img.size == (20, 40)
    top, bottom = np.array(img)[5, 10], np.array(img)[35, 10]
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]


def test_modes_are_normalised() -> None:
    def decoded(img: Image.Image, fmt: str = "PNG", **options: object) -> Image.Image:
        return decode_image(encode(img, fmt, **options), param="p", limits=LIMITS)

    rgba = noise(8, 8, 4)
    kept = decoded(Image.fromarray(rgba))
    assert kept.mode == "RGBA" and np.array_equal(np.array(kept), rgba)
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 0
    palette.putpixel((0, 0), 0)
    from_palette = decoded(palette)
    assert from_palette.mode == "RGBA"
    assert np.array(from_palette)[:2, :2].tolist() == [
        [[0, 0, 0, 0], [255, 0, 0, 255]],
        [[255, 0, 0, 255], [255, 0, 0, 255]],
    ]
    assert decoded(Image.fromarray(noise(8, 8, 1))).mode == "L"
    assert decoded(Image.fromarray(noise(8, 8, 1)).convert("LA")).mode == "RGBA"
    assert decoded(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG").mode == "RGB"
    assert decoded(Image.new("P", (8, 8))).mode == "RGB"
    # 8x8, not 3x1: min_image_side now refuses a side under 8 pixels.
    levels = np.zeros((8, 8), dtype=np.uint16)
    levels[0, :3] = (0, 257 * 100, 65535)
    assert np.array(decoded(Image.fromarray(levels)))[0, :3].tolist() == [0, 100, 255]


def test_an_animated_webp_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    img = decode_image(data, param="p", limits=LIMITS)
    assert img.getpixel((4, 4)) == (255, 0, 0)


def test_fit_image_keeps_an_exact_size_untouched() -> None:
    img = Image.fromarray(noise(64, 48))
    assert fit_image(img, 64, 48) is img


def test_fit_image_covers_then_center_crops() -> None:
    pixels = np.zeros((100, 200, 3), np.uint8)
    pixels[:, :50] = (255, 0, 0)
    pixels[:, 50:150] = (0, 255, 0)
    pixels[:, 150:] = (0, 0, 255)
    square = np.array(fit_image(Image.fromarray(pixels), 64, 64)).astype(int)
    assert square.shape == (64, 64, 3)
    # The covering scale (0.64) keeps the middle 100 columns: only green survives.
    assert (square[:, 2:-2, 1] > 245).all() and (square[:, 2:-2, [0, 2]] < 10).all()
    wide = fit_image(Image.fromarray(pixels), 96, 24)
    assert wide.size == (96, 24)
    middle = np.array(wide)[:, :, 1].astype(int)
    assert (middle[:, 40:56] > 245).all() and (np.array(wide)[:, :8, 0] > 245).all()


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1024, 1024), (1024, 1024)),
        ((1001, 777), (1000, 776)),
        ((30, 20), (64, 64)),
        ((100, 50), (96, 64)),
        ((4096, 1024), (2048, 512)),
    ],
)
def test_size_from_image(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert size_from_image(Image.new("L", size), LIMITS) == expected


def test_size_from_image_fits_the_pixel_budget_keeping_aspect() -> None:
    w, h = size_from_image(Image.new("L", (4000, 3000)), LIMITS)
    assert w % 8 == h % 8 == 0 and w * h <= LIMITS.max_pixels and w <= LIMITS.max_side
    assert w * h > 0.95 * LIMITS.max_pixels and abs(w / h - 4 / 3) < 0.01
    tight = LimitsConfig(min_side=64, max_side=512, max_pixels=200_000)
    w, h = size_from_image(Image.new("L", (3000, 3000)), tight)
    assert (w, h) == (440, 440)


def test_rgb_pixels_composites_alpha_over_white() -> None:
    rgba = np.array([[[255, 0, 0, 0], [0, 0, 0, 255], [0, 0, 0, 128]]], np.uint8)
    img = Image.fromarray(rgba)
    assert rgb_pixels(img).tolist() == [[[255, 255, 255], [0, 0, 0], [127, 127, 127]]]
    assert alpha_channel(img).tolist() == [[0, 255, 128]]  # type: ignore[union-attr]
    rgb = noise(4, 4)
    assert np.array_equal(rgb_pixels(Image.fromarray(rgb)), rgb)
    assert alpha_channel(Image.fromarray(rgb)) is None
    assert rgb_pixels(Image.new("L", (2, 2), 9)).shape == (2, 2, 3)


@pytest.mark.parametrize("blur", [0, 4])
def test_mask_pixels_match_diffusers(blur: int) -> None:
    from diffusers.image_processor import VaeImageProcessor

    source = Image.fromarray(noise(64, 48))
    expected = source if blur == 0 else VaeImageProcessor.blur(source, blur)
    expected = VaeImageProcessor.convert_to_grayscale(expected)
    ours = mask_pixels(source, blur)
    assert ours.dtype == np.uint8 and ours.shape == (48, 64)
    assert np.array_equal(ours, np.array(expected))


def test_decode_rgb_and_decode_mask_fit_to_the_request() -> None:
    data = encode(Image.fromarray(noise(100, 60)), "PNG")
    assert decode_rgb(data, param="p", limits=LIMITS, width=64, height=64).shape == (64, 64, 3)
    mask = decode_mask(data, param="p", limits=LIMITS, width=32, height=48, blur=2)
    assert mask.shape == (48, 32) and mask.dtype == np.uint8


def test_intake_imports_no_gpu_stack() -> None:
    script = (
        "import sys, shared.intake.images, shared.intake.noise_masks\n"
        "print([m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules])"
    )
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr
