"""A deployment that no request can hurt, on the default model: 2 P and 2 D behind a real router.

- An 8 MB prompt sent through the router while 32 ordinary streaming requests run: a 413 at once (the router
  refuses it from its Content-Length, so no instance ever sees it), every ordinary request succeeds, no instance
  is marked unhealthy, and their p99 latency stays within 1.5x of the same burst without it.

- A D SIGSTOPped mid-stream for longer than the stall timeout: the stream moves to the other D and the client's text
  equals an uninterrupted run's (greedy, and seeded); SIGKILLed: the same.
- P SIGKILLed before the first token: the request succeeds on the other P.
- With one D left, SIGSTOP or SIGKILL mid-stream: the client gets an error event within the stall timeout + 5 s.
- Afterwards every surviving instance has free == total blocks.

The tests share one deployment and run in file order (each one takes the instances it needs away).
"""

from __future__ import annotations

import asyncio
import json
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

pytest.register_assert_rewrite("server_fixtures", "pd_fixtures")

from pd_fixtures import RouterProcess, kill_instance, start_instance, stop_all, wait_all_free  # noqa: E402
from server_fixtures import ServerProcess  # noqa: E402

pytest_plugins = ["server_fixtures"]
pytestmark = pytest.mark.slow

STALL_S = 4.0
FLAGS = [
    "--max-model-len",
    "1024",
    "--num-blocks",
    "256",
    "--stall-timeout",
    f"{STALL_S:g}",
]  # four engine cores: a small KV cache each
P_FLAGS = [*FLAGS, "--max-num-batched-tokens", "32"]  # a long prompt takes many steps on P: time to kill it
LONG = {"max_tokens": 96, "ignore_eos": True, "stream": True}
BIG = {"prompt": "hello " * 1_400_000, "max_tokens": 4}  # 8.4 MB of JSON
NUM_ORDINARY = 32
GREEDY = {"prompt": "Once upon a time, in a small village by the sea,", "temperature": 0, **LONG}
SEEDED = {"prompt": "My favourite recipe for a quick dinner is", "temperature": 0.8, "seed": 7, **LONG}


class Deployment:
    def __init__(self, tmp: Path) -> None:
        self.prefills = [start_instance("prefill", tmp, P_FLAGS) for _ in range(2)]
        self.decodes = [start_instance("decode", tmp, FLAGS) for _ in range(2)]
        for server in (*self.prefills, *self.decodes):
            server.wait_ready()
        flags = ["--prefill", *(p.url for p in self.prefills), "--decode", *(d.url for d in self.decodes)]
        self.router = RouterProcess([*flags, "--stall-timeout", f"{STALL_S:g}"], tmp / "router.log").start()
        self.router.wait_ready()
        self.stopped: list[ServerProcess] = []

    def serving(self, role: str) -> ServerProcess:
        """The instance of `role` the router has a request open on (exactly one must have one)."""
        listed = httpx.get(f"{self.router.url}/health", timeout=5).json()["instances"]
        busy = [i["url"] for i in listed if i["role"] == role and i["in_flight"] > 0]
        assert len(busy) == 1, listed
        return next(s for s in (*self.prefills, *self.decodes) if s.url == busy[0])

    def signal_tree(self, server: ServerProcess, sig: signal.Signals) -> None:
        """`sig` to the instance's API process and everything under it (its engine core)."""
        assert server.proc is not None
        root = psutil.Process(server.proc.pid)
        for proc in [root, *root.children(recursive=True)]:
            proc.send_signal(sig)

    def resume(self, server: ServerProcess) -> None:
        """SIGCONT a stopped instance and wait until the router finds it healthy again."""
        self.signal_tree(server, signal.SIGCONT)
        self.stopped.remove(server)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            listed = httpx.get(f"{self.router.url}/health", timeout=5).json()["instances"]
            if any(i["url"] == server.url and i["healthy"] for i in listed):
                return
            time.sleep(0.2)
        raise AssertionError(f"{server.url} is not healthy again 30 s after SIGCONT")

    def kill(self, server: ServerProcess) -> None:
        kill_instance(server)
        for group in (self.prefills, self.decodes):
            if server in group:
                group.remove(server)

    def survivors_free(self) -> None:
        for server in (*self.prefills, *self.decodes):
            wait_all_free(server.url, timeout_s=60)


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch_module: pytest.MonkeyPatch
) -> Iterator[Deployment]:
    # four engine cores share this machine's cores: one thread each, or their OpenMP threads spin against each
    # other and steps take seconds (longer than the stall timeout)
    monkeypatch_module.setenv("OMP_NUM_THREADS", "1")
    d = Deployment(tmp_path_factory.mktemp("migration"))
    try:
        yield d
    finally:
        for server in d.stopped:
            d.signal_tree(server, signal.SIGCONT)
        stop_all(d.router, *d.prefills, *d.decodes)


def stream(url: str, body: dict[str, Any], after_chunks: int | None = None, act: Any = None) -> dict[str, Any]:
    """Stream `body`; after `after_chunks` text chunks call `act()`. The text, any error event, and the longest
    the stream went without an event after `act` (the gap the client saw)."""
    text, error, num_chunks, last, gap = "", None, 0, None, 0.0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            if last is not None:
                gap = max(gap, time.monotonic() - last)
                last = time.monotonic()
            if line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                error = event["error"]
                continue
            text += "".join(c.get("text") or "" for c in event["choices"])
            num_chunks += 1
            if num_chunks == after_chunks:
                act()
                last = time.monotonic()
    return {"text": text, "error": error, "gap": gap}


def reference(url: str, body: dict[str, Any]) -> str:
    answer = stream(url, body)
    assert answer["error"] is None and answer["text"]
    return answer["text"]


# ---- one huge request among ordinary ones -----------------------------------------------------------------


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


def test_huge_prompt_hurts_no_other_request(deployment: Deployment) -> None:
    router = deployment.router
    asyncio.run(burst(router.url, with_big=False))  # warm-up: first-use costs out of the comparison
    ratios = []
    for _ in range(2):  # two pairs side by side: a real effect shows in both, a noisy moment of this machine in one
        alone, _ = asyncio.run(burst(router.url, with_big=False))
        with_big, big = asyncio.run(burst(router.url, with_big=True))
        assert big is not None and big["status"] == 413 and big["code"] == "request_too_large", big
        assert big["seconds"] < 5, big
        ratios.append(p99(with_big) / p99(alone))
    assert min(ratios) <= 1.5, ratios
    listed = httpx.get(f"{router.url}/health", timeout=5).json()["instances"]
    assert all(i["healthy"] for i in listed), listed
    assert "unhealthy" not in router.log_text()
    for server in (*deployment.prefills, *deployment.decodes):
        assert "request_too_large" not in server.log_text()  # no instance saw the big request
    deployment.survivors_free()


def test_huge_prompt_to_an_instance_is_a_413_and_it_stays_healthy(deployment: Deployment) -> None:
    p = deployment.prefills[0]
    r = httpx.post(f"{p.url}/v1/completions", json=BIG, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
    assert httpx.get(f"{p.url}/health", timeout=5).status_code == 200


def test_long_text_prompt_under_the_size_limit_is_refused_before_tokenizing(deployment: Deployment) -> None:
    """3.6 MB of text fits the request limit but not the context: a 400 from its length alone, while /health
    keeps answering at once."""
    p, router = deployment.prefills[0], deployment.router
    body = {"prompt": "hello " * 600_000, "max_tokens": 4}
    start = time.monotonic()
    r = httpx.post(f"{router.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert time.monotonic() - start < 5
    assert httpx.get(f"{p.url}/health", timeout=1).status_code == 200


# ---- instances that hang or die ---------------------------------------------------------------------------


@pytest.mark.parametrize("body", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_stopped_decode_mid_stream_moves_to_the_other(deployment: Deployment, body: dict[str, Any]) -> None:
    want = reference(deployment.router.url, body)
    victim: list[ServerProcess] = []

    def stop_serving_decode() -> None:
        victim.append(deployment.serving("decode"))
        deployment.signal_tree(victim[0], signal.SIGSTOP)
        deployment.stopped.append(victim[0])

    got = stream(deployment.router.url, body, after_chunks=8, act=stop_serving_decode)
    assert got["error"] is None, got
    assert got["text"] == want
    assert STALL_S - 0.5 <= got["gap"] < STALL_S + 5, got["gap"]
    deployment.resume(victim[0])
    deployment.survivors_free()


def test_prefill_killed_before_the_first_token_is_retried(deployment: Deployment) -> None:
    body = {"prompt": "Tell me about the sea. " * 120, "max_tokens": 8, "temperature": 0}  # ~720 tokens on P
    want = httpx.post(f"{deployment.router.url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
    with httpx.Client(timeout=120) as client:
        answer: list[httpx.Response] = []
        sender = threading.Thread(
            target=lambda: answer.append(client.post(f"{deployment.router.url}/v1/completions", json=body))
        )
        sender.start()
        time.sleep(0.3)
        deployment.kill(deployment.serving("prefill"))
        sender.join(120)
    assert answer and answer[0].status_code == 200, answer[0].text if answer else "no answer"
    assert answer[0].json()["choices"][0]["text"] == want
    deployment.survivors_free()


def test_killed_decode_mid_stream_moves_to_the_other(deployment: Deployment) -> None:
    want = reference(deployment.router.url, GREEDY)
    got = stream(
        deployment.router.url, GREEDY, after_chunks=8, act=lambda: deployment.kill(deployment.serving("decode"))
    )
    assert got["error"] is None and got["text"] == want
    deployment.survivors_free()


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_last_decode_lost_mid_stream_is_an_error_event(deployment: Deployment, how: str) -> None:
    assert len(deployment.decodes) == 1
    decode = deployment.decodes[0]

    def lose_it() -> None:
        if how == "stop":
            deployment.signal_tree(decode, signal.SIGSTOP)
            deployment.stopped.append(decode)
        else:
            deployment.kill(decode)

    got = stream(deployment.router.url, GREEDY, after_chunks=8, act=lose_it)
    assert got["error"] is not None and decode.url in got["error"]["message"], got
    assert got["error"]["code"] == ("instance_stalled" if how == "stop" else "instance_unavailable")
    assert got["gap"] < STALL_S + 5, got["gap"]
    if how == "stop":
        deployment.resume(decode)
    deployment.survivors_free()
