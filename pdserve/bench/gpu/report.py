"""`pdserve bench gpu`'s output: the PNG (one panel per part that produced figures) and the printed report.

Reads only the result dict the run built (main.py); measures nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pdserve.bench.common import fmt
from pdserve.bench.gpu.config import PARTS, TARGET_BATCH1_OVER_ROOFLINE
from pdserve.bench.plot import finish_figure, pyplot

# ---- the figure ---------------------------------------------------------------------------------------------


def _panels(result: dict[str, Any]) -> list[str]:
    parts = result["parts"]
    names = [n for n in ("decode", "prefill") if parts[n].get("rows")]
    transfer = parts["transfer"]
    if (transfer.get("raw") or {}).get("rows"):
        names.append("raw")
    if (transfer.get("pd") or {}).get("rows"):
        names.append("pd")
    return names


def _bars(ax: Any, groups: list[str], series: list[tuple[str, list[float | None], str]], fmt_: str = "{:.1f}") -> None:
    """Grouped bars: one group per x label, one bar per series (None: no bar)."""
    width = 0.8 / max(1, len(series))
    for k, (label, values, color) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
        points = [(x, v) for x, v in zip(xs, values) if v is not None]
        if not points:
            continue
        bars = ax.bar([x for x, _ in points], [v for _, v in points], width=width, color=color, label=label)
        ax.bar_label(bars, labels=[fmt_.format(v) for _, v in points], fontsize=6)
    ax.set_xticks(range(len(groups)), groups)


def _plot_decode(ax: Any, result: dict[str, Any]) -> None:
    d = result["parts"]["decode"]
    groups = [str(r["batch"]) for r in d["rows"]]
    _bars(
        ax,
        groups,
        [
            ("pdserve, CUDA graphs", [r["graphs_ms"] for r in d["rows"]], "#1f77b4"),
            ("pdserve, eager", [r["eager_ms"] for r in d["rows"]], "#ff7f0e"),
            ("HF generate", [r["hf_ms"] for r in d["rows"]], "#7f7f7f"),
        ],
    )
    if d.get("roofline_ms"):
        ax.axhline(
            d["roofline_ms"],
            color="#d62728",
            ls="--",
            lw=1,
            label=f"weight-read roofline {d['roofline_ms']:.2f} ms",
        )
    ax.set_xlabel("batch (sequences decoding)")
    ax.set_ylabel("ms per decode step / token")
    ratio = d["target"]["ratio"]
    ax.set_title(
        f"decode, context {d['context_tokens']}"
        + (
            f"\nbatch 1 graphs / roofline = {ratio:.2f}x (target {TARGET_BATCH1_OVER_ROOFLINE}x)"
            if ratio is not None
            else ""
        ),
        fontsize=9,
    )


def _plot_prefill(ax: Any, result: dict[str, Any]) -> None:
    p = result["parts"]["prefill"]
    groups = [str(r["tokens"]) for r in p["rows"]]
    _bars(ax, groups, [("pdserve prefill", [r["tflops"] for r in p["rows"]], "#1f77b4")])
    peak = result["baselines"]["matmul"]["tflops_best"]
    ax.axhline(
        peak,
        color="#d62728",
        ls="--",
        lw=1,
        label=f"{result['baselines']['matmul']['n']}^3 matmul {peak:.0f} TFLOP/s",
    )
    ax.set_xlabel("prompt tokens (one request, one step)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(
        "prefill: achieved FLOP rate vs matmul peak\n"
        + ", ".join(f"{r['tokens']}: {r['over_matmul_peak'] or 0:.0%}" for r in p["rows"]),
        fontsize=9,
    )


def _plot_raw(ax: Any, result: dict[str, Any]) -> None:
    rows = result["parts"]["transfer"]["raw"]["rows"]
    groups = [f"{r['tokens']}\n{r['nbytes'] / 2**20:.0f} MiB" for r in rows]
    _bars(
        ax,
        groups,
        [
            ("cuda_ipc, all layers", [r["ipc_all_layers"]["gb_per_s_median"] for r in rows], "#1f77b4"),
            (
                "cuda_ipc, layer by layer",
                [r["ipc_layer_by_layer"]["gb_per_s_median"] for r in rows],
                "#ff7f0e",
            ),
            ("device copy (contiguous)", [r["device_copy"]["gb_per_s_median"] for r in rows], "#2ca02c"),
            (
                "same slice copies, in-process",
                [r["local_slices"]["gb_per_s_median"] for r in rows],
                "#9467bd",
            ),
        ],
        "{:.0f}",
    )
    ax.set_xlabel("prompt tokens (KV bytes)")
    ax.set_ylabel("GB/s moved (median)")
    ax.set_title("KV transfer: cuda_ipc into another process", fontsize=9)


def _plot_pd(ax: Any, result: dict[str, Any]) -> None:
    pd = result["parts"]["transfer"]["pd"]
    rows = pd["rows"]
    groups = [f"{r['tokens']}\nexposed {100 * (r['exposed_share_of_ttft'] or 0):.2f}%" for r in rows]
    _bars(
        ax,
        groups,
        [
            ("PD TTFT (D's first token)", [r["ttft_ms_median"] for r in rows], "#1f77b4"),
            ("P prefill alone", [r["prefill_alone_ms_median"] for r in rows], "#7f7f7f"),
        ],
    )
    ax.set_xlabel("prompt tokens (exposed transfer / TTFT)")
    ax.set_ylabel("ms (median)")
    ax.set_title(f"in-engine PD over {pd['engine']} (P and D in one process)", fontsize=9)


_PANELS = {"decode": _plot_decode, "prefill": _plot_prefill, "raw": _plot_raw, "pd": _plot_pd}


def plot(path: Path, result: dict[str, Any]) -> Path:
    """One panel per part (the transfer part has two: raw engine and in-engine PD)."""
    names = _panels(result) or ["none"]
    fig, axes = pyplot().subplots(1, len(names), figsize=(5.2 * len(names), 4.6), dpi=110, squeeze=False)
    axes = list(axes[0])
    try:
        for ax, name in zip(axes, names):
            if name == "none":
                ax.text(0.5, 0.5, "no part produced figures", ha="center", va="center", transform=ax.transAxes)
                continue
            _PANELS[name](ax, result)
            ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # room for the legend above the bars
            ax.legend(fontsize=7, frameon=False, loc="upper left", ncol=2)
        model = result["model"]
        title = (
            f"pdserve bench gpu: {result['gpu']['name']}, {model['name']} {model['dtype']} "
            f"({model['load_format']} weights), torch {result['gpu']['torch']}"
        )
        return finish_figure(fig, axes, title, path)
    except BaseException:
        pyplot().close(fig)
        raise


# ---- the printed report -------------------------------------------------------------------------------------


def _table(header: Sequence[tuple[str, int]], rows: list[list[Any]]) -> list[str]:
    head = "".join(f"{n:>{w}}" for n, w in header)
    return [head, "-" * len(head)] + ["".join(f"{c!s:>{w}}" for c, (_, w) in zip(row, header)) for row in rows]


def _report_decode(part: dict[str, Any]) -> list[str]:
    lines = [
        f"\ndecode (ms per step, context {part['context_tokens']}; roofline "
        f"{fmt(part['roofline_ms'], '{:.2f}')} ms = {part['weight_bytes'] / 1e9:.2f} GB of weights at "
        f"{fmt(part['hbm_gb_per_s'], '{:.0f}')} GB/s)"
    ]
    lines += _table(
        (
            ("batch", 6),
            ("graphs", 9),
            ("eager", 9),
            ("HF", 9),
            ("graphs/roof", 12),
            ("roof+KV", 9),
            ("eager/graphs", 13),
            ("HF/graphs", 10),
            ("HF/eager", 9),
        ),
        [
            [
                r["batch"],
                fmt(r["graphs_ms"], "{:.2f}"),
                fmt(r["eager_ms"], "{:.2f}"),
                fmt(r["hf_ms"], "{:.2f}"),
                fmt(r["graphs_over_roofline"], "{:.2f}x"),
                fmt(r["roofline_weights_kv_ms"], "{:.2f}"),
                fmt(r["eager_over_graphs"], "{:.2f}x"),
                fmt(r["hf_over_graphs"], "{:.2f}x"),
                fmt(r["hf_over_eager"], "{:.2f}x"),
            ]
            for r in part["rows"]
        ],
    )
    target = part["target"]
    if target["ratio"] is not None:
        lines.append(
            f"batch 1 with CUDA graphs: {target['ratio']:.2f}x the roofline (target "
            f"{target['max_ratio']}x: {'met' if target['met'] else 'NOT met'})"
        )
    for sub in ("graphs", "eager", "hf"):
        if "skipped" in part[sub]:
            lines.append(f"{sub}: skipped ({part[sub]['skipped']})")
    return lines


def _report_prefill(part: dict[str, Any]) -> list[str]:
    return ["\nprefill (one request, one engine step)"] + _table(
        (("tokens", 7), ("steps", 6), ("ms", 9), ("tok/s", 10), ("TFLOP/s", 9), ("/peak", 7)),
        [
            [
                r["tokens"],
                r["steps"],
                fmt(r["seconds_median"] * 1e3),
                fmt(r["tokens_per_s"], "{:.0f}"),
                fmt(r["tflops"]),
                fmt(r["over_matmul_peak"], "{:.0%}"),
            ]
            for r in part["rows"]
        ],
    )


def _report_raw(raw: dict[str, Any]) -> list[str]:
    if not raw.get("rows"):
        return [f"\ntransfer raw: {raw.get('skipped') or 'ERROR ' + str(raw.get('error'))}"]
    gpus = f"GPU {raw.get('p_gpu')} -> GPU {raw.get('d_gpu')}"
    lines = [f"\ntransfer, raw cuda_ipc into another process, {gpus} (GB/s moved, median)"]
    lines += _table(
        (
            ("tokens", 7),
            ("MiB", 7),
            ("all layers", 11),
            ("per layer", 10),
            ("scattered", 10),
            ("peer copy", 10),
            ("slices", 8),
            ("all/copy", 9),
            ("layer/copy", 11),
            ("scat/copy", 10),
        ),
        [
            [
                r["tokens"],
                f"{r['nbytes'] / 2**20:.0f}",
                fmt(r["ipc_all_layers"]["gb_per_s_median"], "{:.0f}"),
                fmt(r["ipc_layer_by_layer"]["gb_per_s_median"], "{:.0f}"),
                fmt(r["ipc_scattered"]["gb_per_s_median"], "{:.0f}"),
                fmt(r["device_copy"]["gb_per_s_median"], "{:.0f}"),
                fmt(r["local_slices"]["gb_per_s_median"], "{:.0f}"),
                fmt(r["all_layers_over_copy"], "{:.2f}"),
                fmt(r["layer_by_layer_over_copy"], "{:.2f}"),
                fmt(r["scattered_over_copy"], "{:.2f}"),
            ]
            for r in raw["rows"]
        ],
    )
    lines.append(
        "all layers / per layer: CudaIpcEngine.write (one call, or one per layer) + flush; "
        "scattered: all layers into every other block of D's; peer copy: one contiguous copy of "
        "the same bytes between the GPUs; slices: one copy per (layer, K|V) into this process's "
        "memory on D's GPU"
    )
    return lines


def _report_pd(pd: dict[str, Any]) -> list[str]:
    where = f"P on GPU {pd.get('p_gpu')}, D on GPU {pd.get('d_gpu')}" if pd.get("p_gpu") is not None else "CPU"
    lines = [f"\ntransfer, in-engine PD over {pd['engine']} (P and D in one process, {where}; ms, median)"]
    lines += _table(
        (
            ("tokens", 7),
            ("KV MiB", 7),
            ("TTFT", 9),
            ("P alone", 9),
            ("TTFT/alone", 11),
            ("busy", 8),
            ("exposed", 8),
            ("exp/TTFT", 9),
            ("overlap", 8),
            ("runs", 7),
            ("catch-up", 9),
        ),
        [
            [
                r["tokens"],
                f"{r['kv_bytes'] / 2**20:.0f}",
                fmt(r["ttft_ms_median"]),
                fmt(r["prefill_alone_ms_median"]),
                fmt(r["ttft_over_prefill_alone"], "{:.2f}x"),
                fmt(r["busy_ms_median"], "{:.2f}"),
                fmt(r["exposed_ms_median"], "{:.2f}"),
                fmt(
                    None if r["exposed_share_of_ttft"] is None else 100 * r["exposed_share_of_ttft"],
                    "{:.2f}%",
                ),
                f"{r['num_overlapped']}/{r['requests']}",
                max(r["copy_runs"]),
                max(r["catchup_blocks"]),
            ]
            for r in pd["rows"]
        ],
    )
    lines.append(
        "TTFT: to D's first token; P alone: a plain request of the same length on P; busy / "
        "exposed: P's sender time writing / steps waiting for it after the forward; overlap: "
        "requests whose exposed time < half their busy time;\nruns: the most (P block, D block) "
        "runs a request's sends had (one copy per run, layer and K|V); catch-up: the most blocks "
        "of a request sent after its forward instead of layer by layer"
    )
    return lines


def _report_transfer(part: dict[str, Any]) -> list[str]:
    raw, pd = part.get("raw") or {}, part.get("pd") or {}
    lines = _report_raw(raw)
    if pd.get("rows"):
        lines += _report_pd(pd)
    elif "error" in part:
        lines.append(f"\ntransfer pd: ERROR {part['error']}")
    return lines


_REPORTS = {"decode": _report_decode, "prefill": _report_prefill, "transfer": _report_transfer}


def format_report(result: dict[str, Any]) -> str:
    parts, base = result["parts"], result["baselines"]
    lines = [
        f"pdserve bench gpu: {result['gpu']['name']} ({result['device']}), {result['model']['name']} "
        f"{result['model']['dtype']}; device copy {fmt(base['copy']['gb_per_s_best'], '{:.0f}')} GB/s "
        f"(read + written), {base['matmul']['n']}^3 matmul {fmt(base['matmul']['tflops_best'])} TFLOP/s"
    ]
    for name in PARTS:
        part = parts[name]
        if "skipped" in part:
            lines.append(f"\n{name}: skipped ({part['skipped']})")
        elif "error" in part and not any(key in part for key in ("rows", "raw", "pd")):
            lines.append(f"\n{name}: ERROR {part['error']}")
        else:
            lines += _REPORTS[name](part)
    lines.append(
        f"\ntook {result['seconds']['total']:.0f} s; results: {result['files']['json']}, {result['files']['png']}"
    )
    return "\n".join(lines)
