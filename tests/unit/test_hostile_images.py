"""Hostile images: every case of the corpus (tests/hostile/corpus.py) through `decode_image` gets
its status and code, a refusal in milliseconds; the decode-cost caps of
shared/intake/image_caps.py hold at exactly their limit and refuse one past it; and mutated files
make nothing but our own errors escape."""

from __future__ import annotations

import base64
import contextlib
import random
import struct
import time
import zlib

import pytest
from PIL import Image

from shared.config.models import LimitsConfig
from shared.errors import ServeError
from shared.intake.image_caps import check_decode_cost
from shared.intake.images import decode_image
from tests.hostile.corpus import Case, b64, image_cases, noise, png_bytes, png_chunk, saved

LIMITS = LimitsConfig()
FAST_S = 0.05  # "answered in milliseconds": decoding these files takes 1-3 s
PARAM = "init_image"


def refusal(data: str, limits: LimitsConfig = LIMITS) -> tuple[ServeError, float]:
    """The error decode_image raises for `data`, and the fastest of three tries: a refusal's cost
    is the code's, and a shared CI box adds scheduler noise to any single run."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        with pytest.raises(ServeError) as caught:
            decode_image(data, param=PARAM, limits=limits)
        times.append(time.perf_counter() - start)
    return caught.value, min(times)


@pytest.mark.parametrize("case", image_cases(), ids=lambda case: case.name)
def test_every_corpus_case_gets_its_answer(case: Case) -> None:
    if case.status == 200:
        img = decode_image(case.data, param=PARAM, limits=LIMITS)
        assert img.size == case.size
        assert img.mode in ("RGB", "RGBA", "L")
        return
    error, elapsed = refusal(case.data)
    assert (error.status, error.code, error.param) == (case.status, case.code, PARAM), error
    assert elapsed < FAST_S, f"took {elapsed * 1000:.1f} ms"
    # Messages teach without leaking internals: no exception reprs, no paths.
    assert "Error" not in error.message and "/" not in error.message.replace("data:image/", "")


def test_the_corpus_is_cheap_to_hold() -> None:
    assert sum(len(case.data) for case in image_cases()) < 40_000_000


def test_refusals_say_what_was_wrong_and_what_is_allowed() -> None:
    refused = [case for case in image_cases() if case.status != 200]
    messages = {case.name: refusal(case.data)[0].message for case in refused}
    assert messages["png_10000000x1"] == (
        "init_image is 10000000x1; its sides may differ by at most 16:1"
    )
    assert messages["png_4x4"] == "init_image is 4x4; each side must be at least 8 pixels"
    assert "more than 64 scans" in messages["jpeg_1000_scans"]
    assert "more than 4,096 chunks" in messages["png_250k_private_chunks"]
    assert "200 frames" in messages["apng_200_frames"]
    assert "more than 100 frames" in messages["webp_200_frames"]
    assert "1,000,000 bytes" in messages["png_ztxt_bomb"]
    assert "null" in messages["empty_string"]


# ---- check_decode_cost at each cap: exactly the limit passes, one more is refused.


def png_header(width: int, height: int, *chunks: bytes) -> bytes:
    """A PNG's structure only (no pixel data: check_decode_cost never reads it)."""
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + ihdr + b"".join(chunks) + png_chunk(b"IEND", b"")


SOF0_64X64 = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, 64, 64, 1) + b"\x01\x11\x00"
SOS = b"\xff\xda" + struct.pack(">HB", 8, 1) + b"\x01\x00\x00\x3f\x00"


def jpeg_bytes(*segments: bytes, scans: int = 1, entropy: bytes = b"\x12\x34") -> bytes:
    """SOI, `segments`, a 64x64 SOF0, `scans` SOS headers each followed by `entropy`, EOI."""
    return b"\xff\xd8" + b"".join(segments) + SOF0_64X64 + (SOS + entropy) * scans + b"\xff\xd9"


def jpeg_segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def webp_bytes(*chunks: bytes) -> bytes:
    """A VP8X (canvas 64x64) WebP with `chunks` after it."""
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x02\0\0\0" + (63).to_bytes(3, "little") * 2
    body = b"WEBP" + vp8x + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def webp_chunk(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack("<I", len(payload)) + payload + b"\0" * (len(payload) & 1)


def check(raw: bytes, limits: LimitsConfig = LIMITS) -> tuple[int, int] | None:
    fmt = {b"\x89P": "PNG", b"\xff\xd8": "JPEG", b"RI": "WEBP"}[raw[:2]]
    return check_decode_cost(raw, fmt, PARAM, limits)


def refused(raw: bytes, status: int, code: str, limits: LimitsConfig = LIMITS) -> ServeError:
    with pytest.raises(ServeError) as caught:
        check(raw, limits)
    assert (caught.value.status, caught.value.code, caught.value.param) == (status, code, PARAM)
    return caught.value


def test_the_pixel_cap() -> None:
    limits = LimitsConfig(max_image_pixels=64 * 64)
    assert check(png_header(64, 64), limits) == (64, 64)
    error = refused(png_header(64, 65), 413, "image_too_large", limits)
    assert "64x65 (4,160 pixels)" in error.message and "4,096 pixels" in error.message
    refused(webp_bytes(), 413, "image_too_large", LimitsConfig(max_image_pixels=64 * 63))


def test_the_aspect_cap() -> None:
    assert check(png_header(128, 8)) == (128, 8)
    assert check(png_header(8, 128)) == (8, 128)
    refused(png_header(129, 8), 422, "image_aspect_ratio")
    refused(png_header(8, 129), 422, "image_aspect_ratio")
    odd = LimitsConfig(max_image_aspect=2.5)
    assert check(png_header(20, 8), odd) == (20, 8)
    assert "2.5:1" in refused(png_header(21, 8), 422, "image_aspect_ratio", odd).message


def test_the_minimum_side() -> None:
    assert check(png_header(8, 8)) == (8, 8)
    refused(png_header(8, 7), 422, "image_too_small")
    refused(png_header(0, 0), 422, "image_too_small")  # no ZeroDivisionError
    refused(png_header(9, 0), 422, "image_aspect_ratio")  # a zero side is an infinite ratio
    assert check(png_header(3, 3), LimitsConfig(min_image_side=3)) == (3, 3)


def test_the_scan_cap_counts_only_real_scans() -> None:
    assert check(jpeg_bytes(scans=64)) == (64, 64)
    refused(jpeg_bytes(scans=65), 422, "too_many_scans")
    # Byte stuffing, restart markers and fill inside entropy-coded data are not markers.
    tricky = b"\x01\xff\x00\xff\xd3\x02\xff\xff\x00\x03\xff\xff\xd7"
    assert check(jpeg_bytes(scans=64, entropy=tricky)) == (64, 64)
    refused(jpeg_bytes(scans=65, entropy=tricky), 422, "too_many_scans")
    # An EXIF thumbnail is a whole JPEG inside APP1: its scans are skipped with the segment.
    thumbnail = jpeg_bytes(scans=100)
    app1 = jpeg_segment(0xE1, b"Exif\0\0" + thumbnail)
    assert check(jpeg_bytes(app1, scans=64)) == (64, 64)
    assert check(jpeg_bytes(scans=2), LimitsConfig(max_jpeg_scans=2)) == (64, 64)
    refused(jpeg_bytes(scans=3), 422, "too_many_scans", LimitsConfig(max_jpeg_scans=2))


def test_the_chunk_cap() -> None:
    limits = LimitsConfig(max_png_chunks=8)
    private = png_chunk(b"prVt", b"")
    assert check(png_header(16, 16, *[private] * 6), limits) == (16, 16)  # 8 with IHDR, IEND
    error = refused(png_header(16, 16, *[private] * 7), 422, "too_many_chunks", limits)
    assert "more than 8 chunks" in error.message
    # JPEG marker segments (SOF and SOS included) and WebP chunks count the same way.
    comment = jpeg_segment(0xFE, b"")
    assert check(jpeg_bytes(*[comment] * 6), limits) == (64, 64)
    refused(jpeg_bytes(*[comment] * 7), 422, "too_many_chunks", limits)
    junk = webp_chunk(b"JUNK", b"")
    assert check(webp_bytes(*[junk] * 7), limits) == (64, 64)
    refused(webp_bytes(*[junk] * 8), 422, "too_many_chunks", limits)


def test_the_chunk_walk_stops_where_pillow_stops() -> None:
    limits = LimitsConfig(max_png_chunks=8)
    private = png_chunk(b"prVt", b"")
    png = png_header(16, 16)
    # After IEND, or at bytes that are no chunk type, Pillow reads no further; neither do we.
    assert check(png + private * 20, limits) == (16, 16)
    assert check(png[:-12] + png_chunk(b"pr\0t", b"") + private * 20, limits) == (16, 16)
    # But Pillow takes digits and "_" in a type: so do we.
    refused(png[:-12] + png_chunk(b"p_1t", b"") * 20, 422, "too_many_chunks", limits)


def test_the_metadata_cap() -> None:
    limits = LimitsConfig(max_image_metadata_bytes=1024)
    # A whole chunk counts: 12 bytes of length, type and CRC, then its data.
    text = png_chunk(b"tEXt", b"k\0" + b"x" * 1010)
    assert check(png_header(16, 16, text), limits) == (16, 16)
    longer = png_chunk(b"tEXt", b"k\0" + b"x" * 1011)
    refused(png_header(16, 16, longer), 413, "image_metadata_too_large", limits)
    # Image data and APNG frames are not metadata.
    frames = png_chunk(b"fdAT", b"\0" * 4096) + png_chunk(b"IDAT", b"\0" * 4096)
    assert check(png_header(16, 16, text, frames), limits) == (16, 16)
    # JPEG: marker, length and payload of APPn and COM.
    app = jpeg_segment(0xE2, b"\0" * 500)  # 504 bytes
    assert check(jpeg_bytes(app, jpeg_segment(0xFE, b"\0" * 516)), limits) == (64, 64)
    refused(
        jpeg_bytes(app, jpeg_segment(0xFE, b"\0" * 517)), 413, "image_metadata_too_large", limits
    )
    # WebP: EXIF, ICCP and XMP chunks with their 8-byte headers.
    assert check(webp_bytes(webp_chunk(b"EXIF", b"\0" * 1016)), limits) == (64, 64)
    over = webp_bytes(webp_chunk(b"XMP ", b"\0" * 500), webp_chunk(b"ICCP", b"\0" * 509))
    refused(over, 413, "image_metadata_too_large", limits)


@pytest.mark.parametrize(
    ("kind", "prefix"), [(b"zTXt", b"k\0\0"), (b"iCCP", b"icc\0\0"), (b"iTXt", b"k\0\1\0en\0\0")]
)
def test_compressed_metadata_counts_what_it_inflates_to(kind: bytes, prefix: bytes) -> None:
    limits = LimitsConfig(max_image_metadata_bytes=1024)
    exact = png_chunk(kind, prefix + zlib.compress(b"a" * 1024))
    assert check(png_header(16, 16, exact), limits) == (16, 16)
    bomb = png_chunk(kind, prefix + zlib.compress(b"a" * 1025))
    error = refused(png_header(16, 16, bomb), 413, "image_metadata_too_large", limits)
    assert "inflate" in error.message


def test_corrupt_compressed_chunks_cannot_buy_unbounded_work() -> None:
    # Each corrupt stream is charged one 16 KiB inflate step: 61 fit in 1,000,000 bytes, 62 not.
    corrupt = png_chunk(b"zTXt", b"k\0\0" + b"not zlib")
    assert check(png_header(16, 16, *[corrupt] * 61)) == (16, 16)
    refused(png_header(16, 16, *[corrupt] * 62), 413, "image_metadata_too_large")


def test_the_frame_cap() -> None:
    actl = [png_chunk(b"acTL", struct.pack(">II", frames, 0)) for frames in (100, 101)]
    assert check(png_header(16, 16, actl[0])) == (16, 16)
    assert "101 frames" in refused(png_header(16, 16, actl[1]), 422, "too_many_frames").message
    frame = webp_chunk(b"ANMF", b"\0" * 16)
    assert check(webp_bytes(*[frame] * 100)) == (64, 64)
    refused(webp_bytes(*[frame] * 101), 422, "too_many_frames")


def test_stray_bytes_before_the_first_scan_are_capped() -> None:
    # Junk, then 0xFF fill before the SOF marker's own 0xFF: 4091 + 5 = 4096 stray bytes pass.
    app = jpeg_segment(0xE0, b"JFIF\0")
    assert check(jpeg_bytes(app + b"\0" * 4091 + b"\xff" * 5)) == (64, 64)
    error = refused(jpeg_bytes(app + b"\0" * 4092 + b"\xff" * 5), 400, "invalid_image")
    assert "stray bytes" in error.message
    # After the first scan libjpeg skips junk in C and Pillow does not walk: no cap there.
    table = jpeg_segment(0xC4, b"\0" * 17)
    later = jpeg_bytes()[:-2] + table + b"\0" * 100_000 + SOS + b"\x12\xff\xd9"
    assert check(later) == (64, 64)
    refused(later, 422, "too_many_scans", LimitsConfig(max_jpeg_scans=1))


@pytest.mark.parametrize("unit", [b"\xff\x00", b"\xff\xd0", b"\xff\xff", b"\0\0", b"\xff\x01"])
def test_ten_megabytes_of_entropy_data_are_walked_in_milliseconds(unit: bytes) -> None:
    # Stuffing, restart markers, fill, zeros: one scan, walked to EOI. FF01 pairs are markers
    # (TEM), so that walk stops at the segment cap instead.
    raw = jpeg_bytes(scans=1, entropy=unit * 5_000_000)
    start = time.perf_counter()
    try:
        assert check(raw) == (64, 64)
    except ServeError as error:
        assert (unit, error.code) == (b"\xff\x01", "too_many_chunks")
    assert time.perf_counter() - start < FAST_S


def test_sizes_come_from_each_format_header() -> None:
    for img, fmt, options in (
        (noise(40, 24), "PNG", {}),
        (noise(40, 24), "JPEG", {}),
        (noise(40, 24), "JPEG", {"progressive": True}),
        (noise(40, 24), "WEBP", {"lossless": True}),
        (noise(40, 24), "WEBP", {"quality": 50}),
        (noise(40, 24, "RGBA"), "WEBP", {"exif": b"Exif\0\0MM\0*\0\0\0\x08\0\0"}),  # VP8X
    ):
        assert check(saved(img, fmt, **options)) == (40, 24), (fmt, options)
    assert check(b"\x89PNG\r\n\x1a\n") is None
    assert check(b"\xff\xd8\xff\xd9") is None
    assert check(b"RIFF\4\0\0\0WEBP") is None


def test_every_header_is_checked_not_only_the_first() -> None:
    second = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0))
    refused(png_header(16, 16, second), 413, "image_too_large")
    sof = b"\xff\xc2" + struct.pack(">HBHHB", 11, 8, 1, 4000, 1) + b"\x01\x11\x00"
    refused(jpeg_bytes(sof), 422, "image_aspect_ratio")


# ---- Pillow's own text limits, reached when the configured cap is above them.


def test_pillow_text_limits_are_a_metadata_error_not_a_bad_file() -> None:
    generous = LimitsConfig(max_image_metadata_bytes=100_000_000)
    rows = b"".join(b"\0" + bytes(range(16)) for _ in range(16))
    over = (png_chunk(b"zTXt", b"k\0\0" + zlib.compress(b"a" * 2_000_000)),)
    # Over MAX_TEXT_CHUNK (1 MiB) in one chunk, read by Image.open, or by load() after IDAT; then
    # under it in each chunk but over MAX_TEXT_MEMORY (64 MiB) together.
    each = png_chunk(b"zTXt", b"k\0\0" + zlib.compress(b"a" * 1_000_000))
    for raw in (
        png_bytes(16, 16, rows, before=over),
        png_bytes(16, 16, rows, after=over),
        png_bytes(16, 16, rows, before=(each * 70,)),
    ):
        with pytest.raises(ServeError) as caught:
            decode_image(b64(raw), param=PARAM, limits=generous)
        assert (caught.value.status, caught.value.code) == (413, "image_metadata_too_large")


# ---- Fuzz: truncations, bit flips and spliced bytes of valid files.


def _seeds() -> list[bytes]:
    frames = [Image.new("RGB", (16, 16), (40 * i, 0, 0)) for i in range(3)]
    return [
        saved(noise(24, 16), "PNG"),
        saved(noise(24, 16, "RGBA"), "PNG"),
        saved(frames[0], "PNG", save_all=True, append_images=frames[1:]),
        saved(noise(24, 16), "JPEG"),
        saved(noise(24, 16), "JPEG", progressive=True, comment=b"hi"),
        saved(noise(24, 16), "WEBP", lossless=True),
        saved(noise(24, 16), "WEBP", quality=50),
        saved(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True),
    ]


def _mutants(count: int) -> list[bytes]:
    rng = random.Random(0)
    seeds = _seeds()
    mutants = []
    for _ in range(count):
        raw = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(raw))
            action = rng.randrange(4)
            if action == 0:
                del raw[at + 1 :]  # truncate, keeping a byte to mutate
            elif action == 1:
                raw[at] ^= 1 << rng.randrange(8)  # flip a bit
            elif action == 2:
                raw[at:at] = rng.randbytes(rng.randint(1, 16))  # insert
            else:
                # a length or size field set to an extreme
                raw[at : at + 4] = rng.choice([b"\xff" * 4, b"\0" * 4, b"\x7f\xff\xff\xff"])
        mutants.append(bytes(raw))
    return mutants


def test_mutated_files_raise_only_our_errors() -> None:
    outcomes: dict[int, int] = {}
    for raw in _mutants(400):
        try:
            decode_image(base64.b64encode(raw).decode(), param=PARAM, limits=LIMITS)
            status = 200
        except ServeError as error:
            status = error.status
        outcomes[status] = outcomes.get(status, 0) + 1
    # Both sides of the line are exercised: some mutants still decode, most are refused.
    assert outcomes.get(200, 0) > 0 and outcomes.get(400, 0) > 0, outcomes
    assert set(outcomes) <= {200, 400, 413, 415, 422}, outcomes


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_the_walk_survives_any_bytes(fmt: str) -> None:
    rng = random.Random(1)
    heads = {"PNG": b"\x89PNG\r\n\x1a\n", "JPEG": b"\xff\xd8\xff", "WEBP": b"RIFF\0\0\1\0WEBP"}
    # Random tails, and every mutant's tail behind this format's magic.
    tails = [rng.randbytes(rng.randint(0, 300)) for _ in range(300)]
    for tail in tails + [mutant[12:] for mutant in _mutants(200)]:
        with contextlib.suppress(ServeError):
            check_decode_cost(heads[fmt] + tail, fmt, PARAM, LIMITS)
