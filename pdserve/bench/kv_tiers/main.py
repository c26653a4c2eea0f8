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
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

from pdserve.bench.common import (
    LABEL_RE,
    add_output_args,
    code_version,
    label_or_timestamp,
    machine_info,
    now_iso,
    write_outputs,
)
from pdserve.bench.datasets import Conversation, build_dataset, dataset_stats, load_tokenizer
from pdserve.bench.kv_tiers.configs import CONFIGS, DATASETS, POOLS, bench_config
from pdserve.bench.kv_tiers.measure import add_ratios, run_config
from pdserve.bench.kv_tiers.report import figure_title, format_table, plot
from pdserve.bench.launch import BenchServerError, sigterm_interrupts
from pdserve.bench.serve import ENDPOINTS, BenchServeError, ServeBenchConfig, _json_object
from pdserve.config import DTYPES, LOAD_FORMATS


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
    _add_workload_args(p.add_argument_group("workload (as for pdserve bench serve)"))
    add_output_args(p)
    p.set_defaults(func=run)


def _add_workload_args(w: argparse._ArgumentGroup) -> None:
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
    result = _result(args, check, conversations, records)
    stem = f"kv-tiers-{args.dataset}-{label_or_timestamp(args.label)}"
    title = figure_title(result, args)
    write_outputs(result, args.result_dir, stem, lambda path: plot(path, title, records))
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


def _result(
    args: argparse.Namespace, check: ServeBenchConfig, conversations: list[Conversation], records: list[dict[str, Any]]
) -> dict[str, Any]:
    """The JSON of a run: the workload (`check`: its client config), the cache sizes, each config's record."""
    return {
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
