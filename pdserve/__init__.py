"""pdserve: an LLM serving engine built around prefill/decode disaggregation."""

from pdserve.engine.llm import LLM
from pdserve.request import CompletionOutput, RequestOutput, SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
