"""Benchmarks against the official implementation; run as `python -m benchmarks.<script>`."""
