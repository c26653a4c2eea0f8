"""`pdserve bench kv-tiers`: how much prefill the KV cache tiers save, and what that does to TTFT.

Runs one workload (multi-turn or shared-prefix prompts from datasets.py, sent
by the `bench serve` client) against four `pdserve serve` subprocesses started
one after another on free loopback ports, all with the same small device tier:

  none    --no-prefix-caching
  device  prefix caching on the device tier only
  host    + a host tier (--num-host-blocks)
  pool    + host tier + a pool (a local Mooncake master, or a directory)

For each it records the client's latency figures and the change of the
server's Prometheus counters over the run (prompt tokens computed, prefix
cache hits per tier, pool bytes), then writes kv-tiers-<dataset>-<label>.json
and a .png under --result-dir and prints a table with ratios against `none`.
It knows the server only by its command line, /health and /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from pdserve.bench.common import LABEL_RE, add_output_args, code_version, fmt, machine_info, now_iso, write_json
from pdserve.bench.datasets import Conversation, DatasetConfig, build_dataset, dataset_stats, load_tokenizer
from pdserve.bench.launch import BenchServerError, ServerProcess, free_port, scrape, sigterm_interrupts
from pdserve.bench.plot import finish_figure, pyplot
from pdserve.bench.serve import (
    ENDPOINTS,
    BenchServeError,
    ServeBenchConfig,
    _benchmark,
    _json_object,
    run_benchmark,
)
from pdserve.config import DTYPES, LOAD_FORMATS

CONFIGS = ("none", "device", "host", "pool")
DESCRIPTIONS = {
    "none": "no prefix caching: every prompt token is computed",
    "device": "prefix caching on the device tier only",
    "host": "prefix caching, device tier + host tier",
    "pool": "prefix caching, device tier + host tier + pool",
}
POOLS = ("mooncake", "file", "memory")
DATASETS = ("multi-turn", "shared-prefix")
SETTLE_TIMEOUT_S = 60.0
# JSON name -> Prometheus sample of a counter whose change over a run is recorded
COUNTERS = {
    "prompt_tokens_computed": "pdserve_prompt_tokens_total",
    "query_tokens": "pdserve_prefix_cache_query_tokens_total",
    "hit_tokens_device": 'pdserve_prefix_cache_hit_tokens_total{tier="device"}',
    "hit_tokens_host": 'pdserve_prefix_cache_hit_tokens_total{tier="host"}',
    "hit_tokens_pool": 'pdserve_prefix_cache_hit_tokens_total{tier="pool"}',
    "store_bytes_put": 'pdserve_kv_store_bytes_total{op="put"}',
    "store_bytes_get": 'pdserve_kv_store_bytes_total{op="get"}',
    "store_errors": "pdserve_kv_store_errors_total",
    "recomputed_tokens": "pdserve_recomputed_tokens_total",
    "preemptions": "pdserve_preemptions_total",
    "blocks_saved_on_preemption": "pdserve_kv_blocks_saved_on_preemption_total",
}
TIERS = ("device", "host", "pool")


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


# ---- the four configurations ------------------------------------------------------------------------


@contextlib.contextmanager
def open_pool(kind: str, work_dir: Path) -> Iterator[dict[str, Any]]:
    """The --kv-store-config of a fresh pool; a Mooncake master runs until the block exits."""
    if kind == "file":
        path = work_dir / "pool"
        path.mkdir(parents=True, exist_ok=True)
        yield {"path": str(path)}
    elif kind == "memory":
        yield {}
    else:
        from pdserve.store.base import StoreError
        from pdserve.store.master import MasterProcess

        port = free_port()
        master = MasterProcess(port=port, metadata_port=next(p for p in iter(free_port, None) if p != port))
        try:
            master.start()
        except StoreError as e:
            raise BenchServerError(
                f"cannot start a Mooncake master for the pool config ({e}); or use --pool file"
            ) from e
        try:
            yield master.store_config()
        finally:
            master.stop()


def cache_output(name: str, args: argparse.Namespace) -> bool:
    """Multi-turn host and pool servers also keep generated tokens' blocks, so a next turn can hit the answer."""
    return args.dataset == "multi-turn" and name in ("host", "pool")


def server_flags(name: str, args: argparse.Namespace, pool_config: dict[str, Any] | None) -> list[str]:
    """The exact `pdserve serve` flags of one configuration (port and host are added at start)."""
    flags = [
        "--dtype",
        args.dtype,
        "--load-format",
        args.load_format,
        "--block-size",
        str(args.block_size),
        "--num-blocks",
        str(args.num_blocks),
        "--max-model-len",
        str(args.max_model_len or args.num_blocks * args.block_size),
    ]
    if args.model is not None:
        flags = ["--model", args.model, *flags]
    if name == "none":
        flags.append("--no-prefix-caching")
    if name in ("host", "pool"):
        flags += ["--num-host-blocks", str(args.num_host_blocks)]
    if name == "pool":
        flags += ["--kv-store", args.pool, "--kv-store-config", json.dumps(pool_config or {})]
    if cache_output(name, args):
        flags.append("--cache-output")
    return flags + shlex.split(args.server_flags)


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


def bench_config(args: argparse.Namespace, url: str, result_dir: Path, label: str) -> ServeBenchConfig:
    dataset = DatasetConfig(
        name=args.dataset,
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        prefix_len=args.prefix_len,
        num_turns=args.num_turns,
        seed=args.seed,
    )
    return ServeBenchConfig(
        base_url=url,
        endpoint=args.endpoint,
        dataset=dataset,
        request_rate=args.request_rate,
        max_concurrency=args.max_concurrency,
        tokenizer=client_tokenizer(args),
        timeout_s=args.timeout,
        result_dir=result_dir,
        label=label,
        use_tqdm=args.use_tqdm,
    )


def client_tokenizer(args: argparse.Namespace) -> str | None:
    """--tokenizer, else the --model directory when it holds a tokenizer, else pdserve's default model's."""
    if args.tokenizer is not None:
        return str(args.tokenizer)
    if args.model is not None and (Path(args.model) / "tokenizer.json").is_file():
        return str(args.model)
    return None


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


# ---- output ---------------------------------------------------------------------------------------------


def format_table(records: list[dict[str, Any]]) -> str:
    columns = (
        ("config", 7),
        ("sent", 7),
        ("computed", 9),
        ("x none", 7),
        ("hit dev", 8),
        ("hit host", 9),
        ("hit pool", 9),
        ("put MiB", 8),
        ("get MiB", 8),
        ("TTFT mean", 10),
        ("TTFT p99", 9),
        ("x none", 7),
        ("TPOT", 7),
        ("E2E mean", 9),
        ("failed", 7),
    )
    head = "".join(f"{name:<{w}}" if i == 0 else f"{name:>{w}}" for i, (name, w) in enumerate(columns))
    rows = [head, "-" * len(head)]
    for r in records:
        s, c, v = r["server"], r["client"], r["vs_none"] or {}
        cells = [
            r["name"],
            s["prompt_tokens_sent"],
            s["prompt_tokens_computed"],
            fmt(v.get("prompt_tokens_computed"), "{:.2f}"),
            *(s["hit_tokens"][t] for t in TIERS),
            f"{s['store_bytes']['put'] / 2**20:.1f}",
            f"{s['store_bytes']['get'] / 2**20:.1f}",
            fmt(c["ttft"]["mean_ms"]),
            fmt(c["ttft"]["p99_ms"]),
            fmt(v.get("ttft_mean"), "{:.2f}"),
            fmt(c["tpot"]["mean_ms"]),
            fmt(c["e2el"]["mean_ms"]),
            c["failed"],
        ]
        rows.append(
            "".join(
                f"{cell:<{w}}" if i == 0 else f"{cell!s:>{w}}" for i, (cell, (_, w)) in enumerate(zip(cells, columns))
            )
        )
    rows.append(
        "sent: prompt tokens of the completed requests (server usage); computed: prompt tokens the server "
        "computed;\nhit: prompt tokens reused, by tier; TTFT, TPOT and E2E latency in ms (mean but for p99); "
        "x none: ratio to none"
    )
    return "\n".join(rows)


def plot(path: Path, title: str, records: list[dict[str, Any]]) -> Path:
    """Left: prompt tokens computed plus hits per tier, stacked; right: TTFT mean and p99 per config."""
    names = [r["name"] for r in records]
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(11.0, 4.2), dpi=110)
    try:
        bottom = [0.0] * len(records)
        parts = [("computed", "#7f7f7f", [r["server"]["prompt_tokens_computed"] for r in records])]
        parts += [
            (f"hit {tier}", color, [r["server"]["hit_tokens"][tier] for r in records])
            for tier, color in zip(TIERS, ("#1f77b4", "#ff7f0e", "#2ca02c"))
        ]
        for label, color, values in parts:
            bars = left.bar(names, values, bottom=bottom, color=color, width=0.6, label=label)
            bottom = [b + v for b, v in zip(bottom, values)]
            if label == "computed":
                left.bar_label(bars, labels=[str(v) for v in values], label_type="center", fontsize=8, color="white")
        left.set_ylabel("prompt tokens")
        left.set_title("prefill: prompt tokens computed, and reused by tier", fontsize=10)
        left.set_ylim(0, max(bottom, default=1.0) * 1.25 or 1.0)
        left.legend(fontsize=8, ncol=4, loc="upper center", frameon=False)
        xs = range(len(records))
        for offset, key, color in ((-0.2, "mean_ms", "#1f77b4"), (0.2, "p99_ms", "#d62728")):
            values = [r["client"]["ttft"][key] or 0.0 for r in records]
            bars = right.bar([i + offset for i in xs], values, width=0.4, color=color, label=f"TTFT {key[:-3]}")
            right.bar_label(bars, labels=[f"{v:.0f}" for v in values], fontsize=8)
        right.set_xticks(list(xs), names)
        right.set_ylabel("ms")
        right.set_title("time to first token", fontsize=10)
        right.set_ylim(0, max((r["client"]["ttft"]["p99_ms"] or 0.0 for r in records), default=1.0) * 1.25 or 1.0)
        right.legend(fontsize=8, ncol=2, loc="upper center", frameon=False)
        return finish_figure(fig, (left, right), title, path)
    except BaseException:
        pyplot().close(fig)
        raise


def write_outputs(result: dict[str, Any], args: argparse.Namespace) -> None:
    stem = f"kv-tiers-{args.dataset}-{args.label or time.strftime('%Y%m%d-%H%M%S')}"
    json_path, png_path = args.result_dir / f"{stem}.json", args.result_dir / f"{stem}.png"
    result["files"] = {"json": str(json_path), "png": str(png_path)}
    write_json(json_path, result)
    c = result["cache"]
    title = (
        f"{result['model']}, {args.dataset}: {result['dataset']['num_requests']} requests, device "
        f"{c['num_blocks']} blocks x {c['block_size']} tokens, host {c['num_host_blocks']} blocks, "
        f"pool {c['pool']}"
    )
    plot(png_path, title, result["configs"])


# ---- command line ----------------------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "kv-tiers",
        help="prefill saved and TTFT with no cache, device, +host, +pool tiers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s = p.add_argument_group("servers (the same for every configuration except the tiers)")
    s.add_argument("--model", default=None, help="as for pdserve serve (default: pdserve's default model)")
    s.add_argument("--load-format", choices=LOAD_FORMATS, default="auto", help="dummy: random weights")
    s.add_argument("--dtype", choices=DTYPES, default="float32")
    s.add_argument("--max-model-len", type=int, default=None, help="default: --num-blocks x --block-size")
    s.add_argument("--block-size", type=int, default=16)
    s.add_argument(
        "--num-blocks",
        type=int,
        default=96,
        help="device tier blocks, the same in every config; keep it below the workload's working set (default 96)",
    )
    s.add_argument("--num-host-blocks", type=int, default=128, help="host tier blocks of host and pool (default 128)")
    s.add_argument(
        "--pool",
        choices=POOLS,
        default="mooncake",
        help="pool of the pool config: a local Mooncake master, a temp directory, or in-process memory",
    )
    s.add_argument(
        "--pool-config",
        type=_json_object,
        default={},
        help='JSON merged into the pool\'s --kv-store-config, e.g. \'{"global_segment_size": "2GiB"}\'',
    )
    s.add_argument(
        "--configs",
        type=_config_list,
        default=list(CONFIGS),
        help=f"comma-separated subset of {','.join(CONFIGS)} (default: all, in that order)",
    )
    s.add_argument("--server-flags", default="", help="more pdserve serve flags for every config, e.g. '--device cuda'")
    s.add_argument("--server-timeout", type=float, default=300.0, help="seconds for each server to answer /health")
    w = p.add_argument_group("workload (as for pdserve bench serve)")
    w.add_argument("--dataset", choices=DATASETS, default="multi-turn")
    w.add_argument("--endpoint", choices=tuple(ENDPOINTS), default="completions")
    w.add_argument("--tokenizer", default=None, help="default: the --model directory's, else pdserve's default")
    w.add_argument("--num-prompts", type=int, default=32, help="conversations for multi-turn (default 32)")
    w.add_argument("--input-len", type=int, default=64, help="tokens per prompt / per user message (default 64)")
    w.add_argument("--output-len", type=int, default=32, help="max_tokens of each request (default 32)")
    w.add_argument("--num-turns", type=int, default=3)
    w.add_argument("--prefix-len", type=int, default=None, help="shared-prefix: common tokens (default input/2)")
    w.add_argument("--request-rate", type=float, default=math.inf)
    w.add_argument(
        "--max-concurrency",
        type=int,
        default=4,
        help="requests in flight at most (default 4, so running requests fit the device tier and nothing is preempted)",
    )
    w.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    w.add_argument("--seed", type=int, default=0, help="seeds the prompts and the arrival times")
    add_output_args(p)
    p.set_defaults(func=run)


def _config_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in CONFIGS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"--configs takes names from {','.join(CONFIGS)}, got {text!r}")
    return [n for n in CONFIGS if n in names]


def check_args(args: argparse.Namespace) -> None:
    if args.num_blocks < 1 or args.num_host_blocks < 1:
        raise ValueError(
            f"--num-blocks and --num-host-blocks must be at least 1, got {args.num_blocks} and {args.num_host_blocks}"
        )
    if args.label is not None and not LABEL_RE.match(args.label):
        raise ValueError(f"--label {args.label!r} may hold only letters, digits, '.', '_' and '-'")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    check = bench_config(args, "http://127.0.0.1:1", args.result_dir, "check")  # validates the workload flags
    conversations = build_dataset(check.dataset, load_tokenizer(check.tokenizer))
    records: list[dict[str, Any]] = []
    try:
        with sigterm_interrupts(), tempfile.TemporaryDirectory(prefix="pdserve-kv-tiers-") as tmp:
            for name in args.configs:
                records.append(run_config(name, args, conversations, Path(tmp)))
    except (BenchServerError, BenchServeError) as e:
        print(f"pdserve bench kv-tiers: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pdserve bench kv-tiers: interrupted; every server was stopped", file=sys.stderr)
        return 130
    add_ratios(records)
    result = {
        "benchmark": "kv-tiers",
        "date": now_iso(),
        "label": args.label,
        "pdserve_version": code_version(),
        "model": records[0]["model"],
        "machine": machine_info(),
        "workload": {
            "dataset": args.dataset,
            "endpoint": args.endpoint,
            "num_prompts": args.num_prompts,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "num_turns": args.num_turns,
            "prefix_len": check.dataset.shared_prefix_len if args.dataset == "shared-prefix" else None,
            "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
            "max_concurrency": args.max_concurrency,
            "seed": args.seed,
            "tokenizer": check.tokenizer,
        },
        "dataset": dataset_stats(conversations),
        "cache": {
            "block_size": args.block_size,
            "num_blocks": args.num_blocks,
            "num_host_blocks": args.num_host_blocks,
            "pool": args.pool,
            "cache_output": [r["name"] for r in records if r["cache_output"]],
        },
        "configs": records,
    }
    write_outputs(result, args)
    print(format_table(records))
    print(f"Results: {result['files']['json']}, {result['files']['png']}")
    failed = [(r["name"], r["client"]["failed"], r["errors"]) for r in records if r["client"]["failed"]]
    for name, num_failed, errors in failed:
        print(
            f"pdserve bench kv-tiers: error: {num_failed} requests failed in the {name!r} config; first: "
            f"{errors[0]['error'] if errors else 'n/a'}",
            file=sys.stderr,
        )
    return 1 if failed else 0
