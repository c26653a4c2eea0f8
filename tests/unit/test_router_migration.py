"""The router when an instance dies or stalls: retries before the first byte, migration mid-stream, and the error
event when a request cannot move. Fake instances over real HTTP on 127.0.0.1 (test_router_app's), no model; the
real-model versions are tests/e2e/test_resilience.py.

A fake D's chunk i is token 100 + i with text "t<i>"; a resumed request starts at chunk len(resume_token_ids).
"""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

pytest.register_assert_rewrite("test_router_app")
from test_router_app import fakes, pd_body, router, scrape, stream_bytes, subprocess_fake, wait_until  # noqa: E402

from pdserve.router.stream import StreamRelay  # noqa: E402

STALL_S = 1.0


def stream(url: str, body: dict, timeout: float = 20) -> tuple[bytes, float]:
    start = time.monotonic()
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=timeout) as resp:
        assert resp.status_code == 200, resp.read()
        return b"".join(resp.iter_raw()), time.monotonic() - start


def events(data: bytes) -> list[str]:
    return [e for e in data.decode().split("\n\n") if e]


# -- the relay (pure) ----------------------------------------------------------------------------------------------


def test_relay_takes_token_ids_out_and_drops_chunks_of_ids_only() -> None:
    relay = StreamRelay()
    raw = (
        b'data: {"choices": [{"index": 0, "text": "a", "token_ids": [5, 6]}]}\n\n'
        b': keepalive\n\ndata: {"choices": [{"index": 0, "text": "", "token_ids": [7]}]}\n\n'
        b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "token_ids": []}]}\n\ndata: [DO'
    )
    out = relay.feed(raw[:30]) + relay.feed(raw[30:])
    assert out == (
        b'data: {"choices": [{"index": 0, "text": "a"}]}\n\n: keepalive\n\n'
        b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n'
    )
    assert relay.token_ids == [5, 6, 7] and not relay.is_done
    assert relay.feed(b"NE]\n\n") == b"data: [DONE]\n\n" and relay.is_done


def test_relay_stops_at_an_instance_fault_and_passes_request_errors() -> None:
    relay = StreamRelay()
    request_error = b'data: {"error": {"message": "no", "code": "kv_transfer_timeout"}}\n\n'
    assert relay.feed(request_error) == request_error and relay.fault is None
    before = b'data: {"choices": [{"index": 0, "text": "b", "token_ids": [9]}]}\n\n'
    fault = b'data: {"error": {"message": "stuck", "code": "engine_stalled"}}\n\ndata: [DONE]\n\n'
    assert relay.feed(before + fault) == b'data: {"choices": [{"index": 0, "text": "b"}]}\n\n'
    assert relay.fault is not None and relay.fault["code"] == "engine_stalled"
    assert relay.token_ids == [9] and not relay.is_done


# -- migration mid-stream ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["hang_at", "cut_at", "stall_error_at"])
def test_stream_moves_to_another_decode_and_continues(how: str) -> None:
    with (
        fakes(("prefill", {}), ("decode", {}), ("decode", {})) as (p, d1, d2),
        router([("prefill", p.url), ("decode", d1.url), ("decode", d2.url)], stall_timeout_s=STALL_S) as r,
    ):
        first = d1 if r.registry.get(d1.url).url < r.registry.get(d2.url).url else d2  # type: ignore[union-attr]
        second = d2 if first is d1 else d1
        body = pd_body(True, **{f"decode:{first.port}": {"chunks": 8, how: 3}, "decode": {"chunks": 8}})
        data, seconds = stream(r.url, body)
        assert data == stream_bytes(8), data  # every chunk once, in order, then [DONE]
        assert [rec.body.get("resume_token_ids") for rec in first.records] == [None]
        assert [rec.body.get("resume_token_ids") for rec in second.records] == [[100, 101, 102]]
        assert p.records[-1].body["resume_token_ids"] == [100, 101, 102]  # P computes prompt + completion so far
        assert "stream_token_ids" not in p.records[-1].body
        if how == "hang_at":
            assert STALL_S <= seconds < STALL_S + 5
        reason = "failed" if how == "cut_at" else "stalled"
        assert scrape(r.url)[f'pdserve_router_migrations_total{{reason="{reason}"}}'] == 1
        if how != "stall_error_at":  # (that D ended its stream itself)
            wait_until(lambda: first.records[0].closed_early, 3, "the first D's connection closed")
        wait_until(lambda: all(i.num_in_flight == 0 for i in r.registry.instances()), 5, "in-flight back to 0")


def test_stream_with_nowhere_to_go_ends_with_an_error_event_within_the_stall_timeout() -> None:
    with (
        fakes(("prefill", {}), ("decode", {})) as (p, d),
        router([("prefill", p.url), ("decode", d.url)], stall_timeout_s=STALL_S) as r,
    ):
        data, seconds = stream(r.url, pd_body(True, decode={"chunks": 8, "hang_at": 2}))
        got = events(data)
        assert got[:2] == events(stream_bytes(2))[:2] and got[-1] == "data: [DONE]"
        error = json.loads(got[-2].removeprefix("data: "))["error"]
        assert error["code"] == "instance_stalled" and d.url in error["message"], error
        assert STALL_S <= seconds < STALL_S + 5
        wait_until(lambda: d.records[0].closed_early, 3, "D's connection closed")


def test_migrations_are_bounded() -> None:
    with (
        fakes(("prefill", {}), ("decode", {}), ("decode", {})) as (p, d1, d2),
        router([("prefill", p.url), ("decode", d1.url), ("decode", d2.url)], max_migrations=0) as r,
    ):
        data, _ = stream(r.url, pd_body(True, decode={"chunks": 8, "cut_at": 3}))
        error = json.loads(events(data)[-2].removeprefix("data: "))["error"]
        assert error["code"] == "instance_unavailable" and "closed the stream before its end" in error["message"]
        assert len(d1.records) + len(d2.records) == 1


# -- retries before the first byte ---------------------------------------------------------------------------------


@pytest.mark.parametrize("is_stream", [False, True])
def test_prefill_killed_before_the_first_token_is_retried_on_another(is_stream: bool) -> None:
    with (
        subprocess_fake("prefill") as (p1_url, proc),
        fakes(("prefill", {}), ("decode", {})) as (p2, d),
        router([("prefill", p1_url), ("prefill", p2.url), ("decode", d.url)], "round_robin") as r,
    ):
        slow = f"prefill:{p1_url.rsplit(':', 1)[1]}"
        body = pd_body(is_stream, **{slow: {"delay": 30}, "decode": {"chunks": 4}})
        if p1_url > p2.url:  # round robin takes the lower URL first: make the first request go to the doomed P
            post_first = httpx.post(f"{r.url}/v1/completions", json=pd_body(), timeout=20)
            assert post_first.status_code == 200
        threading.Timer(0.5, proc.send_signal, (signal.SIGKILL,)).start()
        if is_stream:
            data, _ = stream(r.url, body)
            assert data == stream_bytes(4)
        else:
            resp = httpx.post(f"{r.url}/v1/completions", json=body, timeout=20)
            assert resp.status_code == 200 and resp.json()["served_by"] == "decode", resp.text
        assert scrape(r.url)["pdserve_router_retries_total"] == 1
        assert len(p2.records) >= 1 and p2.records[-1].finished
        wait_until(lambda: all(i.num_in_flight == 0 for i in r.registry.instances()), 5, "in-flight back to 0")
