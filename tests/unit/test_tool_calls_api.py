"""Tool calls through the API server (`tool_choice` "auto" and "none"), over HTTP, with a stub engine client.

The default 135M model never calls a tool on its own, so the engine here is a stub that "writes" a given text:
its `generate` yields the text's token ids (the default model's tokenizer) one per delta, then EOS with
finish_reason "stop", as the engine core does. The app is the real one (`build_app`); its lifespan, which would
start an engine core, does not run outside `with TestClient(...)`. The parsing itself is tested in
test_tool_calls.py; this file checks what the endpoint makes of it: message content, tool_calls, finish_reason,
streamed deltas, and what the model is told.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from pdserve.messages import EngineStats, RequestDelta, WireSamplingParams
from pdserve.server.api import ServerSettings, build_app

MODEL = "m"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TEXT_AND_CALL = "Sure.\n" + CALL
TIME_CALL = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
PLAIN = "The weather in Paris is mild."
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


class StubEngine:
    """Just enough of AsyncEngineClient for Serving: ready, never full, and generating `text` for every request."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.config = SimpleNamespace(scheduler=SimpleNamespace(max_num_seqs=4))
        self.info = SimpleNamespace(max_model_len=4096, vocab_size=len(tokenizer))
        self.failure: str | None = None
        self.stall: str | None = None
        self.is_ready = True
        self.is_healthy = True
        self.num_open_requests = 0
        self.stats = EngineStats()
        self.text = ""
        self.finish_reason = "stop"  # "stop": the text then EOS; "length": the text, cut by max_tokens
        self.prompts: list[list[int]] = []  # each request's prompt, in arrival order
        self.samplings: list[WireSamplingParams] = []

    async def generate(
        self,
        req_id: str,
        prompt_token_ids: list[int],
        sampling: WireSamplingParams,
        transfer: Any = None,
        idle_s: float | None = None,
        after: str | None = None,
    ) -> AsyncIterator[RequestDelta | None]:
        self.prompts.append(list(prompt_token_ids))
        self.samplings.append(sampling)
        ids = self.tokenizer.encode(self.text, add_special_tokens=False)
        if self.finish_reason == "stop":
            ids.append(self.tokenizer.eos_token_id)
        for i, token_id in enumerate(ids):
            yield RequestDelta(req_id, [token_id], finish_reason=self.finish_reason if i == len(ids) - 1 else None)

    async def abort(self, req_id: str, finish_reason: str = "abort") -> None:
        return None


@pytest.fixture(scope="module")
def tokenizer(default_hf_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_hf_dir))


@pytest.fixture
def engine(tokenizer: Any) -> StubEngine:
    return StubEngine(tokenizer)


@pytest.fixture
def http(engine: StubEngine, tokenizer: Any) -> Iterator[TestClient]:
    app = build_app(engine, tokenizer, ServerSettings(model_name=MODEL))  # type: ignore[arg-type]
    yield TestClient(app, raise_server_exceptions=False)


def chat(http: TestClient, **fields: Any) -> dict[str, Any]:
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def stream_chat(http: TestClient, **fields: Any) -> list[dict[str, Any]]:
    """The chunks of a streamed chat completion, [DONE] checked and dropped."""
    body = {"model": MODEL, "messages": MESSAGES, "stream": True, **fields}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, r.read().decode()
        text = r.read().decode()
    events = [block.removeprefix("data: ") for block in text.split("\n\n") if block.strip()]
    assert events[-1] == "[DONE]", events[-1]
    return [json.loads(e) for e in events[:-1]]


def test_auto_splits_content_and_call(http: TestClient, engine: StubEngine, tokenizer: Any) -> None:
    engine.text = TEXT_AND_CALL
    body = chat(http, tools=[WEATHER], tool_choice="auto")
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["role"] == "assistant"
    assert message["content"] == "Sure."
    (call,) = message["tool_calls"]
    assert call["type"] == "function"
    assert call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    # "auto" is unconstrained, and the model was told about the tool (the template renders no tools: a system message)
    assert engine.samplings[-1].grammar is None
    prompt = tokenizer.decode(engine.prompts[-1])
    assert "<tools>" in prompt and '"get_weather"' in prompt, prompt
    assert body["usage"]["completion_tokens"] == len(tokenizer.encode(TEXT_AND_CALL, add_special_tokens=False)) + 1


def test_auto_is_the_default_with_tools(http: TestClient, engine: StubEngine) -> None:
    engine.text = TEXT_AND_CALL
    (choice,) = chat(http, tools=[WEATHER])["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Sure."
    assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["get_weather"]


def test_auto_streams_content_then_one_call_delta(http: TestClient, engine: StubEngine) -> None:
    engine.text = TEXT_AND_CALL
    chunks = stream_chat(http, tools=[WEATHER], tool_choice="auto")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    choices = [c["choices"][0] for c in chunks]
    assert all(c["index"] == 0 for c in choices)
    assert choices[0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["delta"] for c in choices[1:]]
    assert "".join(d.get("content", "") for d in deltas) == "Sure."
    call_deltas = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert len(call_deltas) == 1, deltas
    (call,) = call_deltas[0]
    assert call["index"] == 0
    assert call["id"].startswith("call_")
    assert call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    # the text of the call never reaches the client as content
    assert not any("<tool_call>" in d.get("content", "") or "Paris" in d.get("content", "") for d in deltas)
    assert [c["finish_reason"] for c in choices] == [None] * (len(choices) - 1) + ["tool_calls"]


def test_auto_without_a_call_is_plain_content(http: TestClient, engine: StubEngine) -> None:
    engine.text = PLAIN
    (choice,) = chat(http, tools=[WEATHER], tool_choice="auto")["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["message"] == {"role": "assistant", "content": PLAIN}
    choices = [c["choices"][0] for c in stream_chat(http, tools=[WEATHER], tool_choice="auto")]
    assert "".join(c["delta"].get("content") or "" for c in choices) == PLAIN
    assert not any("tool_calls" in c["delta"] for c in choices)
    assert choices[-1]["finish_reason"] == "stop"


def test_none_keeps_the_call_text_as_content(http: TestClient, engine: StubEngine, tokenizer: Any) -> None:
    engine.text = TEXT_AND_CALL
    (choice,) = chat(http, tools=[WEATHER], tool_choice="none")["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["message"] == {"role": "assistant", "content": TEXT_AND_CALL}
    assert "<tools>" not in tokenizer.decode(engine.prompts[-1])  # "none": the model is not told about the tools
    assert engine.samplings[-1].grammar is None
    choices = [c["choices"][0] for c in stream_chat(http, tools=[WEATHER], tool_choice="none")]
    assert "".join(c["delta"].get("content") or "" for c in choices) == TEXT_AND_CALL
    assert not any("tool_calls" in c["delta"] for c in choices)
    assert choices[-1]["finish_reason"] == "stop"


def test_without_tools_the_call_text_is_content(http: TestClient, engine: StubEngine) -> None:
    engine.text = TEXT_AND_CALL
    (choice,) = chat(http)["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["message"] == {"role": "assistant", "content": TEXT_AND_CALL}


def test_auto_returns_every_call_in_order(http: TestClient, engine: StubEngine) -> None:
    """parallel_tool_calls is not enforced under "auto": each block the model writes is a call."""
    engine.text = f"{CALL}\n{TIME_CALL}"
    tools = [WEATHER, {"type": "function", "function": {"name": "get_time"}}]
    (choice,) = chat(http, tools=tools, parallel_tool_calls=False)["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    functions = [c["function"] for c in choice["message"]["tool_calls"]]
    assert functions == [
        {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"name": "get_time", "arguments": "{}"},
    ]
    assert len({c["id"] for c in choice["message"]["tool_calls"]}) == 2
    choices = [c["choices"][0] for c in stream_chat(http, tools=tools)]
    streamed = [call for c in choices for call in c["delta"].get("tool_calls", [])]
    assert [(c["index"], c["function"]) for c in streamed] == list(enumerate(functions))
    assert not any(c["delta"].get("content") for c in choices)
    assert choices[-1]["finish_reason"] == "tool_calls"


def test_auto_call_cut_by_max_tokens_stays_length(http: TestClient, engine: StubEngine) -> None:
    """A call parsed out of a completion that max_tokens cut keeps finish_reason "length"."""
    engine.text, engine.finish_reason = TEXT_AND_CALL, "length"
    (choice,) = chat(http, tools=[WEATHER])["choices"]
    assert choice["finish_reason"] == "length"
    assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["get_weather"]
    choices = [c["choices"][0] for c in stream_chat(http, tools=[WEATHER])]
    assert choices[-1]["finish_reason"] == "length"


def test_auto_unterminated_call_is_content(http: TestClient, engine: StubEngine) -> None:
    """A block still open when the completion ends is not a call: its text is content, whole and streamed."""
    engine.text = TEXT_AND_CALL.removesuffix("</tool_call>")
    unterminated = engine.text.rstrip()  # content never ends in whitespace
    (choice,) = chat(http, tools=[WEATHER])["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["message"] == {"role": "assistant", "content": unterminated}
    choices = [c["choices"][0] for c in stream_chat(http, tools=[WEATHER])]
    assert "".join(c["delta"].get("content") or "" for c in choices) == unterminated
    assert not any("tool_calls" in c["delta"] for c in choices)
    assert choices[-1]["finish_reason"] == "stop"
