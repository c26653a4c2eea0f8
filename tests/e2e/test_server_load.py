"""A real `pdserve serve` under concurrent streams and client disconnects.

64 streams at once all finish correctly; a client that goes away (closed
stream, or a non-streaming request whose client timed out) has its request
aborted and every KV block comes back.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from typing import Any

import httpx
import pytest

pytest.register_assert_rewrite("server_fixtures")  # before the import below: its asserts explain failures

from server_fixtures import (  # noqa: E402
    ServerProcess,
    metrics,
    request_ids_in_log,
    sse_events,
    wait_idle,
)

pytest_plugins = ["server_fixtures"]  # the server fixtures, shared by the test_server_* modules

NUM_STREAMS = 64
MAX_TOKENS = 16
CHECKED = (0, 21, 42, 63)  # 63 may stop at EOS  # streams whose text is compared with the same request sent alone
LONG_MAX_TOKENS = 3000  # never reached: these requests are abandoned by their client


def body(i: int) -> dict[str, Any]:
    return {
        "prompt": f"Question {i}: what is {i} plus {i * 3}? Answer:",
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": not stops_at_eos(i),
    }


def stops_at_eos(i: int) -> bool:
    return i % 8 == 7  # a few may end early with the end-of-text token


async def one_stream(client: httpx.AsyncClient, url: str, i: int) -> dict[str, Any]:
    async with client.stream(
        "POST", f"{url}/v1/completions", json={**body(i), "stream": True, "stream_options": {"include_usage": True}}
    ) as r:
        text = (await r.aread()).decode()
    assert r.status_code == 200, text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(text)
    assert events[-1] == "[DONE]", f"stream {i} does not end with [DONE]: {events[-3:]}"
    *chunks, usage_chunk = events[:-1]
    assert usage_chunk["choices"] == [], usage_chunk
    reasons = [c["choices"][0]["finish_reason"] for c in chunks]
    assert reasons[-1] in ("length", "stop") and all(r is None for r in reasons[:-1]), reasons
    assert len({c["id"] for c in chunks} | {usage_chunk["id"]}) == 1
    return {
        "id": usage_chunk["id"],
        "text": "".join(c["choices"][0]["text"] for c in chunks),
        "finish_reason": reasons[-1],
        "usage": usage_chunk["usage"],
    }


def poll_peak_running(url: str, stop: threading.Event, peak: list[float]) -> None:
    while not stop.is_set():
        peak.append(metrics(url)["pdserve_num_requests_running"])
        time.sleep(0.05)


def test_64_concurrent_streams(server: ServerProcess) -> None:
    alone = {}
    for i in CHECKED:
        r = httpx.post(f"{server.url}/v1/completions", headers=server.headers, json=body(i), timeout=60)
        assert r.status_code == 200, r.text
        alone[i] = r.json()
    before = wait_idle(server.url)

    async def run() -> list[dict[str, Any]]:
        limits = httpx.Limits(max_connections=NUM_STREAMS)
        async with httpx.AsyncClient(headers=server.headers, timeout=300, limits=limits) as client:
            return list(await asyncio.gather(*[one_stream(client, server.url, i) for i in range(NUM_STREAMS)]))

    stop, peak = threading.Event(), [0.0]
    poller = threading.Thread(target=poll_peak_running, args=(server.url, stop, peak))
    poller.start()
    try:
        results = asyncio.run(run())
    finally:
        stop.set()
        poller.join()

    assert len({res["id"] for res in results}) == NUM_STREAMS
    for i, res in enumerate(results):
        n = res["usage"]["completion_tokens"]
        assert 1 <= n <= MAX_TOKENS if stops_at_eos(i) else n == MAX_TOKENS, (i, res)
        assert (res["finish_reason"] == "length") == (n == MAX_TOKENS), (i, res)
    for i in CHECKED:
        expected = alone[i]["choices"][0]
        assert results[i]["text"] == expected["text"], i
        assert results[i]["finish_reason"] == expected["finish_reason"], i
        counts = ("prompt_tokens", "completion_tokens", "total_tokens")  # (cached_tokens depends on timing)
        assert [results[i]["usage"][k] for k in counts] == [alone[i]["usage"][k] for k in counts], i
    # the engine ran them as one batch (the metrics poller may miss a step or two at the edges)
    assert max(peak) >= NUM_STREAMS * 3 // 4, f"the streams were not batched together (peak running {max(peak)})"
    after = wait_idle(server.url)
    assert after["pdserve_kv_blocks_free"] == after["pdserve_kv_blocks_total"]
    assert after["pdserve_generation_tokens_total"] - before["pdserve_generation_tokens_total"] == sum(
        res["usage"]["completion_tokens"] for res in results
    )
    assert after["pdserve_request_latency_seconds_count"] - before["pdserve_request_latency_seconds_count"] == (
        NUM_STREAMS
    )


def aborts(m: dict[str, float]) -> float:
    return m.get('pdserve_requests_total{finish_reason="abort"}', 0.0)


def start_then_drop_stream(server: ServerProcess, num_chunks: int) -> str:
    """Start a long streaming request, read `num_chunks` text chunks, close the connection; return its id."""
    with httpx.Client(headers=server.headers, timeout=60) as client:
        with client.stream(
            "POST",
            f"{server.url}/v1/completions",
            json={
                "prompt": "Tell me a very long story about a dragon.",
                "max_tokens": LONG_MAX_TOKENS,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
            },
        ) as r:
            assert r.status_code == 200
            chunks = []
            lines = r.iter_lines()  # NOTE: keep a reference; a collected iterator closes the connection
            for line in lines:
                if line.startswith("data: "):
                    chunks.append(line)
                    if len(chunks) == num_chunks:
                        break
            m = metrics(server.url)
            assert m["pdserve_num_requests_running"] == 1, m
            assert m["pdserve_kv_blocks_free"] < m["pdserve_kv_blocks_total"], m
    (req_id,) = set(re.findall(r'"id": "([^"]+)"', "\n".join(chunks)))
    return req_id


def test_closed_stream_frees_blocks(server: ServerProcess) -> None:
    before = wait_idle(server.url)
    req_id = start_then_drop_stream(server, num_chunks=3)
    after = wait_idle(server.url, timeout_s=15)
    assert after["pdserve_kv_blocks_free"] == after["pdserve_kv_blocks_total"]
    assert aborts(after) - aborts(before) == 1
    assert req_id in request_ids_in_log(server.log_text(), LONG_MAX_TOKENS)
    assert (
        httpx.post(
            f"{server.url}/v1/completions", headers=server.headers, timeout=60, json={"prompt": "Hi", "max_tokens": 2}
        ).status_code
        == 200
    )


def test_timed_out_non_streaming_request_frees_blocks(server: ServerProcess) -> None:
    before = wait_idle(server.url)
    known = set(request_ids_in_log(server.log_text(), LONG_MAX_TOKENS))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server.url}/v1/completions",
            headers=server.headers,
            timeout=2.0,
            json={
                "prompt": "Tell me a very long story about a dragon.",
                "max_tokens": LONG_MAX_TOKENS,
                "ignore_eos": True,
            },
        )
    (req_id,) = set(request_ids_in_log(server.log_text(), LONG_MAX_TOKENS)) - known
    after = wait_idle(server.url, timeout_s=15)
    assert after["pdserve_kv_blocks_free"] == after["pdserve_kv_blocks_total"]
    assert aborts(after) - aborts(before) == 1
    assert after["pdserve_generation_tokens_total"] > before["pdserve_generation_tokens_total"]  # it had started
    assert req_id.startswith("cmpl-")


def test_every_request_logs_how_it_finished(server: ServerProcess) -> None:
    dropped = start_then_drop_stream(server, num_chunks=1)
    r = httpx.post(
        f"{server.url}/v1/completions",
        headers=server.headers,
        timeout=60,
        json={"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0, "stop": ["."]},
    )
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    stopped = r.json()["id"]
    wait_idle(server.url, timeout_s=15)
    time.sleep(0.5)  # the engine process writes its log independently
    log = server.log_text()
    assert f"request {dropped} finished (abort)" in log
    assert f"request {stopped} finished (stop)" in log
