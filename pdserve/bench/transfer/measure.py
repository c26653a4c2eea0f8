"""What `pdserve bench transfer` measures: per length, the client's TTFT and P's and D's transfer counters of
each request, and the raw bandwidth of the same transfer engine alone (probe.measure_raw_bandwidth)."""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
from typing import Any

from pdserve.bench.common import MIN_RANDOM_TOKEN_ID, fmt, random_requests
from pdserve.bench.deployment import Deployment
from pdserve.bench.serve import ServeBenchConfig
from pdserve.bench.transfer.client import mib, model_name, ratio, send_counted
from pdserve.bench.transfer.workload import MAX_TOKENS, KVLayout

MIN_RAW_NBYTES = 1 << 20
OVERLAP_EXPOSED_SHARE = 0.5  # a request whose exposed sender time is below this share of its busy time overlapped


def measure_request(
    deployment: Deployment, config: ServeBenchConfig, model: str, prompt_ids: list[int]
) -> dict[str, Any]:
    """Send one request through the router; what the client and P's and D's counters saw of it."""
    record, growth = send_counted(deployment, config, model, prompt_ids)
    if growth is None:
        return record
    p, d = growth
    record |= {
        "kv_bytes": int(p["bytes_sent"]),
        "transfer_s": round(p["seconds"], 6),
        "busy_s": round(p["busy_seconds"], 6),
        "exposed_s": round(p["exposed_seconds"], 6),
        "d_kv_bytes": int(d["bytes_received"]),
        "d_receive_s": round(d["seconds"], 6),
        "failures": p["failures"] + d["failures"],
    }
    record["overlapped"] = record["exposed_s"] < OVERLAP_EXPOSED_SHARE * record["busy_s"]
    return record


def summarize_length(input_len: int, records: list[dict[str, Any]], layout: KVLayout) -> dict[str, Any]:
    """Per-request figures of one length from its measured requests (sums over the successful ones / their count)."""
    ok = [r for r in records if r["success"]]
    n = len(ok)

    def per_request(key: str) -> float | None:
        return sum(r[key] for r in ok) / n if n else None

    kv_bytes, transfer_s, busy_s, exposed_s = (
        per_request(k) for k in ("kv_bytes", "transfer_s", "busy_s", "exposed_s")
    )
    ttfts = [r["ttft_ms"] / 1000 for r in ok]
    ttft_s = statistics.fmean(ttfts) if ttfts else None
    prompt_tokens = (ok[0]["prompt_tokens"] if ok else None) or input_len
    return {
        "input_len": input_len,
        "prompt_tokens": prompt_tokens,
        "num_requests": len(records),
        "completed": n,
        "num_blocks": math.ceil(prompt_tokens / layout.block_size),
        "expected_kv_bytes_per_request": layout.bytes_for(prompt_tokens),
        "kv_bytes_per_request": kv_bytes,
        "d_kv_bytes_per_request": per_request("d_kv_bytes"),
        "transfer_s_per_request": transfer_s,
        "busy_s_per_request": busy_s,
        "exposed_s_per_request": exposed_s,
        "gb_per_s_busy": ratio(kv_bytes, busy_s, 1e9),
        "gb_per_s_window": ratio(kv_bytes, transfer_s, 1e9),
        "ttft_mean_ms": None if ttft_s is None else round(ttft_s * 1000, 3),
        "ttft_min_ms": min((r["ttft_ms"] for r in ok), default=None),
        "ttft_max_ms": max((r["ttft_ms"] for r in ok), default=None),
        "transfer_share_of_ttft": ratio(exposed_s, ttft_s),
        "busy_share_of_ttft": ratio(busy_s, ttft_s),
        "d_receive_s_per_request": per_request("d_receive_s"),
        "num_overlapped": sum(r["overlapped"] for r in ok),
        "failures": sum(r.get("failures", 0) for r in ok) + len(records) - n,
        "requests": records,
    }


def measure_lengths(
    args: argparse.Namespace, deployment: Deployment, lens: list[int], layout: KVLayout, vocab_size: int
) -> tuple[str, list[dict[str, Any]]]:
    """(the served model's name, one summary per length)."""
    config = ServeBenchConfig(base_url=deployment.url, timeout_s=args.timeout, use_tqdm=False)
    model = asyncio.run(model_name(config))
    out = []
    for i, input_len in enumerate(lens):
        count = args.num_warmup + args.num_requests
        # a seed per length: prompts share no prefix (no prefix-cache hit on P), within or across lengths
        requests = random_requests(
            count,
            (input_len, input_len),
            (MAX_TOKENS, MAX_TOKENS),
            vocab_size,
            seed=args.seed * 1000 + i,
            min_token_id=min(MIN_RANDOM_TOKEN_ID, vocab_size // 2),
        )
        records = [measure_request(deployment, config, model, r.prompt_token_ids) for r in requests]
        summary = summarize_length(input_len, records[args.num_warmup :], layout)
        summary["warmup"] = records[: args.num_warmup]
        out.append(summary)
        print(
            f"[transfer] {input_len} tokens: {summary['completed']}/{args.num_requests} ok, TTFT "
            f"{fmt(summary['ttft_mean_ms'])} ms, {fmt(mib(summary['kv_bytes_per_request']), '{:.2f}')} MiB KV "
            f"per request",
            flush=True,
        )
    return model, out


def measure_raw(engine: str, lengths: list[dict[str, Any]], layout: KVLayout, repeats: int) -> None:
    """Add each length's `raw` figures: the engine alone moving that length's KV bytes (at least 1 MiB)."""
    from pdserve.disagg.transfer.probe import measure_raw_bandwidth

    for length in lengths:
        nbytes = max(
            length["kv_bytes_per_request"] or length["expected_kv_bytes_per_request"],
            MIN_RAW_NBYTES,
            2 * layout.chunk_nbytes,
        )
        raw = measure_raw_bandwidth(engine, nbytes=int(nbytes), chunk_nbytes=layout.chunk_nbytes, repeats=repeats)
        length["raw"] = {k: round(v, 6) if isinstance(v, float) else v for k, v in raw.items()}
        length["raw"]["chunk_nbytes"] = layout.chunk_nbytes
        length["busy_over_raw"] = ratio(length["gb_per_s_busy"], raw["gb_per_s_best"])
        print(
            f"[transfer] raw {engine}, {mib(raw['nbytes']):.2f} MiB: {raw['gb_per_s_best']:.2f} GB/s best, "
            f"{raw['gb_per_s_mean']:.2f} mean",
            flush=True,
        )
