"""Request isolation at the HTTP edge, in process: parse_json_body, the router's shape check, the request size
middleware (driven as raw ASGI and through httpx), the JSON body route, and the strict protocol fields."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel, ValidationError

from pdserve.http.errors import ApiError, add_error_handlers
from pdserve.http.json_body import JsonBodyRoute, is_json
from pdserve.http.limits import DEFAULT_MAX_JSON_DEPTH, RequestSizeLimit, parse_json_body
from pdserve.router.shape import PROMPT_TYPES, body_shape_problem
from pdserve.server.protocol import ChatCompletionRequest, CompletionRequest

Message = dict[str, Any]

# ---- parse_json_body -----------------------------------------------------------------------------------------


def refusal(raw: bytes, **kw: Any) -> str:
    with pytest.raises(ApiError) as e:
        parse_json_body(raw, **kw)
    assert (e.value.status, e.value.code, e.value.type) == (400, "invalid_request", "invalid_request_error")
    return e.value.message


def nested(depth: int, open_: str = "[", close: str = "]") -> bytes:
    return (open_ * depth + close * depth).encode()


def test_depth_exactly_at_the_limit_passes_and_one_past_is_refused() -> None:
    assert parse_json_body(nested(DEFAULT_MAX_JSON_DEPTH)) is not None
    message = refusal(nested(DEFAULT_MAX_JSON_DEPTH + 1))
    assert message == "the request body nests arrays and objects more than 64 deep, the limit; flatten it"
    objects = lambda n: b'{"a":' * n + b"1" + b"}" * n  # noqa: E731
    assert parse_json_body(objects(5), max_depth=5) is not None
    assert "more than 5 deep" in refusal(objects(6), max_depth=5)
    mixed = b'{"a": [{"b": [1]}]}'  # depth 4
    assert parse_json_body(mixed, max_depth=4) == {"a": [{"b": [1]}]}
    assert "more than 3 deep" in refusal(mixed, max_depth=3)


def test_5000_deep_is_refused_before_json_recursion() -> None:
    assert "more than 64 deep" in refusal(nested(5000))
    assert "more than 64 deep" in refusal(nested(5000, "{", "}"))
    assert "more than 64 deep" in refusal(b'{"x": ' + b"[" * 100_000)  # unbalanced, still cut short


def test_brackets_inside_strings_do_not_count() -> None:
    raw = json.dumps({"a": "[[[[{{{{" * 50, "b": '"[[[[\\', "c": ["]]]]}}"]}).encode()
    assert parse_json_body(raw, max_depth=2) == json.loads(raw)
    escaped = b'["\\"[[[[[[", "\\\\", [["\\\\\\"[[["]]]'  # escaped quotes and backslashes around brackets
    assert parse_json_body(escaped, max_depth=3) == json.loads(escaped)
    assert "more than 2 deep" in refusal(escaped, max_depth=2)


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b'{"temperature": NaN}', "NaN is not a JSON number"),
        (b"[Infinity]", "Infinity is not a JSON number"),
        (b'{"x": -Infinity}', "-Infinity is not a JSON number"),
        (b'{"temperature": 1e400}', "the number 1e400 is too large for a 64-bit float"),
        (b"[-2.5e999]", "the number -2.5e999 is too large"),
    ],
)
def test_non_finite_numbers_are_refused(raw: bytes, fragment: str) -> None:
    assert fragment in refusal(raw)


def test_finite_numbers_and_big_integers_pass() -> None:
    assert parse_json_body(b"[1e308, -0.0, 10000000000000000000000000000000]") == [1e308, -0.0, 10**31]


def test_invalid_utf8_and_invalid_json() -> None:
    assert refusal(b'{"prompt": "\xff\xfe"}') == (
        "the request body is not valid UTF-8 (at byte 12); send JSON encoded as UTF-8"
    )
    assert refusal(b'{"prompt": "hi", ') == (
        "the request body is not valid JSON (JSON decode error: Expecting property name enclosed in double quotes "
        "at line 1 column 18)"
    )
    assert "not valid JSON" in refusal(b"")
    assert "4300 digits" in refusal(b"[" + b"7" * 5000 + b"]")


@pytest.mark.parametrize(
    "head",
    [
        b'{"prompt": ' + b"[1], " * 400_000,  # 2 MB, 800k brackets: the most work for the walk
        b'{"prompt": "' + b'\\"[' * 600_000 + b'", "x": ',  # escapes everywhere
        b'["' + b'\\"' * 1_000_000,  # escaped quotes and no string end: once quadratic
        b'"\\' * 1_000_000,
    ],
    ids=["brackets", "escapes", "open-string", "backslashes"],
)
def test_multi_megabyte_bodies_are_checked_in_linear_time(head: bytes) -> None:
    """Each body ends 100 deep, so the walk covers all of it (where a string left open swallows the end, the body
    is refused by json.loads instead)."""
    import time

    start = time.perf_counter()
    with pytest.raises(ApiError, match="more than 64 deep|not valid JSON"):
        parse_json_body(head + b"[" * 100)
    assert time.perf_counter() - start < 2.0


# ---- the router's shape check --------------------------------------------------------------------------------

CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "body, path",
    [
        ({"prompt": "hi"}, CMPL),
        ({"prompt": ["hi", "there"]}, CMPL),
        ({"prompt": [0, 1, 2**31 - 1]}, CMPL),
        ({"prompt": [[1, 2]], "max_tokens": None, "n": 1, "stream": True}, CMPL),
        ({"messages": HI, "max_tokens": 3, "max_completion_tokens": None, "unknown": [True, 1.5]}, CHAT),
        ({"messages": HI, "prompt": "also here"}, CHAT),
    ],
)
def test_shapes_that_pass(body: dict[str, Any], path: str) -> None:
    assert body_shape_problem(body, path) is None


@pytest.mark.parametrize(
    "body, path, problem",
    [
        ([1, 2], CMPL, "the request body must be a JSON object, not an array"),
        ("hi", CHAT, "the request body must be a JSON object, not a string"),
        ({"max_tokens": 1}, CMPL, "prompt is required"),
        ({"prompt": "hi"}, CHAT, "messages is required"),
        ({"prompt": [True, False]}, CMPL, "prompt: token id 0 is a boolean (true); token ids must be JSON integers"),
        ({"prompt": [1, 2.0]}, CMPL, "prompt: token id 1 is a float (2.0); token ids must be JSON integers"),
        ({"prompt": [[1], [2, "3"]]}, CMPL, "prompt: token id 1 is a string; token ids must be JSON integers"),
        ({"prompt": [10**30]}, CMPL, f"prompt: token id 0 is {10**30}; token ids are 0..2147483647"),
        ({"prompt": [-1]}, CMPL, "prompt: token id 0 is -1; token ids are 0..2147483647"),
        ({"prompt": []}, CMPL, f"prompt: must be {PROMPT_TYPES}; got an empty array"),
        ({"prompt": [[]]}, CMPL, "prompt: a list of token ids must not be empty"),
        ({"prompt": {"a": 1}}, CMPL, f"prompt: must be {PROMPT_TYPES}; got an object"),
        ({"prompt": None}, CMPL, f"prompt: must be {PROMPT_TYPES}; got null"),
        ({"messages": []}, CHAT, "messages: must be a non-empty array of message objects; got an array"),
        ({"messages": "hi"}, CHAT, "messages: must be a non-empty array of message objects; got a string"),
        ({"messages": [HI[0], "x"]}, CHAT, "messages: message 1 is a string; each message must be an object"),
        ({"messages": HI, "max_tokens": True}, CHAT, "max_tokens: must be an integer; got a boolean (true)"),
        ({"prompt": "hi", "max_tokens": 3.0}, CMPL, "max_tokens: must be an integer; got a float (3.0)"),
        ({"prompt": "hi", "max_tokens": "3"}, CMPL, "max_tokens: must be an integer; got a string"),
        ({"prompt": "hi", "n": None}, CMPL, "n: must be an integer; got null"),
        ({"prompt": "hi", "stream": "true"}, CMPL, "stream: must be true or false; got a string"),
        ({"prompt": "hi", "stream": 1}, CMPL, "stream: must be true or false; got an integer"),
    ],
)
def test_shapes_that_are_refused(body: Any, path: str, problem: str) -> None:
    assert body_shape_problem(body, path) == problem


# ---- the size limit as raw ASGI --------------------------------------------------------------------------------

LIMIT = 1000


def http_scope(headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": "/", "headers": headers}


def feeder(chunks: list[bytes]) -> Callable[[], Awaitable[Message]]:
    """A receive() that hands out `chunks` as one body, then waits forever (as a live client would)."""
    queue = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    calls: list[int] = []

    async def receive() -> Message:
        calls.append(1)
        if queue:
            return queue.pop(0)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    receive.calls = calls  # type: ignore[attr-defined]
    return receive


async def run(app: Any, scope: dict[str, Any], receive: Callable[[], Awaitable[Message]]) -> list[Message]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await RequestSizeLimit(app, LIMIT)(scope, receive, send)
    return sent


async def reading_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads the whole body and echoes its length."""
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(size).encode()})


def answer(sent: list[Message]) -> tuple[int, dict[str, Any], dict[bytes, bytes]]:
    start, body = sent
    assert body.get("more_body", False) is False
    return start["status"], json.loads(body["body"]), dict(start["headers"])


def test_content_length_over_the_limit_is_refused_before_the_app_runs() -> None:
    called: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        called.append(True)

    receive = feeder([b"x" * 10])
    sent = asyncio.run(run(app, http_scope([(b"content-length", b"100000000")]), receive))
    status, body, headers = answer(sent)
    assert status == 413 and headers[b"connection"] == b"close"
    assert body == {
        "error": {
            "message": "the request body has 100000000 bytes; this server accepts at most 1000 (--max-request-bytes)",
            "type": "invalid_request_error",
            "code": "request_too_large",
        }
    }
    assert not called  # the app never ran; the body was read only to be thrown away (so the client gets the 413)


def test_chunked_body_over_the_limit_stops_reading_and_is_a_413() -> None:
    receive = feeder([b"x" * 600, b"x" * 600, b"x" * 600])
    sent = asyncio.run(run(reading_app, http_scope([(b"transfer-encoding", b"chunked")]), receive))
    status, body, headers = answer(sent)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert b"connection" not in headers  # the server discards the rest and keeps the connection: the client reads this
    assert body["error"]["message"] == (
        "the request body is larger than 1000 bytes, this server's limit (--max-request-bytes)"
    )
    assert len(receive.calls) == 2  # type: ignore[attr-defined]  # the third chunk is never read


def test_an_app_answer_after_the_limit_is_replaced_by_the_413() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:
            await reading_app(scope, receive, send)
        except Exception:  # as FastAPI's body parsing does: any error is its own 400
            await send({"type": "http.response.start", "status": 400, "headers": []})
            await send({"type": "http.response.body", "body": b"There was an error parsing the body"})

    sent = asyncio.run(run(app, http_scope([]), feeder([b"x" * 1001])))
    assert answer(sent)[0] == 413


def test_under_the_limit_passes_through() -> None:
    sent = asyncio.run(run(reading_app, http_scope([(b"content-length", b"1000")]), feeder([b"x" * 1000])))
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"1000"
    sent = asyncio.run(run(reading_app, http_scope([]), feeder([b"x" * 500, b"x" * 500])))
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"1000"


def test_a_streaming_response_is_not_buffered() -> None:
    """The app sends its second chunk only once the first has reached the client: a buffering middleware
    would never pass the first on, and this would time out."""

    async def main() -> list[bytes]:
        delivered = asyncio.Event()
        got: list[bytes] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await receive()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"one", "more_body": True})
            await asyncio.wait_for(delivered.wait(), 2)
            await send({"type": "http.response.body", "body": b"two"})

        async def send(message: Message) -> None:
            if message["type"] == "http.response.body":
                got.append(message["body"])
                delivered.set()

        await RequestSizeLimit(app, LIMIT)(http_scope([]), feeder([b"{}"]), send)
        return got

    assert asyncio.run(main()) == [b"one", b"two"]


def test_other_scopes_pass_through_and_the_limit_must_be_positive() -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    asyncio.run(RequestSizeLimit(app, 1)({"type": "lifespan"}, feeder([]), feeder([])))  # type: ignore[arg-type]
    assert seen == ["lifespan"]
    with pytest.raises(ValueError, match="--max-request-bytes must be >= 1, got 0"):
        RequestSizeLimit(app, 0)


# ---- a FastAPI app with both: the size limit and the JSON body route -------------------------------------------


class Body(BaseModel):
    prompt: str
    temperature: float = 1.0


def make_app() -> FastAPI:
    app = FastAPI()
    app.router.route_class = JsonBodyRoute
    app.add_middleware(RequestSizeLimit, max_bytes=LIMIT)
    add_error_handlers(app, __import__("logging").getLogger("test"), "test")

    @app.post("/echo")
    async def echo(body: Body) -> dict[str, Any]:
        return body.model_dump()

    @app.post("/stream")
    async def stream() -> Any:
        from fastapi.responses import StreamingResponse

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"data: {i}\n\n".encode()

        return StreamingResponse(chunks(), media_type="text/event-stream")

    return app


async def post(content: Any, path: str = "/echo", **headers: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=make_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.post(path, content=content, headers=headers)


JSON = {"content-type": "application/json"}


def test_route_answers_bad_json_bodies_with_the_openai_shape() -> None:
    deep = asyncio.run(post(nested(500), **JSON))
    assert deep.status_code == 400 and deep.json()["error"]["code"] == "invalid_request"
    assert "more than 64 deep" in deep.json()["error"]["message"]
    nan = asyncio.run(post(b'{"prompt": "x", "temperature": NaN}', **JSON))
    assert nan.status_code == 400 and nan.json()["error"]["message"] == "NaN is not a JSON number; send a finite number"
    ok = asyncio.run(
        post(b'{"prompt": "x", "temperature": 0.5}', **{"content-type": "application/json; charset=utf-8"})
    )
    assert ok.status_code == 200 and ok.json() == {"prompt": "x", "temperature": 0.5}
    not_json_type = asyncio.run(post(nested(500), **{"content-type": "text/plain"}))  # FastAPI's own, as before
    assert not_json_type.status_code == 400 and "body" in not_json_type.json()["error"]["message"]


def test_size_limit_through_fastapi_and_httpx() -> None:
    over = asyncio.run(post(b'{"prompt": "' + b"x" * LIMIT + b'"}', **JSON))
    assert over.status_code == 413 and over.json()["error"]["code"] == "request_too_large"

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield b" " * 300

    over_chunked = asyncio.run(post(chunked(), **JSON))
    assert over_chunked.status_code == 413 and "larger than 1000 bytes" in over_chunked.json()["error"]["message"]
    streamed = asyncio.run(post(b"", "/stream"))
    assert streamed.status_code == 200 and streamed.text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"


def test_is_json() -> None:
    assert is_json("application/json") and is_json("Application/JSON; charset=utf-8") and is_json("application/x+json")
    assert not is_json(None) and not is_json("text/plain") and not is_json("application/jsonl")


# ---- the API server's protocol: strict token ids, finite floats ------------------------------------------------


@pytest.mark.parametrize(
    "prompt, fragment",
    [
        ([True, False], "token id 0 is a boolean (true); token ids must be JSON integers"),
        ([1.0], "token id 0 is a float (1.0)"),
        ([[5, 2.5]], "token id 1 is a float (2.5)"),
        ([1, "2"], "token id 1 is a string"),
        ([1, 10**30], "less than or equal to 2147483647"),
    ],
)
def test_prompt_token_ids_are_strict(prompt: Any, fragment: str) -> None:
    with pytest.raises(ValidationError, match=None) as e:
        CompletionRequest(prompt=prompt)
    assert fragment in str(e.value)


def test_valid_prompts_still_pass() -> None:
    assert CompletionRequest(prompt=[1, 2]).prompt == [[1, 2]]  # always a list of prompts once validated
    assert CompletionRequest(prompt=[[3]]).prompt == [[3]]
    assert CompletionRequest(prompt=["1"]).prompt == ["1"]  # a batch of one string, not an id


@pytest.mark.parametrize("value", [True, 1.0, "1"])
def test_stop_token_ids_are_strict(value: Any) -> None:
    with pytest.raises(ValidationError, match="stop_token_ids.0"):
        CompletionRequest(prompt="x", stop_token_ids=[value])


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), "nan", "-Infinity"])
def test_float_fields_refuse_nan_and_inf(field: str, value: Any) -> None:
    with pytest.raises(ValidationError, match=f"{field}\n  Input should be a finite number"):
        ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **{field: value})
