"""Server-Sent Events framing (the WHATWG ``text/event-stream`` format), pure functions only."""

from __future__ import annotations

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}


def sse_event(data: str, *, event: str | None = None, id: str | None = None) -> bytes:
    """One event; ``data`` may span lines (each becomes its own ``data:`` line)."""
    lines = []
    if id is not None:
        lines.append(f"id: {id}")
    if event is not None:
        lines.append(f"event: {event}")
    lines.extend(f"data: {line}" for line in data.split("\n"))
    return ("\n".join(lines) + "\n\n").encode()


def sse_comment(text: str) -> bytes:
    """A comment line: ignored by clients, keeps proxies from closing an idle connection."""
    return f": {text}\n\n".encode()
