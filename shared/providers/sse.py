"""Server-sent events (the `text/event-stream` framing) decoded from an async stream of lines.

Only what the providers' streams use: `event:` and `data:` fields, multi-line data, comments, and
a blank line that dispatches the event. `id:`/`retry:` are ignored because these streams are not
resumable.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSentEvent:
    event: str
    data: str


async def iter_sse(lines: AsyncIterator[str]) -> AsyncIterator[ServerSentEvent]:
    """Events from the stream's lines (line endings already stripped)."""
    event = ""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield ServerSentEvent(event=event or "message", data="\n".join(data))
            event, data = "", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            event = value
        elif field == "data":
            data.append(value)
    if data:
        yield ServerSentEvent(event=event or "message", data="\n".join(data))
