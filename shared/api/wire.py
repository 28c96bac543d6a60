"""Wire encodings of stream events: NDJSON (one JSON object per line) and Server-Sent Events."""

from __future__ import annotations

from pydantic import BaseModel

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"


def pick_stream_type(accept: str | None) -> str:
    """SSE when the client asks for it, NDJSON otherwise (the default)."""
    return SSE if accept and SSE in accept else NDJSON


def encode_event(event: BaseModel, media_type: str) -> str:
    data = event.model_dump_json()
    if media_type == SSE:
        return f"event: {getattr(event, 'event', 'message')}\ndata: {data}\n\n"
    return data + "\n"
