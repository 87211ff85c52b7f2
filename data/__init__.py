"""Data: corpora, tokenizers, prompt sets, and the target-regenerated distillation datasets."""
