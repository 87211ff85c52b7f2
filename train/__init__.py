"""Training: the one loop, pretraining of causal LMs, and the drafter entry point."""
