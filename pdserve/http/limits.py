"""Limits on what one HTTP request may send, shared by the API server and the router.

The defaults live here so that `pdserve serve`, `pdserve router` and `pdserve launch` agree. So do the two
checks every request body meets at the edge: `RequestSizeLimit` (413 past --max-request-bytes, refused before
it is read where the client declares its size) and `parse_json_body` (UTF-8, nesting depth, finite numbers).
This module imports no FastAPI or Starlette at load time: the CLI parser and the launcher import it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from itertools import accumulate, count
from operator import sub
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from pdserve.http.errors import ApiError

DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024  # a request body past this is a 413, answered before it is read
DEFAULT_STALL_TIMEOUT_S = 10.0  # an engine core or an instance silent this long is stalled
DEFAULT_MAX_JSON_DEPTH = 64  # arrays and objects nested deeper than this are a 400 (an OpenAI body needs ~6)


def add_robustness_args(parser: argparse.ArgumentParser) -> None:
    """--max-request-bytes and --stall-timeout: the same flags on `serve`, `router` and `launch`."""
    parser.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        metavar="BYTES",
        help="a request body larger than this is answered 413 before it is read (default: 4 MiB)",
    )
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=DEFAULT_STALL_TIMEOUT_S,
        metavar="SECONDS",
        help="an engine core that makes no progress, or an instance that sends nothing on a request, this long "
        "has stalled: its streams end with an error event, or move to another instance (default: 10)",
    )


# ---- JSON bodies --------------------------------------------------------------------------------------------

# a string literal once escapes are gone; one left open runs to the end, so every match succeeds at once and the scan
# stays linear (a failed match would be retried from each later quote)
_JSON_STRING = re.compile(rb'"[^"]*(?:"|\Z)')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")  # depth after i brackets: their sum minus i
_DEPTH_CHUNK = 1 << 16  # brackets walked per accumulate(): C speed, and a stop soon after the limit is passed


class _NotFinite(ValueError):
    """json.loads met NaN, Infinity or a number that overflows a float."""


def parse_json_body(raw: bytes, max_depth: int = DEFAULT_MAX_JSON_DEPTH) -> Any:
    """`raw` parsed as JSON. ApiError 400 invalid_request when it is not UTF-8, not JSON, nests arrays and objects
    deeper than `max_depth`, or holds NaN, Infinity or a number too large for a float. The depth is checked before
    the parse, in time linear in the body, so a deep body never reaches json's recursion."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _invalid(f"the request body is not valid UTF-8 (at byte {e.start}); send JSON encoded as UTF-8") from None
    if _nests_deeper_than(raw, max_depth):
        raise _invalid(f"the request body nests arrays and objects more than {max_depth} deep, the limit; flatten it")
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except _NotFinite as e:
        raise _invalid(str(e)) from None
    except json.JSONDecodeError as e:
        where = f"line {e.lineno} column {e.colno}"
        raise _invalid(f"the request body is not valid JSON (JSON decode error: {e.msg} at {where})") from None
    except (ValueError, RecursionError) as e:  # e.g. an integer of more than 4300 digits
        raise _invalid(f"the request body is not valid JSON ({str(e).split(':')[0]})") from None


def json_type(value: Any) -> str:
    """What a parsed JSON value is, for error messages: 'a boolean (true)', 'a float (1.0)', 'a string', ..."""
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, float):
        return f"a float ({value!r})"
    names = {str: "a string", int: "an integer", list: "an array", dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _nests_deeper_than(raw: bytes, max_depth: int) -> bool:
    """Whether `raw`'s arrays and objects nest deeper than `max_depth`; brackets inside strings do not count."""
    if raw.count(b"[") + raw.count(b"{") <= max_depth:
        return False
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")  # escaped backslashes, then escaped quotes
    steps = _JSON_STRING.sub(b"", unescaped).translate(_BRACKET_STEPS, _NOT_BRACKETS)  # 2 per opener, 0 per closer
    depth = 0
    for start in range(0, len(steps), _DEPTH_CHUNK):
        levels = list(map(sub, accumulate(steps[start : start + _DEPTH_CHUNK], initial=depth), count()))
        if max(levels) > max_depth:
            return True
        depth = levels[-1]
    return False


def _refuse_constant(name: str) -> Any:
    raise _NotFinite(f"{name} is not a JSON number; send a finite number")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if math.isinf(value):
        shown = literal if len(literal) <= 40 else literal[:40] + "..."
        raise _NotFinite(f"the number {shown} is too large for a 64-bit float; send a finite number")
    return value


def _invalid(message: str) -> ApiError:
    # NOTE: imported here, not at the top: pdserve.http.errors loads FastAPI, which the CLI parser must not
    from pdserve.http.errors import ApiError

    return ApiError(400, message, "invalid_request")


# ---- the request size limit ---------------------------------------------------------------------------------


class RequestTooLarge(Exception):
    """Raised to the app from `receive` once a body without a Content-Length passes the limit."""


class RequestSizeLimit:
    """Pure ASGI middleware (it never buffers a response, so streams still stream): a request body larger than
    `max_bytes` is answered 413 request_too_large in the OpenAI error shape.

    A Content-Length over the limit is refused before the app is called: nothing of the body is kept or parsed. So
    that a client that writes its whole body before it reads its answer gets the 413 rather than a reset, what it
    sends meanwhile is read and thrown away, for at most DRAIN_S seconds and DRAIN_BYTES bytes; then the 413 goes
    out and the connection is closed. A body
    without one (chunked) is counted as the app reads it: past the limit `receive` raises RequestTooLarge, whatever
    the app then sends is dropped, and the 413 goes out instead; the server discards the rest of that body unread
    and keeps the connection, so the client gets its answer."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"--max-request-bytes must be >= 1, got {max_bytes}")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            message = f"the request body has {declared} bytes; this server accepts at most {self.max_bytes}"
            await _drain(receive)
            await _send_too_large(send, message + " (--max-request-bytes)", close=True)
            return
        guard = _BodyGuard(receive, send, self.max_bytes)
        try:
            await self.app(scope, guard.receive, guard.send)
        except Exception:
            if not guard.is_refusing:
                raise
        if guard.is_refusing:
            message = f"the request body is larger than {self.max_bytes} bytes, this server's limit"
            await _send_too_large(send, message + " (--max-request-bytes)", close=False)


class _BodyGuard:
    """The `receive` and `send` one request's app sees: body bytes counted, and after the limit is passed, the
    app's answer held back (unless its response had started: then it is the app's to end)."""

    def __init__(self, receive: Receive, send: Send, max_bytes: int) -> None:
        self._receive = receive
        self._send = send
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self.is_started = False  # the app's response has started
        self.is_refusing = False  # the limit was passed before that: the 413 is the middleware's to send

    async def receive(self) -> Message:
        if self.num_bytes > self.max_bytes:
            raise RequestTooLarge(f"request body larger than {self.max_bytes} bytes")
        message = await self._receive()
        if message["type"] == "http.request":
            self.num_bytes += len(message.get("body", b""))
            if self.num_bytes > self.max_bytes:
                self.is_refusing = not self.is_started
                raise RequestTooLarge(f"request body larger than {self.max_bytes} bytes")
        return message

    async def send(self, message: Message) -> None:
        if self.is_refusing:
            return
        if message["type"] == "http.response.start":
            self.is_started = True
        await self._send(message)


DRAIN_S = 2.0  # the longest a refused body is read (and thrown away) before its 413 goes out
DRAIN_BYTES = 64 * 1024 * 1024  # the most of it that is read


async def _drain(receive: Receive) -> None:
    """Read and discard a refused request's body until it ends, DRAIN_S pass or DRAIN_BYTES were read."""
    import asyncio

    async def discard() -> None:
        num_bytes = 0
        while num_bytes < DRAIN_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return
            num_bytes += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    try:
        await asyncio.wait_for(discard(), DRAIN_S)
    except asyncio.TimeoutError:
        pass


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_too_large(send: Send, message: str, close: bool) -> None:
    """The 413. `close`: the server closes the connection after it rather than read the rest of the body."""
    error = {"message": message, "type": "invalid_request_error", "code": "request_too_large"}
    body = json.dumps({"error": error}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
