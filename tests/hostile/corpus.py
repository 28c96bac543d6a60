"""The hostile and odd image corpus: every case is what a client puts in an image field of a JSON
body (base64, a data: URL or other text) with the answer `decode_image` must give under the
default `LimitsConfig`: 200 and the decoded, EXIF-transposed size for a valid odd image, else the
status and error code.

Built in code (Pillow, zlib and hand-written PNG, JPEG and WebP structure), deterministically, in
about half a second and 13 MB; `image_cases()` is cached, so every test tier shares one build.
"""

from __future__ import annotations

import base64
import functools
import io
import random
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

_MB = 1_000_000


@dataclass(frozen=True)
class Case:
    """One input and its answer. `size` is the decoded size for a 200, None otherwise."""

    name: str
    data: str
    status: int
    code: str | None
    size: tuple[int, int] | None


@functools.cache
def image_cases() -> list[Case]:
    """Every case, in a stable order, names unique."""
    cases = [
        *_size_cases(),
        *_cost_cases(),
        *_format_cases(),
        *_polyglot_cases(),
        *_mode_cases(),
        *_orientation_cases(),
        *_corrupt_cases(),
        *_text_cases(),
    ]
    assert len({case.name for case in cases}) == len(cases)
    return cases


def png_bytes(
    width: int,
    height: int,
    rows: bytes,
    *,
    depth: int = 8,
    colour: int = 0,
    before: tuple[bytes, ...] = (),
    after: tuple[bytes, ...] = (),
) -> bytes:
    """A PNG written by hand: IHDR, `before` chunks, one IDAT of `rows` (filter bytes included),
    `after` chunks, IEND. For what Pillow will not write (16-bit RGB, 10,000,000x1)."""
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            png_chunk(b"IHDR", header),
            *before,
            png_chunk(b"IDAT", zlib.compress(rows)),
            *after,
            png_chunk(b"IEND", b""),
        ]
    )


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk with a correct CRC (Pillow checks it on every chunk before IDAT)."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def saved(img: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    channels = len(mode)
    shape = (height, width, channels) if channels > 1 else (height, width)
    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    return Image.fromarray(pixels, mode)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _ok(name: str, raw: bytes, size: tuple[int, int]) -> Case:
    return Case(name, b64(raw), 200, None, size)


def _no(name: str, data: bytes | str, status: int, code: str) -> Case:
    return Case(name, data if isinstance(data, str) else b64(data), status, code, None)


def _size_cases() -> Iterator[Case]:
    yield _no("bomb_50000x50000", png_bytes(50_000, 50_000, b"\0\0"), 413, "image_too_large")
    # Real zlib streams of the whole image: 10 MB and 20 MB of rows that deflate to ~10-20 KB.
    yield _no(
        "png_10000000x1",
        png_bytes(10_000_000, 1, bytes(10_000_001)),
        422,
        "image_aspect_ratio",
    )
    yield _no(
        "png_1x10000000", png_bytes(1, 10_000_000, bytes(20_000_000)), 422, "image_aspect_ratio"
    )
    yield _no("png_4096x1", png_bytes(4096, 1, bytes(4097)), 422, "image_aspect_ratio")
    yield _no("png_4x4", saved(noise(4, 4), "PNG"), 422, "image_too_small")
    yield _no("webp_claims_10000x10000", _webp_claiming(10_000, 10_000), 413, "image_too_large")


def _cost_cases() -> Iterator[Case]:
    yield _no("jpeg_1000_scans", _thousand_scan_jpeg(), 422, "too_many_scans")
    empty_private = png_chunk(b"prVt", b"")
    yield _no(
        "png_250k_private_chunks",
        _png_with(before=(empty_private * 250_000,)),
        422,
        "too_many_chunks",
    )
    text_bomb = b"Comment\0\0" + zlib.compress(b"A" * 2 * _MB, 9)
    yield _no(
        "png_ztxt_bomb",
        _png_with(before=(png_chunk(b"zTXt", text_bomb),)),
        413,
        "image_metadata_too_large",
    )
    icc_bomb = b"ICC Profile\0\0" + zlib.compress(bytes(2 * _MB), 9)
    yield _no(
        "png_iccp_bomb",
        _png_with(before=(png_chunk(b"iCCP", icc_bomb),)),
        413,
        "image_metadata_too_large",
    )
    text = png_chunk(b"tEXt", b"Comment\0" + b"x" * 65_536)
    yield _no("png_2mb_ancillary", _png_with(after=(text * 32,)), 413, "image_metadata_too_large")
    app1 = b"\xff\xe1" + struct.pack(">H", 65_535) + b"\0" * 65_533
    jpeg = saved(noise(32, 32), "JPEG")
    yield _no(
        "jpeg_2mb_app_segments", jpeg[:2] + app1 * 32 + jpeg[2:], 413, "image_metadata_too_large"
    )
    yield _no("webp_2mb_exif", _webp_with_exif(2 * _MB), 413, "image_metadata_too_large")
    junk = jpeg[:20] + b"\0" * 5000 + jpeg[20:]
    yield _no("jpeg_5000_junk_bytes_in_header", junk, 400, "invalid_image")
    yield _no("apng_200_frames", _animation("PNG", 200), 422, "too_many_frames")
    yield _no("webp_200_frames", _animation("WEBP", 200), 422, "too_many_frames")
    yield _ok("apng_3_frames", _animation("PNG", 3), (16, 16))
    yield _ok("webp_3_frames", _animation("WEBP", 3), (16, 16))


def _format_cases() -> Iterator[Case]:
    small = noise(16, 16)
    yield _no("gif", saved(small.convert("P"), "GIF"), 415, "unsupported_image")
    yield _no("tiff", saved(small, "TIFF"), 415, "unsupported_image")
    yield _no("bmp", saved(small, "BMP"), 415, "unsupported_image")
    yield _no("ico", saved(small, "ICO"), 415, "unsupported_image")
    # ISO-BMFF: an `ftyp` box first (Pillow's AVIF writer is an optional build, so by hand).
    for brand in (b"heic", b"avif"):
        ftyp = b"\0\0\0\x18ftyp" + brand + b"\0\0\0\0mif1" + brand + bytes(64)
        yield _no(brand.decode(), ftyp, 415, "unsupported_image")
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16"/>'
    yield _no("svg", svg, 415, "unsupported_image")
    pdf = b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
    yield _no("pdf", pdf, 415, "unsupported_image")
    html = b"<!DOCTYPE html><html><body><script>alert(1)</script></body></html>"
    yield _no("html", html, 415, "unsupported_image")
    yield _no("empty_file", b"", 422, "empty_image")
    yield _no("random_bytes", random.Random(7).randbytes(4096), 415, "unsupported_image")


def _polyglot_cases() -> Iterator[Case]:
    png = saved(noise(32, 32), "PNG")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("payload.txt", "not an image")
    yield _ok("png_then_zip", png + archive.getvalue(), (32, 32))
    yield _ok("png_then_html", png + b"<html><script>alert(1)</script></html>", (32, 32))
    gif_html = b"GIF89a" + b"<html><script>alert(1)</script></html>"
    yield _no("gif_header_then_html", gif_html, 415, "unsupported_image")
    php = saved(noise(32, 32), "JPEG", comment=b"<?php system($_GET['c']); ?>")
    yield _ok("jpeg_php_comment", php, (32, 32))


def _mode_cases() -> Iterator[Case]:
    rgb16 = b"".join(b"\0" + bytes(range(96)) for _ in range(16))  # 16 px * 3 ch * 2 bytes
    yield _ok("png_rgb_16bit", png_bytes(16, 16, rgb16, depth=16, colour=2), (16, 16))
    gray16 = Image.fromarray(np.arange(256, dtype=np.uint16).reshape(16, 16) * 257)
    yield _ok("png_gray_16bit", saved(gray16, "PNG"), (16, 16))
    yield _ok("jpeg_cmyk", saved(noise(16, 16, "CMYK"), "JPEG"), (16, 16))
    yield _ok("png_la", saved(noise(16, 16, "LA"), "PNG"), (16, 16))
    palette = noise(16, 16).convert("P")
    yield _ok("png_p_trns", saved(palette, "PNG", transparency=0), (16, 16))
    yield _ok("png_1bit", saved(noise(16, 16, "L").convert("1"), "PNG"), (16, 16))
    yield _ok("webp_lossless", saved(noise(24, 16), "WEBP", lossless=True), (24, 16))
    yield _ok("webp_lossy", saved(noise(24, 16), "WEBP", quality=80), (24, 16))


def _orientation_cases() -> Iterator[Case]:
    img = noise(64, 48)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        raw = saved(img, "JPEG", exif=exif.tobytes())
        size = (48, 64) if orientation >= 5 else (64, 48)
        yield _ok(f"jpeg_exif_orientation_{orientation}", raw, size)


def _corrupt_cases() -> Iterator[Case]:
    png = saved(noise(64, 64), "PNG")
    jpeg = saved(noise(64, 64), "JPEG")
    yield _no("png_truncated", png[: len(png) // 2], 400, "invalid_image")
    yield _no("jpeg_truncated", jpeg[: len(jpeg) // 2], 400, "invalid_image")
    idat = png.index(b"IDAT")
    crc_at = idat + 4 + struct.unpack_from(">I", png, idat - 4)[0]
    bad_crc = png[:crc_at] + bytes(4) + png[crc_at + 4 :]
    # Pillow checks the CRC of every chunk before the first IDAT, but never an IDAT's own.
    yield _ok("png_bad_idat_crc", bad_crc, (64, 64))
    corrupt = bytearray(png)
    corrupt[idat + 10] ^= 0xFF  # inside the zlib stream
    yield _no("png_corrupt_idat", bytes(corrupt), 400, "invalid_image")
    bad_header = bytearray(png)
    bad_header[29] ^= 0xFF  # IHDR's CRC
    yield _no("png_bad_ihdr_crc", bytes(bad_header), 400, "invalid_image")


def _text_cases() -> Iterator[Case]:
    png = b64(saved(noise(16, 16), "PNG"))
    yield _no("invalid_base64", "not base64 at all!", 400, "invalid_image")
    wrapped = "\n".join(png[i : i + 76] for i in range(0, len(png), 76)) + "\n"
    yield Case("base64_wrapped_76", wrapped, 200, None, (16, 16))
    yield Case("data_url_lying_mime", f"data:image/gif;base64,{png}", 200, None, (16, 16))
    yield _no("data_url_not_base64", f"data:image/png,{png}", 400, "invalid_image")
    for name, url in (
        ("https_url", "https://example.com/a.png"),
        ("scheme_relative_url", "//example.com/a.png"),
        ("file_url", "file:///etc/passwd"),
    ):
        yield _no(name, url, 422, "remote_image_not_allowed")
    yield _no("empty_string", "", 422, "empty_image")
    yield _no("blank_string", "   ", 422, "empty_image")
    yield _no("data_url_empty", "data:image/png;base64,", 422, "empty_image")


def _png_with(before: tuple[bytes, ...] = (), after: tuple[bytes, ...] = ()) -> bytes:
    """A valid 16x16 gray PNG with extra chunks before or after its IDAT."""
    rows = b"".join(b"\0" + bytes(range(16)) for _ in range(16))
    return png_bytes(16, 16, rows, before=before, after=after)


def _thousand_scan_jpeg() -> bytes:
    """A real progressive JPEG whose scans (with the Huffman tables between them) are repeated to
    1000, and whose frame header claims 4096x4096: within the pixel limit, costly to decode."""
    raw = saved(noise(32, 32), "JPEG", progressive=True)
    first_scan = raw.index(b"\xff\xc4", raw.index(b"\xff\xc2"))  # the DHT before scan 1
    scans = raw[first_scan:-2]  # up to EOI
    per_copy = scans.count(b"\xff\xda")
    header = bytearray(raw[:first_scan])
    sof = header.index(b"\xff\xc2")
    header[sof + 5 : sof + 9] = struct.pack(">HH", 4096, 4096)
    return bytes(header) + scans * -(-1000 // per_copy) + b"\xff\xd9"


def _animation(fmt: str, frames: int) -> bytes:
    # Distinct colours: encoders merge identical consecutive frames into one.
    images = [
        Image.new("RGB", (16, 16), (i % 256, (7 * i) % 256, 255 - i % 256)) for i in range(frames)
    ]
    options: dict[str, object] = {"lossless": True} if fmt == "WEBP" else {}
    return saved(images[0], fmt, save_all=True, append_images=images[1:], **options)


def _webp_claiming(width: int, height: int) -> bytes:
    """A lossless WebP whose VP8L header claims width x height."""
    raw = bytearray(saved(Image.new("RGB", (8, 8)), "WEBP", lossless=True))
    bits = struct.unpack("<I", raw[21:25])[0] & ~((1 << 28) - 1)
    raw[21:25] = struct.pack("<I", bits | (width - 1) | (height - 1) << 14)
    return bytes(raw)


def _webp_with_exif(nbytes: int) -> bytes:
    """A 16x16 WebP (VP8X with the EXIF flag) carrying an EXIF chunk of `nbytes`."""
    raw = saved(noise(16, 16), "WEBP", lossless=True)
    image = raw[12:]
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes([0x08, 0, 0, 0]) + (15).to_bytes(3, "little") * 2
    exif = b"EXIF" + struct.pack("<I", nbytes) + b"\0" * nbytes
    body = b"WEBP" + vp8x + image + exif
    return b"RIFF" + struct.pack("<I", len(body)) + body
