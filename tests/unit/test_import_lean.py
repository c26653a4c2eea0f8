"""The control plane imports no torch: the package root, config, messages, the scheduler, the KV manager,
the PD control plane, the router, the launcher, the transfer contract and the pool's base, each in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

import pytest

LEAN_MODULES = [
    "pdserve",
    "pdserve.config",
    "pdserve.messages",
    "pdserve.request",
    "pdserve.scheduler.scheduler",
    "pdserve.kvcache",
    "pdserve.kvcache.manager",
    "pdserve.kvcache.block_pool",
    "pdserve.disagg.control",
    "pdserve.disagg.prefill",
    "pdserve.disagg.decode",
    "pdserve.disagg.role",
    "pdserve.router.app",
    "pdserve.store.base",
    "pdserve.http.errors",
    "pdserve.http.auth",
    "pdserve.validation",
    "pdserve.scheduler.pool_reads",
    "pdserve.disagg.storage",
    "pdserve.disagg.direct",
    "pdserve.disagg.transfer.base",
    "pdserve.launcher",
    "pdserve.procs",
    "pdserve.native",
]

PROBE = """
import sys
for name in sys.argv[1:]:
    __import__(name)
heavy = sorted(m for m in ("torch", "transformers", "triton", "numpy") if m in sys.modules)
print(",".join(heavy))
"""


@pytest.mark.parametrize("module", LEAN_MODULES)
def test_module_imports_no_torch(module: str) -> None:
    out = subprocess.run([sys.executable, "-c", PROBE, module], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing {module} loaded {out.stdout.strip()}"


def test_llm_is_still_exported_lazily() -> None:
    code = "import sys, pdserve; assert 'torch' not in sys.modules; from pdserve import LLM; print(LLM.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "pdserve.engine.llm"


def test_cli_parser_imports_no_torch() -> None:
    """`pdserve router` and `pdserve launch` build the whole parser (bench's subcommands too) before they run."""
    code = "import sys; from pdserve.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
