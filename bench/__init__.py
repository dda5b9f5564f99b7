"""Benchmarks: ratios measured side by side in one run (run as `python -m bench.NAME`)."""
