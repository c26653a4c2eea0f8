"""`pdserve bench pd`: PD disaggregation against mixed replicas, the same workload through the router.

Starts, one after another, two deployments of the same number of instance processes with the
`pdserve launch` machinery (plan_parts, build_*_argv, Launcher; run here in a thread so the benchmark
can reach every part):

  pd     --num-prefill 1 --num-decode 1   (KV moved P -> D)
  mixed  --num-prefill 0 --num-decode 0 --num-mixed 2

drives each with the `bench serve` client (random prompts, streaming) and records TTFT, TPOT, ITL,
throughput and failures of both, their ratios, and a few counters of every instance. A reference
figure quoted in the issue (vLLM, not measured here) is printed beside pdserve's PD figures. Writes
pd-serve-<label>.json and a .png under --result-dir and prints a table. It knows the deployments only
by their command lines, /health and /metrics.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
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
from pdserve.bench.datasets import Conversation, DatasetConfig, build_dataset, dataset_stats, load_tokenizer
from pdserve.bench.deployment import Deployment
from pdserve.bench.kv_tiers import client_tokenizer
from pdserve.bench.launch import BenchServerError, scrape, sigterm_interrupts
from pdserve.bench.pd_report import figure_title, format_table, plot, ratios, reference_comparison
from pdserve.bench.serve import ENDPOINTS, BenchServeError, ServeBenchConfig, run_benchmark
from pdserve.config import DTYPES, LOAD_FORMATS
from pdserve.launcher import (
    KV_TRANSFER_ENGINES,
    LaunchConfig,
)

CONFIGS = ("pd", "mixed")
DESCRIPTIONS = {
    "pd": "PD disaggregation: 1 prefill + 1 decode instance, KV moved P -> D (pdserve launch --num-prefill 1 "
    "--num-decode 1)",
    "mixed": "2 mixed replicas, each serving requests end to end (pdserve launch --num-prefill 0 --num-decode 0 "
    "--num-mixed 2)",
}
SETTLE_TIMEOUT_S = 30.0
# JSON name -> Prometheus sample of an instance counter whose change over a run is recorded
COUNTERS = {
    "prompt_tokens": "pdserve_prompt_tokens_total",
    "generation_tokens": "pdserve_generation_tokens_total",
    "preemptions": "pdserve_preemptions_total",
    "kv_bytes_sent": 'pdserve_kv_transfer_bytes_total{direction="send"}',
    "kv_bytes_received": 'pdserve_kv_transfer_bytes_total{direction="recv"}',
    "kv_transfers": "pdserve_kv_transfer_seconds_count",
    "kv_transfer_seconds": "pdserve_kv_transfer_seconds_sum",
}
FAILURES_PREFIX = "pdserve_kv_transfer_failures_total{"


def instance_counters(url: str) -> dict[str, Any]:
    samples = scrape(url)
    counters: dict[str, Any] = {key: samples.get(name, 0.0) for key, name in COUNTERS.items()}
    counters["kv_transfer_failures"] = {
        name[len(FAILURES_PREFIX) :].split('"')[1]: value
        for name, value in samples.items()
        if name.startswith(FAILURES_PREFIX)
    }
    counters["is_idle"] = (
        samples.get("pdserve_num_requests_running") == samples.get("pdserve_num_requests_waiting") == 0
    )
    return counters


def settled_counters(deployment: Deployment) -> dict[str, dict[str, Any]]:
    """Every instance's counters once all are idle and two reads agree."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    previous: dict[str, dict[str, Any]] | None = None
    while True:
        now = {p.name: instance_counters(p.probe_url) for p in deployment.instances()}
        if all(c["is_idle"] for c in now.values()) and now == previous:
            return now
        if time.monotonic() > deadline:
            raise BenchServerError(
                f"the {deployment.name!r} instances did not go idle with steady counters within "
                f"{SETTLE_TIMEOUT_S:.0f} s"
            )
        previous = now
        time.sleep(0.2)


def counter_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    delta: dict[str, Any] = {k: round(after[k] - before[k], 6) for k in COUNTERS}
    for k in (
        "prompt_tokens",
        "generation_tokens",
        "preemptions",
        "kv_bytes_sent",
        "kv_bytes_received",
        "kv_transfers",
    ):
        delta[k] = int(delta[k])
    delta["kv_transfer_failures"] = {
        r: int(n - before["kv_transfer_failures"].get(r, 0)) for r, n in after["kv_transfer_failures"].items()
    }
    return delta


# ---- the two configurations ----------------------------------------------------------------------------


def instance_flags(args: argparse.Namespace) -> list[str]:
    """Engine flags every instance of both deployments gets."""
    flags = ["--dtype", args.dtype, "--load-format", args.load_format, "--block-size", str(args.block_size)]
    for option, value in (
        ("--model", args.model),
        ("--max-model-len", args.max_model_len),
        ("--num-blocks", args.num_blocks),
        ("--max-num-seqs", args.max_num_seqs),
        ("--max-num-batched-tokens", args.max_num_batched_tokens),
    ):
        if value is not None:
            flags += [option, str(value)]
    return flags + shlex.split(args.server_flags)


def launch_config(
    name: str, args: argparse.Namespace, flags: list[str] | None = None, gpus: tuple[int, ...] = ()
) -> LaunchConfig:
    """The deployment of config `name`: every instance gets `flags` (default instance_flags(args))."""
    is_pd = name == "pd"
    return LaunchConfig(
        num_prefill=int(is_pd),
        num_decode=int(is_pd),
        num_mixed=0 if is_pd else 2,
        kv_transfer_engine=args.kv_transfer_engine,
        engine_argv=tuple(instance_flags(args) if flags is None else flags),
        gpus=gpus,
    )


def bench_config(args: argparse.Namespace, url: str, result_dir: Path, label: str) -> ServeBenchConfig:
    dataset = DatasetConfig(
        name="random",
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        range_ratio=args.random_range_ratio,
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


def run_config(
    name: str, args: argparse.Namespace, conversations: list[Conversation], work_dir: Path
) -> dict[str, Any]:
    """Start the deployment of `name`, run the workload through its router, stop it; the config's record."""
    deployment = Deployment(name, launch_config(name, args), work_dir / name / "logs", args.server_timeout)
    print(f"[pd] {name}: starting {shlex.join(deployment.launch_argv)}", flush=True)
    with deployment:
        before = settled_counters(deployment)
        raw = run_benchmark(bench_config(args, deployment.url, work_dir / name, name), conversations)
        deployment.check_alive()
        after = settled_counters(deployment)
    server = {
        n: {"role": next(p.role for p in deployment.parts if p.name == n)} | counter_delta(before[n], after[n])
        for n in before
    }
    metrics = {k: v for k, v in raw["metrics"].items() if k != "goodput"}
    num_transfer_failures = sum(sum(s["kv_transfer_failures"].values()) for s in server.values())
    return {
        "name": name,
        "description": DESCRIPTIONS[name],
        "deployment": deployment.describe(),
        "model": raw["server"]["model"],
        "client": metrics,
        "server": server,
        "num_errors": metrics["failed"] + num_transfer_failures,
        "errors": raw["errors"],
        "requests": raw["requests"],
    }


# ---- command line -----------------------------------------------------------------------------------------


def add_engine_flag_args(group: argparse._ArgumentGroup) -> None:
    """The engine flags every instance of both deployments gets (instance_flags), shared with bench pd-sweep."""
    s = group
    s.add_argument("--model", default=None, help="as for pdserve serve (default: pdserve's default model)")
    s.add_argument("--load-format", choices=LOAD_FORMATS, default="auto", help="dummy: random weights")
    s.add_argument("--dtype", choices=DTYPES, default="float32")
    s.add_argument("--max-model-len", type=int, default=None, help="default: the model's")
    s.add_argument("--block-size", type=int, default=16)
    s.add_argument("--num-blocks", type=int, default=None, help="KV blocks per instance (default: the engine's)")
    s.add_argument("--max-num-seqs", type=int, default=None)
    s.add_argument("--max-num-batched-tokens", type=int, default=None)
    s.add_argument("--kv-transfer-engine", choices=KV_TRANSFER_ENGINES, default="auto", help="of the pd deployment")


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "pd",
        help="1 prefill + 1 decode vs 2 mixed replicas behind the router: TTFT, TPOT, ITL, throughput",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s = p.add_argument_group("deployments (every instance of both gets the same engine flags)")
    s.add_argument(
        "--configs",
        type=_config_list,
        default=list(CONFIGS),
        help=f"comma-separated subset of {','.join(CONFIGS)} (default: both, in that order)",
    )
    add_engine_flag_args(s)
    s.add_argument("--server-flags", default="", help="more pdserve serve flags for every instance, one string")
    s.add_argument(
        "--server-timeout", type=float, default=300.0, help="seconds for a deployment to answer /health (default 300)"
    )
    w = p.add_argument_group("workload (as for pdserve bench serve, random dataset)")
    w.add_argument("--endpoint", choices=tuple(ENDPOINTS), default="completions")
    w.add_argument("--tokenizer", default=None, help="default: the --model directory's, else pdserve's default")
    w.add_argument("--num-prompts", type=int, default=64)
    w.add_argument("--input-len", type=int, default=128)
    w.add_argument("--output-len", type=int, default=64)
    w.add_argument("--random-range-ratio", type=float, default=0.0)
    w.add_argument("--request-rate", type=float, default=math.inf)
    w.add_argument("--max-concurrency", type=int, default=16)
    w.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    w.add_argument("--seed", type=int, default=0, help="seeds the prompts and the arrival times")
    add_output_args(p)
    p.set_defaults(func=run)


def _config_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or any(n not in CONFIGS for n in names):
        raise argparse.ArgumentTypeError(f"--configs takes names from {','.join(CONFIGS)}, got {text!r}")
    return [n for n in CONFIGS if n in names]


def run_deployments(
    command: str, names: list[str], run_one: Callable[[str, Path], dict[str, Any]]
) -> list[dict[str, Any]] | int:
    """run_one(name, work_dir) for every config, one after another, in a temporary directory, SIGTERM taken as
    Ctrl-C: the records, or the exit code once a clear error was printed (every deployment stopped)."""
    records: list[dict[str, Any]] = []
    try:
        with sigterm_interrupts(), tempfile.TemporaryDirectory(prefix=f"pdserve-bench-{command}-") as tmp:
            for name in names:
                records.append(run_one(name, Path(tmp)))
    except (BenchServerError, BenchServeError) as e:
        print(f"pdserve bench {command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"pdserve bench {command}: interrupted; every deployment was stopped", file=sys.stderr)
        return 130
    return records


def run(args: argparse.Namespace) -> int:
    if args.label is not None and not LABEL_RE.match(args.label):
        raise ValueError(f"--label {args.label!r} may hold only letters, digits, '.', '_' and '-'")
    check = bench_config(args, "http://127.0.0.1:1", args.result_dir, "check")  # validates the workload flags
    conversations = build_dataset(check.dataset, load_tokenizer(check.tokenizer))
    records = run_deployments("pd", args.configs, lambda name, work: run_config(name, args, conversations, work))
    if isinstance(records, int):
        return records
    by_name = {r["name"]: r for r in records}
    result = {
        "benchmark": "pd-serve",
        "date": now_iso(),
        "label": args.label,
        "pdserve_version": code_version(),
        "model": records[0]["model"],
        "machine": machine_info(),
        "workload": {
            "dataset": "random",
            "endpoint": args.endpoint,
            "num_prompts": args.num_prompts,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "random_range_ratio": args.random_range_ratio,
            "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
            "max_concurrency": args.max_concurrency,
            "seed": args.seed,
            "tokenizer": check.tokenizer,
        },
        "engine": {"dtype": args.dtype, "block_size": args.block_size, "instance_flags": instance_flags(args)},
        "dataset": dataset_stats(conversations),
        "notes": {
            "server": "each instance's counter changes over the run; they include the one 2-token test "
            "request the bench serve client sends before the workload (not in the client figures)",
            "num_errors": "failed requests + failed KV transfers",
            "omp_num_threads": "as pdserve launch sets it: the cores divided among the instances",
        },
        "configs": records,
        "pd_over_mixed": ratios(by_name["pd"], by_name["mixed"]) if len(by_name) == 2 else None,
        "reference": reference_comparison(records, args),
    }
    stem = f"pd-serve-{label_or_timestamp(args.label)}"
    title = figure_title(result, args)
    write_outputs(result, args.result_dir, stem, lambda path: plot(path, title, records))
    print(format_table(records, result))
    print(f"Results: {result['files']['json']}, {result['files']['png']}")
    failed = [r for r in records if r["num_errors"]]
    for r in failed:
        first = r["errors"][0]["error"] if r["errors"] else "n/a"
        print(
            f"pdserve bench pd: error: {r['num_errors']} errors in the {r['name']!r} config; first: {first}",
            file=sys.stderr,
        )
    return 1 if failed else 0
