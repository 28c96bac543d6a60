"""Wire encodings of stream events: NDJSON (one JSON object per line), Server-Sent Events, and
multipart/x-mixed-replace image frames (each step's preview, then the image) that a plain `<img>`
tag shows live."""

from __future__ import annotations

import base64

from pydantic import BaseModel

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
FRAMES = "multipart/x-mixed-replace"
FRAME_BOUNDARY = "frame"


def pick_stream_type(accept: str | None) -> str:
    """SSE or image frames when the client asks for them, NDJSON otherwise (the default)."""
    if accept and FRAMES in accept:
        return FRAMES
    return SSE if accept and SSE in accept else NDJSON


def encode_frame(event: BaseModel) -> bytes | None:
    """One multipart part: a step's first preview, the first image, or the error as JSON;
    None for events with nothing to show (queued, a step without a preview)."""
    kind = getattr(event, "event", "")
    if kind == "error":
        return _part("application/json", event.model_dump_json().encode())
    images = getattr(event, "previews", None) if kind == "step" else getattr(event, "images", None)
    if not images:
        return None
    image = images[0]
    return _part(f"image/{image.format}", base64.b64decode(image.b64))


def _part(content_type: str, data: bytes) -> bytes:
    head = f"--{FRAME_BOUNDARY}\r\nContent-Type: {content_type}\r\n"
    return head.encode() + f"Content-Length: {len(data)}\r\n\r\n".encode() + data + b"\r\n"


def encode_event(event: BaseModel, media_type: str) -> str:
    data = event.model_dump_json()
    if media_type == SSE:
        return f"event: {getattr(event, 'event', 'message')}\ndata: {data}\n\n"
    return data + "\n"
