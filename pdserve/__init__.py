"""pdserve: an LLM serving engine built around prefill/decode disaggregation.

The package root imports no torch: `LLM` is loaded on first use, so the router and the other pure-Python
parts (config, messages, scheduler, kvcache, the PD control plane) import lean.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pdserve.request import CompletionOutput, RequestOutput, SamplingParams

if TYPE_CHECKING:
    from pdserve.engine.llm import LLM

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from pdserve.engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'pdserve' has no attribute {name!r}")
