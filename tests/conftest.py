"""Shared fixtures: a tiny random Llama target with a real BPE tokenizer, built in seconds."""

from __future__ import annotations

import pytest
import torch

from data.tokenizer import train_bpe


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


TINY_TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    print(i)\n",
    "import os\nimport sys\n\nif __name__ == '__main__':\n    sys.exit(0)\n",
] * 20


def tiny_llama(vocab_size: int, **config):
    """A 2-layer, width-32 Llama with GQA (4 query heads, 2 KV heads), random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            **config,
        )
    )


@pytest.fixture(scope="session")
def tiny_target_dir(tmp_path_factory):
    """A 2-layer, width-32 Llama in Hugging Face format (random weights, seeded)."""
    path = tmp_path_factory.mktemp("tiny_target")
    tokenizer = train_bpe(TINY_TEXTS, vocab_size=300)
    torch.manual_seed(0)
    model = tiny_llama(
        len(tokenizer),
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
