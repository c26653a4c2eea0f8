"""OpenAI streaming responses: an incremental server-sent-events decoder and chunk parsing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


class SSEDecoder:
    """Incremental text/event-stream decoder: feed bytes as they arrive, get each complete event's data."""

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []

    def feed(self, raw: bytes) -> list[str]:
        lines = (self._buf + raw).split(b"\n")
        self._buf = lines.pop()  # an unfinished line waits for more bytes
        events: list[str] = []
        for line in lines:
            self._line(line.rstrip(b"\r").decode("utf-8"), events)
        return events

    def close(self) -> list[str]:
        """The events left when the stream ends without a final blank line."""
        events: list[str] = []
        if self._buf:
            self._line(self._buf.rstrip(b"\r").decode("utf-8"), events)
            self._buf = b""
        self._line("", events)
        return events

    def _line(self, line: str, events: list[str]) -> None:
        if not line:  # a blank line ends the event
            if self._data:
                events.append("\n".join(self._data))
                self._data = []
        elif line.startswith("data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(" ") else value)
        # comments (':...') and the event/id/retry fields carry nothing we measure


@dataclass(frozen=True)
class StreamChunk:
    """One parsed SSE data payload of an OpenAI streaming response."""

    text: str = ""  # generated text in this chunk
    usage: dict[str, Any] | None = None
    error: str | None = None
    is_done: bool = False


def parse_chunk(data: str, endpoint: str) -> StreamChunk:
    """Completions: choices[0].text; chat: choices[0].delta.content (+ reasoning_content). '[DONE]' ends."""
    if data.strip() == "[DONE]":
        return StreamChunk(is_done=True)
    try:
        chunk = json.loads(data)
    except json.JSONDecodeError:
        return StreamChunk(error=f"stream chunk is not JSON: {data[:200]!r}")
    if not isinstance(chunk, dict):
        return StreamChunk(error=f"stream chunk is not a JSON object: {data[:200]!r}")
    if chunk.get("error"):
        err = chunk["error"]
        return StreamChunk(error=str(err.get("message", err) if isinstance(err, dict) else err))
    text = ""
    choices = chunk.get("choices") or []
    if choices:
        if endpoint == "chat":
            delta = choices[0].get("delta") or {}
            text = (delta.get("reasoning_content") or "") + (delta.get("content") or "")
        else:
            text = choices[0].get("text") or ""
    usage = chunk.get("usage")
    return StreamChunk(text=text, usage=usage if isinstance(usage, dict) else None)
