"""`pdserve bench serve --ab-rounds N`: one workload, two request bodies, side by side against one server.

The baseline arm merges --ab-baseline-body into every request, the treatment arm --extra-body; both send the
same prompts with the same arrivals (same --seed). After one warm-up request of each arm (a grammar compiles
there, before any timing), the workload runs 2N times in pairs whose order alternates (baseline then
treatment, then treatment then baseline, ...), so a drift of a shared, noisy machine falls on both arms
alike. The JSON holds each arm's per-round and pooled metrics and the ratios treatment / baseline; the PNG
shows both arms side by side. Knows nothing about the server: only what serve.py sends and measures.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pdserve.bench.common import Stopwatch, code_version, label_or_timestamp, machine_info, now_iso, write_outputs
from pdserve.bench.datasets import Conversation, Turn, dataset_stats
from pdserve.bench.metrics import RequestResult, summarize
from pdserve.bench.plot import finish_figure, pyplot
from pdserve.bench.serve import (
    MAX_ERRORS_RECORDED,
    ServeBenchConfig,
    build_payload,
    config_record,
    discover_model,
    open_session,
    request_record,
    run_workload,
    send_test_request,
    server_record,
)

ARMS = ("baseline", "treatment")
TPOT_RATIO_TARGET = 1.1  # the structured-output requirement: TPOT within 1.1x of free text
# ratio name -> where it sits in an arm's metrics (see arm_metrics)
RATIO_METRICS: dict[str, tuple[str, ...]] = {
    "tpot_p50": ("tpot", "p50_ms"),
    "tpot_mean": ("tpot", "mean_ms"),
    "itl_p50": ("itl", "p50_ms"),
    "itl_mean": ("itl", "mean_ms"),
    "ttft_p50": ("ttft", "p50_ms"),
    "e2el_p50": ("e2el", "p50_ms"),
    "output_throughput": ("output_throughput",),
    "request_throughput": ("request_throughput",),
    "mean_output_len": ("mean_output_len",),
}
SPREAD_METRICS = ("tpot_p50", "itl_p50", "output_throughput")  # also reported pair by pair


@dataclass(frozen=True)
class ABConfig:
    rounds: int  # rounds per arm; 2 * rounds in all
    baseline_body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"--ab-rounds must be at least 1 (rounds per arm), got {self.rounds}")


@dataclass
class Round:
    """One pass of the whole workload with one arm's body."""

    index: int
    arm: str
    per_conversation: list[list[RequestResult]]
    duration_s: float
    stopwatch: dict[str, Any]  # Stopwatch.as_dict(): client CPU seconds and the load average around the round

    @property
    def results(self) -> list[RequestResult]:
        return [r for results in self.per_conversation for r in results]


def round_order(rounds: int) -> list[str]:
    """The arm of each of the 2 * `rounds` rounds: pairs alternate which arm goes first (ABBA ABBA ...)."""
    pairs = [ARMS if i % 2 == 0 else ARMS[::-1] for i in range(rounds)]
    return [arm for pair in pairs for arm in pair]


def arm_metrics(results: Sequence[RequestResult], duration_s: float, slos: dict[str, float]) -> dict[str, Any]:
    """metrics.summarize plus mean_output_len (generated tokens per successful request)."""
    metrics = summarize(results, duration_s, slos)
    completed = metrics["completed"]
    metrics["mean_output_len"] = round(metrics["total_output_tokens"] / completed, 3) if completed else None
    return metrics


def metric(metrics: dict[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = metrics
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return None if value is None else float(value)


def ratio(treatment: float | None, baseline: float | None) -> float | None:
    """treatment / baseline, rounded to 4 places; None where either is missing or the baseline is 0."""
    if treatment is None or baseline is None or baseline == 0:
        return None
    return round(treatment / baseline, 4)


def pooled_ratios(baseline: dict[str, Any], treatment: dict[str, Any]) -> dict[str, float | None]:
    """Each RATIO_METRICS figure of the pooled treatment over the pooled baseline."""
    return {name: ratio(metric(treatment, path), metric(baseline, path)) for name, path in RATIO_METRICS.items()}


def pair_spread(
    baseline_rounds: Sequence[dict[str, Any]], treatment_rounds: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """SPREAD_METRICS ratios pair by pair (the i-th round of each arm form pair i) with their min, median, max."""
    if len(baseline_rounds) != len(treatment_rounds):
        raise ValueError(f"{len(baseline_rounds)} baseline rounds but {len(treatment_rounds)} treatment rounds")
    spread: dict[str, Any] = {}
    for name in SPREAD_METRICS:
        path = RATIO_METRICS[name]
        values = [ratio(metric(t, path), metric(b, path)) for b, t in zip(baseline_rounds, treatment_rounds)]
        known = [v for v in values if v is not None]
        spread[name] = {
            "per_pair": values,
            "min": min(known, default=None),
            "median": round(statistics.median(known), 4) if known else None,
            "max": max(known, default=None),
        }
    return spread


def tpot_verdict(ratios: dict[str, float | None]) -> dict[str, Any]:
    tpot = ratios["tpot_p50"]
    return {
        "metric": "pooled median TPOT, treatment / baseline",
        "ratio": tpot,
        "target": TPOT_RATIO_TARGET,
        "met": None if tpot is None else tpot <= TPOT_RATIO_TARGET,
    }


# ---- running ------------------------------------------------------------------------


async def _run_rounds(
    config: ServeBenchConfig, ab: ABConfig, conversations: list[Conversation]
) -> tuple[str, list[Round]]:
    bodies = {"baseline": ab.baseline_body, "treatment": config.extra_body}
    order = round_order(ab.rounds)
    rounds: list[Round] = []
    async with open_session(config) as session:
        model = config.model or await discover_model(session, config)
        for arm in ARMS:
            await send_test_request(session, config, model, bodies[arm], f"the {arm} warm-up request")
        for i, arm in enumerate(order):
            with Stopwatch() as watch:
                desc = f"round {i + 1}/{len(order)} {arm}"
                per_conversation, duration = await run_workload(
                    session, config, model, conversations, bodies[arm], desc
                )
            rounds.append(Round(i, arm, per_conversation, duration, watch.as_dict()))
    return model, rounds


def run_ab_benchmark(config: ServeBenchConfig, ab: ABConfig, conversations: list[Conversation]) -> dict[str, Any]:
    """Run both arms against the server, write the JSON and PNG, return the result dict."""
    model, rounds = asyncio.run(_run_rounds(config, ab, conversations))
    bodies = {"baseline": ab.baseline_body, "treatment": config.extra_body}
    arms = {arm: _arm_record(config, arm, bodies[arm], rounds) for arm in ARMS}
    ratios = pooled_ratios(arms["baseline"]["pooled"], arms["treatment"]["pooled"])
    spread = pair_spread(
        [r["metrics"] for r in arms["baseline"]["rounds"]], [r["metrics"] for r in arms["treatment"]["rounds"]]
    )
    result: dict[str, Any] = {
        "benchmark": "serve-ab",
        "date": now_iso(),
        "label": config.label,
        "pdserve_version": code_version(),
        "server": server_record(config, model),
        "config": config_record(config)
        | {"ab": {"rounds_per_arm": ab.rounds, "order": round_order(ab.rounds), "bodies": bodies}},
        "client_machine": machine_info(),
        "dataset": dataset_stats(conversations),
        "ratios": {
            "definition": "treatment / baseline; pooled: all rounds of an arm together (throughputs over the "
            "arm's summed round durations); per_pair: round i of each arm, which ran back to back",
            "pooled": ratios,
            "per_pair": spread,
        },
        "tpot_target": tpot_verdict(ratios),
        "notes": output_len_notes(arms),
        "arms": arms,
        "errors": [
            {"arm": r.arm, "round": r.index, "status": x.status, "error": x.error}
            for r in rounds
            for x in r.results
            if not x.success
        ][:MAX_ERRORS_RECORDED],
        "requests": [
            {"arm": r.arm, "round": r.index, **request_record(c, t, x)}
            for r in rounds
            for c, results in enumerate(r.per_conversation)
            for t, x in enumerate(results)
        ],
    }
    stem = "serve-" + (config.label or f"ab-{config.dataset.name}-{config.endpoint}-{label_or_timestamp(None)}")
    title = _figure_title(result)
    write_outputs(result, config.result_dir, stem, lambda path: plot_ab(path, title, rounds))
    return result


def _arm_record(config: ServeBenchConfig, arm: str, body: dict[str, Any], rounds: list[Round]) -> dict[str, Any]:
    mine = [r for r in rounds if r.arm == arm]
    pooled = arm_metrics([x for r in mine for x in r.results], sum(r.duration_s for r in mine), config.goodput_slos)
    return {
        "body": body,
        "fixed_output_len": fixed_output_len(config, body),
        "pooled": pooled,
        "rounds": [
            {
                "round": r.index,
                "client": r.stopwatch,
                "metrics": arm_metrics(r.results, r.duration_s, config.goodput_slos),
            }
            for r in mine
        ],
    }


def fixed_output_len(config: ServeBenchConfig, body: dict[str, Any]) -> bool:
    """Whether requests with `body` ask for exactly their output length (ignore_eos)."""
    payload = build_payload(config.endpoint, "m", Conversation((Turn("", 0, 1),)), 0, [], body)
    return bool(payload.get("ignore_eos"))


def output_len_notes(arms: dict[str, dict[str, Any]]) -> list[str]:
    notes = []
    fixed = {arm: arms[arm]["fixed_output_len"] for arm in ARMS}
    if fixed["baseline"] != fixed["treatment"]:
        variable = "treatment" if fixed["baseline"] else "baseline"
        notes.append(
            f"the {variable} arm's output lengths are the model's (at most --output-len; it sends no ignore_eos: "
            "structured output ends where the grammar ends the text), the other arm's are exactly --output-len. "
            "Compare TPOT and ITL, which are per token; throughputs, E2E latency and the load on the server also "
            "follow the different lengths (see mean_output_len)."
        )
    elif not fixed["baseline"]:
        notes.append("both arms' output lengths are the model's (no ignore_eos); see mean_output_len")
    return notes


# ---- reporting ----------------------------------------------------------------------


def format_ab_table(result: dict[str, Any]) -> str:
    """Both arms' pooled figures and their ratio, one metric per line."""
    width = 72
    base, treat = result["arms"]["baseline"]["pooled"], result["arms"]["treatment"]["pooled"]
    ratios = result["ratios"]["pooled"]
    rows = [
        " Serving A/B: treatment / baseline ".center(width, "="),
        f"{'':<34}{'baseline':>12}{'treatment':>13}{'ratio':>13}",
    ]

    def cell(value: float | None, spec: str = "{:.2f}") -> str:
        return "n/a" if value is None else spec.format(value)

    for name, label in (
        ("tpot_p50", "Median TPOT (ms)"),
        ("tpot_mean", "Mean TPOT (ms)"),
        ("itl_p50", "Median ITL (ms)"),
        ("ttft_p50", "Median TTFT (ms)"),
        ("e2el_p50", "Median E2E latency (ms)"),
        ("output_throughput", "Output throughput (tok/s)"),
        ("request_throughput", "Request throughput (req/s)"),
        ("mean_output_len", "Mean output length (tokens)"),
    ):
        path = RATIO_METRICS[name]
        rows.append(
            f"{label:<34}{cell(metric(base, path)):>12}{cell(metric(treat, path)):>13}{cell(ratios[name], '{:.3f}'):>13}"
        )
    rows.append(f"{'Failed requests':<34}{base['failed']:>12}{treat['failed']:>13}")
    for name in SPREAD_METRICS:
        s = result["ratios"]["per_pair"][name]
        pairs = ", ".join(cell(v, "{:.3f}") for v in s["per_pair"])
        rows.append(f"{name + ' ratio per pair:':<34}{pairs:>38}")
    verdict = result["tpot_target"]
    rows.append(
        f"TPOT ratio {cell(verdict['ratio'], '{:.3f}')} vs target {verdict['target']}: "
        f"{'met' if verdict['met'] else 'not met' if verdict['met'] is False else 'n/a'}"
    )
    rows += [f"note: {n}" for n in result["notes"]]
    rows.append("=" * width)
    return "\n".join(rows)


_ARM_COLORS = {"baseline": "#1f77b4", "treatment": "#ff7f0e"}


def plot_ab(path: Path, title: str, rounds: list[Round]) -> Path:
    """TPOT and ITL CDFs of both arms (all rounds pooled), and each round's median TPOT and output throughput."""
    fig, axes = pyplot().subplots(1, 4, figsize=(16.0, 4.0), dpi=110)
    try:
        for ax, name in zip(axes[:2], ("TPOT", "ITL")):
            for arm in ARMS:
                done = [x for r in rounds if r.arm == arm for x in r.results if x.success]
                values = (
                    [t for x in done if (t := x.tpot) is not None]
                    if name == "TPOT"
                    else [g for x in done for g in x.itl]
                )
                ms = np.sort(np.asarray(values, dtype=np.float64) * 1000.0)
                if ms.size:
                    median = float(np.median(ms))
                    label = f"{arm} (p50 {median:.1f} ms)"
                    ax.step(ms, np.arange(1, ms.size + 1) / ms.size, where="post", color=_ARM_COLORS[arm], label=label)
            ax.set_xlabel(f"{name} (ms)")
            ax.set_ylabel("fraction of requests" if name == "TPOT" else "fraction of gaps")
            ax.set_ylim(0, 1.02)
            ax.legend(fontsize=8, loc="lower right")
        for ax, (ylabel, value) in zip(
            axes[2:],
            (
                ("median TPOT per round (ms)", lambda m: metric(m, RATIO_METRICS["tpot_p50"])),
                ("output throughput per round (tok/s)", lambda m: m["output_throughput"]),
            ),
        ):
            for arm in ARMS:
                mine = [r for r in rounds if r.arm == arm]
                heights = [value(arm_metrics(r.results, r.duration_s, {})) or 0.0 for r in mine]
                ax.bar([r.index + 1 for r in mine], heights, color=_ARM_COLORS[arm], label=arm, width=0.7)
            ax.set_xlabel("round (run order)")
            ax.set_ylabel(ylabel)
            ax.set_xticks([r.index + 1 for r in rounds])
            ax.legend(fontsize=8, loc="lower right")
        return finish_figure(fig, axes, title, path)
    except BaseException:
        pyplot().close(fig)
        raise


def _figure_title(result: dict[str, Any]) -> str:
    cfg, r = result["config"], result["ratios"]["pooled"]
    ds = cfg["dataset"]

    def cell(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    return (
        f"{result['server']['model']} ({result['server']['endpoint']}), {ds['name']} in {ds['input_len']} "
        f"out {ds['output_len']}, {ds['num_prompts']} prompts, max concurrency {cfg['max_concurrency'] or 'none'}, "
        f"{cfg['ab']['rounds_per_arm']} rounds per arm\n"
        f"treatment / baseline: median TPOT {cell(r['tpot_p50'])}, median ITL {cell(r['itl_p50'])}, output tok/s "
        f"{cell(r['output_throughput'])}, mean output length {cell(r['mean_output_len'])}"
    )


# ---- command line -------------------------------------------------------------------


def add_ab_args(parser: argparse.ArgumentParser, json_object: Any) -> None:
    g = parser.add_argument_group(
        "A/B",
        "run the workload 2N times against one server, alternating the baseline body and --extra-body",
    )
    g.add_argument(
        "--ab-rounds",
        type=int,
        default=0,
        metavar="N",
        help="rounds per arm (default 0: no A/B, one run with --extra-body)",
    )
    g.add_argument(
        "--ab-baseline-body",
        type=json_object,
        default=None,
        metavar="JSON",
        help="JSON object merged into the baseline arm's requests (default {}); --extra-body is the treatment's",
    )


def ab_config_from_args(args: argparse.Namespace) -> ABConfig | None:
    """The A/B configuration, or None for a plain run."""
    if args.ab_rounds == 0:
        if args.ab_baseline_body is not None:
            raise ValueError("--ab-baseline-body needs --ab-rounds N (rounds per arm)")
        return None
    return ABConfig(rounds=args.ab_rounds, baseline_body=args.ab_baseline_body or {})
