"""Inference: the speculative loop, proposers, verification and `python -m infer.eval`."""
