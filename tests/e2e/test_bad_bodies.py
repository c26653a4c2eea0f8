"""Bad request bodies against a real router in front of real P and D instances (a tiny random-weight model),
all with --max-request-bytes 64 KiB: each body is a 4xx in the OpenAI error shape from the router and from
each instance, nothing is read past the size limit, and afterwards every instance is healthy and idle. Then a
hypothesis fuzz of the router (test_server_fuzz.py's strategies): never a 5xx.

One deployment serves the whole module; the model loads once per instance.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

pytest.register_assert_rewrite("server_fixtures", "pd_fixtures")

from helpers import make_tiny_chat_model  # noqa: E402
from pd_fixtures import RouterProcess, start_instance  # noqa: E402
from server_fixtures import MODEL_NAME, ServerProcess, assert_openai_error, wait_idle  # noqa: E402
from test_server_fuzz import BAD_CHAT, BAD_COMPLETION, VALID_CHAT, VALID_COMPLETION, bodies, check  # noqa: E402

from pdserve.http.limits import DRAIN_S  # noqa: E402

pytest_plugins = ["server_fixtures"]

LIMIT = 64 * 1024
CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]
INVALID = "invalid_request"
FUZZ = settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))


class Deployment:
    def __init__(self, prefill: ServerProcess, decode: ServerProcess, router: RouterProcess) -> None:
        self.prefill, self.decode, self.router = prefill, decode, router

    def url(self, target: str) -> str:
        return {"router": self.router.url, "prefill": self.prefill.url, "decode": self.decode.url}[target]


@pytest.fixture(scope="module")
def pd(tmp_path_factory: pytest.TempPathFactory, default_hf_dir: Path) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("bad-bodies")
    model = make_tiny_chat_model(root / "tiny-chat", default_hf_dir)
    flags = ["--model", str(model), "--served-model-name", MODEL_NAME, "--max-model-len", "1024"]
    flags += ["--num-blocks", "128", "--max-request-bytes", str(LIMIT)]
    p = start_instance("prefill", root, flags)
    d = start_instance("decode", root, flags)
    router = None
    try:
        p.wait_ready()
        d.wait_ready()
        router_flags = ["--prefill", p.url, "--decode", d.url, "--max-request-bytes", str(LIMIT)]
        router = RouterProcess(router_flags, root / "router.log").start().wait_ready()
        yield Deployment(p, d, router)
    finally:
        for part in (router, p, d):
            if part is not None:
                part.stop()


# (path, raw body, status, code, a fragment of the router's message, of an instance's)
BAD_BODIES: dict[str, tuple[str, bytes, int, str, str, str | None]] = {
    "deep-5000": (
        CMPL,
        b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        400,
        INVALID,
        "more than 64 deep",
        "more than 64 deep",
    ),
    "deep-chat": (CHAT, b'{"messages": ' + b"[{" * 3000 + b"}]" * 3000 + b"}", 400, INVALID, "deep", "deep"),
    "bool-ids": (
        CMPL,
        b'{"prompt": [true, false], "max_tokens": 1}',
        400,
        INVALID,
        "prompt: token id 0 is a boolean (true); token ids must be JSON integers",
        "token id 0 is a boolean (true); token ids must be JSON integers",
    ),
    "float-ids": (
        CMPL,
        b'{"prompt": [[1.0, 2.0]], "max_tokens": 1}',
        400,
        INVALID,
        "token id 0 is a float (1.0)",
        "token id 0 is a float (1.0)",
    ),
    "bool-stop-token-ids": (
        CMPL,
        b'{"prompt": "hi", "max_tokens": 1, "stop_token_ids": [true]}',
        400,
        INVALID,
        "stop_token_ids.0: Input should be a valid integer",  # the router leaves this field to the instances
        "stop_token_ids.0: Input should be a valid integer",
    ),
    "nan": (
        CMPL,
        b'{"prompt": "hi", "max_tokens": 1, "temperature": NaN}',
        400,
        INVALID,
        "NaN is not a JSON number",
        "NaN is not a JSON number",
    ),
    "infinity-chat": (
        CHAT,
        b'{"messages": [{"role": "user", "content": "hi"}], "top_p": -Infinity}',
        400,
        INVALID,
        "-Infinity is not a JSON number",
        "-Infinity is not a JSON number",
    ),
    "float-overflow": (
        CMPL,
        b'{"prompt": "hi", "temperature": 1e400}',
        400,
        INVALID,
        "1e400 is too large",
        "1e400 is too large",
    ),
    "huge-id": (
        CMPL,
        json.dumps({"prompt": [1, 10**30], "max_tokens": 1}).encode(),
        400,
        INVALID,
        f"prompt: token id 1 is {10**30}; token ids are 0..2147483647",
        "less than or equal to 2147483647",
    ),
    "huge-max-tokens": (
        CMPL,
        json.dumps({"prompt": "hi", "max_tokens": 10**30}).encode(),
        400,
        "context_length_exceeded",
        "max_tokens",
        "max_tokens",
    ),
    "invalid-utf8": (
        CMPL,
        b'{"prompt": "caf\xe9 \xff", "max_tokens": 1}',
        400,
        INVALID,
        "not valid UTF-8",
        "not valid UTF-8",
    ),
    "array-body": (CMPL, b"[1, 2]", 400, INVALID, "must be a JSON object, not an array", "valid dictionary"),
    "string-stream": (
        CMPL,
        b'{"prompt": "hi", "max_tokens": 1, "stream": "yes"}',
        400,
        INVALID,
        "stream: must be true or false; got a string",
        None,  # an instance takes "yes" for true: pydantic's lax bool
    ),
    "over-the-limit": (
        CMPL,
        json.dumps({"prompt": "x" * LIMIT, "max_tokens": 1}).encode(),
        413,
        "request_too_large",
        f"this server accepts at most {LIMIT} (--max-request-bytes)",
        f"this server accepts at most {LIMIT} (--max-request-bytes)",
    ),
}
TARGETS = ["router", "prefill", "decode"]


def fragment(name: str, target: str) -> str | None:
    """What the router's message (or an instance's) holds for this body; None where it is not refused there."""
    router_fragment, instance_fragment = BAD_BODIES[name][4:]
    return router_fragment if target == "router" else instance_fragment


CASES = [(name, target) for name in sorted(BAD_BODIES) for target in TARGETS if fragment(name, target) is not None]


@pytest.mark.parametrize("name, target", CASES)
def test_bad_body_is_a_4xx_in_the_openai_shape(pd: Deployment, name: str, target: str) -> None:
    path, raw, status, code, _, _ = BAD_BODIES[name]
    headers = {"content-type": "application/json"}
    r = httpx.post(pd.url(target) + path, content=raw, headers=headers, timeout=30)
    assert_openai_error(r, status, code, fragment(name, target) or "")


@pytest.mark.parametrize("target", TARGETS)
def test_a_chunked_body_over_the_limit_is_a_413(pd: Deployment, target: str) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(LIMIT // 4096 + 1):
            yield b"x" * 4096
        yield b'", "max_tokens": 1}'

    async def post() -> httpx.Response:
        async with httpx.AsyncClient(timeout=30) as client:
            return await client.post(
                pd.url(target) + CMPL, content=chunks(), headers={"content-type": "application/json"}
            )

    r = asyncio.run(post())
    assert_openai_error(r, 413, "request_too_large", f"larger than {LIMIT} bytes", "--max-request-bytes")


def raw_exchange(url: str, head: bytes, body: bytes) -> tuple[int, dict[str, Any], float, bool]:
    """Send `head` and `body` over a socket and read one response: (status, JSON body, seconds to the answer,
    whether the server then closed the connection)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        start = time.monotonic()
        sock.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        header, rest = data.split(b"\r\n\r\n", 1)
        length = int(next(h for h in header.split(b"\r\n") if h.lower().startswith(b"content-length:")).split(b":")[1])
        while len(rest) < length:
            rest += sock.recv(65536)
        elapsed = time.monotonic() - start
        try:
            closed = sock.recv(1) == b""
        except (ConnectionResetError, TimeoutError):
            closed = False
    return int(header.split(b" ", 2)[1]), json.loads(rest), elapsed, closed


@pytest.mark.parametrize("target", TARGETS)
def test_a_100_mb_content_length_is_refused_without_waiting_for_the_body(pd: Deployment, target: str) -> None:
    """The client declares 100 MB and sends 16 bytes of it: the 413 comes once the server has waited DRAIN_S for
    more (it throws away what a client sends before reading, so that such a client sees the 413), never for the
    100 MB."""
    declared = 100 * 1024 * 1024
    head = f"POST {CMPL} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
    status, body, elapsed, closed = raw_exchange(pd.url(target), head.encode(), b'{"prompt": "hi",')
    assert status == 413 and body["error"]["code"] == "request_too_large", body
    assert body["error"]["message"] == (
        f"the request body has {declared} bytes; this server accepts at most {LIMIT} (--max-request-bytes)"
    )
    assert DRAIN_S <= elapsed < DRAIN_S + 2.0 and closed


def test_a_body_under_the_limit_still_works(pd: Deployment) -> None:
    prompt = "hello " * 100
    for target in TARGETS:
        r = httpx.post(pd.url(target) + CMPL, json={"prompt": prompt, "max_tokens": 2, "ignore_eos": True}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
    with httpx.stream("POST", pd.router.url + CHAT, json={"messages": HI, "max_tokens": 3, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert b"data: [DONE]" in b"".join(r.iter_raw())


# ---- the router under fuzz -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def router_client(pd: Deployment) -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60) as client:
        yield client


@FUZZ
@given(body=bodies(VALID_COMPLETION, BAD_COMPLETION))
def test_fuzz_router_completions(pd: Deployment, router_client: httpx.Client, body: bytes) -> None:
    check(pd.router, router_client, CMPL, body)  # type: ignore[arg-type]


@FUZZ
@given(body=bodies(VALID_CHAT, BAD_CHAT, keep=("max_tokens",)))
def test_fuzz_router_chat(pd: Deployment, router_client: httpx.Client, body: bytes) -> None:
    check(pd.router, router_client, CHAT, body)  # type: ignore[arg-type]


def test_afterwards_every_instance_is_healthy_and_idle(pd: Deployment) -> None:
    for server in (pd.prefill, pd.decode):
        assert httpx.get(f"{server.url}/health", timeout=10).json() == {"status": "ok"}
        wait_idle(server.url, timeout_s=15)
        assert "Traceback" not in server.log_text() and "internal error" not in server.log_text()
    assert httpx.get(f"{pd.router.url}/health", timeout=10).json()["status"] == "ok"
    assert "Traceback" not in pd.router.log_text(), pd.router.log_text()[-5000:]
