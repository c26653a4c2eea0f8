"""OpenAI and vLLM request features over HTTP on a real `pdserve serve`: structured output, forced tool calls,
n > 1 and lists of prompts, echo with prompt logprobs (against Hugging Face), and the logits processors.

Runs on the shared session server (default flags, --api-key). Requests that do not depend on each other are
sent concurrently: the machine has two cores, and one batch of many requests costs about what one does. The
exact formulas of the processors are checked against Hugging Face elsewhere (test_processors_hf.py); here only
that they reach the engine through the HTTP path.
"""

from __future__ import annotations

import asyncio
import enum
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import jsonschema
import openai
import pydantic
import pytest
import torch

pytest.register_assert_rewrite("server_fixtures")  # before the import below: its asserts explain failures

from server_fixtures import (  # noqa: E402
    API_KEY,
    MODEL_NAME,
    ServerProcess,
    assert_openai_error,
    metrics,
)

pytest_plugins = ["server_fixtures"]
pytestmark = pytest.mark.slow

BLOCK_SIZE = 16  # the server's default --block-size
TIMEOUT_S = 540  # per request, under pytest's 600 s: a busy shared 2-core machine can be 20x slower
LOGPROB_TOLERANCE = 1e-4  # both fp32, the same weights; the prompt is one forward on each side


class Api:
    """An AsyncOpenAI client and a raw httpx client (for fields the openai client drops), on one event loop."""

    def __init__(self, server: ServerProcess) -> None:
        self.loop = asyncio.new_event_loop()
        self.client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=TIMEOUT_S)
        self.raw = httpx.AsyncClient(base_url=f"{server.url}/v1", headers=server.headers, timeout=TIMEOUT_S)

    def gather(self, *coros: Any) -> list[Any]:
        async def run() -> list[Any]:
            return list(await asyncio.gather(*coros))

        return self.loop.run_until_complete(run())

    async def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return await self.raw.post(path, json={"model": MODEL_NAME, **body})

    def close(self) -> None:
        self.loop.run_until_complete(self.client.close())
        self.loop.run_until_complete(self.raw.aclose())
        self.loop.close()


@pytest.fixture
def api(server: ServerProcess) -> Iterator[Api]:
    api = Api(server)
    yield api
    api.close()


@pytest.fixture(scope="module")
def hf_tokenizer(default_hf_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_hf_dir))


def user(content: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content}]


def ok(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    return r.json()


# ---- 1. structured output ----------------------------------------------------------------------------------------

Short = Annotated[str, pydantic.Field(max_length=24)]  # bounds a small model's rambling inside a string


class Address(pydantic.BaseModel):
    city: Short
    country: Short


class Person(pydantic.BaseModel):
    """A nested object."""

    name: Short
    age: int = pydantic.Field(ge=0, le=120)
    address: Address


class Mood(str, enum.Enum):
    happy = "happy"
    sad = "sad"
    neutral = "neutral"


class Review(pydantic.BaseModel):
    """An enum field."""

    title: Short
    mood: Mood
    stars: int = pydantic.Field(ge=1, le=5)


class Recipe(pydantic.BaseModel):
    """An array with max_length."""

    dish: Short
    ingredients: list[Short] = pydantic.Field(max_length=3)


SCHEMA_PROMPTS = [
    "Describe a person.",
    "Tell me about someone from Spain.",
    "Invent a character for a story.",
    "Who is your favourite scientist?",
    "Give me a profile of a teacher.",
    "Describe your best friend.",
    "Write about a famous painter.",
    "Describe a pilot.",
    "Tell me about a chef.",
    "Who lives next door?",
]
# prompts whose greedy json_object answer closes within JSON_OBJECT_MAX_TOKENS (many others nest forever)
JSON_OBJECT_PROMPTS = [
    "Return JSON with keys name and age for Bob, 30.",
    "Output a JSON object with a field 'ok' set to true.",
    "Output a JSON object with a field 'ok' set to false.",
    "Return JSON with keys city and country for Paris.",
    "Give a JSON object mapping 'a' to 1.",
]
SCHEMA_MAX_TOKENS = 160
JSON_OBJECT_MAX_TOKENS = 120
DATE_RE = r"\d{4}-\d{2}-\d{2}"
PETS = ["cat", "dog", "fish"]


async def parse(api: Api, model: type[pydantic.BaseModel], prompt: str, **sampling: Any) -> Any:
    """The parsed completion, or the exception `parse` raised (so that every failure is reported together)."""
    try:
        return await api.client.chat.completions.parse(
            model=MODEL_NAME, messages=user(prompt), response_format=model, max_tokens=SCHEMA_MAX_TOKENS, **sampling
        )
    except (openai.LengthFinishReasonError, pydantic.ValidationError) as e:
        return e


def test_structured_output(api: Api) -> None:
    models = [Person, Review, Recipe]
    cases = [
        (model, prompt, sampling)
        for model in models
        for i, prompt in enumerate(SCHEMA_PROMPTS)
        for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": 100 + i})
    ]
    json_object = [
        api.post(
            "/chat/completions",
            {
                "messages": user(p),
                "temperature": 0,
                "max_tokens": JSON_OBJECT_MAX_TOKENS,
                "response_format": {"type": "json_object"},
            },
        )
        for p in JSON_OBJECT_PROMPTS
    ]
    bad_schema = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "wat"}}}
    results = api.gather(
        *[parse(api, model, prompt, **sampling) for model, prompt, sampling in cases],
        *json_object,
        api.post("/chat/completions", {"messages": user("What is today's date?"), "guided_regex": DATE_RE}),
        api.post("/completions", {"prompt": "The best pet is a", "temperature": 0, "guided_choice": PETS}),
        api.post(
            "/completions",
            {"prompt": "My pet is a", "temperature": 1, "seed": 3, "structured_outputs": {"choice": PETS}},
        ),
        api.post("/chat/completions", {"messages": user("hi"), "response_format": bad_schema}),
        api.post("/chat/completions", {"messages": user("hi"), "guided_regex": "a+", "guided_choice": ["a"]}),
        api.post(
            "/completions",
            {"prompt": "hi", "response_format": {"type": "json_object"}, "guided_json": {"type": "object"}},
        ),
    )
    parsed, results = results[: len(cases)], results[len(cases) :]
    failures = []
    for (model, prompt, sampling), response in zip(cases, parsed):
        if isinstance(response, Exception):
            failures.append(f"{model.__name__} {prompt!r} {sampling}: {type(response).__name__}: {response}")
            continue
        (choice,) = response.choices
        content = choice.message.content
        if choice.finish_reason != "stop" or not isinstance(choice.message.parsed, model):
            failures.append(f"{model.__name__} {prompt!r} {sampling}: {choice.finish_reason} {content!r}")
        # strict, compact, in the schema's order: exactly the declared properties, on one line
        elif list(json.loads(content)) != list(model.model_fields) or "\n" in content:
            failures.append(f"{model.__name__} {prompt!r} {sampling}: not the schema's keys in order: {content!r}")
    assert not failures, f"{len(failures)} of {len(cases)} schema completions failed:\n" + "\n".join(failures)

    for prompt, r in zip(JSON_OBJECT_PROMPTS, results):
        (choice,) = ok(r)["choices"]
        assert choice["finish_reason"] == "stop", (prompt, choice)
        assert isinstance(json.loads(choice["message"]["content"]), (dict, list)), (prompt, choice)
    date, choice_greedy, choice_seeded, bad, two, two_more = results[len(JSON_OBJECT_PROMPTS) :]
    (c,) = ok(date)["choices"]
    assert c["finish_reason"] == "stop" and re.fullmatch(DATE_RE, c["message"]["content"]), c
    for r in (choice_greedy, choice_seeded):
        (c,) = ok(r)["choices"]
        assert c["finish_reason"] == "stop" and c["text"] in PETS, c
    message = assert_openai_error(bad, 400, "invalid_request", "response_format", 'Unsupported type "wat"')
    assert ".cc:" not in message, f"xgrammar's C++ source location leaked: {message}"
    assert_openai_error(two, 400, "invalid_request", "guided_regex", "guided_choice")
    assert_openai_error(two_more, 400, "invalid_request", "response_format", "guided_json")


# ---- 2. forced tool calls --------------------------------------------------------------------------------------

WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 32},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": WEATHER_PARAMS},
}
NAMED = {"type": "function", "function": {"name": "get_weather"}}
WEATHER_QUESTION = user("What is the weather like in Paris?")
TOOL_MAX_TOKENS = 80


async def stream_tool_calls(api: Api, **fields: Any) -> tuple[list[tuple[str, str]], str, str]:
    """A streamed chat's tool calls reassembled per index ((name, arguments) in index order), its finish_reason
    and its content."""
    stream = await api.client.chat.completions.create(model=MODEL_NAME, stream=True, **fields)
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    content, reasons = [], []
    async for chunk in stream:
        (choice,) = chunk.choices
        content.append(choice.delta.content or "")
        for call in choice.delta.tool_calls or []:
            if call.id is not None:
                assert call.id.startswith("call_") and call.index not in names, call
            names[call.index] = names.get(call.index, "") + (call.function.name or "")
            arguments[call.index] = arguments.get(call.index, "") + (call.function.arguments or "")
        if choice.finish_reason is not None:
            reasons.append(choice.finish_reason)
    assert len(reasons) == 1, reasons
    assert sorted(names) == list(range(len(names))), names
    return [(names[i], arguments[i]) for i in sorted(names)], reasons[0], "".join(content)


def test_forced_tool_calls(api: Api) -> None:
    forced = [
        {"tool_choice": "required", "parallel_tool_calls": False},
        {"tool_choice": NAMED},
    ]
    common = {"messages": WEATHER_QUESTION, "tools": [WEATHER], "temperature": 0, "max_tokens": TOOL_MAX_TOKENS}
    bad_name = {"type": "function", "function": {"name": "get weather!", "parameters": WEATHER_PARAMS}}
    bad_params = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 3}}}
    unknown = {"type": "function", "function": {"name": "get_time"}}
    results = api.gather(
        *[api.client.chat.completions.create(model=MODEL_NAME, **common, **f) for f in forced],
        *[stream_tool_calls(api, **common, **f) for f in forced],
        api.post("/chat/completions", {"messages": WEATHER_QUESTION, "tools": [bad_name]}),
        api.post("/chat/completions", {"messages": WEATHER_QUESTION, "tools": [WEATHER, bad_params]}),
        api.post("/chat/completions", {"messages": WEATHER_QUESTION, "tools": [WEATHER], "tool_choice": unknown}),
        api.post(
            "/chat/completions",
            {"messages": WEATHER_QUESTION, "tools": [WEATHER], "tool_choice": "required", "guided_regex": "a"},
        ),
    )
    whole, streamed, errors = results[:2], results[2:4], results[4:]
    for fields, response, (calls, reason, content) in zip(forced, whole, streamed):
        (choice,) = response.choices
        assert choice.finish_reason == "tool_calls", (fields, choice)
        assert choice.message.content is None, (fields, choice)
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_"), call
        assert call.function.name == "get_weather", call
        jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMS)
        # greedy: the stream's deltas reassemble to the same call
        assert calls == [(call.function.name, call.function.arguments)], (fields, calls, call)
        assert reason == "tool_calls" and content == "", (fields, reason, content)

    bad_name_r, bad_params_r, unknown_r, with_grammar = errors
    assert_openai_error(bad_name_r, 400, "invalid_request", "tools[0].function.name", "get weather!")
    assert_openai_error(bad_params_r, 400, "invalid_request", "tools[1].function.parameters")
    assert_openai_error(unknown_r, 400, "invalid_request", "tool_choice", "'get_time'", "get_weather")
    assert_openai_error(with_grammar, 400, None, "tool_choice", "structured-output")

    # the conversation goes on: the call, then the tool's answer
    call = whole[0].choices[0].message.tool_calls[0]
    messages = [
        *WEATHER_QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "unit": "celsius"})},
    ]
    (answer,) = api.gather(
        api.client.chat.completions.create(
            model=MODEL_NAME, messages=messages, tools=[WEATHER], temperature=0, max_tokens=40
        )
    )
    (choice,) = answer.choices
    assert isinstance(choice.message.content, str) and choice.message.content.strip(), choice
    assert choice.message.tool_calls is None, choice
    assert choice.finish_reason in ("stop", "length"), choice
    assert answer.usage.prompt_tokens > whole[0].usage.prompt_tokens


# ---- 3. n > 1 and lists of prompts ---------------------------------------------------------------------------

N_PROMPT = "My favourite animal is the"
PROMPT_LIST = ["The capital of France is", "def add(a, b):", "Once upon a time", "1, 2, 3,"]


async def stream_chat_choices(api: Api, **fields: Any) -> tuple[dict[int, str], dict[int, str]]:
    """(text, finish_reason) per choice index of a streamed chat."""
    stream = await api.client.chat.completions.create(model=MODEL_NAME, stream=True, **fields)
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    async for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason is not None:
                assert choice.index not in reasons, f"choice {choice.index} finished twice"
                reasons[choice.index] = choice.finish_reason
    return texts, reasons


def test_n_and_prompt_lists(api: Api) -> None:
    seeded = {"prompt": N_PROMPT, "n": 3, "temperature": 0.9, "seed": 5, "max_tokens": 12}
    chat_n = {"messages": user("Name an animal."), "n": 2, "temperature": 0.9, "seed": 11, "max_tokens": 16}
    greedy = {"temperature": 0, "max_tokens": 12}
    results = api.gather(
        api.client.completions.create(model=MODEL_NAME, **seeded),
        api.client.completions.create(model=MODEL_NAME, **seeded),
        api.client.chat.completions.create(model=MODEL_NAME, **chat_n),
        stream_chat_choices(api, **chat_n),
        api.client.completions.create(model=MODEL_NAME, prompt=PROMPT_LIST, **greedy),
        *[api.client.completions.create(model=MODEL_NAME, prompt=p, **greedy) for p in PROMPT_LIST],
    )
    first, second, chat_whole, (chat_texts, chat_reasons), listed, *singles = results
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.text for c in first.choices]
    assert len(set(texts)) > 1, f"n=3 at temperature 0.9 gave one text three times: {texts}"
    assert [c.text for c in second.choices] == texts, "the same seeded request must give the same three choices"
    assert first.usage.prompt_tokens == second.usage.prompt_tokens

    assert [c.index for c in chat_whole.choices] == [0, 1]
    assert sorted(chat_texts) == [0, 1], chat_texts
    for c in chat_whole.choices:
        assert chat_texts[c.index] == c.message.content, (c.index, chat_texts[c.index], c.message.content)
        assert chat_reasons[c.index] == c.finish_reason

    assert [c.index for c in listed.choices] == [0, 1, 2, 3]
    for prompt, c, single in zip(PROMPT_LIST, listed.choices, singles):
        assert c.text == single.choices[0].text, prompt
        assert c.finish_reason == single.choices[0].finish_reason, prompt
    assert listed.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)


def test_n_computes_the_prompt_once(api: Api, server: ServerProcess) -> None:
    """Alone on the server (the counter is global): siblings take the prompt's full blocks from the prefix cache."""
    prompt = [(7919 * i) % 40000 + 1000 for i in range(100)]  # token ids no other test sends
    before = metrics(server.url)["pdserve_prompt_tokens_total"]
    (response,) = api.gather(
        api.client.completions.create(model=MODEL_NAME, prompt=prompt, n=4, max_tokens=4, temperature=0.9, seed=2)
    )
    computed = metrics(server.url)["pdserve_prompt_tokens_total"] - before
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert response.usage.prompt_tokens == len(prompt), "usage counts the prompt once, not once per choice"
    assert response.usage.completion_tokens == 4 * 4
    assert len(prompt) <= computed <= len(prompt) + 3 * BLOCK_SIZE, (
        f"{computed:.0f} prompt tokens computed for a {len(prompt)}-token prompt with n=4: the prompt must be "
        f"computed once, each of the 3 siblings recomputing at most its last partial block ({BLOCK_SIZE} tokens)"
    )


# ---- 4. echo and prompt logprobs against Hugging Face -----------------------------------------------------------

ECHO_TEXTS = [
    "The capital of France is",
    "The quick brown fox jumps over the lazy dog because",
    "def fibonacci(n):\n    if n < 2:\n        return n",
]


def hf_prompt_logprobs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, vocab]: row i is the distribution of token i + 1 given tokens 0..i."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return logits.log_softmax(dim=-1)[:-1]


def rank_bounds(row: torch.Tensor, logprob: float) -> tuple[int, int]:
    """The ranks (1 = most likely) a token of this logprob may have in `row`, allowing for near-ties."""
    lo = int((row > logprob + LOGPROB_TOLERANCE).sum()) + 1
    hi = int((row > logprob - LOGPROB_TOLERANCE).sum()) + 1
    return lo, max(lo, hi - 1)


def test_echo_and_prompt_logprobs_equal_hf(api: Api, default_hf_model: torch.nn.Module, hf_tokenizer: Any) -> None:
    prompts = [hf_tokenizer.encode(t, add_special_tokens=False) for t in ECHO_TEXTS]
    greedy = {"max_tokens": 1, "temperature": 0}
    results = api.gather(
        *[api.post("/completions", {"prompt": ids, "echo": True, "logprobs": 1, **greedy}) for ids in prompts],
        *[api.post("/completions", {"prompt": ids, "prompt_logprobs": 2, **greedy}) for ids in prompts],
        api.post("/completions", {"prompt": ECHO_TEXTS[0], "echo": True, **greedy}),
    )
    echoed, scored, echoed_text = results[: len(prompts)], results[len(prompts) : -1], results[-1]
    for ids, echo_r, scored_r in zip(prompts, echoed, scored):
        expected = hf_prompt_logprobs(default_hf_model, ids)  # [len(ids) - 1, vocab]
        want = [float(expected[i, t]) for i, t in enumerate(ids[1:])]
        (echo,) = ok(echo_r)["choices"]
        assert echo["text"].startswith(hf_tokenizer.decode(ids)), echo["text"]
        lp = echo["logprobs"]
        assert lp["tokens"][: len(ids)] == [hf_tokenizer.decode([t]) for t in ids]
        assert len(lp["tokens"]) == len(ids) + 1 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["token_logprobs"][1 : len(ids)] == pytest.approx(want, abs=LOGPROB_TOLERANCE)
        for i, top in enumerate(lp["top_logprobs"][1 : len(ids)]):
            assert list(top.values()) == pytest.approx([float(expected[i].max())], abs=LOGPROB_TOLERANCE), (i, top)

        (choice,) = ok(scored_r)["choices"]
        entries = choice["prompt_logprobs"]
        assert len(entries) == len(ids) and entries[0] is None
        for i, (token_id, entry) in enumerate(zip(ids[1:], entries[1:])):
            row = expected[i]
            assert str(token_id) in entry, (i, entry)
            assert entry[str(token_id)]["logprob"] == pytest.approx(want[i], abs=LOGPROB_TOLERANCE), (i, entry)
            assert {1, 2} <= {e["rank"] for e in entry.values()}, (i, entry)  # the top 2, and the prompt's token
            for t, e in entry.items():
                assert e["logprob"] == pytest.approx(float(row[int(t)]), abs=LOGPROB_TOLERANCE), (i, t, e)
                lo, hi = rank_bounds(row, float(row[int(t)]))
                assert lo <= e["rank"] <= hi, f"position {i}, token {t}: rank {e['rank']}, HF's is in [{lo}, {hi}]"
                assert e["decoded_token"] == hf_tokenizer.decode([int(t)])
        # the same completion token either way
        assert lp["token_logprobs"][-1] is not None and choice["text"] == echo["text"][len(hf_tokenizer.decode(ids)) :]

    (c,) = ok(echoed_text)["choices"]
    assert c["text"].startswith(ECHO_TEXTS[0]) and len(c["text"]) > len(ECHO_TEXTS[0]), c


# ---- 5. logits processors over HTTP -------------------------------------------------------------------------

REPETITIVE = "hello hello hello hello hello hello hello hello"
CAPITAL = "The capital of France is"
SHORT_ANSWER = user("Answer with one word: yes or no?")  # greedy: "Yes." and EOS, 3 tokens


def test_processors_change_greedy_output(api: Api, hf_tokenizer: Any) -> None:
    greedy = {"temperature": 0, "max_tokens": 16}
    plain, frequency, presence, capital, banned, short, at_least = api.gather(
        api.post("/completions", {"prompt": REPETITIVE, **greedy}),
        api.post("/completions", {"prompt": REPETITIVE, "frequency_penalty": 1.5, **greedy}),
        api.post("/completions", {"prompt": REPETITIVE, "presence_penalty": 1.5, **greedy}),
        api.post("/completions", {"prompt": CAPITAL, "logprobs": 0, **greedy}),
        api.post("/completions", {"prompt": CAPITAL, "bad_words": ["Paris"], **greedy}),
        api.post("/chat/completions", {"messages": SHORT_ANSWER, "temperature": 0, "max_tokens": 30}),
        api.post("/chat/completions", {"messages": SHORT_ANSWER, "temperature": 0, "max_tokens": 30, "min_tokens": 8}),
    )
    plain_text = ok(plain)["choices"][0]["text"]
    assert plain_text.startswith(" hello hello"), f"the precondition: greedy repeats the word; got {plain_text!r}"
    for name, r in (("frequency_penalty", frequency), ("presence_penalty", presence)):
        text = ok(r)["choices"][0]["text"]
        assert text != plain_text, f"{name} 1.5 did not change the greedy output {plain_text!r}"
        assert not text.startswith(" hello hello"), f"{name} 1.5 still repeats: {text!r}"

    (capital_choice,) = ok(capital)["choices"]
    assert "Paris" in capital_choice["text"], f"the precondition: greedy writes Paris; got {capital_choice['text']!r}"
    banned_text = ok(banned)["choices"][0]["text"]
    assert "Paris" not in banned_text, banned_text

    short_body = ok(short)
    assert short_body["choices"][0]["finish_reason"] == "stop" and short_body["usage"]["completion_tokens"] < 8, (
        f"the precondition: greedy stops before 8 tokens; got {short_body}"
    )
    at_least_body = ok(at_least)
    assert at_least_body["usage"]["completion_tokens"] >= 8, at_least_body
    assert at_least_body["choices"][0]["message"]["content"] != short_body["choices"][0]["message"]["content"]

    first = capital_choice["logprobs"]["tokens"][0]
    first_ids = hf_tokenizer.encode(first, add_special_tokens=False)
    assert len(first_ids) == 1, f"{first!r} is not one token: {first_ids}"
    (biased,) = api.gather(
        api.post("/completions", {"prompt": CAPITAL, "logprobs": 0, "logit_bias": {str(first_ids[0]): -100}, **greedy})
    )
    biased_first = ok(biased)["choices"][0]["logprobs"]["tokens"][0]
    assert biased_first != first, f"logit_bias -100 on {first!r} (token {first_ids[0]}) left it the first token"


def test_chat_logprobs_only_when_asked(api: Api) -> None:
    body = {"messages": user("Say hi."), "temperature": 0, "max_tokens": 8}
    with_logprobs, *without = api.gather(
        api.post("/chat/completions", {**body, "logprobs": True}),
        *[api.post("/chat/completions", body) for _ in range(4)],
    )
    assert ok(with_logprobs)["choices"][0]["logprobs"] is not None
    assert [ok(r)["choices"][0]["logprobs"] for r in without] == [None] * 4
