"""The OpenAI API of a real `pdserve serve`, through the official `openai` client.

Greedy output over HTTP equals the offline API token for token; streams
assembled equal the non-streamed answers; logprobs, stop strings, seeds and
the Prometheus metrics behave as documented. Requests that do not depend on
each other are sent concurrently to keep the test fast on two CPU cores.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

pytest.register_assert_rewrite("server_fixtures")  # before the import below: its asserts explain failures

from server_fixtures import (  # noqa: E402
    API_KEY,
    MODEL_NAME,
    ServerProcess,
    sse_events,
    wait_idle,
)

from pdserve import LLM, SamplingParams  # noqa: E402

pytest_plugins = ["server_fixtures"]  # the server fixtures, shared by the test_server_* modules

MAX_TOKENS = 32
TEXT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, there was a",
    "The three primary colors are",
    "Water boils at",
]
TOKEN_PROMPTS = [list(range(1000, 1016)), [504, 3458, 282, 4649, 314, 253]]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Name three colors."}],
]
STOP_CASES = [("The capital of France is", ["."]), ("1, 2, 3, 4,", [" 8", "nine"])]
SEED_PROMPT = "My favourite animal is the"
LOGPROB_TOLERANCE = 1e-3  # batch composition differs between the offline run and the server


@dataclass
class Reference:
    """Offline results (LLM.generate / LLM.chat), greedy, MAX_TOKENS tokens."""

    text: list[Any]  # RequestOutput per TEXT_PROMPTS
    token: list[Any]  # per TOKEN_PROMPTS
    chat: list[Any]  # per CONVERSATIONS
    stop: list[Any]  # per STOP_CASES
    seeded: Any  # SEED_PROMPT, temperature 1, seed 1234
    decode: Any  # token id -> its text
    eos_text: str


@pytest.fixture(scope="module", autouse=True)
def reference(server_starting: ServerProcess) -> Iterator[Reference]:
    """Computed in this process while the server loads its model (autouse: before `server` waits)."""
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=0)
    with LLM(num_blocks=600) as llm:  # the cache size does not change the numbers
        tok = llm.get_tokenizer()
        ref = Reference(
            text=llm.generate(TEXT_PROMPTS, greedy, use_tqdm=False),
            token=llm.generate(TOKEN_PROMPTS, greedy, use_tqdm=False),
            chat=llm.chat(CONVERSATIONS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False),
            stop=llm.generate(
                [p for p, _ in STOP_CASES],
                [SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop=s) for _, s in STOP_CASES],
                use_tqdm=False,
            ),
            seeded=llm.generate(
                SEED_PROMPT, SamplingParams(temperature=1.0, max_tokens=16, seed=1234, ignore_eos=True), use_tqdm=False
            )[0],
            decode=lambda t: tok.decode([t]),
            eos_text=tok.eos_token,
        )
    yield ref


class Api:
    """An AsyncOpenAI client and the one event loop it runs in."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120)

    def gather(self, *coros: Any) -> list[Any]:
        async def run() -> list[Any]:
            return list(await asyncio.gather(*coros))

        return self.loop.run_until_complete(run())

    def close(self) -> None:
        self.loop.run_until_complete(self.client.close())
        self.loop.close()


@pytest.fixture
def api(server: ServerProcess) -> Iterator[Api]:
    api = Api(server.url)
    yield api
    api.close()


async def stream_completion(client: openai.AsyncOpenAI, **kwargs: Any) -> tuple[list[str], str | None, Any]:
    """(text deltas, finish_reason, usage) of a streamed completion with include_usage."""
    deltas, reasons, usages = [], [], []
    stream = await client.completions.create(
        model=MODEL_NAME, stream=True, stream_options={"include_usage": True}, **kwargs
    )
    async for chunk in stream:
        if chunk.usage is not None:
            assert chunk.choices == [], chunk
            usages.append(chunk.usage)
            continue
        assert not usages, "the usage chunk must be the last one"
        (choice,) = chunk.choices
        deltas.append(choice.text)
        if choice.finish_reason is not None:
            reasons.append(choice.finish_reason)
    assert len(reasons) == 1 and len(usages) == 1, (reasons, usages)
    return deltas, reasons[0], usages[0]


async def stream_chat(client: openai.AsyncOpenAI, **kwargs: Any) -> tuple[list[str], str | None, Any]:
    deltas, reasons, usages, roles = [], [], [], []
    stream = await client.chat.completions.create(
        model=MODEL_NAME, stream=True, stream_options={"include_usage": True}, **kwargs
    )
    async for chunk in stream:
        if chunk.usage is not None:
            assert chunk.choices == [], chunk
            usages.append(chunk.usage)
            continue
        (choice,) = chunk.choices
        if choice.delta.role is not None:
            roles.append(choice.delta.role)
        deltas.append(choice.delta.content or "")
        if choice.finish_reason is not None:
            reasons.append(choice.finish_reason)
    assert roles == ["assistant"], roles
    assert len(reasons) == 1 and len(usages) == 1, (reasons, usages)
    return deltas, reasons[0], usages[0]


def test_models_lists_the_served_model(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]
    assert models[0].model_extra["max_model_len"] == 8192


def test_completions_equal_offline_api(reference: Reference, api: Api) -> None:
    prompts: list[Any] = TEXT_PROMPTS + TOKEN_PROMPTS
    expected = reference.text + reference.token
    greedy = dict(temperature=0, max_tokens=MAX_TOKENS)
    results = api.gather(
        *[api.client.completions.create(model=MODEL_NAME, prompt=p, logprobs=0, **greedy) for p in prompts],
        *[stream_completion(api.client, prompt=p, **greedy) for p in prompts],
    )
    whole, streamed = results[: len(prompts)], results[len(prompts) :]
    for prompt, ref, response, (deltas, reason, usage) in zip(prompts, expected, whole, streamed):
        out = ref.outputs[0]
        (choice,) = response.choices
        assert choice.text == out.text, prompt
        assert choice.finish_reason == out.finish_reason, prompt
        assert response.usage.completion_tokens == len(out.token_ids), prompt
        assert response.usage.prompt_tokens == len(ref.prompt_token_ids), prompt
        assert response.usage.total_tokens == len(ref.prompt_token_ids) + len(out.token_ids)
        # token for token: logprobs=0 lists each sampled token and its logprob
        assert choice.logprobs.tokens == [reference.decode(t) for t in out.token_ids], prompt
        for got, t, lps in zip(choice.logprobs.token_logprobs, out.token_ids, out.logprobs):
            assert got == pytest.approx(lps[t], abs=LOGPROB_TOLERANCE), prompt
        assert "".join(deltas) == out.text, prompt
        assert reason == out.finish_reason, prompt
        assert _counts(usage) == _counts(response.usage), prompt


def test_chat_equals_offline_api(reference: Reference, api: Api) -> None:
    greedy = dict(temperature=0, max_tokens=MAX_TOKENS)
    results = api.gather(
        *[api.client.chat.completions.create(model=MODEL_NAME, messages=m, **greedy) for m in CONVERSATIONS],
        *[stream_chat(api.client, messages=m, **greedy) for m in CONVERSATIONS],
    )
    n = len(CONVERSATIONS)
    for ref, response, (deltas, reason, usage) in zip(reference.chat, results[:n], results[n:]):
        out = ref.outputs[0]
        (choice,) = response.choices
        assert choice.message.role == "assistant"
        assert choice.message.content == out.text
        assert out.text  # the model answers something
        assert choice.finish_reason == out.finish_reason
        assert response.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert response.usage.completion_tokens == len(out.token_ids)
        assert "".join(deltas) == out.text
        assert reason == out.finish_reason
        assert _counts(usage) == _counts(response.usage)


def test_stream_without_include_usage_has_no_usage_chunk_and_ends_with_done(server: ServerProcess) -> None:
    for path, body in [
        ("completions", {"prompt": "Hello"}),
        ("chat/completions", {"messages": [{"role": "user", "content": "Hello"}]}),
    ]:
        r = httpx.post(
            f"{server.url}/v1/{path}",
            headers=server.headers,
            timeout=60,
            json={**body, "max_tokens": 4, "temperature": 0, "stream": True, "ignore_eos": True},
        )
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
        events = sse_events(r.text)
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert all("usage" not in c and len(c["choices"]) == 1 for c in chunks), chunks
        assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
        assert len({c["id"] for c in chunks}) == 1


def test_completion_logprobs_shape(reference: Reference, api: Api) -> None:
    k = 3
    (response,) = api.gather(
        api.client.completions.create(model=MODEL_NAME, prompt=TEXT_PROMPTS[0], temperature=0, max_tokens=8, logprobs=k)
    )
    (choice,) = response.choices
    lp = choice.logprobs
    n = response.usage.completion_tokens
    out = reference.text[0].outputs[0]
    assert lp.tokens == [reference.decode(t) for t in out.token_ids[:n]]
    assert "".join(lp.tokens) == choice.text
    assert len(lp.token_logprobs) == n and len(lp.top_logprobs) == n
    for chosen, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0
        assert 1 <= len(top) <= k, top  # see test_top_logprobs_hold_exactly_k for the exact count
        assert all(v <= logprob + 1e-6 for v in top.values()), (chosen, logprob, top)  # greedy took the best
        assert list(top.values()) == sorted(top.values(), reverse=True)


def test_chat_logprobs_shape(reference: Reference, api: Api) -> None:
    k = 2
    (response,) = api.gather(
        api.client.chat.completions.create(
            model=MODEL_NAME, messages=CONVERSATIONS[0], temperature=0, max_tokens=8, logprobs=True, top_logprobs=k
        )
    )
    (choice,) = response.choices
    content = choice.logprobs.content
    out = reference.chat[0].outputs[0]
    assert len(content) == response.usage.completion_tokens
    assert [c.token for c in content] == [reference.decode(t) for t in out.token_ids[: len(content)]]
    # the text skips the special end-of-turn token that ends the answer; the tokens list it
    assert "".join(c.token for c in content).removesuffix(reference.eos_text) == choice.message.content
    for c in content:
        assert c.logprob <= 0 and c.bytes == list(c.token.encode())
        assert 1 <= len(c.top_logprobs) <= k, c  # see test_top_logprobs_hold_exactly_k for the exact count
        assert all(t.bytes == list(t.token.encode()) and t.logprob <= c.logprob + 1e-6 for t in c.top_logprobs)
    # not asked, not sent
    (plain,) = api.gather(
        api.client.chat.completions.create(model=MODEL_NAME, messages=CONVERSATIONS[0], temperature=0, max_tokens=2)
    )
    assert plain.choices[0].logprobs is None


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_top_logprobs_hold_exactly_k(endpoint: str, api: Api) -> None:
    k = 3
    if endpoint == "completions":
        (r,) = api.gather(
            api.client.completions.create(
                model=MODEL_NAME, prompt=TEXT_PROMPTS[0], temperature=0, max_tokens=4, logprobs=k
            )
        )
        lp = r.choices[0].logprobs
        tops = [(tok, list(top)) for tok, top in zip(lp.tokens, lp.top_logprobs)]
    else:
        (r,) = api.gather(
            api.client.chat.completions.create(
                model=MODEL_NAME, messages=CONVERSATIONS[0], temperature=0, max_tokens=4, logprobs=True, top_logprobs=k
            )
        )
        tops = [(c.token, [t.token for t in c.top_logprobs]) for c in r.choices[0].logprobs.content]
    for token, top in tops:
        assert len(top) == k and top[0] == token, (token, top)  # greedy: the sampled token is the most likely


def test_completion_logprobs_text_offset(api: Api) -> None:
    (r,) = api.gather(
        api.client.completions.create(model=MODEL_NAME, prompt=TEXT_PROMPTS[0], temperature=0, max_tokens=4, logprobs=1)
    )
    lp = r.choices[0].logprobs
    offsets = [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert lp.text_offset == offsets


@pytest.mark.parametrize("sampling", [{"temperature": 1e-300}, {"temperature": 1.0, "top_p": 1e-300}])
def test_near_greedy_sampling_is_greedy(reference: Reference, api: Api, sampling: dict[str, float]) -> None:
    (r,) = api.gather(
        api.client.completions.create(model=MODEL_NAME, prompt=TEXT_PROMPTS[0], max_tokens=4, seed=7, **sampling)
    )
    out = reference.text[0].outputs[0]
    assert r.choices[0].text == "".join(reference.decode(t) for t in out.token_ids[:4])


def test_stop_strings(reference: Reference, api: Api) -> None:
    greedy = dict(temperature=0, max_tokens=MAX_TOKENS)
    results = api.gather(
        *[api.client.completions.create(model=MODEL_NAME, prompt=p, stop=s, **greedy) for p, s in STOP_CASES],
        *[stream_completion(api.client, prompt=p, stop=s, **greedy) for p, s in STOP_CASES],
    )
    n = len(STOP_CASES)
    for (prompt, stops), ref, response, (deltas, reason, usage) in zip(
        STOP_CASES, reference.stop, results[:n], results[n:]
    ):
        out = ref.outputs[0]
        assert out.finish_reason == "stop" and out.stop_reason in stops, out  # the case does hit its stop string
        (choice,) = response.choices
        assert choice.finish_reason == "stop", prompt
        assert choice.text == out.text, prompt
        assert not any(s in choice.text for s in stops)
        assert response.usage.completion_tokens == len(out.token_ids)
        assert reason == "stop"
        assert "".join(deltas) == out.text
        assert not any(s in d for d in deltas for s in stops), deltas
        assert usage.completion_tokens == len(out.token_ids)
    assert results[0].choices[0].text == " Paris"
    assert results[1].choices[0].text == " 5, 6, 7,"


def test_chat_stop_string(reference: Reference, api: Api) -> None:
    full = reference.chat[0].outputs[0].text
    assert "France" in full, full
    expected = full[: full.index("France")]
    whole, (deltas, reason, _) = api.gather(
        api.client.chat.completions.create(
            model=MODEL_NAME, messages=CONVERSATIONS[0], temperature=0, max_tokens=MAX_TOKENS, stop="France"
        ),
        stream_chat(api.client, messages=CONVERSATIONS[0], temperature=0, max_tokens=MAX_TOKENS, stop=["France"]),
    )
    assert whole.choices[0].message.content == expected and whole.choices[0].finish_reason == "stop"
    assert "".join(deltas) == expected and reason == "stop"
    assert not any("France" in d for d in deltas)


def test_seed_makes_sampling_reproducible(reference: Reference, api: Api) -> None:
    def ask(seed: int) -> Any:
        return api.client.completions.create(
            model=MODEL_NAME,
            prompt=SEED_PROMPT,
            temperature=1.0,
            max_tokens=16,
            seed=seed,
            extra_body={"ignore_eos": True},
        )

    a, b, other, (deltas, _, _) = api.gather(
        ask(1234),
        ask(1234),
        ask(4321),
        stream_completion(
            api.client, prompt=SEED_PROMPT, temperature=1.0, max_tokens=16, seed=1234, extra_body={"ignore_eos": True}
        ),
    )
    text = a.choices[0].text
    assert a.usage.completion_tokens == 16
    assert b.choices[0].text == text
    assert "".join(deltas) == text
    assert text == reference.seeded.outputs[0].text  # the offline API draws the same tokens for the same seed
    assert other.choices[0].text != text


CONTRACT_METRICS = {
    "pdserve_num_requests_running": "gauge",
    "pdserve_num_requests_waiting": "gauge",
    "pdserve_kv_blocks_total": "gauge",
    "pdserve_kv_blocks_free": "gauge",
    "pdserve_prompt_tokens_total": "counter",
    "pdserve_generation_tokens_total": "counter",
    "pdserve_preemptions_total": "counter",
    "pdserve_time_to_first_token_seconds": "histogram",
    "pdserve_time_per_output_token_seconds": "histogram",
    "pdserve_request_latency_seconds": "histogram",
    "pdserve_recomputed_tokens_total": "counter",
    "pdserve_prefix_cache_query_tokens_total": "counter",
    "pdserve_kv_store_errors_total": "counter",
    "pdserve_kv_blocks_saved_on_preemption_total": "counter",
}
LABELLED_COUNTERS = {
    "pdserve_prefix_cache_hit_tokens_total": ('tier="device"', 'tier="host"', 'tier="pool"'),
    "pdserve_kv_store_bytes_total": ('op="put"', 'op="get"'),
}


def test_metrics_contract_and_counters(server: ServerProcess) -> None:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text  # no API key needed
    for name, kind in CONTRACT_METRICS.items():
        assert f"# TYPE {name} {kind}\n" in text, name
        sample = f"{name}_count" if kind == "histogram" else name
        assert f"\n{sample} " in text, name
    for name in ("pdserve_time_to_first_token_seconds", "pdserve_request_latency_seconds"):
        assert f'{name}_bucket{{le="+Inf"}}' in text
    for name, labels in LABELLED_COUNTERS.items():
        assert f"# TYPE {name} counter\n" in text, name
        for label in labels:
            assert f"\n{name}{{{label}}} " in text, (name, label)

    before = wait_idle(server.url)
    assert before["pdserve_kv_blocks_total"] > 0
    prompt_ids = list(range(2000, 2021))
    r = httpx.post(
        f"{server.url}/v1/completions",
        headers=server.headers,
        timeout=60,
        json={"prompt": prompt_ids, "max_tokens": 6, "temperature": 0, "ignore_eos": True},
    )
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")} == {
        "prompt_tokens": 21,
        "completion_tokens": 6,
        "total_tokens": 27,
    }
    assert set(usage["prompt_tokens_details"]) == {"cached_tokens"}
    after = wait_idle(server.url)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("pdserve_prompt_tokens_total") == 21
    assert delta("pdserve_prefix_cache_query_tokens_total") == 21
    assert delta('pdserve_prefix_cache_hit_tokens_total{tier="device"}') == 0
    assert delta("pdserve_generation_tokens_total") == 6
    assert delta("pdserve_preemptions_total") == 0
    assert delta("pdserve_time_to_first_token_seconds_count") == 1
    assert delta("pdserve_time_per_output_token_seconds_count") == 1
    assert delta("pdserve_request_latency_seconds_count") == 1
    assert delta("pdserve_request_latency_seconds_sum") > 0
    assert delta('pdserve_requests_total{finish_reason="length"}') == 1
    assert after["pdserve_kv_blocks_free"] == after["pdserve_kv_blocks_total"] == before["pdserve_kv_blocks_total"]

    r = httpx.post(
        f"{server.url}/v1/completions",
        headers=server.headers,
        timeout=60,
        json={"prompt": prompt_ids, "max_tokens": 6, "temperature": 0, "ignore_eos": True},
    )
    assert r.status_code == 200, r.text
    again = wait_idle(server.url)
    # the same prompt again: its first full block (16 tokens) comes from the device prefix cache
    assert (
        again['pdserve_prefix_cache_hit_tokens_total{tier="device"}']
        - after.get('pdserve_prefix_cache_hit_tokens_total{tier="device"}', 0.0)
        == 16
    )
    assert again["pdserve_prompt_tokens_total"] - after["pdserve_prompt_tokens_total"] == 5


def _counts(usage: Any) -> dict[str, Any]:
    """A usage's token counts; its cached_tokens depend on which of two concurrent requests cached the prompt."""
    return usage.model_dump(exclude={"prompt_tokens_details"})
