"""Property-based fuzz of request bodies against a real `pdserve serve`: never a 5xx.

Hypothesis builds bodies for /v1/completions and /v1/chat/completions with
every field present, missing or of a random type (nested junk, huge numbers,
NaN, unicode, lone surrogates), unknown extra fields, non-object bodies and
raw bytes. Every answer is a 200 that completes properly or an OpenAI-style
4xx; afterwards the server is healthy, idle, and logged no traceback.

Bounds that keep it fast: a valid request generates at most 3 tokens (or the
completions default of 16); a `max_tokens` that would be coerced into a long
run is never drawn, and chat bodies always carry max_tokens (without it a chat
request may generate up to the whole context).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

pytest.register_assert_rewrite("server_fixtures")  # before the import below: its asserts explain failures

from server_fixtures import (  # noqa: E402
    MAX_MODEL_LEN,
    MODEL_NAME,
    VOCAB_SIZE,
    ServerProcess,
    assert_openai_error,
    sse_events,
    wait_idle,
)

pytest_plugins = ["server_fixtures"]  # the server fixtures, shared by the test_server_* modules

MAX_EXAMPLES = 150
FUZZ = settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))

# NOTE: lone surrogates are left out of completion prompts only: they are a known 500
# (test_server_errors.py::test_lone_surrogate_in_prompt_is_a_400); everywhere else they are drawn.
TEXT_SAFE = st.text(max_size=24)
TEXT = st.one_of(
    TEXT_SAFE, TEXT_SAFE, TEXT_SAFE, st.text(st.one_of(st.characters(), st.characters(categories=["Cs"])), max_size=24)
)


def junk(text: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80), st.floats(), text)
    return st.recursive(
        scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4), max_leaves=8
    )


JUNK = junk(TEXT)
JUNK_SAFE = junk(TEXT_SAFE)


def runs_long(value: Any) -> bool:
    """Whether pydantic's lax int coercion could make `value` a max_tokens of 4 or more that fits the context."""
    if isinstance(value, bool):
        return False
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return False
    if isinstance(value, (int, float)):
        return math.isfinite(value) and 4 <= value < MAX_MODEL_LEN
    return False


SHORT_OR_BAD_MAX_TOKENS = st.one_of(
    st.integers(1, 3),
    st.integers(max_value=0),
    st.integers(min_value=MAX_MODEL_LEN),
    JUNK.filter(lambda v: v is not None and not runs_long(v)),
)
TOKEN_IDS = st.lists(st.integers(0, VOCAB_SIZE - 1), min_size=1, max_size=12)
ROLES = ["system", "user", "assistant", "tool", "developer"]

# Valid values, edge cases included (tiny temperatures and top_p, long stop lists, unicode).
VALID_COMMON = {
    "model": st.one_of(st.just(MODEL_NAME), st.none()),
    "max_tokens": st.integers(1, 3),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1, exclude_min=True),
    "top_k": st.integers(-1, 60000),
    "min_p": st.floats(0, 1),
    "seed": st.one_of(st.none(), st.integers(0, 2**63 - 1)),
    "stop": st.one_of(st.none(), TEXT.filter(bool), st.lists(TEXT.filter(bool), max_size=4)),
    "stop_token_ids": st.lists(st.integers(0, VOCAB_SIZE - 1), max_size=4),
    "ignore_eos": st.booleans(),
    "n": st.just(1),
    "stream": st.booleans(),
    "stream_options": st.one_of(st.none(), st.fixed_dictionaries({}, optional={"include_usage": st.booleans()})),
    "user": TEXT,
}
VALID_COMPLETION = {
    **VALID_COMMON,
    "prompt": st.one_of(
        TEXT_SAFE.filter(bool),
        TOKEN_IDS,
        st.lists(TEXT_SAFE.filter(bool), min_size=1, max_size=1),
        st.lists(TOKEN_IDS, min_size=1, max_size=1),
    ),
    "logprobs": st.one_of(st.none(), st.integers(0, 20)),
    "echo": st.booleans(),
}
TEXT_PART = st.fixed_dictionaries({"type": st.just("text"), "text": TEXT})
VALID_CHAT = {
    **VALID_COMMON,
    "messages": st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(ROLES), "content": st.one_of(TEXT_SAFE, TEXT, st.lists(TEXT_PART, max_size=2))},
            optional={"name": TEXT},
        ),
        min_size=1,
        max_size=3,
    ),
    "logprobs": st.booleans(),
    "top_logprobs": st.one_of(st.none(), st.integers(0, 20)),
    "max_completion_tokens": st.one_of(st.none(), st.integers(1, 3)),
}
# What a corrupted field gets instead (JUNK unless named here).
BAD_COMPLETION = {"prompt": JUNK_SAFE, "max_tokens": st.one_of(st.none(), SHORT_OR_BAD_MAX_TOKENS)}
BAD_CHAT = {
    "max_tokens": SHORT_OR_BAD_MAX_TOKENS,
    "messages": st.one_of(
        JUNK,
        st.lists(
            st.one_of(
                JUNK, st.fixed_dictionaries({}, optional={"role": st.one_of(TEXT, JUNK), "content": JUNK, "name": JUNK})
            ),
            max_size=3,
        ),
    ),
}


@st.composite
def body_objects(
    draw: Any, valid: dict[str, st.SearchStrategy[Any]], bad: dict[str, st.SearchStrategy[Any]], keep: tuple[str, ...]
) -> dict[str, Any]:
    """A valid body with up to 2 fields corrupted, maybe one dropped (never one in `keep`), plus unknown fields."""
    core = ("max_tokens", "prompt", "messages")
    body = draw(
        st.fixed_dictionaries(
            {k: v for k, v in valid.items() if k in core}, optional={k: v for k, v in valid.items() if k not in core}
        )
    )
    num_bad = draw(st.sampled_from([0, 0, 0, 1, 1, 2]))  # most bodies are valid, so most requests generate
    for key in draw(st.lists(st.sampled_from(sorted(valid)), min_size=num_bad, max_size=num_bad, unique=True)):
        body[key] = draw(bad.get(key, JUNK))
    droppable = sorted(k for k in body if k not in keep)
    if droppable and draw(st.sampled_from([False, False, False, True])):
        del body[draw(st.sampled_from(droppable))]
    extra = draw(st.dictionaries(TEXT, JUNK, max_size=2))
    return {**{k: v for k, v in extra.items() if k not in valid}, **body}


def bodies(
    valid: dict[str, st.SearchStrategy[Any]], bad: dict[str, st.SearchStrategy[Any]], keep: tuple[str, ...] = ()
) -> st.SearchStrategy[bytes]:
    """JSON of a (mostly valid) object; one time in ten JSON of anything, or raw bytes."""
    objects = body_objects(valid, bad, keep).map(lambda b: json.dumps(b).encode())
    anything = JUNK.map(lambda b: json.dumps(b).encode())
    return st.sampled_from(["object"] * 18 + ["anything", "bytes"]).flatmap(
        lambda kind: objects if kind == "object" else anything if kind == "anything" else st.binary(max_size=40)
    )


def check(server: ServerProcess, client: httpx.Client, path: str, body: bytes) -> None:
    r = client.post(f"{server.url}{path}", content=body, headers={"content-type": "application/json"})
    event(f"{r.status_code} {r.headers['content-type'].split(';')[0]}")  # see --hypothesis-show-statistics
    assert r.status_code < 500, f"{r.status_code} for {body!r}: {r.text}"
    if r.status_code != 200:
        assert r.status_code in (400, 404), f"{r.status_code} for {body!r}: {r.text}"
        assert_openai_error(r, r.status_code)
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        events = sse_events(r.text)
        assert events[-1] == "[DONE]", events
        chunks = [e for e in events[:-1] if e["choices"]]
        assert not any("error" in e for e in events[:-1]), events
        reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
        assert reasons in (["stop"], ["length"]), events
    else:
        answer = r.json()
        assert answer["choices"][0]["finish_reason"] in ("stop", "length"), answer
        assert 1 <= answer["usage"]["completion_tokens"] <= 16, answer


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(headers=server.headers, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def log_start(server: ServerProcess) -> int:
    return len(server.log_text())


@FUZZ
@given(body=bodies(VALID_COMPLETION, BAD_COMPLETION))
def test_fuzz_completions(server: ServerProcess, client: httpx.Client, log_start: int, body: bytes) -> None:
    check(server, client, "/v1/completions", body)


@FUZZ
@given(body=bodies(VALID_CHAT, BAD_CHAT, keep=("max_tokens",)))
def test_fuzz_chat(server: ServerProcess, client: httpx.Client, log_start: int, body: bytes) -> None:
    check(server, client, "/v1/chat/completions", body)


def test_after_the_fuzz_the_server_is_healthy_and_idle(server: ServerProcess, log_start: int) -> None:
    assert httpx.get(f"{server.url}/health", timeout=10).json() == {"status": "ok"}
    m = wait_idle(server.url, timeout_s=15)
    assert m["pdserve_kv_blocks_free"] == m["pdserve_kv_blocks_total"]
    log = server.log_text()[log_start:]
    assert "Traceback" not in log and "internal error" not in log, log[-5000:]
