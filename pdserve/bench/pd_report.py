"""What a `pdserve bench pd` run says: pd's figures over mixed's, the figure the issue quotes (vLLM, not measured
here) beside pdserve's PD figures, the printed table and the PNG (TTFT, TPOT, ITL, output throughput)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pdserve.bench.common import fmt
from pdserve.bench.plot import finish_figure, pyplot

STATS = ("mean_ms", "p50_ms", "p99_ms")
# The figure the issue quotes; nothing in this benchmark measures it.
REFERENCE_SOURCE = (
    "vLLM CPU 1P1D with its shared-storage example connector (one core each, block size 32, 64 prompts, "
    "128 in / 64 out, concurrency 16, bf16): ~208-225 output tok/s, mean TTFT 1.5-1.9 s (measured by "
    "the issue's author on this machine type, not in this run)"
)
REFERENCE_OUTPUT_TOK_S = (208.0, 225.0)
REFERENCE_TTFT_MEAN_S = (1.5, 1.9)
REFERENCE_WORKLOAD: dict[str, Any] = {
    "num_prompts": 64,
    "input_len": 128,
    "output_len": 64,
    "max_concurrency": 16,
    "dtype": "bfloat16",
    "block_size": 32,
}


def ratios(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float | None]:
    """a's client figures over b's (None where b's is 0 or missing)."""

    def ratio(x: float | None, y: float | None) -> float | None:
        return round(x / y, 4) if x is not None and y else None

    out = {
        f"{key}_{stat[:-3]}": ratio(a["client"][key][stat], b["client"][key][stat])
        for key in ("ttft", "tpot", "itl", "e2el")
        for stat in STATS
    }
    for key in ("output_throughput", "request_throughput"):
        out[key] = ratio(a["client"][key], b["client"][key])
    return out


def reference_comparison(records: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    pd = next((r for r in records if r["name"] == "pd"), None)
    ours = (
        None
        if pd is None
        else {
            "output_throughput_tok_s": pd["client"]["output_throughput"],
            "ttft_mean_s": _seconds(pd["client"]["ttft"]["mean_ms"]),
        }
    )
    same = {
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "max_concurrency": args.max_concurrency,
        "dtype": args.dtype,
        "block_size": args.block_size,
    }
    return {
        "source": REFERENCE_SOURCE,
        "measured_here": False,
        "system": "vLLM (CPU), 1P1D, shared-storage example connector",
        "output_throughput_tok_s": list(REFERENCE_OUTPUT_TOK_S),
        "ttft_mean_s": list(REFERENCE_TTFT_MEAN_S),
        "workload": REFERENCE_WORKLOAD,
        "pdserve_pd_this_run": ours,
        "workload_differences": {
            k: {"reference": REFERENCE_WORKLOAD[k], "this_run": v}
            for k, v in same.items()
            if REFERENCE_WORKLOAD[k] != v
        },
    }


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else round(ms / 1000.0, 4)


# ---- output ----------------------------------------------------------------------------------------------------------


def format_table(records: list[dict[str, Any]], result: dict[str, Any]) -> str:
    columns = (
        ("config", 8),
        ("ok", 5),
        ("errors", 7),
        ("out tok/s", 10),
        ("req/s", 7),
        ("TTFT mean", 10),
        ("p50", 8),
        ("p99", 8),
        ("TPOT mean", 10),
        ("p50", 7),
        ("p99", 7),
        ("ITL mean", 9),
        ("p50", 7),
        ("p99", 7),
    )
    head = "".join(f"{n:<{w}}" if i == 0 else f"{n:>{w}}" for i, (n, w) in enumerate(columns))
    rows = [head, "-" * len(head)]
    for r in records:
        c = r["client"]
        cells = [
            r["name"],
            f"{c['completed']}/{c['num_requests']}",
            r["num_errors"],
            f"{c['output_throughput']:.1f}",
            f"{c['request_throughput']:.2f}",
            *(fmt(c[k][s]) for k in ("ttft", "tpot", "itl") for s in STATS),
        ]
        rows.append(
            "".join(f"{x!s:<{w}}" if i == 0 else f"{x!s:>{w}}" for i, (x, (_, w)) in enumerate(zip(cells, columns)))
        )
    rows.append("latencies in ms; errors: failed requests + failed KV transfers")
    if result["pd_over_mixed"] is not None:
        q = result["pd_over_mixed"]
        rows.append(
            f"pd / mixed: output tok/s {fmt(q['output_throughput'], '{:.2f}')}x, TTFT mean "
            f"{fmt(q['ttft_mean'], '{:.2f}')}x, TPOT mean {fmt(q['tpot_mean'], '{:.2f}')}x, ITL mean "
            f"{fmt(q['itl_mean'], '{:.2f}')}x"
        )
    ref = result["reference"]
    ours = ref["pdserve_pd_this_run"]
    rows.append(f"reference, NOT measured here: {ref['source']}")
    if ours is not None:
        rows.append(
            f"pdserve 1P1D, this run:       {ours['output_throughput_tok_s']:.1f} output tok/s, mean TTFT "
            f"{fmt(ours['ttft_mean_s'], '{:.2f}')} s"
        )
        if ref["workload_differences"]:
            diffs = ", ".join(
                f"{k} {v['this_run']} (reference {v['reference']})" for k, v in ref["workload_differences"].items()
            )
            rows.append(f"  this run's workload differs from the reference's: {diffs}")
    return "\n".join(rows)


def plot(path: Path, title: str, records: list[dict[str, Any]]) -> Path:
    """TTFT, TPOT and ITL (mean, p50, p99) per config side by side; output tok/s with the quoted reference."""
    colors = {"pd": "#1f77b4", "mixed": "#ff7f0e"}
    fig, axes = pyplot().subplots(1, 4, figsize=(15.0, 4.2), dpi=110)
    try:
        width = 0.8 / len(records)
        for ax, key, name in zip(axes, ("ttft", "tpot", "itl"), ("TTFT", "TPOT", "ITL")):
            for i, r in enumerate(records):
                values = [r["client"][key][s] or 0.0 for s in STATS]
                xs = [j + (i - (len(records) - 1) / 2) * width for j in range(len(STATS))]
                bars = ax.bar(xs, values, width=width, color=colors[r["name"]], label=r["name"])
                ax.bar_label(bars, labels=[f"{v:.0f}" for v in values], fontsize=7)
            ax.set_xticks(range(len(STATS)), [s[:-3] for s in STATS])
            ax.set_ylim(0, max((r["client"][key][s] or 0.0 for r in records for s in STATS), default=1.0) * 1.3 or 1.0)
            ax.set_ylabel("ms")
            ax.set_title(name, fontsize=10)
            ax.legend(fontsize=8, frameon=False, ncol=2, loc="upper left")
        ax = axes[3]
        values = [r["client"]["output_throughput"] for r in records]
        bars = ax.bar([r["name"] for r in records], values, color=[colors[r["name"]] for r in records], width=0.6)
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=8)
        low, high = REFERENCE_OUTPUT_TOK_S
        ax.axhspan(low, high, color="#7f7f7f", alpha=0.25, label="vLLM 1P1D, quoted in the issue\n(not measured here)")
        ax.set_ylim(0, max([*values, high]) * 1.3)
        ax.set_ylabel("output tokens / s")
        ax.set_title("output throughput", fontsize=10)
        ax.legend(fontsize=7, frameon=False, loc="upper left")
        return finish_figure(fig, axes, title, path)
    except BaseException:
        pyplot().close(fig)
        raise


def figure_title(result: dict[str, Any], args: argparse.Namespace) -> str:
    w = result["workload"]
    return (
        f"{result['model']} ({args.dtype}), through the router: {w['num_prompts']} prompts, {w['input_len']} in / "
        f"{w['output_len']} out, max concurrency {w['max_concurrency']}, rate {w['request_rate']}; "
        f"pd = 1 prefill + 1 decode, mixed = 2 replicas"
    )
