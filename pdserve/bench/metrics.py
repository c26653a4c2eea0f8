"""Client-side serving metrics: per-request timings -> TTFT/TPOT/ITL/E2E statistics, goodput, table, CDF plot.

Knows nothing about HTTP: the client hands it one `RequestResult` per request.
All times are seconds internally and milliseconds in reports (`*_ms`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pdserve.bench.plot import finish_figure, pyplot

PERCENTILES = (50, 90, 99)
SLO_NAMES = ("ttft", "tpot", "e2el")  # time to first token, time per output token, end-to-end latency


@dataclass
class RequestResult:
    """What the client saw of one request."""

    success: bool
    input_len: int  # prompt tokens: the server's usage if it reported one, else the client's count
    output_len: int  # generated tokens: the server's usage if reported, else content chunks received
    requested_output_len: int  # max_tokens sent
    ttft: float = 0.0  # s from sending to the first chunk with text
    latency: float = 0.0  # s from sending to the end of the stream
    itl: list[float] = field(default_factory=list)  # s between successive chunks with text
    start: float = 0.0  # s since the benchmark started
    status: int | None = None  # HTTP status; None when no response came
    error: str = ""
    text: str = ""  # generated text (multi-turn history); not written to reports
    usage_reported: bool = False

    @property
    def tpot(self) -> float | None:
        """(latency - ttft) / (output_len - 1); None for a failed or single-token request."""
        if not self.success or self.output_len < 2:
            return None
        return (self.latency - self.ttft) / (self.output_len - 1)


def latency_stats(values_s: Sequence[float]) -> dict[str, float | int | None]:
    """count, mean, std, min, max and PERCENTILES (linear interpolation) of seconds, reported in ms."""
    keys = ["mean_ms", "std_ms", "min_ms", "max_ms", *(f"p{p}_ms" for p in PERCENTILES)]
    if len(values_s) == 0:
        return {"count": 0, **dict.fromkeys(keys)}
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    figures = [ms.mean(), ms.std(), ms.min(), ms.max(), *np.percentile(ms, PERCENTILES)]
    return {"count": int(ms.size), **{k: round(float(v), 3) for k, v in zip(keys, figures)}}


def parse_goodput(items: Sequence[str] | None) -> dict[str, float]:
    """['ttft:500', 'tpot:50'] -> {'ttft': 500.0, 'tpot': 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or ():
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_NAMES:
            raise ValueError(
                f"--goodput item {item!r} must look like ttft:500 (name:milliseconds) with a name "
                f"from {', '.join(SLO_NAMES)}"
            )
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput item {item!r}: {value!r} is not a number of milliseconds") from None
        if not ms > 0:
            raise ValueError(f"--goodput item {item!r}: the limit must be above 0 ms")
        slos[name] = ms
    return slos


def meets_slos(result: RequestResult, slos: dict[str, float]) -> bool:
    """Succeeded and within every given limit; a single-token request has no TPOT, so meets any TPOT limit."""
    if not result.success:
        return False
    measured = {"ttft": result.ttft, "tpot": result.tpot, "e2el": result.latency}
    return all(measured[name] is None or measured[name] * 1000.0 <= ms for name, ms in slos.items())  # type: ignore[operator]


def summarize(results: Sequence[RequestResult], duration_s: float, slos: dict[str, float]) -> dict[str, Any]:
    """Throughput, latency statistics and goodput over one benchmark run of `duration_s` seconds."""
    done = [r for r in results if r.success]
    input_tokens, output_tokens = sum(r.input_len for r in done), sum(r.output_len for r in done)

    def per_s(n: int) -> float:
        return round(n / duration_s, 4) if duration_s > 0 else 0.0

    num_good = sum(meets_slos(r, slos) for r in done) if slos else None
    return {
        "duration_s": round(duration_s, 4),
        "num_requests": len(results),
        "completed": len(done),
        "failed": len(results) - len(done),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "num_short_outputs": sum(r.output_len < r.requested_output_len for r in done),
        "usage_reported": all(r.usage_reported for r in done) if done else None,
        "request_throughput": per_s(len(done)),
        "input_throughput": per_s(input_tokens),
        "output_throughput": per_s(output_tokens),
        "total_token_throughput": per_s(input_tokens + output_tokens),
        "ttft": latency_stats([r.ttft for r in done]),
        "tpot": latency_stats([t for r in done if (t := r.tpot) is not None]),
        "itl": latency_stats([gap for r in done for gap in r.itl]),
        "e2el": latency_stats([r.latency for r in done]),
        "goodput": None
        if num_good is None
        else {"slos_ms": dict(slos), "num_good": num_good, "request_goodput": per_s(num_good)},
    }


def format_table(metrics: dict[str, Any], title: str = "Serving Benchmark Result") -> str:
    """A fixed-width summary like vLLM's benchmark_serving, one figure per line."""
    width = 60
    rows: list[str] = [f" {title} ".center(width, "=")]

    def row(name: str, value: Any) -> None:
        text = "n/a" if value is None else (f"{value:.2f}" if isinstance(value, float) else str(value))
        rows.append(f"{name:<44}{text:>16}")

    row("Successful requests:", metrics["completed"])
    row("Failed requests:", metrics["failed"])
    row("Benchmark duration (s):", metrics["duration_s"])
    row("Total input tokens:", metrics["total_input_tokens"])
    row("Total generated tokens:", metrics["total_output_tokens"])
    row("Request throughput (req/s):", metrics["request_throughput"])
    if metrics["goodput"] is not None:
        row("Request goodput (req/s):", metrics["goodput"]["request_goodput"])
    row("Input token throughput (tok/s):", metrics["input_throughput"])
    row("Output token throughput (tok/s):", metrics["output_throughput"])
    row("Total token throughput (tok/s):", metrics["total_token_throughput"])
    for key, name in (
        ("ttft", "Time to First Token"),
        ("tpot", "Time per Output Token (excl. 1st token)"),
        ("itl", "Inter-token Latency"),
        ("e2el", "End-to-end Latency"),
    ):
        rows.append(f" {name} ".center(width, "-"))
        stats = metrics[key]
        for stat in ("mean", *(f"p{p}" for p in PERCENTILES)):
            row(f"{stat.capitalize() if stat == 'mean' else stat.upper()} {key.upper()} (ms):", stats[f"{stat}_ms"])
    rows.append("=" * width)
    return "\n".join(rows)


def plot_latency_cdfs(path: Path, title: str, results: Sequence[RequestResult]) -> Path:
    """CDFs of TTFT, TPOT and ITL of the successful requests (p50/p90/p99 marked); writes `path`."""
    done = [r for r in results if r.success]
    series = (
        ("TTFT", [r.ttft for r in done]),
        ("TPOT", [t for r in done if (t := r.tpot) is not None]),
        ("ITL", [g for r in done for g in r.itl]),
    )
    fig, axes = pyplot().subplots(1, 3, figsize=(12.0, 3.8), dpi=110)
    try:
        for ax, (name, values) in zip(axes, series):
            ms = np.sort(np.asarray(values, dtype=np.float64) * 1000.0)
            if ms.size:
                ax.step(ms, np.arange(1, ms.size + 1) / ms.size, where="post", color="#1f77b4")
                for p, style in zip(PERCENTILES, (":", "--", "-.")):
                    x = float(np.percentile(ms, p))
                    ax.axvline(x, color="#7f7f7f", linestyle=style, linewidth=1, label=f"p{p} {x:.1f} ms")
                ax.legend(fontsize=8, loc="lower right")
            else:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            ax.set_xlabel(f"{name} (ms)")
            ax.set_ylabel("fraction of requests" if name != "ITL" else "fraction of gaps")
            ax.set_ylim(0, 1.02)
        return finish_figure(fig, axes, title, path)
    except BaseException:
        pyplot().close(fig)
        raise
