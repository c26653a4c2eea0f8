"""`pdserve bench kv-tiers`'s output: the printed table and the PNG (prompt tokens computed and reused per tier,
TTFT per configuration)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pdserve.bench.common import fmt
from pdserve.bench.kv_tiers.configs import TIERS
from pdserve.bench.plot import finish_figure, pyplot


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


def figure_title(result: dict[str, Any], args: argparse.Namespace) -> str:
    c = result["cache"]
    return (
        f"{result['model']}, {args.dataset}: {result['dataset']['num_requests']} requests, device "
        f"{c['num_blocks']} blocks x {c['block_size']} tokens, host {c['num_host_blocks']} blocks, "
        f"pool {c['pool']}"
    )
