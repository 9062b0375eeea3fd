"""Benchmarks: each prints ratios measured in one run (ours against a baseline) and takes --json OUT."""
