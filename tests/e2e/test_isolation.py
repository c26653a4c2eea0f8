"""One huge request cannot hurt the others: an 8 MB prompt sent through the router of a 1P1D deployment of the
default model while 32 ordinary streaming requests run. The big one gets a 413 at once (the router refuses it from
its Content-Length, before reading it, so neither P nor D ever sees it), every ordinary request succeeds, no
instance is marked unhealthy, and the ordinary requests' p99 latency stays within 1.5x of the same run without it.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

pytest.register_assert_rewrite("server_fixtures", "pd_fixtures")

from pd_fixtures import RouterProcess, start_pd, stop_all, wait_all_free  # noqa: E402
from server_fixtures import ServerProcess  # noqa: E402

pytest_plugins = ["server_fixtures"]
pytestmark = pytest.mark.slow

BIG = {"prompt": "hello " * 1_400_000, "max_tokens": 4}  # 8.4 MB of JSON
NUM_ORDINARY = 32


@pytest.fixture(scope="module")
def pd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, ServerProcess, RouterProcess]]:
    parts = start_pd(tmp_path_factory.mktemp("isolation"), ["--max-model-len", "1024"], ["--max-model-len", "1024"])
    try:
        yield parts
    finally:
        stop_all(parts[2], parts[0], parts[1])


async def ordinary(client: httpx.AsyncClient, url: str, i: int) -> float:
    body = {"prompt": f"Request {i}: the weather today is", "max_tokens": 12, "stream": True, "temperature": 0}
    start = time.monotonic()
    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        text = (await resp.aread()).decode()
    assert text.rstrip().endswith("data: [DONE]") and '"error"' not in text, text[-300:]
    return time.monotonic() - start


def send_big(url: str) -> dict[str, Any]:
    """The big request, from its own client (a thread of its own: its 8 MB must not slow the burst's client)."""
    start = time.monotonic()
    try:
        r = httpx.post(f"{url}/v1/completions", json=BIG, timeout=60)
        return {"status": r.status_code, "code": r.json()["error"]["code"], "seconds": time.monotonic() - start}
    except httpx.HTTPError as e:
        return {"status": None, "code": f"{type(e).__name__}: {e}", "seconds": time.monotonic() - start}


async def burst(url: str, with_big: bool) -> tuple[list[float], dict[str, Any] | None]:
    """The ordinary requests' latencies, and the big request's answer (status, code, seconds) if sent."""
    async with httpx.AsyncClient(timeout=180) as client:
        tasks = [asyncio.create_task(ordinary(client, url, i)) for i in range(NUM_ORDINARY)]
        big = None
        if with_big:
            await asyncio.sleep(0.2)  # in the middle of the burst
            big = await asyncio.to_thread(send_big, url)
        return list(await asyncio.gather(*tasks)), big


def p99(latencies: list[float]) -> float:
    return statistics.quantiles(latencies, n=100, method="inclusive")[98]


def test_huge_prompt_hurts_no_other_request(pd: tuple[ServerProcess, ServerProcess, RouterProcess]) -> None:
    p, d, router = pd
    asyncio.run(burst(router.url, with_big=False))  # warm-up: first-use costs out of the comparison
    alone, _ = asyncio.run(burst(router.url, with_big=False))
    with_big, big = asyncio.run(burst(router.url, with_big=True))
    assert big is not None and big["status"] == 413 and big["code"] == "request_too_large", big
    assert big["seconds"] < 5, big
    assert p99(with_big) <= 1.5 * p99(alone), (p99(with_big), p99(alone))
    listed = httpx.get(f"{router.url}/health", timeout=5).json()["instances"]
    assert all(i["healthy"] for i in listed), listed
    assert "unhealthy" not in router.log_text()
    for server in (p, d):
        assert "request_too_large" not in server.log_text()  # neither instance saw the big request
        wait_all_free(server.url)


def test_huge_prompt_to_an_instance_is_a_413_and_it_stays_healthy(
    pd: tuple[ServerProcess, ServerProcess, RouterProcess],
) -> None:
    p, _, _ = pd
    r = httpx.post(f"{p.url}/v1/completions", json=BIG, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
    assert httpx.get(f"{p.url}/health", timeout=5).status_code == 200


def test_long_text_prompt_under_the_size_limit_is_refused_before_tokenizing(
    pd: tuple[ServerProcess, ServerProcess, RouterProcess],
) -> None:
    """3.6 MB of text fits the request limit but not the context: a 400 from its length alone, while /health
    keeps answering at once."""
    p, _, router = pd
    body = {"prompt": "hello " * 600_000, "max_tokens": 4}
    start = time.monotonic()
    r = httpx.post(f"{router.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert time.monotonic() - start < 5
    assert httpx.get(f"{p.url}/health", timeout=1).status_code == 200
