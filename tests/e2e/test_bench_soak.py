"""`pdserve bench soak` end to end: about 3 minutes at 1 request/s through the router of a `pdserve launch`
deployment of the default model, 10 % of the clients closing the connection after one or two SSE events.

The deployment gets a small KV cache (256 blocks, max_model_len 1024): two default engine cores take about
3 GB each, too much beside the other tests on a shared machine, and with 256 blocks every block is used (and
evicted from the prefix cache) within the run. The benchmark runs in this process through its own parser.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import pytest

from pdserve.bench import soak, soak_report

BLOCK_SIZE = 16
NUM_BLOCKS = 256
MAX_RSS_GROWTH_PCT = 5.0
# Thread pools (anyio's worker threads, the tokenizer threads) start threads on first use and may add one
# later under a burst; a leak grows with the requests (about 130 after warm-up here).
THREAD_TOLERANCE = 2
# The router and the API servers hold a socket per open request (the router: the client's, and one to each
# of P and D) and keep idle connections pooled; idle at the end they hold no more than at the first sample
# after warm-up, within this. A socket leaked per request or per disconnect would add 10 or more.
FD_TOLERANCE = 2
HTTP_PROCESSES = ("router", "prefill:", "decode:")  # names of the processes whose fds follow the requests


@pytest.fixture(scope="module")
def block_bytes(default_hf_dir: Path) -> int:
    """Bytes of one fp32 KV block of the default model, from its config.json."""
    cfg = json.loads((default_hf_dir / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"] * 2 * BLOCK_SIZE * cfg["num_key_value_heads"] * head_dim * 4


def run_soak(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pdserve bench")
    soak.add_parser(parser.add_subparsers(required=True))
    args = parser.parse_args(["soak", *argv])
    return int(args.func(args))


def is_http_process(name: str) -> bool:
    return name.startswith(HTTP_PROCESSES) and "/" not in name


def check_process(p: dict[str, Any], kv_cache_mib: float) -> None:
    name = p["name"]
    assert p["num_samples"] >= 30, p
    assert p["anon_rss_growth_pct"] < MAX_RSS_GROWTH_PCT, p
    assert p["anon_rss_max_growth_pct"] < MAX_RSS_GROWTH_PCT, p
    # the only shared memory is D's KV cache: D's own, and the pages of it P has written into
    assert p["rss_shmem_mib"]["max"] <= kv_cache_mib + 1, p
    threads = p["threads"]
    assert threads["max"] - threads["min"] <= THREAD_TOLERANCE, p
    assert abs(threads["last"] - threads["first"]) <= THREAD_TOLERANCE, p
    fds = p["fds"]
    if is_http_process(name):
        assert fds["last"] <= fds["first"] + FD_TOLERANCE, p
    else:  # the launcher, the engine cores, the resource trackers: no socket per request
        assert fds["first"] == fds["last"] == fds["max"] == fds["min"], p


def test_process_names_and_request_plan() -> None:
    launch = ["/usr/bin/python3", "-m", "pdserve.cli", "launch", "--port", "8000"]
    serve = ["/usr/bin/python3", "-m", "pdserve.cli", "serve", "--role", "prefill", "--port", "41000"]
    spawn = ["/usr/bin/python3", "-B", "-c", "from multiprocessing.spawn import spawn_main; spawn_main()"]
    tracker = ["/usr/bin/python3", "-B", "-c", "from multiprocessing.resource_tracker import main;main(15)"]
    assert soak_report.process_name(launch, None) == "launch"
    assert soak_report.process_name(["/venv/bin/pdserve", "router", "--port", "1"], "launch") == "router"
    assert soak_report.process_name(serve, "launch") == "prefill:41000"
    assert soak_report.process_name(spawn, "prefill:41000") == "prefill:41000/engine-core"
    assert soak_report.process_name(spawn, "prefill:41000/engine-core") == "prefill:41000/engine-core/worker"
    assert soak_report.process_name(tracker, "prefill:41000") == "prefill:41000/resource-tracker"

    config = soak.SoakConfig(duration_s=100, rate=2, arrival="fixed", disconnect_fraction=0.2)
    specs = soak.plan_requests(config)
    assert [s.offset for s in specs] == [i / 2 for i in range(200)]
    assert specs == soak.plan_requests(config)  # seeded
    assert all(s.is_stream for s in specs if s.disconnect_after) and {s.disconnect_after for s in specs} == {0, 1, 2}
    assert all(8 <= s.max_tokens <= 16 for s in specs) and config.warmup_seconds == 20
    assert 25 <= sum(bool(s.disconnect_after) for s in specs) <= 55
    with pytest.raises(ValueError, match="a disconnecting client streams"):
        soak.SoakConfig(duration_s=60, rate=1, stream_fraction=0.1, disconnect_fraction=0.2)


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_bench_soak(tmp_path: Path, block_bytes: int, capsys: pytest.CaptureFixture[str]) -> None:
    start = time.monotonic()
    code = run_soak(
        [
            "--duration",
            "2.75",
            "--rate",
            "1",
            "--max-tokens-min",
            "8",
            "--max-tokens-max",
            "16",
            "--interval",
            "3",
            "--idle-wait",
            "10",
            "--launch-flags",
            f"--num-blocks {NUM_BLOCKS} --max-model-len 1024",
            "--result-dir",
            str(tmp_path),
            "--label",
            "e2e",
        ]
    )
    out = capsys.readouterr()
    print(out.out, f"\nwall time {time.monotonic() - start:.0f} s")
    assert code == 0, out.err
    assert "every instance back to all blocks free: True" in out.out and "Results:" in out.out
    result = json.loads((tmp_path / "soak-e2e.json").read_text())
    assert (tmp_path / "soak-e2e.png").stat().st_size > 10_000
    assert result["benchmark"] == "soak" and result["model"] == "SmolLM2-135M-Instruct"
    assert result["deployment"]["alive_at_end"]
    tracebacks = result["deployment"]["log_tracebacks"]
    assert "parts/router.log" in tracebacks and not any(tracebacks.values()), tracebacks

    requests = result["requests"]
    assert requests["num_errors"] == 0, requests["errors_by_message"]
    assert requests["num_requests"] >= 100 and requests["num_disconnected"] >= 5
    assert requests["num_completed"] + requests["num_disconnected"] == requests["num_requests"]
    assert set(requests["by_kind"]) == {f"{e}-{m}" for e in ("chat", "completions") for m in soak.MODES}

    blocks = result["blocks"]
    assert blocks["all_free"] and blocks["is_idle"]
    assert [(i["role"], i["num_blocks_free"], i["num_blocks_total"]) for i in blocks["instances"]] == [
        ("prefill", NUM_BLOCKS, NUM_BLOCKS),
        ("decode", NUM_BLOCKS, NUM_BLOCKS),
    ]

    procs = result["processes"]
    names = [p["name"] for p in procs["processes"]]
    p_name, d_name = (
        next(n for n in names if n.startswith(f"{role}:") and "/" not in n) for role in ("prefill", "decode")
    )
    for name in ("launch", "router", p_name, d_name, f"{p_name}/engine-core", f"{d_name}/engine-core"):
        assert names.count(name) == 1, (name, names)
    assert not procs["processes_gone"] and not procs["processes_new_after_warmup"], procs
    kv_cache_mib = NUM_BLOCKS * block_bytes / (1 << 20)
    for p in procs["processes"]:
        check_process(p, kv_cache_mib)
