"""Smoke tests of the benchmarks (python -m benchmarks.<name>): harnesses, not numbers."""
