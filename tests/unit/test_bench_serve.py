"""`pdserve bench serve` pieces without a server: SSE parsing, statistics, goodput, arrivals, payloads, datasets."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pdserve.bench.datasets import Conversation, DatasetConfig, Turn, build_dataset, dataset_stats, load_tokenizer
from pdserve.bench.metrics import (
    RequestResult,
    format_table,
    latency_stats,
    meets_slos,
    parse_goodput,
    summarize,
)
from pdserve.bench.serve import (
    ServeBenchConfig,
    SSEDecoder,
    arrival_offsets,
    build_payload,
    parse_chunk,
)

STREAM = (
    b": keep-alive comment\r\n\r\n"
    b'data: {"choices":[{"text":"Hel"}]}\r\n\r\n'
    b'data:{"choices":[{"text":"l\xc3\xa9"}]}\n\n'
    b"event: message\ndata: first line\ndata: second line\nid: 7\n\n"
    b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
    b"data: [DONE]\n\n"
)
EVENTS = [
    '{"choices":[{"text":"Hel"}]}',
    '{"choices":[{"text":"l\u00e9"}]}',
    "first line\nsecond line",
    '{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}',
    "[DONE]",
]


def test_sse_decoder_whole_stream():
    decoder = SSEDecoder()
    assert decoder.feed(STREAM) == EVENTS
    assert decoder.close() == []


def test_sse_decoder_byte_by_byte_matches_whole():
    decoder = SSEDecoder()
    events = [e for i in range(len(STREAM)) for e in decoder.feed(STREAM[i : i + 1])]
    assert events == EVENTS and decoder.close() == []


def test_sse_decoder_flushes_an_unterminated_last_event():
    decoder = SSEDecoder()
    assert decoder.feed(b'data: {"a":1}\n\ndata: [DONE]') == ['{"a":1}']
    assert decoder.close() == ["[DONE]"]


def test_parse_chunk_completions_and_chat():
    assert parse_chunk('{"choices":[{"index":0,"text":" hi"}]}', "completions").text == " hi"
    role_only = '{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}'
    assert parse_chunk(role_only, "chat").text == ""
    assert parse_chunk('{"choices":[{"delta":{"content":" yo"}}]}', "chat").text == " yo"
    assert parse_chunk('{"choices":[{"delta":{"reasoning_content":"hm"}}]}', "chat").text == "hm"
    assert parse_chunk('{"choices":[{"delta":{"content":null},"finish_reason":"length"}]}', "chat").text == ""
    usage = parse_chunk('{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":4}}', "chat")
    assert usage.text == "" and usage.usage == {"prompt_tokens": 5, "completion_tokens": 4}
    assert parse_chunk("[DONE]", "completions").is_done
    assert parse_chunk('{"error":{"message":"boom","code":500}}', "chat").error == "boom"
    assert "not JSON" in (parse_chunk("oops", "chat").error or "")


def test_latency_stats_exact_percentiles_in_ms():
    stats = latency_stats([1.0, 2.0, 3.0, 4.0])
    assert stats == {
        "count": 4,
        "mean_ms": 2500.0,
        "std_ms": pytest.approx(1118.034, abs=1e-3),
        "min_ms": 1000.0,
        "max_ms": 4000.0,
        "p50_ms": 2500.0,
        "p90_ms": 3700.0,
        "p99_ms": 3970.0,
    }
    assert latency_stats([]) == {
        "count": 0,
        "mean_ms": None,
        "std_ms": None,
        "min_ms": None,
        "max_ms": None,
        "p50_ms": None,
        "p90_ms": None,
        "p99_ms": None,
    }


def _ok(ttft: float, latency: float, output_len: int, input_len: int = 10) -> RequestResult:
    return RequestResult(
        True,
        input_len,
        output_len,
        output_len,
        ttft=ttft,
        latency=latency,
        itl=[(latency - ttft) / max(output_len - 1, 1)] * (output_len - 1),
    )


def test_tpot_excludes_the_first_token():
    assert _ok(0.1, 1.0, 10).tpot == pytest.approx(0.1)
    assert _ok(0.1, 0.1, 1).tpot is None
    assert RequestResult(False, 10, 0, 5, error="x").tpot is None


def test_parse_goodput():
    assert parse_goodput(["ttft:500", "tpot:50", "e2el:2000.5"]) == {"ttft": 500.0, "tpot": 50.0, "e2el": 2000.5}
    assert parse_goodput(None) == {}
    for bad, match in (
        (["ttft"], "name:milliseconds"),
        (["itl:5"], "ttft, tpot, e2el"),
        (["ttft:abc"], "not a number"),
        (["tpot:0"], "above 0"),
    ):
        with pytest.raises(ValueError, match=match):
            parse_goodput(bad)


def test_meets_slos():
    fast, slow_decode = _ok(0.2, 1.1, 10), _ok(0.2, 2.0, 10)  # tpot 0.1 s and 0.2 s
    slos = {"ttft": 500.0, "tpot": 150.0}
    assert meets_slos(fast, slos) and not meets_slos(slow_decode, slos)
    assert not meets_slos(fast, {"ttft": 100.0})
    assert meets_slos(_ok(0.2, 0.2, 1), {"tpot": 1.0})  # one token: no TPOT to miss
    assert not meets_slos(RequestResult(False, 1, 0, 1), {})
    assert meets_slos(slow_decode, {"e2el": 2000.0}) and not meets_slos(slow_decode, {"e2el": 1999.0})


def test_summarize_counts_throughput_and_goodput():
    results = [
        _ok(0.1, 1.0, 10, 100),
        _ok(0.3, 4.1, 20, 50),
        _ok(0.6, 0.6, 1, 7),
        RequestResult(False, 30, 0, 8, status=400, error="HTTP 400: bad"),
    ]
    m = summarize(results, duration_s=2.0, slos={"ttft": 400.0, "tpot": 150.0})
    assert (m["num_requests"], m["completed"], m["failed"]) == (4, 3, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (157, 31)
    assert m["request_throughput"] == 1.5 and m["output_throughput"] == 15.5 and m["input_throughput"] == 78.5
    assert m["total_token_throughput"] == 94.0
    assert m["ttft"]["count"] == 3 and m["ttft"]["p50_ms"] == pytest.approx(300.0)
    assert m["tpot"]["count"] == 2 and m["tpot"]["mean_ms"] == pytest.approx(150.0)
    assert m["itl"]["count"] == 9 + 19 and m["e2el"]["max_ms"] == pytest.approx(4100.0)
    # 1st: ttft 100, tpot 100 -> good; 2nd: tpot 200 -> misses; 3rd: ttft 600 -> misses
    assert m["goodput"] == {"slos_ms": {"ttft": 400.0, "tpot": 150.0}, "num_good": 1, "request_goodput": 0.5}
    assert m["num_short_outputs"] == 0 and m["usage_reported"] is False
    assert summarize(results, 2.0, {})["goodput"] is None
    table = format_table(m)
    assert "Successful requests:" in table and "Request goodput (req/s):" in table and "P99 ITL (ms):" in table


def test_arrival_offsets_are_seeded_poisson():
    a = arrival_offsets(2000, rate=10.0, seed=3)
    assert a == arrival_offsets(2000, rate=10.0, seed=3) and a != arrival_offsets(2000, rate=10.0, seed=4)
    assert a[0] == 0.0 and all(x <= y for x, y in zip(a, a[1:]))
    gaps = np.diff(a)
    assert gaps.mean() == pytest.approx(0.1, rel=0.06) and gaps.std() == pytest.approx(0.1, rel=0.1)
    assert arrival_offsets(5, math.inf, seed=0) == [0.0] * 5
    assert len(arrival_offsets(1, 2.0, seed=0)) == 1


def test_build_payload_single_multi_turn_and_chat():
    single = Conversation((Turn(" a b", 2, 7),))
    body = build_payload("completions", "m", single, 0, [], {})
    assert body == {
        "model": "m",
        "prompt": " a b",
        "max_tokens": 7,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    conv = Conversation((Turn(" q1", 1, 3), Turn(" q2", 1, 4)))
    assert (
        build_payload("completions", "m", conv, 1, [" a1"], {})["prompt"]
        == "User: q1\nAssistant: a1\nUser: q2\nAssistant:"
    )
    chat = build_payload("chat", "m", conv, 1, [" a1"], {"top_k": 1, "temperature": 0.5})
    assert chat["messages"] == [
        {"role": "user", "content": " q1"},
        {"role": "assistant", "content": " a1"},
        {"role": "user", "content": " q2"},
    ]
    assert chat["max_tokens"] == 4 and chat["top_k"] == 1 and chat["temperature"] == 0.5 and "prompt" not in chat


def test_config_errors_name_the_flag():
    for kwargs, flag in (
        ({"base_url": "localhost:8000"}, "--base-url"),
        ({"endpoint": "embeddings"}, "--endpoint"),
        ({"request_rate": 0.0}, "--request-rate"),
        ({"max_concurrency": 0}, "--max-concurrency"),
        ({"timeout_s": 0.0}, "--timeout"),
        ({"label": "a/b"}, "--label"),
    ):
        with pytest.raises(ValueError, match=flag):
            ServeBenchConfig(**{"base_url": "http://h:1", **kwargs})
    for kwargs, flag in (
        ({"name": "sharegpt"}, "--dataset"),
        ({"num_prompts": 0}, "--num-prompts"),
        ({"output_len": 0}, "--output-len"),
        ({"range_ratio": 1.0}, "--random-range-ratio"),
        ({"num_turns": 0}, "--num-turns"),
        ({"name": "shared-prefix", "input_len": 8, "prefix_len": 8}, "--prefix-len"),
    ):
        with pytest.raises(ValueError, match=flag):
            DatasetConfig(**kwargs)


def test_base_url_spellings():
    for url in ("http://h:8000", "http://h:8000/", "http://h:8000/v1", "http://h:8000/v1/"):
        config = ServeBenchConfig(base_url=url, endpoint="chat")
        assert config.api_root == "http://h:8000" and config.url == "http://h:8000/v1/chat/completions"
    assert ServeBenchConfig(base_url="http://h", api_key="k").headers() == {"Authorization": "Bearer k"}
    assert ServeBenchConfig(base_url="http://h").headers() == {}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def _len(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("input_len", [1, 7, 100, 1000])
def test_random_prompts_have_exact_lengths(tokenizer, input_len):
    conversations = build_dataset(DatasetConfig(num_prompts=20, input_len=input_len, output_len=5, seed=1), tokenizer)
    turns = [c.turns[0] for c in conversations]
    assert all(len(c.turns) == 1 for c in conversations)
    assert [_len(tokenizer, t.text) for t in turns] == [input_len] * 20 == [t.input_len for t in turns]
    assert all(t.output_len == 5 for t in turns)
    assert len({t.text for t in turns}) == 20


def test_random_prompts_are_seeded_and_ranged(tokenizer):
    config = DatasetConfig(num_prompts=30, input_len=64, output_len=20, range_ratio=0.5, seed=2)
    a = build_dataset(config, tokenizer)
    assert a == build_dataset(config, tokenizer)
    assert a != build_dataset(
        DatasetConfig(num_prompts=30, input_len=64, output_len=20, range_ratio=0.5, seed=3), tokenizer
    )
    turns = [c.turns[0] for c in a]
    assert all(32 <= t.input_len <= 96 and 10 <= t.output_len <= 30 for t in turns)
    assert all(_len(tokenizer, t.text) == t.input_len for t in turns)
    assert len({t.input_len for t in turns}) > 5
    stats = dataset_stats(a)
    assert stats["num_requests"] == 30 and stats["total_input_tokens"] == sum(t.input_len for t in turns)


def test_shared_prefix_prompts_share_exactly_the_prefix_tokens(tokenizer):
    config = DatasetConfig(name="shared-prefix", num_prompts=10, input_len=120, output_len=4, seed=0)
    turns = [c.turns[0] for c in build_dataset(config, tokenizer)]
    ids = [tokenizer.encode(t.text, add_special_tokens=False) for t in turns]
    assert [len(x) for x in ids] == [120] * 10 == [t.input_len for t in turns]
    assert all(x[:60] == ids[0][:60] for x in ids)  # default prefix: input_len // 2
    assert len({tuple(x[60:]) for x in ids}) == 10
    assert len({t.text.split()[0] for t in turns}) == 1
    config = DatasetConfig(name="shared-prefix", num_prompts=4, input_len=50, output_len=4, prefix_len=40)
    ids = [tokenizer.encode(c.turns[0].text, add_special_tokens=False) for c in build_dataset(config, tokenizer)]
    assert all(len(x) == 50 and x[:40] == ids[0][:40] for x in ids)


def test_multi_turn_conversations(tokenizer):
    config = DatasetConfig(name="multi-turn", num_prompts=5, input_len=16, output_len=3, num_turns=4)
    conversations = build_dataset(config, tokenizer)
    assert len(conversations) == 5 and all(c.is_multi_turn and len(c.turns) == 4 for c in conversations)
    assert all(
        t.input_len == 16 == _len(tokenizer, t.text) and t.output_len == 3 for c in conversations for t in c.turns
    )
    assert dataset_stats(conversations)["num_requests"] == 20
