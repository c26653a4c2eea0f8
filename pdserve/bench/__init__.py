"""Benchmarks: each writes JSON and a PNG under bench/results/."""
