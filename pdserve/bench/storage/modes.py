"""`pdserve bench storage`'s two deployments, 1P1D direct and 1P1D through the Mooncake pool, and what is
measured of each request sent through them (the client's TTFT, P's and D's transfer and pool counters).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import shlex
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pdserve.bench.common import MIN_RANDOM_TOKEN_ID, fmt, random_requests
from pdserve.bench.deployment import Deployment
from pdserve.bench.serve import ServeBenchConfig
from pdserve.bench.transfer.client import COUNTERS as TRANSFER_COUNTERS
from pdserve.bench.transfer.client import model_name, ratio, send_counted
from pdserve.bench.transfer.workload import MAX_TOKENS, KVLayout, instance_flags
from pdserve.config import DEFAULT_STAGING_HOST_MEMORY
from pdserve.launcher import LaunchConfig

MODES = ("direct", "storage")
DEFAULT_SEGMENT_BYTES = 256 << 20  # MooncakeStore's global_segment_size default (docs/kv-store.md)
DEFAULT_LOCAL_BUFFER = "64MiB"  # MooncakeStore's local_buffer_size default
SIZE_STEP = 64 << 20  # automatic segment and host tier sizes are rounded up to this
POOL_HEADROOM = 1.25  # each segment holds every object the run puts, with this margin: no eviction
# JSON name -> Prometheus sample, read on P and on D around every request: `bench transfer`'s and the pool's
COUNTERS = TRANSFER_COUNTERS | {
    "put_seconds": 'pdserve_kv_transfer_pool_seconds_total{op="put"}',
    "get_seconds": 'pdserve_kv_transfer_pool_seconds_total{op="get"}',
    "store_errors": "pdserve_kv_store_errors_total",
}


def _round_up(nbytes: float, step: int = SIZE_STEP) -> int:
    return int(math.ceil(nbytes / step) * step)


def pool_options(args: argparse.Namespace, layout: KVLayout, lens: list[int]) -> dict[str, Any]:
    """The storage deployment's extra --kv-store-config options: --pool-config over a segment per instance
    large enough to hold every object of the run (nothing is evicted, so no put fails for room)."""
    total = sum(layout.bytes_for(n) * args.num_requests for n in lens) + layout.bytes_for(lens[0]) * args.num_warmup
    options: dict[str, Any] = {"global_segment_size": max(DEFAULT_SEGMENT_BYTES, _round_up(total * POOL_HEADROOM))}
    return options | args.pool_config


def storage_flags(args: argparse.Namespace, layout: KVLayout, lens: list[int]) -> list[str]:
    """Flags the storage instances get beyond the direct ones: a host tier that stages the longest prompt
    (the default one, DEFAULT_STAGING_HOST_MEMORY, unless that is too small or --server-flags sets one)."""
    user = shlex.split(args.server_flags)
    need = layout.bytes_for(max(lens))
    if {"--num-host-blocks", "--host-kv-cache-memory"} & set(
        user
    ) or need * POOL_HEADROOM <= DEFAULT_STAGING_HOST_MEMORY:
        return []
    return ["--host-kv-cache-memory", str(_round_up(need * POOL_HEADROOM))]


def deployment_for(
    mode: str, args: argparse.Namespace, layout: KVLayout, lens: list[int], work_dir: Path
) -> Deployment:
    flags = instance_flags(args, lens)
    options = None
    if mode == "storage":
        flags += storage_flags(args, layout, lens)
        options = pool_options(args, layout, lens)
    config = LaunchConfig(
        num_prefill=1,
        num_decode=1,
        kv_transfer=mode,
        kv_transfer_engine=args.kv_transfer_engine,
        engine_argv=tuple(flags),
    )
    return Deployment(mode, config, work_dir / mode / "logs", args.server_timeout, store_options=options)


# ---- measuring a deployment ------------------------------------------------------------------------------------------


def measure_request(
    deployment: Deployment, config: ServeBenchConfig, model: str, prompt_ids: list[int]
) -> dict[str, Any]:
    """Send one request through the router; what the client and P's and D's counters saw of it."""
    record, growth = send_counted(deployment, config, model, prompt_ids, COUNTERS)
    if growth is None:
        return record
    p, d = growth
    record |= {
        "kv_bytes": int(p["bytes_sent"]),
        "d_kv_bytes": int(d["bytes_received"]),
        "p_transfer_ms": round(p["seconds"] * 1000, 3),
        "d_transfer_ms": round(d["seconds"] * 1000, 3),
        "failures": int(p["failures"] + d["failures"]),
        "store_errors": int(p["store_errors"] + d["store_errors"]),
    }
    if deployment.config.kv_transfer == "storage":
        put_s, get_s = p["put_seconds"], d["get_seconds"]
        record |= {
            "put_s": round(put_s, 6),
            "get_s": round(get_s, 6),
            "put_gb_per_s": ratio(record["kv_bytes"], put_s, 1e9),
            "get_gb_per_s": ratio(record["d_kv_bytes"], get_s, 1e9),
        }
    else:
        record["busy_s"] = round(p["busy_seconds"], 6)
    return record


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 6) if present else None


def summarize(mode: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """One mode's figures at one length: medians over its successful requests."""
    ok = [r for r in records if r["success"]]
    ttfts = [r["ttft_ms"] for r in ok]
    out: dict[str, Any] = {
        "num_requests": len(records),
        "completed": len(ok),
        "failures": len(records) - len(ok) + sum(r["failures"] + r["store_errors"] for r in ok),
        "ttft_median_ms": _median(ttfts),
        "ttft_mean_ms": round(statistics.fmean(ttfts), 3) if ttfts else None,
        "ttft_min_ms": min(ttfts, default=None),
        "ttft_max_ms": max(ttfts, default=None),
        "kv_bytes_per_request": _median([r["kv_bytes"] for r in ok]),
        "d_kv_bytes_per_request": _median([r["d_kv_bytes"] for r in ok]),
        "p_transfer_ms_median": _median([r["p_transfer_ms"] for r in ok]),
        "d_transfer_ms_median": _median([r["d_transfer_ms"] for r in ok]),
    }
    if mode == "storage":
        out |= {
            "put_s_median": _median([r["put_s"] for r in ok]),
            "get_s_median": _median([r["get_s"] for r in ok]),
            "put_gb_per_s": _median([r["put_gb_per_s"] for r in ok]),
            "get_gb_per_s": _median([r["get_gb_per_s"] for r in ok]),
        }
    return out | {"requests": records}


def build_prompts(
    args: argparse.Namespace, lens: list[int], vocab_size: int
) -> tuple[list[list[int]], list[list[list[int]]]]:
    """(warm-up prompts of the first length, per length the measured prompts): fresh random token ids each,
    a seed per length, so no prompt shares a block with another; both modes get the same ones."""
    low = min(MIN_RANDOM_TOKEN_ID, vocab_size // 2)

    def draw(count: int, n: int, seed: int) -> list[list[int]]:
        if count == 0:
            return []
        return [
            r.prompt_token_ids
            for r in random_requests(count, (n, n), (MAX_TOKENS, MAX_TOKENS), vocab_size, seed=seed, min_token_id=low)
        ]

    warmup = draw(args.num_warmup, lens[0], args.seed * 1000 + 999)
    return warmup, [draw(args.num_requests, n, args.seed * 1000 + i) for i, n in enumerate(lens)]


def run_mode(
    mode: str,
    args: argparse.Namespace,
    layout: KVLayout,
    lens: list[int],
    prompts: list[list[list[int]]],
    warmup: list[list[int]],
    work_dir: Path,
) -> dict[str, Any]:
    """Start the mode's deployment, send the warm-up and measured requests one at a time, stop it."""
    deployment = deployment_for(mode, args, layout, lens, work_dir)
    print(f"[storage] {mode}: starting {shlex.join(deployment.launch_argv)}", flush=True)
    with deployment:
        config = ServeBenchConfig(base_url=deployment.url, timeout_s=args.timeout, use_tqdm=False)
        model = asyncio.run(model_name(config))
        warm = [measure_request(deployment, config, model, p) for p in warmup]
        per_length = []
        for input_len, length_prompts in zip(lens, prompts):
            records = [measure_request(deployment, config, model, p) for p in length_prompts]
            summary = summarize(mode, records)
            per_length.append(summary)
            extra = (
                f", put {fmt(summary['put_gb_per_s'], '{:.2f}')} GB/s, get {fmt(summary['get_gb_per_s'], '{:.2f}')}"
                " GB/s"
                if mode == "storage"
                else ""
            )
            print(
                f"[storage] {mode}, {input_len} tokens: {summary['completed']}/{len(records)} ok, TTFT median "
                f"{fmt(summary['ttft_median_ms'])} ms{extra}",
                flush=True,
            )
        deployment.check_alive()
    return {"model": model, "deployment": deployment.describe(), "warmup": warm, "lengths": per_length}


def combine(lens: list[int], modes: dict[str, dict[str, Any]], layout: KVLayout) -> list[dict[str, Any]]:
    """One record per length: both modes' summaries, the objects one request moves, the TTFT ratio."""
    out = []
    for i, input_len in enumerate(lens):
        direct, storage = modes["direct"]["lengths"][i], modes["storage"]["lengths"][i]
        ok = [r for m in (direct, storage) for r in m["requests"] if r["success"]]
        prompt_tokens = (ok[0]["prompt_tokens"] if ok else None) or input_len
        num_objects = math.ceil(prompt_tokens / layout.block_size)
        out.append(
            {
                "input_len": input_len,
                "prompt_tokens": prompt_tokens,
                "num_objects": num_objects,
                "object_nbytes": layout.bytes_per_block,
                "kv_bytes_per_request": num_objects * layout.bytes_per_block,
                "direct": direct,
                "storage": storage,
                "ttft_ratio_storage_over_direct": ratio(storage["ttft_median_ms"], direct["ttft_median_ms"]),
            }
        )
    return out
