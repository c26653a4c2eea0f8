"""Prefill/decode disaggregation.

The control plane (prefill.py, decode.py, control.py, reserve.py) is pure Python and runs in the
engine core: it decides which blocks move where and when. The data plane (sender.py, transfer/)
runs on every worker rank and moves tensors exactly as the step plan says.
"""
