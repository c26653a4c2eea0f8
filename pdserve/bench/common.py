"""Pieces every benchmark shares: seeded random requests, machine facts, result files.

Knows nothing about engines: a benchmark hands it token ids, numbers and paths.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Ids below this are special or near-special in SmolLM2 (and in most BPE vocabularies the
# low ids are byte/control tokens); random prompts draw from [MIN_RANDOM_TOKEN_ID, vocab_size).
MIN_RANDOM_TOKEN_ID = 1000


@dataclass(frozen=True)
class BenchRequest:
    """One benchmark request: a prompt and the exact number of tokens to generate."""

    prompt_token_ids: list[int]
    output_len: int

    @property
    def input_len(self) -> int:
        return len(self.prompt_token_ids)


@dataclass
class Stopwatch:
    """Wall and process CPU seconds of a `with` block, and the 1-minute load average at both ends.

    A load well above the torch thread count means other processes shared the CPUs
    during the block, so its wall time is inflated.
    """

    wall_s: float = 0.0
    cpu_s: float = 0.0
    load_avg_before: float | None = None
    load_avg_after: float | None = None

    def __enter__(self) -> Stopwatch:
        self.load_avg_before = _load_avg()
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self._wall
        self.cpu_s = time.process_time() - self._cpu
        self.load_avg_after = _load_avg()

    def as_dict(self) -> dict[str, Any]:
        return {
            "wall_s": round(self.wall_s, 3),
            "cpu_s": round(self.cpu_s, 3),
            "load_avg_before": self.load_avg_before,
            "load_avg_after": self.load_avg_after,
        }


def _load_avg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def check_len_range(name: str, low: int, high: int) -> None:
    """Raise ValueError naming the flags when [low, high] is not a valid length range."""
    if low < 1:
        raise ValueError(f"--{name}-min must be at least 1, got {low}")
    if high < low:
        raise ValueError(f"--{name}-max ({high}) is below --{name}-min ({low}); raise the max or lower the min")


def random_requests(
    num_requests: int,
    input_len: tuple[int, int],
    output_len: tuple[int, int],
    vocab_size: int,
    seed: int,
    min_token_id: int = MIN_RANDOM_TOKEN_ID,
) -> list[BenchRequest]:
    """Seeded requests; lengths uniform in the closed ranges, token ids uniform in [min_token_id, vocab_size)."""
    if num_requests < 1:
        raise ValueError(f"need at least one request, got {num_requests}")
    if vocab_size <= min_token_id:
        raise ValueError(f"vocabulary of {vocab_size} ids has none at or above {min_token_id} to draw prompts from")
    rng = np.random.default_rng(seed)
    in_lens = rng.integers(input_len[0], input_len[1], size=num_requests, endpoint=True)
    out_lens = rng.integers(output_len[0], output_len[1], size=num_requests, endpoint=True)
    return [
        BenchRequest(rng.integers(min_token_id, vocab_size, size=int(n)).tolist(), int(m))
        for n, m in zip(in_lens, out_lens)
    ]


def machine_info() -> dict[str, Any]:
    """Facts that make a figure comparable: platform, cores, torch threads, library versions."""
    import torch
    import transformers

    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _cpu_model() -> str | None:
    """The 'model name' line of /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def code_version() -> dict[str, Any]:
    """The pdserve git commit the figures were taken at, and whether tracked files differed from it."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def fmt(value: float | None, spec: str = "{:.1f}") -> str:
    """A table cell: `value` formatted, or n/a."""
    return "n/a" if value is None else spec.format(value)


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def label_or_timestamp(label: str | None) -> str:
    """The result files' suffix: --label, else the local time (20240131-235959)."""
    return label or time.strftime("%Y%m%d-%H%M%S")


def write_outputs(
    result: dict[str, Any], result_dir: Path, stem: str, draw: Callable[[Path], Path], files_in_json: bool = True
) -> tuple[Path, Path]:
    """Write `result` to <stem>.json and the figure draw(path) to <stem>.png under `result_dir`; (json, png).

    Records both paths in result["files"]: before the JSON is written (so it names its files), or after it
    when not `files_in_json`. The JSON goes first, so a figure that fails to draw loses no numbers.
    """
    json_path, png_path = result_dir / f"{stem}.json", result_dir / f"{stem}.png"
    files = {"json": str(json_path), "png": str(png_path)}
    if files_in_json:
        result["files"] = files
    write_json(json_path, result)
    if not files_in_json:
        result["files"] = files
    draw(png_path)
    return json_path, png_path


LABEL_RE = re.compile(r"^[A-Za-z0-9._-]+$")  # what a --label may hold: it becomes part of a file name


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """--result-dir, --label and --no-tqdm, shared by the benchmarks that write labelled results."""
    o = parser.add_argument_group("output")
    o.add_argument("--result-dir", type=Path, default=Path("bench/results"))
    o.add_argument("--label", default=None, help="file name suffix instead of the timestamp")
    o.add_argument("--no-tqdm", dest="use_tqdm", action="store_false", help="no progress bar")
