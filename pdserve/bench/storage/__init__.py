"""`pdserve bench storage`: PD through the Mooncake Store pool against direct P -> D writes, per prompt length.

main.py is the command (its docstring the full description); modes.py starts the direct and the storage
deployment and measures each request through them; raw.py is the raw Mooncake baseline (a master and two
spawned clients); report.py prints the table and draws the PNG. The workload and the request client are
`bench transfer`'s (transfer/workload.py, transfer/client.py).
"""

from __future__ import annotations

from pdserve.bench.storage.main import add_parser, run
from pdserve.bench.storage.modes import pool_options, storage_flags
from pdserve.bench.transfer.workload import KVLayout

__all__ = ["KVLayout", "add_parser", "pool_options", "run", "storage_flags"]
