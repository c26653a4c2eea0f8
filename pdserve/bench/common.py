"""Pieces every benchmark shares: seeded random requests, machine facts, result files.

Knows nothing about engines: a benchmark hands it token ids, numbers and paths.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
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


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path
