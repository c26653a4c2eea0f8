"""`pdserve bench pd-sweep`: PD disaggregation against mixed replicas over a request-rate sweep, with goodput.

Starts, one after another, the two deployments of `pdserve bench pd` (1 prefill + 1 decode; 2 mixed
replicas), each spread over --gpus with the launcher (on two GPUs: P on one and D on the other, or one
mixed replica per GPU), and drives each with the `bench serve` client at every rate of --request-rates
(Poisson arrivals, random prompts, streaming), in the same deployment one rate after another. Records
per config and rate: throughput, TTFT, TPOT and ITL, and goodput, the completed requests per second
that met every SLO of --goodput (default TTFT <= 1 s and TPOT <= 40 ms). Writes
pd-sweep-<label>.json and .png under --result-dir and prints a table with pd / mixed ratios per rate.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from pdserve.bench.common import (
    LABEL_RE,
    add_output_args,
    code_version,
    fmt,
    label_or_timestamp,
    machine_info,
    now_iso,
    write_outputs,
)
from pdserve.bench.datasets import Conversation, DatasetConfig, build_dataset, dataset_stats, load_tokenizer
from pdserve.bench.deployment import Deployment
from pdserve.bench.metrics import parse_goodput
from pdserve.bench.pd import (
    CONFIGS,
    DESCRIPTIONS,
    _config_list,
    add_engine_flag_args,
    counter_delta,
    instance_flags,
    launch_config,
    run_deployments,
    settled_counters,
)
from pdserve.bench.plot import finish_figure, pyplot
from pdserve.bench.serve import ENDPOINTS, ServeBenchConfig, run_benchmark
from pdserve.config import parse_gpu_ids

DEFAULT_GOODPUT = ("ttft:1000", "tpot:40")
STATS = ("mean_ms", "p50_ms", "p99_ms")
COLORS = {"pd": "#1f77b4", "mixed": "#ff7f0e"}


def sweep_flags(args: argparse.Namespace) -> list[str]:
    """bench pd's instance flags, plus the server's tokenizer where the model has none of its own."""
    flags = instance_flags(args)
    if args.server_tokenizer is not None:
        flags += ["--tokenizer", args.server_tokenizer]
    return flags


def serve_config(args: argparse.Namespace, url: str, rate: float, result_dir: Path, label: str) -> ServeBenchConfig:
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
        request_rate=rate,
        max_concurrency=args.max_concurrency,
        goodput_slos=parse_goodput(args.goodput),
        tokenizer=args.tokenizer,
        timeout_s=args.timeout,
        result_dir=result_dir,
        label=label,
        use_tqdm=args.use_tqdm,
    )


def rate_record(rate: float, raw: dict[str, Any], delta: dict[str, dict[str, Any]]) -> dict[str, Any]:
    m = raw["metrics"]
    failures = sum(sum(d["kv_transfer_failures"].values()) for d in delta.values())
    return {
        "request_rate": rate,
        "completed": m["completed"],
        "num_requests": m["num_requests"],
        "num_errors": m["failed"] + failures,
        "duration_s": m["duration_s"],
        "output_throughput": m["output_throughput"],
        "request_throughput": m["request_throughput"],
        "goodput": m["goodput"]["request_goodput"],
        "num_good": m["goodput"]["num_good"],
        "goodput_share": round(m["goodput"]["num_good"] / m["num_requests"], 4) if m["num_requests"] else None,
        **{key: m[key] for key in ("ttft", "tpot", "itl", "e2el")},
        "server": delta,
        "errors": raw["errors"],
    }


def run_config(
    name: str, args: argparse.Namespace, conversations: list[Conversation], work_dir: Path
) -> dict[str, Any]:
    """Start the deployment of `name`, run every rate through its router, stop it; the config's record."""
    deployment = Deployment(
        name, launch_config(name, args, sweep_flags(args), args.gpus), work_dir / name / "logs", args.server_timeout
    )
    print(f"[pd-sweep] {name}: starting {shlex.join(deployment.launch_argv)}", flush=True)
    rates = []
    with deployment:
        if args.warmup_prompts:  # first requests compile kernels for new shapes: not in any rate's figures
            run_benchmark(
                serve_config(args, deployment.url, math.inf, work_dir / name, f"{name}-warmup"),
                conversations[: args.warmup_prompts],
            )
        for rate in args.request_rates:
            before = settled_counters(deployment)
            raw = run_benchmark(
                serve_config(args, deployment.url, rate, work_dir / name, f"{name}-{rate:g}"), conversations
            )
            deployment.check_alive()
            after = settled_counters(deployment)
            rates.append(rate_record(rate, raw, {n: counter_delta(before[n], after[n]) for n in before}))
            r = rates[-1]
            print(
                f"[pd-sweep] {name} at {rate:g} req/s: goodput {r['goodput']:.2f} req/s "
                f"({r['num_good']}/{r['num_requests']}), TTFT p50 {fmt(r['ttft']['p50_ms'])} ms, "
                f"TPOT p50 {fmt(r['tpot']['p50_ms'])} ms, errors {r['num_errors']}",
                flush=True,
            )
        model = raw["server"]["model"]
    return {
        "name": name,
        "description": DESCRIPTIONS[name],
        "deployment": deployment.describe(),
        "model": model,
        "rates": rates,
    }


def ratios(pd: dict[str, Any], mixed: dict[str, Any]) -> list[dict[str, Any]]:
    """pd's figures over mixed's at each rate (None where mixed's is 0 or missing)."""

    def ratio(x: float | None, y: float | None) -> float | None:
        return round(x / y, 4) if x is not None and y else None

    out = []
    for a, b in zip(pd["rates"], mixed["rates"]):
        row: dict[str, Any] = {
            "request_rate": a["request_rate"],
            "goodput": ratio(a["goodput"], b["goodput"]),
            "output_throughput": ratio(a["output_throughput"], b["output_throughput"]),
        }
        for key in ("ttft", "tpot", "itl"):
            for stat in STATS:
                row[f"{key}_{stat[:-3]}"] = ratio(a[key][stat], b[key][stat])
        out.append(row)
    return out


def format_table(result: dict[str, Any]) -> str:
    columns = (
        ("config", 8),
        ("rate", 6),
        ("ok", 8),
        ("err", 5),
        ("goodput", 9),
        ("good", 7),
        ("out tok/s", 10),
        ("TTFT p50", 10),
        ("p99", 9),
        ("TPOT p50", 10),
        ("p99", 8),
        ("ITL p50", 9),
    )
    head = "".join(f"{n:<{w}}" if i == 0 else f"{n:>{w}}" for i, (n, w) in enumerate(columns))
    rows = [head, "-" * len(head)]
    for c in result["configs"]:
        for r in c["rates"]:
            cells = [
                c["name"],
                f"{r['request_rate']:g}",
                f"{r['completed']}/{r['num_requests']}",
                r["num_errors"],
                f"{r['goodput']:.2f}",
                f"{100 * (r['goodput_share'] or 0):.0f}%",
                f"{r['output_throughput']:.0f}",
                fmt(r["ttft"]["p50_ms"]),
                fmt(r["ttft"]["p99_ms"]),
                fmt(r["tpot"]["p50_ms"]),
                fmt(r["tpot"]["p99_ms"]),
                fmt(r["itl"]["p50_ms"]),
            ]
            rows.append(
                "".join(f"{x!s:<{w}}" if i == 0 else f"{x!s:>{w}}" for i, (x, (_, w)) in enumerate(zip(cells, columns)))
            )
    slos = ", ".join(f"{k.upper()} <= {v:g} ms" for k, v in result["workload"]["goodput_slos_ms"].items())
    rows.append(f"goodput: completed requests/s meeting {slos}; good: their share; latencies in ms")
    for q in result["pd_over_mixed"] or []:
        rows.append(
            f"pd / mixed at {q['request_rate']:g} req/s: goodput {fmt(q['goodput'], '{:.2f}')}x, output tok/s "
            f"{fmt(q['output_throughput'], '{:.2f}')}x, TTFT p50 {fmt(q['ttft_p50'], '{:.2f}')}x, TPOT p50 "
            f"{fmt(q['tpot_p50'], '{:.2f}')}x"
        )
    return "\n".join(rows)


def plot(path: Path, title: str, result: dict[str, Any]) -> Path:
    """Goodput, TTFT and TPOT (p50 solid, p99 dashed) against the request rate, one line per config."""
    slos = result["workload"]["goodput_slos_ms"]
    fig, axes = pyplot().subplots(1, 3, figsize=(15.0, 4.2), dpi=110)
    try:
        for c in result["configs"]:
            xs = [r["request_rate"] for r in c["rates"]]
            color = COLORS[c["name"]]
            axes[0].plot(xs, [r["goodput"] for r in c["rates"]], marker="o", color=color, label=c["name"])
            for ax, key in ((axes[1], "ttft"), (axes[2], "tpot")):
                ax.plot(xs, [r[key]["p50_ms"] for r in c["rates"]], marker="o", color=color, label=f"{c['name']} p50")
                ax.plot(
                    xs,
                    [r[key]["p99_ms"] for r in c["rates"]],
                    marker="x",
                    linestyle="--",
                    color=color,
                    label=f"{c['name']} p99",
                )
        axes[0].plot(xs, xs, color="#7f7f7f", linestyle=":", label="offered rate")
        axes[0].set_ylabel("goodput (req/s)")
        axes[0].set_title(
            "goodput (" + ", ".join(f"{k.upper()} <= {v:g} ms" for k, v in slos.items()) + ")", fontsize=10
        )
        for ax, key, name in ((axes[1], "ttft", "TTFT"), (axes[2], "tpot", "TPOT")):
            if key in slos:
                ax.axhline(slos[key], color="#d62728", linestyle=":", label="SLO")
            ax.set_ylabel("ms")
            ax.set_yscale("log")
            ax.set_title(name, fontsize=10)
        for ax in axes:
            ax.set_xlabel("request rate (req/s)")
            ax.legend(fontsize=7, frameon=False)
        return finish_figure(fig, axes, title, path)
    except BaseException:
        pyplot().close(fig)
        raise


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "pd-sweep",
        help="1P1D vs 2 mixed replicas over a request-rate sweep: goodput, TTFT, TPOT",
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
    s.add_argument(
        "--gpus",
        type=parse_gpu_ids,
        default=(),
        metavar="I,J",
        help="CUDA devices to spread each deployment's two instances over (pdserve launch --gpus)",
    )
    add_engine_flag_args(s)
    s.add_argument(
        "--server-tokenizer",
        default=None,
        help="the instances' --tokenizer (needed for dummy shapes, which have none; e.g. 'default')",
    )
    s.add_argument("--server-flags", default="", help="more pdserve serve flags for every instance, one string")
    s.add_argument(
        "--server-timeout", type=float, default=600.0, help="seconds for a deployment to answer /health (default 600)"
    )
    w = p.add_argument_group("workload (as for pdserve bench serve, random dataset)")
    w.add_argument("--endpoint", choices=tuple(ENDPOINTS), default="completions")
    w.add_argument("--tokenizer", default=None, help="sizes the prompts (default: pdserve's default model's)")
    w.add_argument("--request-rates", type=_rates, default=[1.0, 2.0, 4.0], help="Poisson arrivals/s, e.g. 1,2,4")
    w.add_argument("--num-prompts", type=int, default=64, help="requests at each rate")
    w.add_argument("--input-len", type=int, default=2048)
    w.add_argument("--output-len", type=int, default=256)
    w.add_argument("--random-range-ratio", type=float, default=0.0)
    w.add_argument("--max-concurrency", type=int, default=None)
    w.add_argument(
        "--warmup-prompts",
        type=int,
        default=4,
        help="requests sent all at once to each deployment before the sweep, not measured (default 4)",
    )
    w.add_argument(
        "--goodput",
        nargs="+",
        default=list(DEFAULT_GOODPUT),
        metavar="NAME:MS",
        help="SLOs of a good request (default: ttft:1000 tpot:40)",
    )
    w.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    w.add_argument("--seed", type=int, default=0, help="seeds the prompts and the arrival times")
    add_output_args(p)
    p.set_defaults(func=run)


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--request-rates takes numbers like 1,2,4, got {text!r}") from None
    if not rates or any(not (r > 0) or math.isinf(r) for r in rates):
        raise argparse.ArgumentTypeError(f"--request-rates takes finite rates > 0, got {text!r}")
    return rates


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.warmup_prompts <= args.num_prompts:
        raise ValueError(
            f"--warmup-prompts must be between 0 and --num-prompts ({args.num_prompts}), got {args.warmup_prompts}"
        )
    if args.label is not None and not LABEL_RE.match(args.label):
        raise ValueError(f"--label {args.label!r} may hold only letters, digits, '.', '_' and '-'")
    check = serve_config(args, "http://127.0.0.1:1", args.request_rates[0], args.result_dir, "check")  # validates
    conversations = build_dataset(check.dataset, load_tokenizer(check.tokenizer))
    started = time.monotonic()
    records = run_deployments("pd-sweep", args.configs, lambda name, work: run_config(name, args, conversations, work))
    if isinstance(records, int):
        return records
    result = _result(args, check, conversations, records, started)
    gpus = f" on GPUs {','.join(map(str, args.gpus))}" if args.gpus else ", every instance on GPU 0"
    title = (
        f"{result['model']} ({args.dtype}){gpus}: {args.num_prompts} prompts per rate, {args.input_len} in / "
        f"{args.output_len} out; pd = 1 prefill + 1 decode, mixed = 2 replicas"
    )
    stem = f"pd-sweep-{label_or_timestamp(args.label)}"
    json_path, png_path = write_outputs(result, args.result_dir, stem, lambda path: plot(path, title, result))
    print(format_table(result))
    print(f"Results: {json_path}, {png_path}")
    failed = [(c["name"], r) for c in records for r in c["rates"] if r["num_errors"]]
    for name, r in failed:
        first = r["errors"][0]["error"] if r["errors"] else "n/a"
        print(
            f"pdserve bench pd-sweep: error: {r['num_errors']} errors in {name!r} at {r['request_rate']:g} req/s; "
            f"first: {first}",
            file=sys.stderr,
        )
    return 1 if failed else 0


def _result(
    args: argparse.Namespace,
    check: ServeBenchConfig,
    conversations: list[Conversation],
    records: list[dict[str, Any]],
    started: float,
) -> dict[str, Any]:
    """The JSON of a sweep (`check`: the workload's client config, `started`: time.monotonic() at its start)."""
    by_name = {r["name"]: r for r in records}
    return {
        "benchmark": "pd-sweep",
        "date": now_iso(),
        "label": args.label,
        "pdserve_version": code_version(),
        "model": records[0]["model"],
        "machine": machine_info(),
        "gpus": list(args.gpus),
        "workload": {
            "dataset": "random",
            "endpoint": args.endpoint,
            "num_prompts_per_rate": args.num_prompts,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "random_range_ratio": args.random_range_ratio,
            "request_rates": args.request_rates,
            "max_concurrency": args.max_concurrency,
            "seed": args.seed,
            "tokenizer": check.tokenizer,
            "goodput_slos_ms": check.goodput_slos,
        },
        "engine": {"dtype": args.dtype, "block_size": args.block_size, "instance_flags": sweep_flags(args)},
        "dataset": dataset_stats(conversations),
        "notes": {
            "rates": "each rate runs in the same deployment after the previous one finished",
            "num_errors": "failed requests + failed KV transfers",
            "warmup": f"{args.warmup_prompts} requests at once to each deployment before its first rate, "
            "not in the figures",
            "goodput": "completed requests meeting every SLO, per second of the rate's run",
        },
        "configs": records,
        "pd_over_mixed": ratios(by_name["pd"], by_name["mixed"]) if len(by_name) == 2 else None,
        "seconds": round(time.monotonic() - started, 1),
    }
