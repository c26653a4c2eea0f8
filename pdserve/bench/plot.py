"""PNG charts for benchmark results (matplotlib, headless Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

_COLORS = ("#1f77b4", "#7f7f7f", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")


def pyplot():  # type: ignore[no-untyped-def]
    """matplotlib.pyplot on the headless Agg backend (imported on first use: it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:  # type: ignore[no-untyped-def]
    """Lay out, write `path` (creating its folder) and close the figure."""
    try:
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        fig.clear()
        pyplot().close(fig)
    return path


def finish_figure(fig, axes, title: str, path: Path) -> Path:  # type: ignore[no-untyped-def]
    """The house style's last touches (no top/right spines, a small suptitle), then save_figure."""
    for ax in axes:
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def bar_chart(
    path: Path, title: str, labels: Sequence[str], values: Sequence[float], ylabel: str, value_fmt: str = "{:.1f}"
) -> Path:
    """One bar per label, each annotated with its value; writes `path` and returns it."""
    if len(labels) != len(values):
        raise ValueError(f"bar_chart got {len(labels)} labels but {len(values)} values; give one value per label")
    fig, ax = pyplot().subplots(figsize=(5.5, 4.0), dpi=120)
    try:
        colors = [_COLORS[i % len(_COLORS)] for i in range(len(labels))]
        bars = ax.bar(list(labels), list(values), color=colors, width=0.6)
        for bar, value in zip(bars, values):
            ax.annotate(
                value_fmt.format(value),
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                xytext=(0, 3),
                textcoords="offset points",
            )
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, max(values, default=1.0) * 1.15 or 1.0)
        ax.spines[["top", "right"]].set_visible(False)
    except BaseException:
        pyplot().close(fig)
        raise
    return save_figure(fig, path)
