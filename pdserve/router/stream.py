"""What the router reads of a streamed answer: its server-sent events, split, checked and passed on.

The router asks an instance for `stream_token_ids`: each chunk's choice then carries the token ids of its delta.
`StreamRelay` takes them out (the client never sees them), keeps the completion's token ids so far (what a
migration resumes after), drops the chunks that carried only token ids, notices the end (`data: [DONE]`), and turns
an instance's error event that says the instance failed (not the request) into `InstanceFailed`, so the router can
move the request instead of ending it: `feed` then returns what came before that event and keeps the error in
`fault`. Pure Python; knows nothing about HTTP or instances.
"""

from __future__ import annotations

import json
from typing import Any

# error codes an instance reports when it failed, not the request: the request may go on elsewhere
INSTANCE_FAULT_CODES = frozenset({"engine_dead", "engine_stalled", "instance_unavailable", "instance_stalled"})
DONE = b"data: [DONE]"


class StreamRelay:
    """One client stream's events, across the instances that serve it (a migration feeds a new instance's bytes
    into the same relay). `token_ids` is the completion so far of choice 0."""

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.is_done = False  # [DONE] went by
        self.fault: dict[str, Any] | None = None  # an instance-fault error event's error; the stream ends there
        self._buf = b""

    def restart(self) -> None:
        """A new instance's stream begins: a partial event of the old one, and its fault, are dropped."""
        self._buf = b""
        self.fault = None

    def feed(self, data: bytes) -> bytes:
        """The bytes to pass on for `data` (complete events only; a partial one waits for more). At an
        instance-fault error event it stops: `fault` holds the error, and nothing of it or after it is passed on."""
        events = (self._buf + data).split(b"\n\n")
        self._buf = events.pop()
        out = []
        for event in events:
            relayed = self._event(event)
            if self.fault is not None:
                self._buf = b""
                break
            if relayed is not None:
                out.append(relayed + b"\n\n")
        return b"".join(out)

    def _event(self, event: bytes) -> bytes | None:
        event = event.strip(b"\r\n")
        if not event.startswith(b"data:"):
            return event or None  # a comment (a keepalive) or another field: as it is
        if event == DONE:
            self.is_done = True
            return event
        try:
            payload = json.loads(event[5:])
        except ValueError:
            return event
        if not isinstance(payload, dict):
            return event
        error = payload.get("error")
        if isinstance(error, dict):
            if error.get("code") in INSTANCE_FAULT_CODES:
                self.fault = error
                return None
            return event
        return self._chunk(payload)

    def _chunk(self, payload: dict[str, Any]) -> bytes | None:
        choices = payload.get("choices")
        if not isinstance(choices, list) or not choices:
            return b"data: " + json.dumps(payload, ensure_ascii=False).encode()
        kept = []
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            token_ids = choice.pop("token_ids", None)
            if isinstance(token_ids, list) and choice.get("index", 0) == 0:
                self.token_ids.extend(int(t) for t in token_ids)
            if _has_content(choice):
                kept.append(choice)
        if not kept:
            return None  # it carried token ids only
        payload["choices"] = kept
        return b"data: " + json.dumps(payload, ensure_ascii=False).encode()


def _has_content(choice: dict[str, Any]) -> bool:
    """Whether a client would see anything in this choice: text, a delta, an end or logprobs."""
    return bool(
        choice.get("text") or choice.get("delta") or choice.get("finish_reason") or choice.get("logprobs") is not None
    )
