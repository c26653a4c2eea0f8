"""Admission, chunking and preemption. Knows nothing about tensors."""
