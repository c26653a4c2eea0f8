"""Attention backends behind one interface (see base.AttentionBackend)."""

from pdserve.layers.attention.base import AttentionBackend, BatchLayout, get_backend

__all__ = ["AttentionBackend", "BatchLayout", "get_backend"]
