"""One streaming request at a time through the router, timed by the client, with P's and D's KV transfer
counters (GET /metrics) read around it. Knows the servers only by the OpenAI API and /metrics.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pdserve.bench.deployment import Deployment
from pdserve.bench.launch import BenchServerError, scrape
from pdserve.bench.serve import ServeBenchConfig, discover_model
from pdserve.bench.sse import SSEDecoder
from pdserve.bench.transfer.workload import MAX_TOKENS

SETTLE_TIMEOUT_S = 30.0
COUNTERS = {
    "bytes_sent": 'pdserve_kv_transfer_bytes_total{direction="send"}',
    "bytes_received": 'pdserve_kv_transfer_bytes_total{direction="recv"}',
    "seconds": "pdserve_kv_transfer_seconds_sum",
    "num_transfers": "pdserve_kv_transfer_seconds_count",
    "busy_seconds": 'pdserve_kv_transfer_send_seconds_total{kind="busy"}',
    "exposed_seconds": 'pdserve_kv_transfer_send_seconds_total{kind="exposed"}',
}
FAILURES_PREFIX = "pdserve_kv_transfer_failures_total{"


def read_counters(url: str, counters: Mapping[str, str] = COUNTERS) -> dict[str, Any]:
    """`counters` (JSON name -> Prometheus sample) of `url`, its KV transfer failures and whether it is idle."""
    samples = scrape(url)
    values: dict[str, Any] = {key: samples.get(name, 0.0) for key, name in counters.items()}
    values["failures"] = int(sum(v for k, v in samples.items() if k.startswith(FAILURES_PREFIX)))
    values["is_idle"] = samples.get("pdserve_num_requests_running") == samples.get("pdserve_num_requests_waiting") == 0
    return values


def settled(url: str, before: dict[str, Any], counters: Mapping[str, str] = COUNTERS) -> dict[str, Any]:
    """Counters of `url` once one more transfer (or failure) than `before` is counted and nothing runs."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        now = read_counters(url, counters)
        if now["is_idle"] and now["num_transfers"] + now["failures"] > before["num_transfers"] + before["failures"]:
            return now
        if time.monotonic() > deadline:
            raise BenchServerError(
                f"{url} counted no finished KV transfer within {SETTLE_TIMEOUT_S:.0f} s of the request's end"
            )
        time.sleep(0.05)


@dataclass
class Timing:
    """What the client saw of one request: seconds to the first token's chunk and to the end of the stream."""

    success: bool = False
    error: str | None = None
    ttft_s: float | None = None
    latency_s: float = 0.0
    prompt_tokens: int | None = None


async def send_timed(config: ServeBenchConfig, model: str, prompt_ids: list[int]) -> Timing:
    """POST one streaming completion and time it; never raises for server or network failures.

    Asks for logprobs so the server sends a chunk for every token, even one whose text is empty (a random
    prompt may well get one): TTFT is the first chunk with a choice, not the first with text.
    """
    import aiohttp

    payload = {
        "model": model,
        "prompt": prompt_ids,
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
        "logprobs": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    timing, num_tokens = Timing(), 0
    sent = time.perf_counter()
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=config.timeout_s)) as session,
            session.post(config.url, json=payload) as resp,
        ):
            if resp.status != 200:
                timing.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return timing
            decoder = SSEDecoder()
            async for raw in resp.content.iter_any():
                now = time.perf_counter()
                for data in decoder.feed(raw):
                    chunk = json.loads(data) if data != "[DONE]" else {}
                    if "error" in chunk:
                        timing.error = f"error in stream: {chunk['error']}"
                        return timing
                    if chunk.get("choices"):
                        num_tokens += len((chunk["choices"][0].get("logprobs") or {}).get("tokens") or [])
                        timing.ttft_s = now - sent if timing.ttft_s is None else timing.ttft_s
                    timing.prompt_tokens = (chunk.get("usage") or {}).get("prompt_tokens", timing.prompt_tokens)
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError, json.JSONDecodeError) as e:
        timing.error = f"{type(e).__name__}: {e}"
    timing.latency_s = time.perf_counter() - sent
    if timing.error is None and num_tokens != MAX_TOKENS:
        timing.error = f"the stream carried {num_tokens} tokens, not {MAX_TOKENS}"
    timing.success = timing.error is None
    return timing


async def model_name(config: ServeBenchConfig) -> str:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=config.timeout_s)) as session:
        return await discover_model(session, config)


def send_counted(
    deployment: Deployment,
    config: ServeBenchConfig,
    model: str,
    prompt_ids: list[int],
    counters: Mapping[str, str] = COUNTERS,
) -> tuple[dict[str, Any], tuple[dict[str, Any], dict[str, Any]] | None]:
    """Send one request through the router: what the client saw of it and, if it succeeded, how much P's and
    D's `counters` (and their "failures") grew, read before it and once each counted its transfer."""
    p_url, d_url = deployment.instances("prefill")[0].probe_url, deployment.instances("decode")[0].probe_url
    p0, d0 = read_counters(p_url, counters), read_counters(d_url, counters)
    result = asyncio.run(send_timed(config, model, prompt_ids))
    record: dict[str, Any] = {
        "input_len": len(prompt_ids),
        "prompt_tokens": result.prompt_tokens,
        "success": result.success,
        "error": result.error,
        "ttft_ms": None if result.ttft_s is None else round(result.ttft_s * 1000, 3),
        "latency_ms": round(result.latency_s * 1000, 3),
    }
    if not result.success:
        deployment.check_alive()
        return record, None
    p1, d1 = settled(p_url, p0, counters), settled(d_url, d0, counters)
    return record, (growth(p0, p1), growth(d0, d1))


def growth(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    return {key: after[key] - before[key] for key in after if key != "is_idle"}


def ratio(a: float | None, b: float | None, scale: float = 1.0) -> float | None:
    return None if a is None or not b else round(a / b / scale, 6)


def mib(nbytes: float | None) -> float | None:
    return None if nbytes is None else nbytes / 2**20
