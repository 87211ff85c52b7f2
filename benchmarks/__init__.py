"""Benchmark scripts; each rewrites its own section of benchmarks/results/RESULTS.md."""
