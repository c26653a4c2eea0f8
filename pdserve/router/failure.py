"""The router's error answers: `Failure` (an instance's own error, passed through, or the router's) and `ClientGone`.

Which failures blame an instance rather than the request (so that the request may be retried or moved to
another instance) is `Failure.is_instance_fault`. Knows nothing about routes or HTTP sessions.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import Response

from pdserve.router.registry import Instance
from pdserve.router.stream import INSTANCE_FAULT_CODES


class Failure(Exception):
    """An error answer for the client: an instance's own (passed through unchanged) or the router's."""

    def __init__(self, status: int, error: dict[str, Any], instance: str, body: bytes | None = None) -> None:
        super().__init__(error.get("message", ""))
        self.status = status
        self.error = error  # {"message", "type", "code"}
        self.instance = instance  # URL of the instance it is blamed on, or NO_INSTANCE
        self.body = body if body is not None else json.dumps({"error": error}).encode()

    @classmethod
    def make(cls, status: int, message: str, code: str, instance: str, type_: str = "server_error") -> Failure:
        return cls(status, {"message": message, "type": type_, "code": code}, instance)

    @classmethod
    def answer(cls, inst: Instance, status: int, data: bytes) -> Failure:
        """An instance's non-2xx answer: its JSON error body unchanged, or one naming the instance if not JSON."""
        try:
            parsed = json.loads(data)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            return cls(status, parsed["error"], inst.url, data)
        text = data[:300].decode(errors="replace")
        return cls.make(
            status, f"{inst.role} instance {inst.url} answered HTTP {status}: {text}", f"http_{status}", inst.url
        )

    @property
    def code(self) -> str:
        return str(self.error.get("code") or f"http_{self.status}")

    @property
    def is_instance_fault(self) -> bool:
        """The instance failed (died, hung, its engine stalled), not the request: it may go on elsewhere."""
        return self.code in INSTANCE_FAULT_CODES

    def response(self) -> Response:
        return Response(self.body, self.status, media_type="application/json")

    def sse(self) -> bytes:
        return b"data: " + json.dumps({"error": self.error}).encode() + b"\n\ndata: [DONE]\n\n"


class ClientGone(Exception):
    """The client closed its connection."""
