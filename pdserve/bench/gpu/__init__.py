"""`pdserve bench gpu`: the engine on a GPU, each figure beside a baseline measured in the same run.

main.py is the command (its flags, the run, the result files) and its docstring the full description;
config.py holds GpuBenchConfig and what each figure means; device.py the device and its baselines;
decode.py, prefill.py and transfer.py (with transfer_raw.py) the three parts; report.py the PNG and
the printed table.
"""

from __future__ import annotations

from pdserve.bench.gpu.common import clamp_lens, weight_params
from pdserve.bench.gpu.config import PARTS, GpuBenchConfig
from pdserve.bench.gpu.device import slug
from pdserve.bench.gpu.main import add_parser, config_from_args, run, run_bench
from pdserve.bench.gpu.prefill import prefill_flops
from pdserve.bench.gpu.report import format_report

__all__ = [
    "PARTS",
    "GpuBenchConfig",
    "add_parser",
    "clamp_lens",
    "config_from_args",
    "format_report",
    "prefill_flops",
    "run",
    "run_bench",
    "slug",
    "weight_params",
]
