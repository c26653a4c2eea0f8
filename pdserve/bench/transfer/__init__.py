"""`pdserve bench transfer`: what the P -> D KV transfer costs per prompt length, beside the engine's raw speed.

main.py is the command (its docstring the full description); workload.py the one-request-at-a-time 1P1D
workload it shares with `bench storage` (KV layout, lengths, instance flags); client.py sends a request
and reads P's and D's counters around it; measure.py turns those into per-length figures; report.py
prints the table and draws the PNG.
"""

from __future__ import annotations

from pdserve.bench.transfer.main import add_parser, run
from pdserve.bench.transfer.workload import KVLayout, resolve_input_lens

__all__ = ["KVLayout", "add_parser", "resolve_input_lens", "run"]
