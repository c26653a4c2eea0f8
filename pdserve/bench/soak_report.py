"""`pdserve bench soak`'s watch and report: RSS, open fds and threads of every process over time, the idle
check (every instance's KV blocks after the load), the summaries, the table and the figure.

Knows the deployment only by the pids of its roots (the `pdserve launch` process, or --pids), their
command lines, the router's /health and each instance's /v1/pd/info; of requests, only their outcomes.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil

from pdserve.bench.common import fmt
from pdserve.bench.plot import finish_figure, pyplot

if TYPE_CHECKING:
    from pdserve.bench.soak import Outcome

MIB = 1 << 20
STATS = ("rss", "rss_anon", "rss_shmem", "fds", "threads")  # per process and sample, in this order
PHASES = ("start", "warmup", "load", "drain", "idle")  # a sample's phase; growth figures use load, drain, idle
AFTER_WARMUP = ("load", "drain", "idle")
IDLE_POLL_S = 0.5
MAX_ERRORS_RECORDED = 20


def rss_split(pid: int, rss: int) -> tuple[int, int]:
    """(anonymous, shared memory) bytes of the process's RSS, from /proc/<pid>/status; (rss, 0) without it.

    The third part, file pages (libraries, mapped weights), is clean and comes and goes with the page cache
    under memory pressure: growth figures use the anonymous part, where a heap leak shows.
    NOTE: a P engine core maps D's KV cache (shared memory) and writes blocks into it: each page it has written
    once counts in its RSS (RssShmem), which therefore climbs towards the size of D's cache as D hands out
    blocks it never used before. Those pages are D's memory.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("RssAnon:", "RssShmem:")))
    except OSError:
        return rss, 0
    if len(fields) < 2:
        return rss, 0
    return int(fields["RssAnon"].split()[0]) * 1024, int(fields["RssShmem"].split()[0]) * 1024


def _flag(cmdline: Sequence[str], name: str) -> str | None:
    return next((b for a, b in zip(cmdline, cmdline[1:]) if a == name), None)


def process_name(cmdline: Sequence[str], parent: str | None) -> str:
    """A readable name: launch, router, <role>:<port> (an instance's API server), <parent>/engine-core,
    <parent>/worker, <parent>/resource-tracker, else the executable's base name."""
    joined = " ".join(cmdline)
    for i, arg in enumerate(cmdline[:3]):
        if arg in ("pdserve.cli", "pdserve") or arg.endswith("/pdserve"):
            command = cmdline[i + 1] if i + 1 < len(cmdline) else "pdserve"
            if command == "serve":
                return f"{_flag(cmdline, '--role') or 'mixed'}:{_flag(cmdline, '--port')}"
            return command
    if parent is not None and "multiprocessing.resource_tracker" in joined:
        return f"{parent}/resource-tracker"
    if parent is not None and "spawn_main" in joined:
        return f"{parent}/{'engine-core' if '/' not in parent else 'worker'}"
    base = Path(cmdline[0]).name if cmdline else "?"
    return f"{parent}/{base}" if parent is not None else base


@dataclass
class ProcessWatch:
    """Samples every process of the trees under `root_pids` every `interval_s` in a thread, until stop().

    A sample is {"t": seconds since `t0`, "phase", "num_processes", "procs": {pid: [STATS...]},
    "in_flight", "num_done", "num_errors"}; `counts()` gives the last three (the load's, read in this thread).
    A process that leaves is recorded in `gone` (pid -> t); one that appears later is named when first seen.
    """

    root_pids: list[int]
    interval_s: float
    t0: float
    counts: Callable[[], tuple[int, int, int]]
    phase: str = "start"
    names: dict[int, str] = field(default_factory=dict)
    first_seen: dict[int, float] = field(default_factory=dict)
    gone: dict[int, float] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="soak-process-watch", daemon=True)

    def start(self) -> None:
        self.sample()
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread, then take one last sample (the idle one)."""
        self._stop.set()
        self._thread.join()
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def _refresh(self, t: float) -> None:
        """Name every process of the trees not seen before (parents first: children() lists them in order)."""
        for root in self.root_pids:
            try:
                tree = [self._procs.get(root) or psutil.Process(root)]
                tree += tree[0].children(recursive=True)
            except psutil.Error:
                continue
            for proc in tree:
                if proc.pid in self._procs or proc.pid in self.gone:
                    continue
                try:
                    parent = self.names.get(proc.ppid())
                    name = process_name(proc.cmdline(), parent)
                except psutil.Error:
                    continue
                while name in self.names.values():
                    name += "+"
                self._procs[proc.pid], self.names[proc.pid], self.first_seen[proc.pid] = proc, name, t

    def sample(self) -> dict[str, Any]:
        t = round(time.monotonic() - self.t0, 3)
        self._refresh(t)
        procs: dict[int, list[int]] = {}
        for pid, proc in list(self._procs.items()):
            try:
                with proc.oneshot():
                    rss = proc.memory_info().rss
                    procs[pid] = [rss, *rss_split(pid, rss), proc.num_fds(), proc.num_threads()]
            except psutil.Error:
                self.gone[pid] = t
                del self._procs[pid]
        in_flight, num_done, num_errors = self.counts()
        sample = {"t": t, "phase": self.phase, "num_processes": len(procs), "procs": procs}
        sample |= {"in_flight": in_flight, "num_done": num_done, "num_errors": num_errors}
        self.samples.append(sample)
        return sample


# ---- the idle check ----------------------------------------------------------------------------------


def _get_json(url: str) -> dict[str, Any]:
    """GET url as JSON, also from an error status (the router's /health answers 503 with its instances);
    {"error": ...} when there is no JSON answer (a dead instance)."""
    try:
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return dict(json.loads(r.read()))
        except urllib.error.HTTPError as e:
            return dict(json.loads(e.read()))
    except (OSError, ValueError) as e:  # URLError is an OSError; bad JSON a ValueError
        return {"error": f"GET {url}: {type(e).__name__}: {e}"}


def instance_blocks(router_url: str) -> list[dict[str, Any]]:
    """Every instance the router lists: url, role, its router in-flight count and its /v1/pd/info counts."""
    rows = []
    for inst in _get_json(f"{router_url}/health").get("instances", []):
        info = _get_json(f"{inst['url']}/v1/pd/info")
        rows.append(
            {"url": inst["url"], "role": inst["role"], "router_in_flight": inst["in_flight"]}
            | {k: info.get(k) for k in ("num_open_requests", "num_blocks_free", "num_blocks_total")}
        )
    return rows


def _all_free(rows: list[dict[str, Any]]) -> bool:
    """Every instance answered with its counts, and they are equal."""
    return bool(rows) and all(r["num_blocks_free"] == r["num_blocks_total"] is not None for r in rows)


def _is_idle(rows: list[dict[str, Any]]) -> bool:
    return _all_free(rows) and all(r["router_in_flight"] == r["num_open_requests"] == 0 for r in rows)


def wait_idle(router_url: str, drain_timeout_s: float, idle_wait_s: float) -> dict[str, Any]:
    """Wait (up to drain_timeout_s) for nothing open and every block free, then idle_wait_s; the final read."""
    start = time.monotonic()
    while not _is_idle(instance_blocks(router_url)) and time.monotonic() - start < drain_timeout_s:
        time.sleep(IDLE_POLL_S)
    drain_s = time.monotonic() - start
    time.sleep(idle_wait_s)
    rows = instance_blocks(router_url)
    return {"instances": rows, "all_free": _all_free(rows), "is_idle": _is_idle(rows), "drain_s": round(drain_s, 2)}


# ---- summary -------------------------------------------------------------------------------------------


def _first_last_max(values: list[int]) -> dict[str, int]:
    return {"first": values[0], "last": values[-1], "max": max(values), "min": min(values)}


def _growth_pct(values: list[int]) -> float:
    return round((values[-1] - values[0]) / values[0] * 100, 3) if values[0] else 0.0


def _mib(values: list[int]) -> dict[str, float]:
    return {k: round(v / MIB, 2) for k, v in _first_last_max(values).items()}


def process_summary(watch: ProcessWatch, pid: int) -> dict[str, Any] | None:
    """One process's figures over the samples after warm-up (None if it has none): its anonymous RSS and its
    RSS in MiB, their growth from the first such sample to the last (idle) one in %, the anonymous RSS's fitted
    slope and highest growth; its shared memory; fds and threads."""
    rows = [(s["t"], s["procs"][pid]) for s in watch.samples if s["phase"] in AFTER_WARMUP and pid in s["procs"]]
    if not rows:
        return None
    ts = [t for t, _ in rows]
    rss, anon, shmem, fds, threads = ([v[i] for _, v in rows] for i in range(len(STATS)))
    slope = float(np.polyfit(ts, anon, 1)[0]) * 3600 / MIB if len(rows) >= 3 and ts[-1] > ts[0] else None
    return {
        "name": watch.names[pid],
        "pid": pid,
        "num_samples": len(rows),
        "anon_rss_mib": _mib(anon),
        "anon_rss_growth_pct": _growth_pct(anon),
        "anon_rss_max_growth_pct": round((max(anon) - anon[0]) / anon[0] * 100, 3) if anon[0] else 0.0,
        "anon_rss_slope_mib_per_h": None if slope is None else round(slope, 2),
        "rss_mib": _mib(rss),
        "rss_growth_pct": _growth_pct(rss),
        "rss_shmem_mib": _mib(shmem),
        "fds": _first_last_max(fds),
        "threads": _first_last_max(threads),
        "gone_at_s": watch.gone.get(pid),
        "first_seen_s": watch.first_seen[pid],
    }


def processes_summary(watch: ProcessWatch, warmup_end_s: float) -> dict[str, Any]:
    summaries = [s for pid in watch.names if (s := process_summary(watch, pid)) is not None]
    return {
        "processes": summaries,
        "num_processes": {
            "start": watch.samples[0]["num_processes"],
            "end": watch.samples[-1]["num_processes"],
        },
        "processes_gone": [watch.names[pid] for pid in watch.gone],
        "processes_new_after_warmup": [watch.names[p] for p, t in watch.first_seen.items() if t > warmup_end_s],
        "max_anon_rss_growth_pct": max((s["anon_rss_growth_pct"] for s in summaries), default=None),
        "max_rss_growth_pct": max((s["rss_growth_pct"] for s in summaries), default=None),
    }


def requests_summary(outcomes: list[Outcome], duration_s: float, max_in_flight: int) -> dict[str, Any]:
    """Counts by kind, errors (a disconnect the client made is none), latency of the completed requests."""
    errors = [o for o in outcomes if o.error is not None]
    latencies = [o.latency for o in outcomes if o.error is None and not o.is_disconnected]

    def pct(q: float) -> float | None:
        return round(float(np.percentile(latencies, q)), 3) if latencies else None

    return {
        "num_requests": len(outcomes),
        "num_completed": len(latencies),
        "num_disconnected": sum(o.is_disconnected for o in outcomes),
        "num_errors": len(errors),
        "achieved_rate": round(len(outcomes) / duration_s, 3),
        "by_kind": dict(sorted(Counter(o.kind for o in outcomes).items())),
        "errors_by_message": dict(Counter(o.error for o in errors).most_common()),
        "first_errors": [asdict(o) for o in errors[:MAX_ERRORS_RECORDED]],
        "latency_s": {"p50": pct(50), "p99": pct(99), "max": max(latencies, default=None)},
        "max_in_flight": max_in_flight,
    }


def find_problems(result: dict[str, Any]) -> list[str]:
    """What makes the run fail (exit 1): errors, blocks not all free at the end, a process gone or dead."""
    out = []
    r = result["requests"]
    if r["num_errors"]:
        out.append(f"{r['num_errors']} request errors; the most common: {next(iter(r['errors_by_message']))}")
    if not result["blocks"]["all_free"]:
        out.append("KV blocks were not all free on every instance after the load (see blocks in the JSON)")
    if result["processes"]["processes_gone"]:
        out.append(f"processes exited during the run: {', '.join(result['processes']['processes_gone'])}")
    if not result["deployment"].get("alive_at_end", True):
        out.append("the launched deployment was not running at the end")
    tracebacks = {log: n for log, n in result["deployment"].get("log_tracebacks", {}).items() if n}
    if tracebacks:
        out.append(f"tracebacks in the deployment's logs: {tracebacks}")
    return out


NOTES = {
    "log_tracebacks": "per log file of the launched deployment (the launcher's and each part's): how many Python "
    "tracebacks it holds at the end; any is a problem, even one no client saw",
    "anon_rss_growth_pct": "per process: (last - first) / first of its anonymous RSS (RssAnon: heap, tensors) "
    "over the samples after warm-up; the last sample is taken idle, after the drain and --idle-wait",
    "rss_growth_pct": "the same of the whole RSS. A P engine core's RSS counts each page of D's KV cache "
    "(shared memory it writes into) it has touched once: it climbs towards D's cache size as D uses blocks it "
    "never used before, which is D's memory, not P's (rss_shmem_mib); file pages come and go with the page "
    "cache under memory pressure",
    "anon_rss_slope_mib_per_h": "a least-squares line through the anonymous RSS samples after warm-up",
    "fds, threads": "first, last (idle), max and min over the samples after warm-up",
    "num_errors": "non-200 answers, in-stream errors, network errors, timeouts, streams without [DONE], answers "
    "without max_tokens completion tokens (every request has ignore_eos); a client's own disconnect is none",
    "blocks": "every instance's /v1/pd/info after the load, once nothing was open and every block free (or "
    "--drain-timeout passed), then --idle-wait",
    "samples": "procs: pid -> [rss, RssAnon, RssShmem (bytes), open fds, threads]; t in seconds since the load started",
}


def format_table(result: dict[str, Any]) -> str:
    """The printed summary: a row per process, then requests, errors and KV blocks."""
    head = f"{'process':<30} {'pid':>7} {'anon MiB':>9} {'last':>7} {'growth':>7} {'MiB/h':>7}"
    head += f" {'RSS MiB last':>12} {'growth':>7} {'shmem':>7} {'fds f/l/max':>12} {'threads f/l/max':>15}"
    lines = [head, "-" * len(head)]
    for p in result["processes"]["processes"]:
        anon, rss, fds, thr = p["anon_rss_mib"], p["rss_mib"], p["fds"], p["threads"]
        lines.append(
            f"{p['name']:<30} {p['pid']:>7} {anon['first']:>9.1f} {anon['last']:>7.1f} "
            f"{p['anon_rss_growth_pct']:>6.2f}% {fmt(p['anon_rss_slope_mib_per_h']):>7} {rss['last']:>12.1f} "
            f"{p['rss_growth_pct']:>6.2f}% {p['rss_shmem_mib']['last']:>7.1f} "
            f"{'/'.join(str(fds[k]) for k in ('first', 'last', 'max')):>12} "
            f"{'/'.join(str(thr[k]) for k in ('first', 'last', 'max')):>15}"
        )
    lines.append("anon: anonymous RSS (heap), first and last after warm-up; MiB/h: its slope; shmem: shared memory")
    r = result["requests"]
    lines.append(
        f"requests: {r['num_requests']} ({r['num_completed']} completed, {r['num_disconnected']} disconnected by "
        f"the client), errors: {r['num_errors']}, latency p50/p99 {fmt(r['latency_s']['p50'], '{:.2f}')}/"
        f"{fmt(r['latency_s']['p99'], '{:.2f}')} s, max in flight {r['max_in_flight']}"
    )
    for inst in result["blocks"]["instances"]:
        lines.append(
            f"blocks {inst['role']} {inst['url']}: {inst['num_blocks_free']}/{inst['num_blocks_total']} free, "
            f"{inst['num_open_requests']} open requests"
        )
    lines.append(f"every instance back to all blocks free: {result['blocks']['all_free']}")
    return "\n".join(lines)


# ---- figure --------------------------------------------------------------------------------------------


def _series(samples: list[dict[str, Any]], pid: int, index: int) -> tuple[list[float], list[float]]:
    """Minutes and one stat of `pid` (its index in STATS)."""
    rows = [(s["t"] / 60, v[index]) for s in samples if (v := s["procs"].get(pid)) is not None]
    return [t for t, _ in rows], [v for _, v in rows]


def _process_panels(axes: Any, watch: ProcessWatch, warmup_end_s: float) -> None:
    ax_rss, ax_growth, ax_fds, ax_threads = axes
    colors = pyplot().get_cmap("tab20").colors
    for k, (pid, name) in enumerate(watch.names.items()):
        ts, rss = _series(watch.samples, pid, 1)
        if not ts:
            continue
        color = colors[k % len(colors)]
        ax_rss.plot(ts, [v / MIB for v in rss], label=name, linewidth=1, color=color)
        ts_all, rss_all = _series(watch.samples, pid, 0)
        ax_rss.plot(ts_all, [v / MIB for v in rss_all], linewidth=1, color=color, linestyle=":")
        base = next((v for t, v in zip(ts, rss) if t * 60 >= warmup_end_s), None)
        if base:
            after = [(t, (v - base) / base * 100) for t, v in zip(ts, rss) if t * 60 >= warmup_end_s]
            ax_growth.plot([t for t, _ in after], [g for _, g in after], linewidth=1, color=color)
        for ax, index in ((ax_fds, 3), (ax_threads, 4)):
            ax.step(*_series(watch.samples, pid, index), where="post", linewidth=1, color=color)
    ax_rss.set_yscale("log")
    ax_rss.legend(fontsize=6, loc="best")
    labels = (
        "anonymous RSS (MiB, log; dotted: RSS)",
        "anon RSS change since warm-up (%)",
        "open fds",
        "threads",
    )
    for ax, label in zip(axes, labels):
        ax.set_ylabel(label)


def plot(path: Path, title: str, watch: ProcessWatch, warmup_end_s: float, load_end_s: float) -> Path:
    """3x2 panels against minutes: RSS, RSS change, fds, threads per process; requests and errors; in flight."""
    fig, grid = pyplot().subplots(3, 2, figsize=(12, 10), dpi=110)
    axes = list(grid.flat)
    try:
        _process_panels(axes[:4], watch, warmup_end_s)
        ts = [s["t"] / 60 for s in watch.samples]
        axes[4].plot(ts, [s["num_done"] for s in watch.samples], label="requests done")
        axes[4].plot(ts, [s["num_errors"] for s in watch.samples], label="errors", color="#d62728")
        axes[4].set_ylabel("requests (cumulative)")
        axes[4].legend(fontsize=7)
        axes[5].step(ts, [s["in_flight"] for s in watch.samples], where="post")
        axes[5].set_ylabel("requests in flight (at each sample)")
        for ax in axes:
            ax.axvline(warmup_end_s / 60, color="#7f7f7f", linestyle=":", linewidth=1)
            ax.axvline(load_end_s / 60, color="#7f7f7f", linestyle="--", linewidth=1)
            ax.set_xlabel("minutes (dotted: warm-up end, dashed: load end)")
    except BaseException:
        pyplot().close(fig)
        raise
    return finish_figure(fig, axes, title, path)
