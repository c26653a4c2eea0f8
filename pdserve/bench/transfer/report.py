"""`pdserve bench transfer`'s output: the printed table and the PNG (GB/s per length, share of TTFT)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pdserve.bench.common import fmt
from pdserve.bench.plot import finish_figure, pyplot
from pdserve.bench.transfer.client import mib
from pdserve.bench.transfer.workload import MAX_TOKENS


def format_table(lengths: list[dict[str, Any]], engine: str) -> str:
    columns = (
        ("tokens", 7),
        ("ok", 5),
        ("KV MiB", 8),
        ("window", 8),
        ("busy", 7),
        ("exposed", 8),
        ("overlap", 8),
        ("GB/s busy", 10),
        ("GB/s win", 9),
        (f"raw {engine}", 10),
        ("TTFT", 8),
        ("exp/TTFT", 9),
        ("D recv", 8),
        ("failed", 7),
    )
    head = "".join(f"{n:>{w}}" for n, w in columns)
    rows = [head, "-" * len(head)]
    for x in lengths:
        raw = x.get("raw") or {}
        share = x["transfer_share_of_ttft"]
        cells = [
            x["prompt_tokens"],
            f"{x['completed']}/{x['num_requests']}",
            fmt(mib(x["kv_bytes_per_request"]), "{:.2f}"),
            fmt(_ms(x["transfer_s_per_request"])),
            fmt(_ms(x["busy_s_per_request"])),
            fmt(_ms(x["exposed_s_per_request"])),
            f"{x['num_overlapped']}/{x['completed']}",
            fmt(x["gb_per_s_busy"], "{:.2f}"),
            fmt(x["gb_per_s_window"], "{:.3f}"),
            fmt(raw.get("gb_per_s_best"), "{:.2f}"),
            fmt(x["ttft_mean_ms"]),
            fmt(None if share is None else share * 100, "{:.1f}%"),
            fmt(_ms(x["d_receive_s_per_request"])),
            x["failures"],
        ]
        rows.append("".join(f"{c!s:>{w}}" for c, (_, w) in zip(cells, columns)))
    rows.append(
        "per request, times in ms: window = P's first send to KVDone; busy / exposed = "
        "P rank 0's sender writing / steps waiting for it;\nGB/s busy = KV bytes / busy (rank 0's sender, "
        "while the forward runs on the same cores); raw = the engine alone (best of its repeats); "
        "exp/TTFT = exposed / mean TTFT; D recv = D's KVDest to KVDone;\noverlap = requests whose sends ran during the "
        "forward (the others' KVDest reached P after its prefill step began: sent after the forward)"
    )
    return "\n".join(rows)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def plot(path: Path, title: str, lengths: list[dict[str, Any]], engine: str) -> Path:
    """Left: GB/s of pdserve's transfers and of the raw engine per length; right: share of TTFT on transfer."""
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(12.0, 4.4), dpi=110)
    try:
        xs = list(range(len(lengths)))
        names = [str(x["prompt_tokens"]) for x in lengths]
        series = (
            (
                f"raw {engine} engine alone (best)",
                [(x.get("raw") or {}).get("gb_per_s_best") for x in lengths],
                "#2ca02c",
                "s",
            ),
            (
                "pdserve: KV bytes / sender busy time\n(P rank 0, forward on the same cores)",
                [x["gb_per_s_busy"] for x in lengths],
                "#1f77b4",
                "o",
            ),
            (
                "pdserve: KV bytes / transfer window\n(first send to KVDone)",
                [x["gb_per_s_window"] for x in lengths],
                "#ff7f0e",
                "^",
            ),
        )
        for label, values, color, marker in series:
            points = [(x, v) for x, v in zip(xs, values) if v]
            left.plot([p[0] for p in points], [p[1] for p in points], marker=marker, color=color, label=label)
        left.set_yscale("log")
        left.set_xticks(xs, names)
        left.set_xlabel("prompt tokens")
        left.set_ylabel("GB/s (1e9 bytes/s)")
        left.set_title("KV transfer throughput", fontsize=10)
        left.legend(fontsize=7, frameon=False)
        exposed = [100 * (x["transfer_share_of_ttft"] or 0.0) for x in lengths]
        busy = [100 * (x["busy_share_of_ttft"] or 0.0) for x in lengths]
        bars = right.bar(xs, exposed, width=0.6, color="#d62728", label="exposed sender time / TTFT (not hidden)")
        right.bar_label(bars, labels=[f"{v:.2f}%" for v in exposed], fontsize=8)
        right.plot(xs, busy, "o", color="#1f77b4", label="busy sender time / TTFT (hidden + exposed)")
        right.set_xticks(
            xs, [f"{name}\n{x['num_overlapped']}/{x['completed']} overlapped" for name, x in zip(names, lengths)]
        )
        right.set_xlabel("prompt tokens (requests whose sends ran during the forward)")
        right.set_ylabel("% of mean TTFT")
        right.set_ylim(0, max([*exposed, *busy, 1.0]) * 1.3)
        right.set_title("share of TTFT spent on KV transfer", fontsize=10)
        right.legend(fontsize=7, frameon=False, loc="upper left")
        return finish_figure(fig, (left, right), title, path)
    except BaseException:
        pyplot().close(fig)
        raise


def figure_title(result: dict[str, Any], args: argparse.Namespace, engine: str) -> str:
    return (
        f"{result['model']} ({args.dtype}, block {args.block_size}): 1 prefill + 1 decode behind the router, "
        f"engine {engine} ({args.kv_transfer_engine}), {args.num_requests} sequential requests per length, "
        f"max_tokens {MAX_TOKENS}\nbusy-time GB/s is measured on P's rank 0 while the forward runs on the same "
        f"cores; raw = the engine alone"
    )
