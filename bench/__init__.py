"""Benchmarks: speed and memory side by side with a baseline, in one run (`python -m bench.NAME`)."""
