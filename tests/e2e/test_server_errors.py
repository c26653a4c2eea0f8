"""Bad input to a real `pdserve serve`: the right status and an OpenAI-style error that says what to fix.

Every error body is exactly {"error": {"message", "type", "code"}}; no user
input produces a 5xx or a traceback. The API key guards /v1/* only.
"""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

pytest.register_assert_rewrite("server_fixtures")  # before the import below: its asserts explain failures

from server_fixtures import (  # noqa: E402
    API_KEY,
    MAX_MODEL_LEN,
    MODEL_NAME,
    VOCAB_SIZE,
    ServerProcess,
    assert_openai_error,
    wait_idle,
)

pytest_plugins = ["server_fixtures"]  # the server fixtures, shared by the test_server_* modules

CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]
INVALID = "invalid_request"
TOO_LONG = "context_length_exceeded"

# (path, body: a dict sent as JSON or bytes sent as they are, status, code, fragments of the message)
BAD_INPUTS: dict[str, tuple[str, Any, int, str | None, list[str]]] = {
    "bad-json": (CMPL, b'{"prompt": "hi", ', 400, INVALID, ["JSON decode error"]),
    "bad-json-chat": (CHAT, b'{"messages": [}', 400, INVALID, ["JSON decode error"]),
    "not-an-object": (CMPL, b"[1, 2]", 400, INVALID, ["body: Input should be a valid dictionary"]),
    "missing-prompt": (CMPL, {"max_tokens": 4}, 400, INVALID, ["prompt: Field required"]),
    "missing-messages": (CHAT, {"max_tokens": 4}, 400, INVALID, ["messages: Field required"]),
    "max-tokens-0": (
        CMPL,
        {"prompt": "hi", "max_tokens": 0},
        400,
        INVALID,
        ["max_tokens: Input should be greater than or equal to 1"],
    ),
    "max-tokens-negative-chat": (
        CHAT,
        {"messages": HI, "max_tokens": -3},
        400,
        INVALID,
        ["max_tokens: Input should be greater than or equal to 1"],
    ),
    "max-tokens-text": (CMPL, {"prompt": "hi", "max_tokens": "lots"}, 400, INVALID, ["max_tokens: "]),
    "prompt-too-long": (
        CMPL,
        {"prompt": [1] * 9000, "max_tokens": 1},
        400,
        TOO_LONG,
        ["the prompt has 9000 tokens", f"maximum context length is {MAX_MODEL_LEN}", "at most 8191"],
    ),
    "prompt-fills-context": (
        CMPL,
        {"prompt": [1] * MAX_MODEL_LEN, "max_tokens": 1},
        400,
        TOO_LONG,
        ["the prompt has 8192 tokens", "at most 8191", "shorten it"],
    ),
    "text-prompt-too-long": (
        CMPL,
        {"prompt": "hello " * 9000},
        400,
        TOO_LONG,
        ["the prompt has 9001 tokens", f"maximum context length is {MAX_MODEL_LEN}"],
    ),
    "chat-too-long": (
        CHAT,
        {"messages": [{"role": "user", "content": "hello " * 9000}], "max_tokens": 1},
        400,
        TOO_LONG,
        ["the prompt has 9031 tokens", f"maximum context length is {MAX_MODEL_LEN}"],
    ),
    "prompt-plus-max-tokens": (
        CMPL,
        {"prompt": [1] * 100, "max_tokens": 8100},
        400,
        TOO_LONG,
        [
            "the prompt has 100 tokens and max_tokens is 8100: 8200 in all",
            f"maximum context length of {MAX_MODEL_LEN}",
            "lower max_tokens to at most 8092",
        ],
    ),
    "chat-plus-max-completion-tokens": (
        CHAT,
        {"messages": HI, "max_completion_tokens": 9000},
        400,
        TOO_LONG,
        ["the prompt has 31 tokens", "9031 in all", "at most 8161"],
    ),
    "top-p-0": (CMPL, {"prompt": "hi", "top_p": 0}, 400, INVALID, ["top_p: Input should be greater than 0"]),
    "top-p-1.5": (
        CHAT,
        {"messages": HI, "top_p": 1.5},
        400,
        INVALID,
        ["top_p: Input should be less than or equal to 1"],
    ),
    "temperature-negative": (
        CMPL,
        {"prompt": "hi", "temperature": -1},
        400,
        INVALID,
        ["temperature: Input should be greater than or equal to 0"],
    ),
    "temperature-negative-chat": (CHAT, {"messages": HI, "temperature": -1}, 400, INVALID, ["temperature: "]),
    "top-k-below-minus-1": (CMPL, {"prompt": "hi", "top_k": -2}, 400, INVALID, ["top_k: "]),
    "min-p-2": (CMPL, {"prompt": "hi", "min_p": 2}, 400, INVALID, ["min_p: "]),
    "n-65": (CMPL, {"prompt": "hi", "n": 65}, 400, INVALID, ["n: Input should be less than or equal to 64"]),
    "n-65-chat": (CHAT, {"messages": HI, "n": 65}, 400, INVALID, ["n: Input should be less than or equal to 64"]),
    "unknown-model": (
        CMPL,
        {"prompt": "hi", "model": "gpt-4"},
        404,
        "model_not_found",
        ["model 'gpt-4' does not exist", f"this server serves '{MODEL_NAME}'"],
    ),
    "unknown-model-chat": (CHAT, {"messages": HI, "model": "gpt-4"}, 404, "model_not_found", ["'gpt-4'"]),
    "token-id-too-big": (
        CMPL,
        {"prompt": [5, VOCAB_SIZE, 7]},
        400,
        None,
        [f"token id {VOCAB_SIZE} is outside the vocabulary [0, {VOCAB_SIZE})"],
    ),
    "token-id-negative": (
        CMPL,
        {"prompt": [-1]},
        400,
        INVALID,
        ["prompt.list[constrained-int].0: Input should be greater than or equal to 0"],
    ),
    "empty-prompt": (CMPL, {"prompt": ""}, 400, INVALID, ["prompt: ", "the prompt is empty"]),
    "empty-token-list": (CMPL, {"prompt": []}, 400, INVALID, ["the prompt is an empty list of token ids"]),
    "too-many-choices": (CMPL, {"prompt": ["a", "b"], "n": 33}, 400, INVALID, ["2 prompts times n=33 is more than 64"]),
    "prompt-wrong-type": (CMPL, {"prompt": 5}, 400, INVALID, ["prompt.str: Input should be a valid string"]),
    "prompt-object": (CMPL, {"prompt": {"text": "hi"}}, 400, INVALID, ["prompt"]),
    "empty-messages": (CHAT, {"messages": []}, 400, INVALID, ["messages: List should have at least 1 item"]),
    "messages-wrong-type": (CHAT, {"messages": "hi"}, 400, INVALID, ["messages: Input should be a valid list"]),
    "bad-role": (
        CHAT,
        {"messages": [{"role": "robot", "content": "hi"}]},
        400,
        INVALID,
        ["messages.0.role: Input should be 'system', 'user', 'assistant', 'tool' or 'developer'"],
    ),
    "image-content": (
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        None,
        ["only text content parts are supported"],
    ),
    "top-logprobs-without-logprobs": (
        CHAT,
        {"messages": HI, "top_logprobs": 2},
        400,
        None,
        ["top_logprobs needs logprobs: true"],
    ),
    "top-logprobs-21": (
        CHAT,
        {"messages": HI, "logprobs": True, "top_logprobs": 21},
        400,
        INVALID,
        ["top_logprobs: Input should be less than or equal to 20"],
    ),
    "logprobs-21": (
        CMPL,
        {"prompt": "hi", "logprobs": 21},
        400,
        INVALID,
        ["logprobs: Input should be less than or equal to 20"],
    ),
    "empty-stop": (CMPL, {"prompt": "hi", "stop": [""]}, 400, INVALID, ["stop sequences must not be empty"]),
    "five-stops": (
        CMPL,
        {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]},
        400,
        INVALID,
        ["at most 4 stop sequences"],
    ),
    "negative-seed": (CMPL, {"prompt": "hi", "seed": -1}, 400, INVALID, ["seed: "]),
    "stream-options-wrong-type": (
        CMPL,
        {"prompt": "hi", "stream": True, "stream_options": 5},
        400,
        INVALID,
        ["stream_options: "],
    ),
    "bad-stream-body": (CMPL, {"prompt": "", "stream": True}, 400, INVALID, ["the prompt is empty"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_status_and_message(server: ServerProcess, case: str) -> None:
    path, body, status, code, fragments = BAD_INPUTS[case]
    kwargs: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(
        f"{server.url}{path}", headers={**server.headers, "content-type": "application/json"}, timeout=60, **kwargs
    )
    assert_openai_error(r, status, code, *fragments)


def test_bad_inputs_leave_nothing_running(server: ServerProcess) -> None:
    m = wait_idle(server.url, timeout_s=5)
    assert m["pdserve_kv_blocks_free"] == m["pdserve_kv_blocks_total"]
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


@pytest.mark.parametrize("method, path", [("GET", "/v1/models"), ("POST", CMPL), ("POST", CHAT)])
@pytest.mark.parametrize("key", [None, "wrong-key", API_KEY.upper()])
def test_api_key_is_enforced(server: ServerProcess, method: str, path: str, key: str | None) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.request(
        method,
        f"{server.url}{path}",
        headers=headers,
        timeout=30,
        json={"prompt": "hi", "messages": HI, "max_tokens": 1},
    )
    assert_openai_error(r, 401, "invalid_api_key", "missing or wrong API key", "send 'Authorization: Bearer <key>'")


def test_api_key_is_checked_before_the_body(server: ServerProcess) -> None:
    r = httpx.post(f"{server.url}{CMPL}", content=b"{not json", timeout=30)
    assert_openai_error(r, 401, "invalid_api_key")


def test_api_key_with_the_openai_client(server: ServerProcess) -> None:
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=1)
    assert e.value.status_code == 401
    right = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    assert right.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=1).usage.completion_tokens == 1


def test_health_and_metrics_need_no_key(server: ServerProcess) -> None:
    r = httpx.get(f"{server.url}/health", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/metrics", timeout=10).status_code == 200


def test_unknown_route_and_wrong_method_are_openai_errors(server: ServerProcess) -> None:
    assert_openai_error(httpx.get(f"{server.url}/v1/nothing-here", headers=server.headers, timeout=10), 404)
    assert_openai_error(httpx.get(f"{server.url}{CMPL}", headers=server.headers, timeout=10), 405)


# ---- integers that once overflowed msgspec or torch ---------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("top_k", 2**70, "top_k: Input should be less than or equal to 2147483647"),
        ("top_k", 2**64 - 1, "top_k: Input should be less than or equal to 2147483647"),  # once killed the engine
        ("stop_token_ids", [2**70], "stop_token_ids.0: Input should be less than or equal to 2147483647"),
        ("prompt", [1, 2**70], "prompt.list[constrained-int].1: Input should be less than or equal to 2147483647"),
        ("seed", 2**63, "seed: Input should be less than or equal to 9223372036854775807"),
    ],
)
def test_huge_integers_are_a_400(server: ServerProcess, field: str, value: Any, fragment: str) -> None:
    r = httpx.post(
        f"{server.url}{CMPL}", headers=server.headers, timeout=30, json={"prompt": "hi", "max_tokens": 1, field: value}
    )
    assert_openai_error(r, 400, INVALID, fragment)
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


# ---- known bugs: user input that still produces a 500 -------------------------------------------------------


def test_lone_surrogate_in_prompt_is_a_400(server: ServerProcess) -> None:
    r = httpx.post(
        f"{server.url}{CMPL}",
        headers={**server.headers, "content-type": "application/json"},
        timeout=30,
        content=b'{"prompt": "abc \\ud800", "max_tokens": 1}',
    )
    assert_openai_error(r, 400, None, "prompt")


@pytest.mark.parametrize("part", [{"type": "text"}, {"type": "text", "text": {"nested": 1}}])
def test_text_part_without_text_is_a_400(server: ServerProcess, part: dict[str, Any]) -> None:
    r = httpx.post(
        f"{server.url}{CHAT}",
        headers=server.headers,
        timeout=60,
        json={"messages": [{"role": "user", "content": [part]}], "max_tokens": 1},
    )
    assert_openai_error(r, 400, None, "text")


def test_server_survives_the_known_500(server: ServerProcess) -> None:
    m = wait_idle(server.url, timeout_s=5)
    assert m["pdserve_kv_blocks_free"] == m["pdserve_kv_blocks_total"]
    r = httpx.post(f"{server.url}{CMPL}", headers=server.headers, timeout=60, json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
