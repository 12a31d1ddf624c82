"""Benchmarks (``platform bench …``): ratios measured side by side in one run, machine named."""
