"""`pdserve bench serve` against a fake OpenAI-compatible streaming server started in the test.

The fake (FastAPI + uvicorn on 127.0.0.1, in a background thread) streams one
text chunk per requested token with a small sleep, honours include_usage, and
fails on purpose for prompts holding FAIL (HTTP 400), BREAK (error chunk in the
stream) or SLOW (outlives the client's --timeout).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from pdserve.bench.datasets import Conversation, DatasetConfig, Turn
from pdserve.bench.serve import ServeBenchConfig, run_benchmark
from pdserve.cli import main

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

MODEL = "fake-model"
CHUNK_SLEEP_S = 0.004


def _answer(i: int) -> str:
    return f" w{i}"


def make_app(received: list[dict[str, Any]]) -> Any:
    from fastapi.responses import JSONResponse, StreamingResponse

    app = fastapi.FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

    async def stream(body: dict[str, Any], chat: bool, prompt_text: str) -> Any:
        received.append(body)
        if body.get("model") != MODEL:
            return JSONResponse({"error": {"message": f"model {body.get('model')!r} not found"}}, status_code=404)
        if "FAIL" in prompt_text:
            return JSONResponse({"error": {"message": "prompt rejected on purpose", "code": 400}}, status_code=400)
        include_usage = (body.get("stream_options") or {}).get("include_usage", False)

        def chunk(text: str | None, finish: str | None = None) -> str:
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
            choice.update({"delta": {} if text is None else {"content": text}} if chat else {"text": text or ""})
            return f"data: {json.dumps({'id': 'x', 'model': MODEL, 'choices': [choice]})}\n\n"

        async def events() -> Any:
            if chat:
                yield 'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
            if "SLOW" in prompt_text:
                await asyncio.sleep(5.0)
            for i in range(body["max_tokens"]):
                await asyncio.sleep(CHUNK_SLEEP_S)
                if "BREAK" in prompt_text and i == 1:
                    yield 'data: {"error": {"message": "engine died on purpose", "code": 500}}\n\n'
                    return
                yield chunk(_answer(i))
            yield chunk(None, "length")
            if include_usage:
                usage = {"prompt_tokens": len(prompt_text), "completion_tokens": body["max_tokens"]}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: dict[str, Any]) -> Any:
        return await stream(body, False, body["prompt"])

    @app.post("/v1/chat/completions")
    async def chat(body: dict[str, Any]) -> Any:
        return await stream(body, True, "".join(m["content"] for m in body["messages"]))

    return app


@pytest.fixture(scope="module")
def fake_server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(received), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "fake server did not start within 10 s"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", received
    server.should_exit = True
    thread.join(timeout=10)


def _bench_requests(received: list[dict[str, Any]], first: int) -> list[dict[str, Any]]:
    """Bodies received since index `first`, without the 2-token test request."""
    return [b for b in received[first:] if b.get("max_tokens") != 2]


def _check_request_records(result: dict[str, Any]) -> None:
    for r in result["requests"]:
        if r["success"]:
            assert 0 < r["ttft_ms"] <= r["latency_ms"]
            assert r["tpot_ms"] is None or r["tpot_ms"] * (r["output_len"] - 1) <= r["latency_ms"] - r["ttft_ms"] + 0.01


@pytest.mark.timeout(60)
def test_cli_random_completions(fake_server, tmp_path, capsys):
    url, received = fake_server
    first = len(received)
    args = [
        "bench",
        "serve",
        "--base-url",
        url + "/v1",
        "--num-prompts",
        "12",
        "--input-len",
        "24",
        "--output-len",
        "6",
        "--request-rate",
        "100",
        "--max-concurrency",
        "4",
        "--seed",
        "5",
        "--goodput",
        "ttft:5000",
        "tpot:2000",
        "--result-dir",
        str(tmp_path),
        "--label",
        "t1",
        "--no-tqdm",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Successful requests:" in out and "serve-random-completions-t1.json" in out

    result = json.loads((tmp_path / "serve-random-completions-t1.json").read_text())
    assert (tmp_path / "serve-random-completions-t1.png").stat().st_size > 5000
    bodies = _bench_requests(received, first)
    assert len(bodies) == 12 and all(b["model"] == MODEL and b["ignore_eos"] and b["stream"] for b in bodies)
    assert all(b["temperature"] == 0.0 and b["stream_options"] == {"include_usage": True} for b in bodies)
    assert result["server"] == {
        "base_url": url,
        "url": url + "/v1/completions",
        "endpoint": "completions",
        "model": MODEL,
    }
    assert result["dataset"]["total_input_tokens"] == 12 * 24 and result["dataset"]["total_output_tokens"] == 72
    m = result["metrics"]
    assert (m["num_requests"], m["completed"], m["failed"], m["num_short_outputs"]) == (12, 12, 0, 0)
    assert m["total_output_tokens"] == 72 and m["usage_reported"] is True
    assert m["total_input_tokens"] == sum(len(b["prompt"]) for b in bodies)  # the fake counts characters
    assert m["ttft"]["count"] == 12 and m["itl"]["count"] == 12 * 5 and m["tpot"]["count"] == 12
    assert 0 < m["ttft"]["mean_ms"] <= m["e2el"]["mean_ms"] and m["ttft"]["max_ms"] <= m["e2el"]["max_ms"]
    assert m["ttft"]["p50_ms"] <= m["ttft"]["p90_ms"] <= m["ttft"]["p99_ms"] <= m["ttft"]["max_ms"]
    assert m["tpot"]["mean_ms"] >= CHUNK_SLEEP_S * 1000 * 0.5
    assert m["request_throughput"] == pytest.approx(12 / m["duration_s"], rel=1e-3)
    assert m["output_throughput"] == pytest.approx(72 / m["duration_s"], rel=1e-3)
    assert m["goodput"]["num_good"] == 12 and m["goodput"]["slos_ms"] == {"ttft": 5000.0, "tpot": 2000.0}
    assert result["errors"] == [] and len(result["requests"]) == 12
    starts = [r["start_s"] for r in result["requests"]]
    assert max(starts) > 0.02  # Poisson at 100/s: arrivals spread out, not all at 0
    _check_request_records(result)
    assert result["config"]["request_rate"] == 100.0 and result["config"]["max_concurrency"] == 4


@pytest.mark.timeout(60)
def test_cli_multi_turn_chat_carries_the_answers(fake_server, tmp_path):
    url, received = fake_server
    first = len(received)
    args = [
        "bench",
        "serve",
        "--base-url",
        url,
        "--endpoint",
        "chat",
        "--dataset",
        "multi-turn",
        "--num-prompts",
        "3",
        "--num-turns",
        "2",
        "--input-len",
        "10",
        "--output-len",
        "4",
        "--result-dir",
        str(tmp_path),
        "--label",
        "mt",
        "--no-tqdm",
    ]
    assert main(args) == 0
    result = json.loads((tmp_path / "serve-multi-turn-chat-mt.json").read_text())
    m = result["metrics"]
    assert (m["num_requests"], m["completed"], m["failed"], m["total_output_tokens"]) == (6, 6, 0, 24)
    assert result["config"]["request_rate"] == "inf"
    bodies = _bench_requests(received, first)
    second_turns = [b["messages"] for b in bodies if len(b["messages"]) == 3]
    assert len(second_turns) == 3
    answer = "".join(_answer(i) for i in range(4))
    assert all(msgs[1] == {"role": "assistant", "content": answer} for msgs in second_turns)
    firsts = {msgs[0]["content"] for msgs in second_turns}
    assert firsts == {b["messages"][0]["content"] for b in bodies if len(b["messages"]) == 1}
    _check_request_records(result)


@pytest.mark.timeout(60)
def test_cli_counts_chunks_without_usage(fake_server, tmp_path):
    url, _ = fake_server
    args = [
        "bench",
        "serve",
        "--base-url",
        url,
        "--endpoint",
        "chat",
        "--num-prompts",
        "3",
        "--input-len",
        "8",
        "--output-len",
        "5",
        "--extra-body",
        '{"stream_options": {"include_usage": false}}',
        "--result-dir",
        str(tmp_path),
        "--label",
        "nousage",
        "--no-tqdm",
    ]
    assert main(args) == 0
    m = json.loads((tmp_path / "serve-random-chat-nousage.json").read_text())["metrics"]
    assert m["completed"] == 3 and m["usage_reported"] is False
    assert m["total_output_tokens"] == 15 and m["total_input_tokens"] == 3 * 8  # the client's own counts


@pytest.mark.timeout(60)
def test_failures_are_counted_and_recorded(fake_server, tmp_path):
    url, _ = fake_server
    ok = Turn(" fine words", 2, 3)
    conversations = [
        Conversation((ok,)),
        Conversation((Turn(" FAIL", 1, 3),)),
        Conversation((ok,)),
        Conversation((Turn(" BREAK", 1, 5),)),
        Conversation((Turn(" SLOW", 1, 3),)),
        Conversation((Turn(" FAIL", 1, 3), ok)),
    ]
    config = ServeBenchConfig(
        base_url=url,
        dataset=DatasetConfig(num_prompts=len(conversations)),
        timeout_s=1.0,
        result_dir=tmp_path,
        label="fail",
        use_tqdm=False,
        goodput_slos={"ttft": 5000.0},
    )
    started = time.monotonic()
    result = run_benchmark(config, conversations)
    assert time.monotonic() - started < 10  # the SLOW request timed out instead of hanging
    m = result["metrics"]
    assert (m["num_requests"], m["completed"], m["failed"]) == (7, 2, 5)
    assert m["total_output_tokens"] == 6 and m["goodput"]["num_good"] == 2
    errors = {(e["conversation"], e["turn"]): e for e in result["errors"]}
    assert set(errors) == {(1, 0), (3, 0), (4, 0), (5, 0), (5, 1)}
    assert errors[1, 0]["status"] == 400 and errors[1, 0]["error"] == "HTTP 400: prompt rejected on purpose"
    assert errors[3, 0]["status"] == 200 and "engine died on purpose" in errors[3, 0]["error"]
    assert "--timeout 1 s" in errors[4, 0]["error"]
    assert errors[5, 1]["status"] is None and errors[5, 1]["error"].startswith("not sent")
    assert json.loads((tmp_path / "serve-random-completions-fail.json").read_text())["metrics"] == m
    _check_request_records(result)


@pytest.mark.timeout(60)
def test_unreachable_server_and_wrong_model_fail_cleanly(fake_server, tmp_path, capsys):
    url, _ = fake_server
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    common = ["--num-prompts", "2", "--input-len", "4", "--output-len", "2", "--result-dir", str(tmp_path), "--no-tqdm"]
    assert main(["bench", "serve", "--base-url", dead, *common]) == 1
    assert "cannot reach" in capsys.readouterr().err
    assert main(["bench", "serve", "--base-url", url, "--model", "nope", *common]) == 1
    err = capsys.readouterr().err
    assert "test request" in err and "not found" in err and "--model (nope)" in err
    assert main(["bench", "serve", "--base-url", url, "--goodput", "ttft=5", *common]) == 2
    assert "--goodput" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
