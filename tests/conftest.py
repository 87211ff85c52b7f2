"""Shared fixtures: a tiny random Llama target with a real BPE tokenizer, built in seconds."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # Triton kernels run in the interpreter on CPU (correctness)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import huggingface_hub
import pytest
from huggingface_hub import constants as hf_constants

from data.tokenizer import train_bpe
from tests.hub_standin import SENTINEL, HubStandin


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


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A running Hub stand-in that the real client can reach, and only it; HF_TOKEN = SENTINEL.

    - Offline mode: CI sets HF_HUB_OFFLINE=1 so no test reaches the real Hub. huggingface_hub
      reads it once, at import, into ``constants.HF_HUB_OFFLINE``, and its request hook then
      refuses *every* request, 127.0.0.1 included (unsetting the variable later changes
      nothing). These tests talk only to the local stand-in, so they lift that constant for
      their own duration (the variable stays set, so hf_xet stays offline).
    - Side requests: to build its User-Agent, huggingface_hub (2.x) fetches an "agent
      harnesses" list from ``constants.ENDPOINT`` (huggingface.co) unless telemetry is off; so
      telemetry is turned off, and the default endpoint is pointed at the stand-in, where any
      request it does not know fails the test (see ``unhandled``) instead of leaving the host.
    - Proxies: ``*_PROXY`` variables would route 127.0.0.1 through a proxy; NO_PROXY covers it,
      and the shared HTTP client is recreated so it reads the patched environment.
    """
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")  # read by hf_xet when its session starts
    for name in ("HF_OIDC_RESOURCE", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    huggingface_hub.close_session()
    try:
        with HubStandin(tmp_path / "hub") as standin:
            monkeypatch.setattr(hf_constants, "ENDPOINT", standin.endpoint)
            monkeypatch.setattr(
                hf_constants,
                "HUGGINGFACE_CO_URL_TEMPLATE",
                standin.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
            )
            yield standin
    finally:
        huggingface_hub.close_session()
    assert standin.unhandled == [], "the client called endpoints the stand-in does not know"
    assert standin.failures == []
