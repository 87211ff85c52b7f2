"""Benchmark scripts; each rewrites its own section of benchmarks/RESULTS.md."""
