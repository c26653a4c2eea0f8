"""`pdserve bench storage`'s output: the printed table and the PNG (TTFT per mode, pool GB/s against raw Mooncake)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pdserve.bench.common import fmt
from pdserve.bench.plot import finish_figure, pyplot
from pdserve.bench.transfer.workload import MAX_TOKENS


def format_table(lengths: list[dict[str, Any]]) -> str:
    columns = (
        ("tokens", 7),
        ("KV MiB", 8),
        ("objects", 8),
        ("TTFT dir", 10),
        ("TTFT sto", 10),
        ("sto/dir", 8),
        ("put GB/s", 9),
        ("raw put", 9),
        ("put/raw", 8),
        ("get GB/s", 9),
        ("raw get", 9),
        ("get/raw", 8),
        ("failed", 7),
    )
    head = "".join(f"{n:>{w}}" for n, w in columns)
    rows = [head, "-" * len(head)]
    for x in lengths:
        d, s, raw = x["direct"], x["storage"], x.get("raw") or {}
        cells = [
            x["prompt_tokens"],
            fmt(x["kv_bytes_per_request"] / 2**20, "{:.2f}"),
            x["num_objects"],
            fmt(d["ttft_median_ms"]),
            fmt(s["ttft_median_ms"]),
            fmt(x["ttft_ratio_storage_over_direct"], "{:.2f}x"),
            fmt(s["put_gb_per_s"], "{:.2f}"),
            fmt((raw.get("put") or {}).get("gb_per_s_median"), "{:.2f}"),
            fmt(x.get("put_over_raw"), "{:.2f}"),
            fmt(s["get_gb_per_s"], "{:.2f}"),
            fmt((raw.get("get") or {}).get("gb_per_s_median"), "{:.2f}"),
            fmt(x.get("get_over_raw"), "{:.2f}"),
            d["failures"] + s["failures"],
        ]
        rows.append("".join(f"{c!s:>{w}}" for c, (_, w) in zip(cells, columns)))
    rows.append(
        "TTFT: median ms per mode (dir = direct P->D writes, sto = through the Mooncake pool); put GB/s = "
        "bytes P put / P rank 0's staging + writing seconds;\nget GB/s = bytes D read / D's read seconds "
        "(medians over requests); raw = Mooncake alone, one process putting and another getting the same "
        "objects (median of --raw-repeats)"
    )
    return "\n".join(rows)


def _line(ax: Any, values: list[float | None], label: str, color: str, marker: str, style: str = "-") -> None:
    """One series over the lengths (x = the length's index); a missing or zero value gets no point."""
    points = [(x, v) for x, v in enumerate(values) if v]
    ax.plot([p[0] for p in points], [p[1] for p in points], style, marker=marker, color=color, label=label)


def _plot_ttft(ax: Any, lengths: list[dict[str, Any]]) -> None:
    _line(ax, [x["direct"]["ttft_median_ms"] for x in lengths], "direct (P writes into D's cache)", "#1f77b4", "o")
    _line(
        ax,
        [x["storage"]["ttft_median_ms"] for x in lengths],
        "storage (through the Mooncake pool)",
        "#d62728",
        "s",
    )
    for i, x in enumerate(lengths):
        if x["ttft_ratio_storage_over_direct"] and x["storage"]["ttft_median_ms"]:
            ax.annotate(
                f"{x['ttft_ratio_storage_over_direct']:.2f}x",
                (i, x["storage"]["ttft_median_ms"]),
                textcoords="offset points",
                xytext=(0, 7),
                ha="center",
                fontsize=8,
            )
    ax.set_yscale("log")
    ax.set_xticks(list(range(len(lengths))), [str(x["prompt_tokens"]) for x in lengths])
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("median TTFT (ms)")
    ax.set_title("TTFT (labels: storage / direct)", fontsize=10)
    ax.legend(fontsize=7, frameon=False)


def _plot_throughput(ax: Any, lengths: list[dict[str, Any]]) -> None:
    _line(
        ax,
        [x["storage"]["put_gb_per_s"] for x in lengths],
        "storage put (P: stage + write, rank 0)",
        "#ff7f0e",
        "^",
    )
    _line(ax, [x["storage"]["get_gb_per_s"] for x in lengths], "storage get (D: read)", "#2ca02c", "v")
    _line(
        ax,
        [(x.get("raw") or {}).get("put", {}).get("gb_per_s_median") for x in lengths],
        "raw Mooncake batch_put_from",
        "#ff7f0e",
        "^",
        "--",
    )
    _line(
        ax,
        [(x.get("raw") or {}).get("get", {}).get("gb_per_s_median") for x in lengths],
        "raw Mooncake batch_get_into (another process)",
        "#2ca02c",
        "v",
        "--",
    )
    ax.set_yscale("log")
    ax.set_xticks(list(range(len(lengths))), [str(x["prompt_tokens"]) for x in lengths])
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("GB/s (1e9 bytes/s)")
    ax.set_title("pool throughput per request", fontsize=10)
    ax.legend(fontsize=7, frameon=False)


def plot(path: Path, title: str, lengths: list[dict[str, Any]]) -> Path:
    """Left: median TTFT per length, direct and storage; right: GB/s of storage put/get and raw put/get."""
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(12.0, 4.6), dpi=110)
    try:
        _plot_ttft(left, lengths)
        _plot_throughput(right, lengths)
        return finish_figure(fig, (left, right), title, path)
    except BaseException:
        pyplot().close(fig)
        raise


def figure_title(result: dict[str, Any], args: argparse.Namespace) -> str:
    return (
        f"{result['model']} ({args.dtype}, block {args.block_size}): 1 prefill + 1 decode behind the router, "
        f"direct vs storage (Mooncake, TCP), {args.num_requests} sequential requests per length, max_tokens "
        f"{MAX_TOKENS}\nraw = Mooncake alone, one process putting, another getting the same objects"
    )
