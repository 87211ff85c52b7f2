"""Triton attention kernels for tree and cascade verification, with PyTorch references."""
