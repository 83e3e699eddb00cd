"""Benchmarks: `benchmarks/run` (see harness.py); not part of the test suite."""
