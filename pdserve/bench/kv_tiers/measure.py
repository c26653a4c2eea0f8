"""One configuration of `pdserve bench kv-tiers` run end to end: its server started, the workload sent, the
server's counters read around it; and the configuration's record (client figures, prefill saved per tier).
It knows the server only by its command line, /health and /metrics."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shlex
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from pdserve.bench.datasets import Conversation
from pdserve.bench.kv_tiers.configs import (
    COUNTERS,
    DESCRIPTIONS,
    SETTLE_TIMEOUT_S,
    TIERS,
    bench_config,
    cache_output,
    open_pool,
    server_flags,
)
from pdserve.bench.launch import BenchServerError, ServerProcess, scrape
from pdserve.bench.serve import _benchmark, run_benchmark


def settled_counters(url: str) -> dict[str, int]:
    """COUNTERS once nothing runs or waits and two scrapes agree (pool writes after the last finish included)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    previous: dict[str, int] | None = None
    while True:
        samples = scrape(url)
        counters = {key: int(samples.get(name, 0.0)) for key, name in COUNTERS.items()}
        idle = samples.get("pdserve_num_requests_running") == 0 and samples.get("pdserve_num_requests_waiting") == 0
        if idle and counters == previous:
            return counters
        if time.monotonic() > deadline:
            raise BenchServerError(f"{url} did not go idle with steady counters within {SETTLE_TIMEOUT_S:.0f} s")
        previous = counters if idle else None
        time.sleep(0.2)


def _minus(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a[k] - b[k] for k in a}


def run_config(
    name: str, args: argparse.Namespace, conversations: list[Conversation], work_dir: Path
) -> dict[str, Any]:
    """Start the server of `name`, run the workload, stop everything; the config's record."""
    with contextlib.ExitStack() as stack:
        pool_config = None
        if name == "pool":
            pool_config = stack.enter_context(open_pool(args.pool, work_dir)) | args.pool_config
        server = ServerProcess(name, server_flags(name, args, pool_config), work_dir / f"{name}.log")
        stack.callback(server.stop)  # runs before the pool closes
        print(f"[kv-tiers] {name}: starting pdserve serve {shlex.join(server.flags)}", flush=True)
        server.start()
        server.wait_ready(args.server_timeout)
        bench = bench_config(args, server.url, work_dir / name, name)
        probe = replace(bench, use_tqdm=False)
        # _benchmark always sends one tiny test request first: measure it (the 2nd of two identical ones,
        # the 1st warms up) and take it out of the workload's deltas.
        before = settled_counters(server.url)
        asyncio.run(_benchmark(probe, []))
        after_first = settled_counters(server.url)
        asyncio.run(_benchmark(probe, []))
        start = settled_counters(server.url)
        raw = run_benchmark(bench, conversations)
        end = settled_counters(server.url)
    probe_delta = _minus(start, after_first)
    record = config_record(name, server.flags, pool_config, raw, _minus(_minus(end, start), probe_delta), args)
    record["probe"] = {"first": _minus(after_first, before), "each_later": probe_delta}
    return record


# ---- records ---------------------------------------------------------------------------------------------------------


def config_record(
    name: str,
    flags: list[str],
    pool_config: dict[str, Any] | None,
    raw: dict[str, Any],
    delta: dict[str, int],
    args: argparse.Namespace,
) -> dict[str, Any]:
    metrics = {k: v for k, v in raw["metrics"].items() if k != "goodput"}
    turns: dict[int, list[float]] = {}
    for r in raw["requests"]:
        if r["success"]:
            turns.setdefault(r["turn"], []).append(r["ttft_ms"])
    sent = metrics["total_input_tokens"]
    hits = {tier: delta[f"hit_tokens_{tier}"] for tier in TIERS}
    reusable = reusable_tokens(raw["requests"], args.block_size) if args.dataset == "multi-turn" else None
    return {
        "name": name,
        "description": DESCRIPTIONS[name],
        "server_flags": flags,
        "cache_output": cache_output(name, args),
        "pool": None if name != "pool" else {"kind": args.pool, "config": pool_config},
        "model": raw["server"]["model"],
        "client": metrics,
        "ttft_mean_ms_by_turn": [round(sum(v) / len(v), 3) for _, v in sorted(turns.items())],
        "server": {
            "prompt_tokens_sent": sent,
            "prompt_tokens_computed": delta["prompt_tokens_computed"],
            "prefill_saved_tokens": sent - delta["prompt_tokens_computed"],
            "query_tokens": delta["query_tokens"],
            "reusable_tokens": reusable,
            "hit_tokens": hits,
            "hit_tokens_total": sum(hits.values()),
            "hit_rate": round(sum(hits.values()) / delta["query_tokens"], 4) if delta["query_tokens"] else None,
            "store_bytes": {"put": delta["store_bytes_put"], "get": delta["store_bytes_get"]},
            **{k: delta[k] for k in ("store_errors", "recomputed_tokens", "preemptions", "blocks_saved_on_preemption")},
        },
        "errors": raw["errors"],
        "requests": raw["requests"],
    }


def reusable_tokens(requests: list[dict[str, Any]], block_size: int) -> int:
    """Multi-turn: prompt tokens a cache could serve at most, from each conversation's own previous turn.

    Turn k's prompt starts with turn k-1's prompt and answer, whose KV is prompt + output - 1 tokens (the
    last token is never fed back); whole blocks only, and a prompt's last block is always computed. Counts
    the answers as reusable, which they are where the re-sent text tokenizes back to the generated tokens.
    """
    total = 0
    previous: dict[int, dict[str, Any]] = {}
    for r in sorted(requests, key=lambda r: (r["conversation"], r["turn"])):
        before = previous.get(r["conversation"])
        if r["success"] and before is not None and before["turn"] == r["turn"] - 1:
            num_blocks = min((before["input_len"] + before["output_len"] - 1), r["input_len"] - 1) // block_size
            total += num_blocks * block_size
        previous[r["conversation"]] = r
    return total


def add_ratios(records: list[dict[str, Any]]) -> None:
    """Each record's figures over the `none` record's (None where `none` did not run or the base is 0)."""
    base = next((r for r in records if r["name"] == "none"), None)

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 4) if a is not None and b else None

    for r in records:
        if base is None:
            r["vs_none"] = None
            continue
        r["vs_none"] = {
            "prompt_tokens_computed": ratio(
                r["server"]["prompt_tokens_computed"], base["server"]["prompt_tokens_computed"]
            ),
            "ttft_mean": ratio(r["client"]["ttft"]["mean_ms"], base["client"]["ttft"]["mean_ms"]),
            "ttft_p99": ratio(r["client"]["ttft"]["p99_ms"], base["client"]["ttft"]["p99_ms"]),
            "e2el_mean": ratio(r["client"]["e2el"]["mean_ms"], base["client"]["e2el"]["mean_ms"]),
        }
