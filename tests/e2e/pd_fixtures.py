"""PD deployments for end-to-end tests: real `pdserve serve --role prefill|decode` processes and a real
`pdserve router` in front, each with its log file (printed when a test fails, see server_fixtures)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from helpers import make_tiny_chat_model
from server_fixtures import _LIVE, ServerProcess, free_port, metrics, sse_events

STARTUP_TIMEOUT_S = 180.0


@dataclass(eq=False)
class RouterProcess:
    """One `pdserve router` subprocess (it quacks like ServerProcess for the log-on-failure fixture)."""

    flags: list[str]
    log_path: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RouterProcess:
        args = [
            sys.executable,
            "-m",
            "pdserve.cli",
            "router",
            "--port",
            str(self.port),
            "--health-interval",
            "0.5",
            *self.flags,
        ]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            log.write(f"$ {' '.join(args)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
            )
        _LIVE.append(self)  # type: ignore[arg-type]
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout_s: float = 60) -> RouterProcess:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, f"router exited:\n{self.log_text()[-3000:]}"
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"the router did not become healthy:\n{self.log_text()[-3000:]}")

    def stop(self) -> int | None:
        if self in _LIVE:
            _LIVE.remove(self)  # type: ignore[arg-type]
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None


def start_instance(role: str, log_dir: Path, flags: list[str], port: int | None = None) -> ServerProcess:
    server = ServerProcess(["--role", role, *flags], log_dir / f"{role}-{time.monotonic_ns()}.log")
    if port is not None:
        server.port = port
    return server.start()


def kill_instance(server: ServerProcess) -> None:
    """SIGKILL an instance: its API process and its engine core (and workers) at once, as a crash would."""
    assert server.proc is not None
    procs = [psutil.Process(server.proc.pid)]
    try:
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        pass
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
    if server in _LIVE:
        _LIVE.remove(server)


def blocks_free(url: str) -> tuple[float, float]:
    m = metrics(url)
    return m["pdserve_kv_blocks_free"], m["pdserve_kv_blocks_total"]


def wait_all_free(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        free, total = blocks_free(url)
        if free == total:
            return
        assert time.monotonic() < deadline, f"{url}: {free} of {total} blocks free after {timeout_s:.0f} s"
        time.sleep(0.2)


def completion(url: str, body: dict[str, Any], timeout: float = 120) -> tuple[int, dict[str, Any]]:
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=timeout)
    return r.status_code, r.json()


def stream_text(r: httpx.Response) -> tuple[str, list[str]]:
    """Text and logprob tokens assembled from a completions or chat SSE body."""
    text, tokens = "", []
    for e in sse_events(r.text):
        if e == "[DONE]" or "error" in e:
            continue
        for c in e["choices"]:
            text += c.get("text") or (c.get("delta") or {}).get("content") or ""
            lp = c.get("logprobs") or {}
            tokens += lp.get("tokens") or [t["token"] for t in lp.get("content") or []]
    return text, tokens


# ---- the equality workload: completions and chat, streaming and not ---------------------------------

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Write a long story about a dragon. " * 12,
]  # ~100 tokens: several 32-token chunks on P
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colors. " * 8}],
]
MAX_TOKENS = 24


def requests() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for stream in (False, True):
        for p in PROMPTS:
            out.append(
                (
                    "/v1/completions",
                    {"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 1, "stream": stream},
                )
            )
        for m in CHATS:
            out.append(
                (
                    "/v1/chat/completions",
                    {"messages": m, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": True, "stream": stream},
                )
            )
    return out


async def answer(
    client: httpx.AsyncClient, url: str, path: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[str, list[str]]:
    r = await client.post(url + path, json=body, headers=headers, timeout=180)
    assert r.status_code == 200, r.text
    if body["stream"]:
        return stream_text(r)
    choice = r.json()["choices"][0]
    if "message" in choice:
        return choice["message"]["content"], [t["token"] for t in choice["logprobs"]["content"]]
    return choice["text"], choice["logprobs"]["tokens"]


async def answers(url: str, headers: dict[str, str]) -> list[tuple[str, list[str]]]:
    """The text and logprob tokens of every request(), sent concurrently."""
    async with httpx.AsyncClient() as client:
        return list(await asyncio.gather(*(answer(client, url, path, body, headers) for path, body in requests())))


def start_pd(
    tmp_path: Path, p_flags: list[str], d_flags: list[str]
) -> tuple[ServerProcess, ServerProcess, RouterProcess]:
    p = start_instance("prefill", tmp_path, p_flags)
    d = start_instance("decode", tmp_path, d_flags)
    p.wait_ready()
    d.wait_ready()
    router = RouterProcess(["--prefill", p.url, "--decode", d.url], tmp_path / "router.log").start().wait_ready()
    return p, d, router


def stop_all(*parts: Any) -> None:
    for part in parts:
        part.stop()


def tp2_pd_equals_mixed(
    tmp_path: Path,
    default_hf_dir: Path,
    flags: list[str],
    check_after: Callable[[ServerProcess, ServerProcess, int], None],
) -> None:
    """TP=2 (gloo) on both P and D. The default model's 9 heads do not split in two, so this runs a tiny
    random-weight Llama with the default model's tokenizer. The reference is P itself answering plain
    requests: an instance of any role serves a request without kv_transfer_params through the mixed path."""
    model = make_tiny_chat_model(tmp_path / "tiny-chat", default_hf_dir)
    flags = [*flags, "--model", str(model), "-tp", "2", "--max-model-len", "1024", "--num-blocks", "128"]
    p, d, router = start_pd(tmp_path, [*flags, "--max-num-batched-tokens", "48"], flags)
    try:
        want = asyncio.run(answers(p.url, {}))
        got = asyncio.run(answers(router.url, {}))
        assert got == want
        check_after(p, d, len(want))
    finally:
        stop_all(router, p, d)
