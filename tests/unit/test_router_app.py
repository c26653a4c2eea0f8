"""The router over fake instances: real HTTP on 127.0.0.1, no model.

A fake instance follows the instance contract (/health, /v1/pd/info, OpenAI
endpoints) and records every request, including whether its connection was
closed before it finished. Like a real D, a fake D sends no token of a PD
request before the fake P (in this process) has answered its room. Its
behaviour per request comes from the body's "fake" field ({"prefill": {...},
"decode": {...}}), which the router passes through like any unknown field. Fakes that must die run as subprocesses of
this file and get SIGKILL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

if __name__ != "__main__":  # a fake-instance subprocess needs nothing of pdserve, whose import loads torch
    from pdserve.bench.launch import free_port
    from pdserve.router.app import RouterSettings, build_router_app
    from pdserve.router.policies import make_policy
    from pdserve.router.registry import HealthSettings, Registry
    from pdserve.server.heartbeat import heartbeat

INTERVAL = 0.2  # router health interval in these tests


def stream_bytes(num_chunks: int, start: int = 0, with_ids: bool = False) -> bytes:
    """What a fake D streams for `num_chunks` (from chunk `start`, a resumed stream's), byte for byte. Chunk i is
    token 100 + i, text "t<i>"; with the router's `stream_token_ids`, its choice carries the token id."""
    ids = ', "token_ids": [{}]'
    chunks = [
        f'data: {{"choices": [{{"index": 0, "text": "t{i}"{ids.format(100 + i) if with_ids else ""}}}]}}\n\n'
        for i in range(start, num_chunks)
    ]
    return ("".join(chunks) + "data: [DONE]\n\n").encode()


@dataclass
class Record:
    path: str
    body: dict[str, Any]
    closed_early: bool = False
    finished: bool = False


ROOMS_PREFILLED: set[str] = set()  # rooms a fake P of this process has answered 2xx for


async def _wait_disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class Fake:
    """A fake P, D or mixed instance."""

    def __init__(
        self,
        role: str,
        incarnation: str = "inc-1",
        fingerprint: str = "fp-1",
        tp_size: int = 1,
        port: int | None = None,
    ) -> None:
        self.role, self.incarnation, self.fingerprint, self.tp_size = role, incarnation, fingerprint, tp_size
        self.port = port or free_port()
        self.records: list[Record] = []
        self.app = self._build()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def control_address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}{self.role[0]}"  # fake, distinct per instance

    def _build(self) -> FastAPI:
        app = FastAPI()
        app.get("/health")(lambda: {"status": "ok"})
        app.get("/v1/pd/info")(
            lambda: {
                "role": self.role,
                "incarnation": self.incarnation,
                "control_address": self.control_address,
                "fingerprint": self.fingerprint,
                "model": "fake",
                "tp_size": self.tp_size,
                "kv_transfer": "direct",
                "num_open_requests": 0,
                "num_blocks_free": 10,
                "num_blocks_total": 10,
            }
        )
        app.get("/v1/models")(lambda: {"object": "list", "data": [{"id": "fake", "object": "model"}]})
        app.post("/v1/completions")(self._complete)
        app.post("/v1/chat/completions")(self._complete)
        return app

    async def _complete(self, request: Request) -> Response:
        body = await request.json()
        rec = Record(request.url.path, body)
        self.records.append(rec)
        fake = body.get("fake", {})
        cfg = fake.get(f"{self.role}:{self.port}", fake.get(self.role, {}))  # one instance's, else its role's
        gone = asyncio.create_task(_wait_disconnect(request.receive))
        if await _pause(gone, cfg.get("delay", 0)):
            rec.closed_early = True
            return Response(status_code=499)
        status = cfg.get("status", 200)
        if status >= 300:
            gone.cancel()
            rec.finished = True
            return JSONResponse(
                {
                    "error": {
                        "message": f"fake {self.role} says no",
                        "type": "invalid_request_error",
                        "code": cfg.get("code", "bad_request"),
                    }
                },
                status,
            )
        if body.get("stream"):
            return StreamingResponse(self._chunks(rec, cfg, gone), media_type="text/event-stream")
        kv = await self._await_kv(body, cfg, gone)
        if kv == "gone" or await _pause(gone, cfg.get("chunks", 3) * cfg.get("chunk_delay", 0)):
            rec.closed_early = True
            return Response(status_code=499)
        gone.cancel()
        rec.finished = True
        if kv == "timeout":
            return JSONResponse(
                {"error": {"message": "no KV", "type": "server_error", "code": "kv_transfer_timeout"}}, 502
            )
        if self.role == "prefill" and "kv_transfer_params" in body:
            ROOMS_PREFILLED.add(body["kv_transfer_params"]["room"])
        return JSONResponse(
            {
                "id": "cmpl-fake",
                "object": "text_completion",
                "served_by": self.role,
                "choices": [{"index": 0, "text": "ok", "finish_reason": "length"}],
            }
        )

    async def _await_kv(self, body: dict[str, Any], cfg: dict[str, Any], gone: asyncio.Task[None]) -> str:
        """Like a real D: no first token before P has prefilled the room. 'ok', 'gone' or 'timeout'."""
        if self.role != "decode" or "kv_transfer_params" not in body or cfg.get("no_kv_wait"):
            return "ok"
        deadline = time.monotonic() + cfg.get("kv_timeout", 10)
        while body["kv_transfer_params"]["room"] not in ROOMS_PREFILLED:
            if await _pause(gone, 0.01):
                return "gone"
            if time.monotonic() > deadline:
                return "timeout"
        return "ok"

    async def _chunks(self, rec: Record, cfg: dict[str, Any], gone: asyncio.Task[None]) -> AsyncIterator[bytes]:
        num_chunks, delay = cfg.get("chunks", 3), cfg.get("chunk_delay", 0)
        start = len(rec.body.get("resume_token_ids") or [])
        data = stream_bytes(num_chunks, start, rec.body.get("stream_token_ids", False)).split(b"\n\n")[:-1]
        try:
            kv = await self._await_kv(rec.body, cfg, gone)
            if kv == "gone":
                return
            if kv == "timeout":
                yield b'data: {"error": {"message": "no KV", "code": "kv_transfer_timeout"}}\n\ndata: [DONE]\n\n'
                rec.finished = True
                return
            for i, event in enumerate(data, start):
                if i == cfg.get("hang_at"):  # silent, like a SIGSTOPped instance
                    await _pause(gone, 3600)
                    return
                if i == cfg.get("cut_at"):  # the body ends without [DONE], like a killed instance's
                    return
                if i == cfg.get("stall_error_at"):  # like an instance whose engine core stalled
                    yield b'data: {"error": {"message": "stuck", "code": "engine_stalled"}}\n\ndata: [DONE]\n\n'
                    rec.finished = True
                    return
                if i < num_chunks and await _pause(gone, delay):
                    return
                yield event + b"\n\n"
            rec.finished = True
        finally:
            gone.cancel()
            rec.closed_early = not rec.finished


async def _pause(gone: asyncio.Task[None], seconds: float) -> bool:
    """Sleep `seconds`; True if the client disconnected meanwhile."""
    if seconds > 0:
        await asyncio.wait({gone}, timeout=seconds)
    return gone.done()


class ThreadServer:
    """An ASGI app on 127.0.0.1:port, served by uvicorn in a thread."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.port = port or free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", timeout_graceful_shutdown=1)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), 10, "server start")
        assert self.server.started, "the server did not start; see the captured log"
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def wait_until(cond: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@contextmanager
def fakes(*specs: tuple[str, dict[str, Any]]) -> Iterator[list[Fake]]:
    made = [Fake(role, **kw) for role, kw in specs]
    servers = [ThreadServer(f.app, f.port) for f in made]
    for s in servers:
        s.__enter__()
    try:
        yield made
    finally:
        for s in servers:
            s.__exit__()


@dataclass
class Router:
    url: str
    registry: Registry


@contextmanager
def router(
    instances: list[tuple[str, str]],
    policy: str = "least_loaded",
    api_key: str | None = None,
    request_timeout: float = 30.0,
    **settings: Any,
) -> Iterator[Router]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    registry = Registry(HealthSettings(interval_s=INTERVAL, timeout_s=1.0), headers)
    for role, url in instances:
        registry.add(url, role)
    app = build_router_app(registry, make_policy(policy), RouterSettings(request_timeout, api_key, **settings))
    with ThreadServer(app) as server:
        yield Router(server.url, registry)


@contextmanager
def subprocess_fake(role: str, incarnation: str = "inc-1") -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--role", role, "--port", str(port), "--incarnation", incarnation],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _is_up(url), 20, f"fake {role} subprocess")
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _is_up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


def pd_body(stream: bool = False, **fake: dict[str, Any]) -> dict[str, Any]:
    return {"model": "fake", "prompt": "hello there", "max_tokens": 4, "stream": stream, "fake": fake}


def post(url: str, body: dict[str, Any], path: str = "/v1/completions", **kw: Any) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=kw.pop("timeout", 20), **kw)


def scrape(url: str) -> dict[str, float]:
    samples = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


# -- PD dispatch -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pd() -> Iterator[tuple[Fake, Fake, Router]]:
    with fakes(("prefill", {}), ("decode", {})) as (p, d), router([("prefill", p.url), ("decode", d.url)]) as r:
        yield p, d, r


@pytest.fixture
def pd_clean(pd: tuple[Fake, Fake, Router]) -> Iterator[tuple[Fake, Fake, Router]]:
    p, d, r = pd
    p.records.clear()
    d.records.clear()
    yield pd
    wait_until(lambda: all(i.num_in_flight == 0 for i in r.registry.instances()), 5, "in-flight back to 0")


def test_pd_dispatch_sends_both_sides_their_peer(pd_clean: tuple[Fake, Fake, Router]) -> None:
    p, d, r = pd_clean
    resp = post(r.url, pd_body())
    assert resp.status_code == 200 and resp.json()["served_by"] == "decode"
    (pr,), (dr,) = p.records, d.records
    assert pr.body["stream"] is False and dr.body["stream"] is False
    pk, dk = pr.body["kv_transfer_params"], dr.body["kv_transfer_params"]
    assert pk == {"room": dk["room"], "peer": d.control_address, "peer_incarnation": "inc-1", "mode": "direct"}
    assert dk == {"room": pk["room"], "peer": p.control_address, "peer_incarnation": "inc-1", "mode": "direct"}
    assert len(pk["room"]) == 32
    assert {k: v for k, v in dr.body.items() if k != "kv_transfer_params"} == pd_body()


def test_pd_streaming_passes_bytes_through(pd_clean: tuple[Fake, Fake, Router]) -> None:
    p, d, r = pd_clean
    body = pd_body(True, decode={"chunks": 5, "chunk_delay": 0.01})
    body["messages"] = [{"role": "user", "content": "hi"}]
    with httpx.stream("POST", f"{r.url}/v1/chat/completions", json=body, timeout=20) as resp:
        data = b"".join(resp.iter_raw())
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    assert data == stream_bytes(5)
    assert p.records[0].body["stream"] is False and d.records[0].body["stream"] is True
    assert p.records[0].path == d.records[0].path == "/v1/chat/completions"


@pytest.mark.parametrize("stream", [False, True])
def test_prefill_error_before_stream_returns_its_error_and_closes_decode(
    pd_clean: tuple[Fake, Fake, Router], stream: bool
) -> None:
    p, d, r = pd_clean
    resp = post(r.url, pd_body(stream, prefill={"delay": 0.2, "status": 400}))  # D waits for KV that never comes
    assert resp.status_code == 400
    assert resp.json() == {
        "error": {"message": "fake prefill says no", "type": "invalid_request_error", "code": "bad_request"}
    }
    wait_until(lambda: d.records and d.records[0].closed_early, 3, "D's connection closed")


def test_decode_error_is_the_answer_and_closes_prefill(pd_clean: tuple[Fake, Fake, Router]) -> None:
    p, d, r = pd_clean
    resp = post(r.url, pd_body(True, prefill={"delay": 5}, decode={"status": 503, "code": "no_capacity"}))
    assert resp.status_code == 503
    assert resp.json() == {
        "error": {"message": "fake decode says no", "type": "invalid_request_error", "code": "no_capacity"}
    }
    wait_until(lambda: p.records and p.records[0].closed_early, 3, "P's connection closed")


def test_prefill_error_after_stream_started_ends_with_sse_error(pd_clean: tuple[Fake, Fake, Router]) -> None:
    p, d, r = pd_clean
    body = pd_body(
        True,
        prefill={"delay": 0.3, "status": 502, "code": "kv_transfer_failed"},
        decode={"chunks": 100, "chunk_delay": 0.05, "no_kv_wait": True},
    )
    with httpx.stream("POST", f"{r.url}/v1/completions", json=body, timeout=20) as resp:
        data = b"".join(resp.iter_raw())
    assert resp.status_code == 200
    events = data.decode().split("\n\n")[:-1]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "kv_transfer_failed"
    passed = data[: data.rindex(b'data: {"error"')]  # D's bytes before the error: a true prefix of its stream
    assert passed and stream_bytes(100).startswith(passed) and len(passed) < len(stream_bytes(100))
    wait_until(lambda: d.records[0].closed_early, 3, "D's connection closed")


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_closes_both(pd_clean: tuple[Fake, Fake, Router], stream: bool) -> None:
    p, d, r = pd_clean
    body = pd_body(stream, prefill={"delay": 5}, decode={"chunks": 100, "chunk_delay": 0.05, "no_kv_wait": stream})
    if stream:
        with httpx.stream("POST", f"{r.url}/v1/completions", json=body, timeout=20) as resp:
            next(resp.iter_raw())
    else:
        with pytest.raises(httpx.ReadTimeout):
            post(r.url, body, timeout=0.4)
    wait_until(
        lambda: p.records and p.records[0].closed_early and d.records and d.records[0].closed_early,
        3,
        "both connections closed",
    )


def test_request_timeout_is_504_and_closes_both() -> None:
    with (
        fakes(("prefill", {}), ("decode", {})) as (p, d),
        router([("prefill", p.url), ("decode", d.url)], request_timeout=0.5) as r,
    ):
        resp = post(r.url, pd_body(prefill={"delay": 5}, decode={"delay": 5}))
        assert resp.status_code == 504 and resp.json()["error"]["code"] == "request_timeout"
        wait_until(lambda: p.records[0].closed_early and d.records[0].closed_early, 3, "both connections closed")
        body = pd_body(True, decode={"chunks": 100, "chunk_delay": 0.05})
        events = post(r.url, body).text.split("\n\n")[:-1]
        assert events[-1] == "data: [DONE]" and '"code": "request_timeout"' in events[-2] and len(events) > 3
        wait_until(lambda: d.records[1].closed_early, 3, "D's connection closed")


def test_metrics_count_exactly(pd_clean: tuple[Fake, Fake, Router]) -> None:
    p, d, r = pd_clean
    before = scrape(r.url)
    assert post(r.url, pd_body()).status_code == 200
    assert post(r.url, pd_body(prefill={"status": 400})).status_code == 400
    assert post(r.url, pd_body(decode={"status": 503, "code": "no_capacity"})).status_code == 503
    wait_until(lambda: all(i.num_in_flight == 0 for i in r.registry.instances()), 3, "in-flight 0")
    after = scrape(r.url)

    def delta(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert delta(f'pdserve_router_requests_total{{instance="{p.url}",role="prefill"}}') == 3
    assert delta(f'pdserve_router_requests_total{{instance="{d.url}",role="decode"}}') == 3
    assert delta(f'pdserve_router_errors_total{{instance="{p.url}",code="bad_request"}}') == 1
    assert delta(f'pdserve_router_errors_total{{instance="{d.url}",code="no_capacity"}}') == 1
    assert delta("pdserve_router_request_seconds_count") == 3
    assert after[f'pdserve_router_in_flight{{instance="{d.url}"}}'] == 0
    assert after[f'pdserve_router_instance_healthy{{instance="{p.url}",role="prefill"}}'] == 1


def test_health_and_models(pd: tuple[Fake, Fake, Router]) -> None:
    p, d, r = pd
    health = httpx.get(f"{r.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    listed = {i["url"]: i for i in health.json()["instances"]}
    assert listed[p.url]["role"] == "prefill" and listed[d.url]["incarnation"] == "inc-1"
    assert httpx.get(f"{r.url}/v1/models").json()["data"][0]["id"] == "fake"
    bad = httpx.post(f"{r.url}/v1/completions", content=b"{not json")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"


# -- instances dying, restarting, joining ------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_prefill_killed_mid_request(stream: bool) -> None:
    with (
        subprocess_fake("prefill") as (p_url, proc),
        fakes(("decode", {})) as (d,),
        router([("prefill", p_url), ("decode", d.url)]) as r,
    ):
        body = pd_body(stream, prefill={"delay": 30}, decode={"chunks": 100, "chunk_delay": 0.05, "no_kv_wait": stream})
        threading.Timer(0.5, proc.send_signal, (signal.SIGKILL,)).start()
        resp = post(r.url, body)
        if stream:  # D's stream had started: an SSE error event, then [DONE]
            assert resp.status_code == 200
            events = resp.text.split("\n\n")[:-1]
            assert events[-1] == "data: [DONE]"
            error = json.loads(events[-2].removeprefix("data: "))["error"]
        else:
            assert resp.status_code == 502
            error = resp.json()["error"]
        assert error["code"] == "instance_unavailable" and p_url in error["message"]
        wait_until(lambda: d.records[0].closed_early, 3, "D's connection closed")
        assert r.registry.get(p_url) is not None and not r.registry.get(p_url).is_healthy  # type: ignore[union-attr]
        assert post(r.url, pd_body()).json()["error"]["code"] == "instance_unavailable"


def test_decode_killed_mid_request() -> None:
    with (
        subprocess_fake("decode") as (d_url, proc),
        fakes(("prefill", {})) as (p,),
        router([("prefill", p.url), ("decode", d_url)]) as r,
    ):
        threading.Timer(0.5, proc.send_signal, (signal.SIGKILL,)).start()
        resp = post(r.url, pd_body(prefill={"delay": 30}, decode={"delay": 30}))
        assert resp.status_code == 502
        assert resp.json()["error"]["code"] == "instance_unavailable" and d_url in resp.json()["error"]["message"]
        wait_until(lambda: p.records[0].closed_early, 3, "P's connection closed")


def test_restarted_instance_is_used_again(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pdserve.router")
    with fakes(("prefill", {})) as (p,):
        d = Fake("decode", incarnation="inc-1")
        with router([("prefill", p.url), ("decode", d.url)]) as r:
            with ThreadServer(d.app, d.port):
                wait_until(lambda: r.registry.get(d.url).is_healthy, 3, "D healthy")  # type: ignore[union-attr]
            wait_until(lambda: not r.registry.get(d.url).is_healthy, 3, "D unhealthy")  # type: ignore[union-attr]
            resp = post(r.url, pd_body())
            assert resp.status_code == 503 and "no healthy decode instance" in resp.json()["error"]["message"]
            d2 = Fake("decode", incarnation="inc-2", port=d.port)
            with ThreadServer(d2.app, d2.port):
                wait_until(lambda: r.registry.get(d.url).is_healthy, 3, "D healthy again")  # type: ignore[union-attr]
                assert post(r.url, pd_body()).status_code == 200
                assert p.records[-1].body["kv_transfer_params"]["peer_incarnation"] == "inc-2"
    assert f"instance {d.url} restarted (incarnation inc-1 -> inc-2)" in caplog.text


def test_register_heartbeat_and_expiry() -> None:
    with fakes(("mixed", {})) as (m,), router([]) as r:
        assert httpx.get(f"{r.url}/health").status_code == 503
        loop = asyncio.new_event_loop()
        stop = asyncio.Event()
        beat = threading.Thread(
            target=loop.run_until_complete, args=(heartbeat(r.url, m.url, "mixed", 0.1, stop),), daemon=True
        )
        beat.start()
        wait_until(lambda: httpx.get(f"{r.url}/health").status_code == 200, 3, "registered and healthy")
        assert post(r.url, {"prompt": "x", "kv_transfer_params": {"room": "evil"}}).json()["served_by"] == "mixed"
        assert "kv_transfer_params" not in m.records[-1].body
        loop.call_soon_threadsafe(stop.set)
        beat.join(5)
        assert r.registry.get(m.url) is None  # unregistered on stop
        reply = httpx.post(f"{r.url}/register", json={"url": m.url + "/", "role": "mixed", "interval": 0.1})
        assert reply.json()["status"] == "registered" and r.registry.get(m.url) is not None
        wait_until(lambda: r.registry.get(m.url) is None, 3, "dropped after missed heartbeats")
        bad = httpx.post(f"{r.url}/register", json={"url": "localhost", "role": "mixed"})
        assert bad.status_code == 400 and "not an http(s) URL" in bad.json()["error"]["message"]
        assert httpx.post(f"{r.url}/unregister", json={"url": m.url}).status_code == 404


def test_mixed_only_routing_passes_body_unchanged() -> None:
    with fakes(("mixed", {}), ("mixed", {})) as ms, router([("mixed", m.url) for m in ms], "round_robin") as r:
        for _ in range(2):
            with httpx.stream("POST", f"{r.url}/v1/completions", json=pd_body(True), timeout=20) as resp:
                assert b"".join(resp.iter_raw()) == stream_bytes(3)
        assert [len(m.records) for m in ms] == [1, 1]
        assert ms[0].records[0].body == {**pd_body(True), "stream_token_ids": True}  # the router's only change


def test_no_healthy_instance_and_pair_mismatch() -> None:
    with fakes(("prefill", {"tp_size": 2}), ("decode", {}), ("decode", {"fingerprint": "fp-2"})) as (p, d1, d2):
        with router([("prefill", p.url)]) as r:
            resp = post(r.url, pd_body())
            assert resp.status_code == 503 and resp.json()["error"]["code"] == "instance_unavailable"
        with router([("prefill", p.url), ("decode", d1.url)]) as r:
            error = post(r.url, pd_body()).json()["error"]
            assert error["code"] == "pd_mismatch" and p.url in error["message"] and d1.url in error["message"]
            assert "P and D must have the same tensor-parallel size for now" in error["message"]
        p.tp_size = 1
        with router([("prefill", p.url), ("decode", d2.url)]) as r:
            resp = post(r.url, pd_body())
            assert resp.status_code == 500 and "fingerprint fp-2" in resp.json()["error"]["message"]
    assert not p.records and not d1.records and not d2.records


def test_api_key_required_and_forwarded() -> None:
    with fakes(("mixed", {})) as (m,), router([("mixed", m.url)], api_key="sekret") as r:
        assert post(r.url, pd_body()).json()["error"]["code"] == "invalid_api_key"
        ok = post(r.url, pd_body(), headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200
        assert httpx.post(f"{r.url}/register", json={"url": m.url, "role": "mixed"}).status_code == 401


def _serve_fake() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--role", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--incarnation", default="inc-1")
    a = ap.parse_args()
    fake = Fake(a.role, a.incarnation, port=a.port)
    uvicorn.run(fake.app, host="127.0.0.1", port=a.port, log_level="warning")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    _serve_fake()
