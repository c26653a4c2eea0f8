"""`pdserve launch` end to end, direct and storage: a prefill and a decode instance of the default model behind
the router.

One deployment per KV transfer mode (module-scoped, to keep the suite short) carries:
- the OpenAI features through PD, each equal to the mixed server (the session's main server) token for token:
  structured output (greedy and seeded), a forced tool call, n > 1 with a seed, a list of prompts, echo with
  prompt logprobs (run whole on a prefill instance), every penalty, logit bias, min_tokens and bad_words
  (greedy and seeded); afterwards every instance has all its KV blocks free;
- the deployment itself: every listener of every process on loopback (Mooncake's included), and on SIGTERM exit
  code 0 with no process left. With --kv-transfer storage, the launcher's Mooncake master carries the KV.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
from pydantic import BaseModel, Field
from server_fixtures import API_KEY, MODEL_NAME, STARTUP_TIMEOUT_S, ServerProcess, free_port, metrics

pytest_plugins = ["server_fixtures"]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STOP_TIMEOUT_S = 60.0


@dataclass
class Launched:
    proc: subprocess.Popen[bytes]
    url: str
    output: Path
    log_dir: Path
    kv_transfer: str
    instances: dict[str, str]  # part name -> URL

    def children(self) -> list[int]:
        return [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]


@pytest.fixture(scope="module", params=["direct", "storage"])
def launched(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launched]:
    """A `pdserve launch` deployment; on teardown, SIGTERM: exit code 0 and nothing of it left running."""
    kv_transfer = request.param
    tmp_path = tmp_path_factory.mktemp(f"launch-{kv_transfer}")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_dir = tmp_path / "logs"
    output = tmp_path / "launch.out"
    argv = [sys.executable, "-m", "pdserve.cli", "launch", "--port", str(port), "--max-model-len", "2048"]
    argv += ["--num-blocks", "512", "--log-dir", str(log_dir), "--kv-transfer", kv_transfer]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PDSERVE_API_KEY", None)
    with open(output, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    children: list[int] = []
    code: int | None = None
    try:
        _wait_router(proc, url, output)
        text = output.read_text(errors="replace")
        instances = dict(re.findall(r"^((?:prefill|decode)-\d+)\s+\w+\s+(http://\S+)", text, re.M))
        deployment = Launched(proc, url, output, log_dir, kv_transfer, instances)
        children = deployment.children()
        assert len(children) >= 5, children  # router, 2 API servers, 2 engine cores (and their helpers)
        yield deployment
        children = deployment.children()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(STOP_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        deadline = time.monotonic() + 10  # orphans are reaped by whoever adopts them
        while _alive(children) and time.monotonic() < deadline:
            time.sleep(0.1)
        leftovers = _alive(children)
        for pid in leftovers:
            psutil.Process(pid).kill()
    text = output.read_text(errors="replace")
    assert code == 0, text[-20000:]
    assert not leftovers, f"left running after the launcher exited: {leftovers}\n{text[-20000:]}"


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _wait_router(proc: subprocess.Popen[bytes], url: str, output: Path) -> None:
    deadline = time.monotonic() + 2 * STARTUP_TIMEOUT_S  # two instances load the model on a shared CPU
    last = "no answer"
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"pdserve launch exited with code {proc.returncode}:\n{output.read_text()}"
        try:
            r = httpx.get(f"{url}/health", timeout=5)
            # the router can answer before the launcher has seen every part ready and printed its table
            if r.status_code == 200 and "OpenAI API:" in output.read_text(errors="replace"):
                return
            last = f"{r.status_code} {r.text}"
        except httpx.TransportError as e:
            last = repr(e)
        time.sleep(0.5)
    raise AssertionError(
        f"the router did not answer /health within the deadline (last: {last}):\n{output.read_text()[-20000:]}"
    )


def _listeners(pids: list[int]) -> list[tuple[int, str]]:
    """(pid, 'address:port') of every TCP listener of these processes."""
    found = []
    for pid in pids:
        try:
            connections = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        found += [(pid, f"{c.laddr.ip}:{c.laddr.port}") for c in connections if c.status == psutil.CONN_LISTEN]
    return found


def _is_loopback(address: str) -> bool:
    ip = address.rsplit(":", 1)[0]
    return ip.startswith("127.") or ip in ("::1", "::ffff:127.0.0.1")


# ---- the OpenAI features through PD, equal to mixed ------------------------------------------------------------


class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int
    favorite: Color
    hobbies: list[str] = Field(max_length=3)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
PROCESSORS: list[dict[str, Any]] = [
    {"presence_penalty": 1.5},
    {"frequency_penalty": 1.0},
    {"repetition_penalty": 1.3},
    {"logit_bias": {"28": 5}},
    {"min_tokens": 10},
    {"bad_words": ["Paris"]},
]


async def battery(base_url: str, api_key: str) -> dict[str, Any]:
    """The same requests for any deployment; what each answered, by name. Independent requests go at once."""
    c = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=300)
    person = [{"role": "user", "content": "Describe a person named Ann, age 30."}]

    async def parse(**kw: Any) -> Any:
        r = await c.chat.completions.parse(model=MODEL_NAME, messages=person, response_format=Person, **kw)
        assert r.choices[0].message.parsed is not None, r
        return r.choices[0].message.content

    async def tool() -> Any:
        r = await c.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=60,
            temperature=0,
        )
        calls = r.choices[0].message.tool_calls or []
        return [(call.function.name, json.loads(call.function.arguments)) for call in calls]  # type: ignore[union-attr]

    async def completion(key: str, **kw: Any) -> tuple[str, Any]:
        r = await c.completions.create(model=MODEL_NAME, **kw)
        if kw.get("echo"):
            return key, [(ch.text, ch.logprobs.token_logprobs if ch.logprobs else None) for ch in r.choices]
        return key, [ch.text for ch in r.choices]

    capital = "The capital of France is"
    jobs = [
        completion("n=3 seeded", prompt="Once upon a time", n=3, max_tokens=12, temperature=1, seed=3),
        completion("4 prompts", prompt=["One", "Two two", "Three", "Four"], max_tokens=6, temperature=0),
        completion("echo", prompt="The quick brown fox", max_tokens=4, temperature=0, echo=True, logprobs=1),
    ]
    for kw in PROCESSORS:
        name = json.dumps(kw)
        jobs.append(completion(name, prompt=capital, max_tokens=16, temperature=0, extra_body=kw))
        jobs.append(
            completion(name + " seeded", prompt=capital, max_tokens=16, temperature=0.8, seed=11, extra_body=kw)
        )
    answers: dict[str, Any] = dict(await asyncio.gather(*jobs))
    answers["json greedy"], answers["json seeded"], answers["tool required"] = await asyncio.gather(
        parse(max_tokens=120, temperature=0), parse(max_tokens=120, temperature=1, seed=7), tool()
    )
    return answers


@pytest.fixture(scope="module")
def mixed_answers(server: ServerProcess) -> dict[str, Any]:
    return asyncio.run(battery(server.url + "/v1", API_KEY))


def test_features_through_pd_equal_mixed(launched: Launched, mixed_answers: dict[str, Any]) -> None:
    pd = asyncio.run(battery(launched.url + "/v1", "unused"))
    different = {k: (mixed_answers[k], pd[k]) for k in mixed_answers if not _same(pd[k], mixed_answers[k])}
    assert not different, f"PD ({launched.kv_transfer}) differs from mixed (mixed, PD): {different}"
    assert pd["tool required"] == [("get_weather", {"city": "Paris"})], pd["tool required"]
    assert len(set(pd["n=3 seeded"])) > 1, pd["n=3 seeded"]
    for name, url in launched.instances.items():  # nothing held once every request has ended
        deadline = time.monotonic() + 30
        while (m := metrics(url))["pdserve_kv_blocks_free"] != m["pdserve_kv_blocks_total"]:
            assert time.monotonic() < deadline, (
                f"{name}: {m['pdserve_kv_blocks_free']} of {m['pdserve_kv_blocks_total']}"
            )
            time.sleep(0.2)


def _same(a: Any, b: Any) -> bool:
    """Equal, logprobs within 1e-4 (a batch of other shapes changes their last bits, never the tokens)."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) < 1e-4
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def test_echo_with_logprobs_runs_whole_on_a_prefill_instance(launched: Launched) -> None:
    """Prompt logprobs need every prompt position's logits: the router sends the request to P alone."""
    before = _posts(launched, "prefill-0"), _posts(launched, "decode-0")
    r = httpx.post(
        f"{launched.url}/v1/completions",
        json={"prompt": "The quick brown fox", "max_tokens": 2, "temperature": 0, "prompt_logprobs": 1},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    scores = r.json()["choices"][0]["prompt_logprobs"]
    assert scores[0] is None and len(scores) == 4 and all(len(s) >= 1 for s in scores[1:]), scores
    assert (_posts(launched, "prefill-0"), _posts(launched, "decode-0")) == (before[0] + 1, before[1])


def test_n_choices_prefill_once_on_p_and_fork_on_d(launched: Launched) -> None:
    """n = 3: P computes the prompt once and sends its KV once; D runs the other two choices on those blocks."""
    prompt = "The history of the Roman Empire spans many centuries and includes " * 8
    p_url = launched.instances["prefill-0"]
    before = metrics(p_url)["pdserve_prompt_tokens_total"], _received(launched)
    r = httpx.post(
        f"{launched.url}/v1/completions",
        json={"prompt": prompt, "n": 3, "max_tokens": 6, "temperature": 0.9, "seed": 1},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    num_prompt = body["usage"]["prompt_tokens"]
    assert metrics(p_url)["pdserve_prompt_tokens_total"] - before[0] == num_prompt  # once, on P
    assert _received(launched) == before[1] + 1  # one KV transfer: D forks the siblings


def _received(launched: Launched) -> int:
    log = (launched.log_dir / "decode-0.log").read_text(errors="replace")
    return len(re.findall(r"KV of \d+ blocks received", log))


def _posts(launched: Launched, part: str) -> int:
    """Completions the part answered (its uvicorn access log)."""
    log = (launched.log_dir / f"{part}.log").read_text(errors="replace")
    return len(re.findall(r'"POST /v1/completions HTTP/1.1" 200', log))


def test_every_listener_is_on_loopback(launched: Launched) -> None:
    children = launched.children()
    listeners = _listeners([launched.proc.pid, *children])
    public = [(pid, address) for pid, address in listeners if not _is_loopback(address)]
    assert public == [], f"listening beyond loopback: {public}\n(all: {listeners})"
    # the router, 2 API servers, 2 engine cores' control channels and Mooncake's ports (and the master's)
    assert len(listeners) >= (11 if launched.kv_transfer == "storage" else 8), listeners
    text = launched.output.read_text(errors="replace")
    assert f"OpenAI API: {launched.url}/v1" in text and "[prefill-0] " in text and "[decode-0] " in text
    assert {"prefill-0.log", "decode-0.log", "router.log"} <= {f.name for f in launched.log_dir.iterdir()}
    if launched.kv_transfer == "storage":
        assert "mooncake-master" in text and "in the pool" in text, text[-20000:]
