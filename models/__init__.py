"""Models: the target wrapper, embedded default targets, and (later) the drafter families."""
