"""Decode-cost caps for input images: one walk over a file's structure (a PNG's chunks, a JPEG's
marker segments, a WebP's RIFF chunks) that reads the size from the header and refuses, before
any pixel is decoded, a file that would be slow or huge to open.

Pillow bounds none of these: it walks PNG chunks and a JPEG's header bytes in Python, decodes
every scan of a progressive JPEG, keeps every private chunk and text in memory, and allocates a
WebP canvas inside `Image.open`. The walk here reads lengths, types and headers only, stops as soon
as a cap is passed, so it costs O(min(file size, caps)). A file that is merely truncated or
inconsistent is left to Pillow, which refuses it as `invalid_image`. Torch- and Pillow-free; numpy
only finds the end of a JPEG scan's entropy-coded data.
"""

from __future__ import annotations

import re
import struct
import zlib

import numpy as np

from shared.config.models import LimitsConfig
from shared.errors import InvalidRequestError, MalformedRequestError, PayloadTooLargeError

# PNG chunks that are image data; every other chunk (text, EXIF, ICC, private) is metadata.
# acTL/fcTL/fdAT are APNG's frames, capped by max_image_frames instead.
_PNG_IMAGE_CHUNKS = frozenset(
    {b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"acTL", b"fcTL", b"fdAT"}
)
_PNG_COMPRESSED = frozenset({b"zTXt", b"iTXt", b"iCCP"})
_PNG_CHUNK = struct.Struct(">I4s")
# Pillow's test for a chunk type (`PngImagePlugin.is_cid`; isalnum first, 10x faster): Pillow
# stops reading at anything else.
_PNG_TYPE = re.compile(rb"\w{4}")
# Output per inflate call when measuring a compressed PNG text or ICC profile.
_INFLATE_STEP = 16 * 1024
_WEBP_METADATA = frozenset({b"EXIF", b"ICCP", b"XMP "})
# JPEG SOF0-SOF15 carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but not.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_SOS, _JPEG_EOI, _JPEG_COM = 0xDA, 0xD9, 0xFE
# Markers without a length field: TEM, RST0-RST7, SOI.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})
# Bytes that make 0xFF a marker: not 0x00 (byte stuffing), not RST0-RST7 (restart markers, part
# of a scan), not 0xFF (fill: the marker is the last 0xFF of the run).
_JPEG_MARKER_BYTES = frozenset(range(0x01, 0xD0)) | frozenset(range(0xD8, 0xFF))
# The same test as a pattern, for the header's stray-bytes search: bounded by the stray cap, so a
# regex's cost per 0xFF does not matter there as it would inside a scan (see _JpegMarkers).
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
# Bytes allowed between a JPEG's header segments (fill, junk) before its first scan. Encoders write
# none; libjpeg skips them with a "corrupt data" warning, but Pillow walks the header a byte per
# Python loop (about 1 us a byte), so a megabyte of padding costs a second.
_MAX_JPEG_STRAY = 4096
# The marker search examines a JPEG in blocks: each byte once, temporaries of a few MB at most.
_JPEG_BLOCK = 1 << 20
_RST0 = np.uint8(0xD0)


def check_decode_cost(
    raw: bytes, fmt: str, param: str, limits: LimitsConfig
) -> tuple[int, int] | None:
    """Walk `raw` (a file `_sniff` named "PNG", "JPEG" or "WEBP") without decoding pixels.

    Returns (width, height) from the first header (PNG IHDR, JPEG SOFn, WebP VP8/VP8L/VP8X) or
    None if it has none. Every header found is checked by `check_size`. Raises, naming `param`:
    422 `too_many_scans` (JPEG SOS markers), 422 `too_many_chunks` (PNG chunks, JPEG marker
    segments, WebP chunks; all over max_png_chunks), 413 `image_metadata_too_large` (PNG ancillary
    chunks, JPEG APPn/COM, WebP EXIF/ICCP/XMP, or what PNG's compressed text and ICC chunks inflate
    to, over max_image_metadata_bytes), 422 `too_many_frames` (APNG acTL, WebP ANMF), 400
    `invalid_image` (a JPEG with over 4096 stray bytes between its header segments).
    """
    walk = _Walk(param, limits)
    if fmt == "PNG":
        _walk_png(raw, walk)
    elif fmt == "JPEG":
        _walk_jpeg(raw, walk)
    else:
        _walk_webp(raw, walk)
    return walk.size


def check_size(size: tuple[int, int], param: str, limits: LimitsConfig) -> None:
    """The header rules: 413 `image_too_large` (pixels), then 422 `image_aspect_ratio`, then
    422 `image_too_small` (shorter side)."""
    width, height = size
    if width * height > limits.max_image_pixels:
        raise too_large(param, limits, f"{width}x{height} ({width * height:,} pixels)")
    long, short = max(size), min(size)
    # Multiplied, not divided: a zero side is an infinite ratio, not a ZeroDivisionError.
    if long > short * limits.max_image_aspect:
        raise InvalidRequestError(
            f"{param} is {width}x{height}; its sides may differ by at most "
            f"{limits.max_image_aspect:g}:1",
            code="image_aspect_ratio",
            param=param,
        )
    if short < limits.min_image_side:
        raise InvalidRequestError(
            f"{param} is {width}x{height}; each side must be at least "
            f"{limits.min_image_side} pixels",
            code="image_too_small",
            param=param,
        )


def too_large(param: str, limits: LimitsConfig, got: str) -> PayloadTooLargeError:
    """413 `image_too_large`: `got` describes the size found ("5000x5000 (25,000,000 pixels)")."""
    return PayloadTooLargeError(
        f"{param} is {got}; the limit is {limits.max_image_pixels:,} pixels",
        code="image_too_large",
        param=param,
    )


class _Walk:
    """What one walk has seen so far; each `add_*` raises as soon as its cap is passed."""

    def __init__(self, param: str, limits: LimitsConfig) -> None:
        self.param = param
        self.limits = limits
        self.size: tuple[int, int] | None = None
        self.chunks = 0
        self.metadata = 0
        self.inflated = 0

    def add_header(self, width: int, height: int) -> None:
        check_size((width, height), self.param, self.limits)
        if self.size is None:
            self.size = (width, height)

    def add_chunk(self, what: str) -> None:
        self.chunks += 1
        if self.chunks > self.limits.max_png_chunks:
            raise self.chunks_error(what)

    def chunks_error(self, what: str) -> InvalidRequestError:
        cap = self.limits.max_png_chunks
        unit = "marker segments" if what == "JPEG" else "chunks"
        return InvalidRequestError(
            f"{self.param} is a {what} with more than {cap:,} {unit}; at most {cap:,} are "
            "allowed; re-save it with a standard encoder",
            code="too_many_chunks",
            param=self.param,
        )

    def add_metadata(self, nbytes: int) -> None:
        self.metadata += nbytes
        if self.metadata > self.limits.max_image_metadata_bytes:
            raise self.metadata_error()

    def add_inflated(self, compressed: bytes) -> None:
        """Inflate a PNG text or ICC profile, no further than the cap: Pillow inflates each one up
        to 1 MiB and keeps it, so a 2 KB chunk can cost a megabyte."""
        cap = self.limits.max_image_metadata_bytes
        inflater = zlib.decompressobj()
        # Each step yields _INFLATE_STEP bytes but the last, so the range only guards the loop.
        for _ in range(cap // _INFLATE_STEP + 2):
            if not compressed or self.inflated > cap:
                break
            try:
                self.inflated += len(inflater.decompress(compressed, _INFLATE_STEP))
            except zlib.error:
                # Pillow drops a corrupt stream, but only after inflating up to the error; the
                # failed step is charged so that corrupt chunks cannot buy unbounded work.
                self.inflated += _INFLATE_STEP
                break
            compressed = inflater.unconsumed_tail
        if self.inflated > cap:
            raise self.metadata_error(inflated=True)

    def add_frames(self, got: str, count: int) -> None:
        cap = self.limits.max_image_frames
        if count > cap:
            raise InvalidRequestError(
                f"{self.param} is an animation of {got} frames; at most {cap:,} are allowed "
                "(only the first frame is used)",
                code="too_many_frames",
                param=self.param,
            )

    def metadata_error(self, inflated: bool = False) -> PayloadTooLargeError:
        cap = self.limits.max_image_metadata_bytes
        what = (
            "compressed text or ICC profiles that inflate to"
            if inflated
            else "metadata (text, EXIF, ICC profiles, private chunks) of"
        )
        return PayloadTooLargeError(
            f"{self.param} carries {what} over {cap:,} bytes; at most {cap:,} are allowed; strip "
            "the metadata and send it again",
            code="image_metadata_too_large",
            param=self.param,
        )


def _walk_png(raw: bytes, walk: _Walk) -> None:
    pos, end = 8, len(raw)
    metadata_cap = walk.limits.max_image_metadata_bytes
    # A Python step per chunk, so the loop is bounded by the cap, not by the file.
    for _ in range(walk.limits.max_png_chunks):
        if pos + 8 > end:
            return
        length, kind = _PNG_CHUNK.unpack_from(raw, pos)
        if not (kind.isalnum() or _PNG_TYPE.match(kind)) or kind == b"IEND":
            # Not a chunk: Pillow refuses it before IDAT and stops reading after it. After IEND
            # (an appended ZIP or HTML page) Pillow reads nothing either.
            return
        data = pos + 8
        pos = data + length + 4
        if kind not in _PNG_IMAGE_CHUNKS:
            # A length past the end of the file is a truncation for Pillow to report, so only
            # the bytes present count.
            walk.metadata += min(length, end - data) + 12
            if walk.metadata > metadata_cap:
                raise walk.metadata_error()
            if kind in _PNG_COMPRESSED:
                compressed = _png_compressed(kind, raw[data : data + length])
                if compressed is not None:
                    walk.add_inflated(compressed)
        elif kind == b"IHDR" and data + 8 <= end:
            walk.add_header(*struct.unpack_from(">II", raw, data))
        elif kind == b"acTL" and data + 4 <= end:
            frames = struct.unpack_from(">I", raw, data)[0]
            walk.add_frames(f"{frames:,}", frames)
    if pos + 8 <= end and _PNG_TYPE.match(raw, pos + 4, pos + 8):
        raise walk.chunks_error("PNG")


def _png_compressed(kind: bytes, data: bytes) -> bytes | None:
    """The zlib stream of a zTXt, iCCP or compressed iTXt chunk, None if it holds none."""
    keyword_end = data.find(b"\0")
    if keyword_end < 0:
        return None
    rest = data[keyword_end + 1 :]
    if kind != b"iTXt":
        return rest[1:] if rest[:1] == b"\0" else None  # compression method 0 = zlib
    if len(rest) < 2 or rest[0] == 0 or rest[1] != 0:  # compressed flag set, method 0 = zlib
        return None
    language_end = rest.find(b"\0", 2)
    key_end = rest.find(b"\0", language_end + 1) if language_end >= 0 else -1
    return rest[key_end + 1 :] if key_end >= 0 else None


def _walk_jpeg(raw: bytes, walk: _Walk) -> None:
    markers = _JpegMarkers(raw)
    end, cap = len(raw), walk.limits.max_png_chunks
    scans = stray = 0
    pos = 2  # after SOI
    # A Python step per marker segment, so the loop is bounded by the cap, not by the file.
    for count in range(1, cap + 2):
        if pos + 1 < end and raw[pos] == 0xFF and raw[pos + 1] in _JPEG_MARKER_BYTES:
            at = pos  # the usual case: the next segment follows at once
        elif scans:
            at = markers.after(pos)  # past a scan's entropy-coded data (or junk after it)
        else:
            # Fill or junk in the header: searched no further than the stray budget allows.
            window = pos + _MAX_JPEG_STRAY - stray + 2
            found = _JPEG_MARKER.search(raw, pos, window)
            if found is None and window < end:
                raise _stray_error(walk)
            at = -1 if found is None else found.start()
            stray += max(at - pos, 0)
        if at < 0:
            return  # truncated: Pillow reports it
        marker = raw[at + 1]
        if marker == _JPEG_EOI:
            return  # what follows (an MPO's second image, a polyglot's tail) is never decoded
        if count > cap:
            raise walk.chunks_error("JPEG")
        if marker in _JPEG_STANDALONE:
            pos = at + 2
            continue
        if at + 4 > end:
            return
        length = struct.unpack_from(">H", raw, at + 2)[0]
        if length < 2:
            return  # a bogus length libjpeg refuses
        pos = at + 2 + length
        if 0xE0 <= marker <= 0xEF or marker == _JPEG_COM:
            walk.add_metadata(min(length + 2, end - at))
        elif marker in _JPEG_SOF and at + 9 <= end:
            height, width = struct.unpack_from(">HH", raw, at + 5)
            walk.add_header(width, height)
        elif marker == _JPEG_SOS:
            scans += 1
            _check_scans(scans, walk)


def _stray_error(walk: _Walk) -> MalformedRequestError:
    return MalformedRequestError(
        f"{walk.param} is a corrupt JPEG file (over {_MAX_JPEG_STRAY:,} stray bytes between its "
        "header segments); send a base64-encoded PNG, JPEG or WebP image",
        code="invalid_image",
        param=walk.param,
    )


def _check_scans(scans: int, walk: _Walk) -> None:
    cap = walk.limits.max_jpeg_scans
    if scans > cap:
        raise InvalidRequestError(
            f"{walk.param} is a JPEG with more than {cap:,} scans; at most {cap:,} are allowed "
            "(progressive encoders write about 10); re-save it as a baseline JPEG",
            code="too_many_scans",
            param=walk.param,
        )


class _JpegMarkers:
    """Finds the next marker in a JPEG: an 0xFF followed by a byte in `_JPEG_MARKER_BYTES`.

    Vectorised, a block at a time, because a scan's entropy-coded data is most of the file and a
    Python step per 0xFF costs 0.1 s on 10 MB of byte stuffing. A block's marker offsets are kept,
    so the walk, which only moves forward, examines each byte once.
    """

    def __init__(self, raw: bytes) -> None:
        self.data = np.frombuffer(raw, np.uint8)
        self.start = self.stop = self.next = 0
        self.hits = np.empty(0, np.intp)

    def after(self, pos: int) -> int:
        """Offset of the first marker's 0xFF at or after `pos`, -1 if none. `pos` only grows."""
        while pos < len(self.data) - 1:
            if not self.start <= pos < self.stop:
                self._load(pos)
            hits, first = self.hits, self.next
            if first < len(hits) and hits[first] < pos:
                # Offsets inside the segments walked since the last call (an APP payload's bytes).
                first = int(np.searchsorted(hits, pos))
            if first < len(hits):
                self.next = first + 1
                return int(hits[first])
            pos = self.stop
        return -1

    def _load(self, pos: int) -> None:
        stop = min(len(self.data) - 1, pos + _JPEG_BLOCK)
        follow = self.data[pos + 1 : stop + 1]
        hit = (self.data[pos:stop] == 0xFF) & (follow != 0) & (follow != 0xFF)
        hit &= (follow - _RST0) > 7  # wraps below 0xD0, so only RST0-RST7 are <= 7
        self.hits = np.flatnonzero(hit) + pos
        self.start, self.stop, self.next = pos, stop, 0


def _walk_webp(raw: bytes, walk: _Walk) -> None:
    # The RIFF size bounds the file; libwebp ignores anything after it.
    end = min(len(raw), 8 + struct.unpack_from("<I", raw, 4)[0])
    pos, frames = 12, 0
    while pos + 8 <= end:
        kind = raw[pos : pos + 4]
        length = struct.unpack_from("<I", raw, pos + 4)[0]
        walk.add_chunk("WebP")
        if pos == 12:
            size = _webp_size(raw, pos)
            if size is not None:
                walk.add_header(*size)
        elif kind == b"ANMF":
            frames += 1
            walk.add_frames(f"more than {walk.limits.max_image_frames:,}", frames)
        elif kind in _WEBP_METADATA:
            walk.add_metadata(min(length, end - pos - 8) + 8)
        pos += 8 + length + (length & 1)  # chunks are padded to an even size


def _webp_size(raw: bytes, at: int) -> tuple[int, int] | None:
    """Canvas size from the WebP chunk at `at` (VP8X, VP8L or VP8), None if it is none of them."""
    chunk = raw[at : at + 4]
    if chunk == b"VP8X" and len(raw) >= at + 18:
        width = int.from_bytes(raw[at + 12 : at + 15], "little") + 1
        return width, int.from_bytes(raw[at + 15 : at + 18], "little") + 1
    if chunk == b"VP8L" and len(raw) >= at + 13 and raw[at + 8] == 0x2F:
        bits = struct.unpack_from("<I", raw, at + 9)[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and len(raw) >= at + 18 and raw[at + 11 : at + 14] == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", raw, at + 14)
        return width & 0x3FFF, height & 0x3FFF
    return None
