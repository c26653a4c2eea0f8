"""`pdserve bench kv-tiers`: how much prefill the KV cache tiers save, and what that does to TTFT.

main.py is the command (its docstring the full description); configs.py says what each of the four
configurations (none, device, host, pool) runs; measure.py runs one and builds its record; report.py
prints the table and draws the PNG.
"""

from __future__ import annotations

from pdserve.bench.kv_tiers.configs import client_tokenizer
from pdserve.bench.kv_tiers.main import add_parser, run

__all__ = ["add_parser", "client_tokenizer", "run"]
