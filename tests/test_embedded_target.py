"""The committed default target loads offline, matches its provenance, and writes code."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from data.corpus import corpus_hash, split_files, stdlib_files, token_windows
from models.embedded import EMBEDDED_TARGETS
from models.target import load_target

TARGET_DIR = EMBEDDED_TARGETS["stdlib-llama"]
PROVENANCE = json.loads((TARGET_DIR / "provenance.json").read_text())


@pytest.fixture(scope="module")
def target():
    return load_target("stdlib-llama", "float32", "cpu")


def test_committed_files():
    weights = TARGET_DIR / "model.safetensors"
    assert weights.stat().st_size <= 20 * 1024 * 1024
    names = {p.name for p in TARGET_DIR.iterdir()}
    assert {"config.json", "tokenizer.json", "provenance.json"} <= names
    assert not {n for n in names if n.endswith((".bin", ".pt", ".pkl", ".pth"))}  # no pickle
    for key in ("command", "corpus", "training", "eval"):
        assert key in PROVENANCE
    assert PROVENANCE["command"].startswith("python train/pretrain.py recipe=stdlib_target")
    assert len(PROVENANCE["corpus"]["corpus_sha256"]) == 64


def test_loads_offline_with_auto_classes():
    """A fresh interpreter with the Hub unreachable loads it through the Auto classes."""
    code = (
        "import sys; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "print(type(m).__name__, m.config.model_type, len(t), t.eos_token)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(TARGET_DIR)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    ).stdout.split()
    vocab_size = json.loads((TARGET_DIR / "config.json").read_text())["vocab_size"]
    assert out == ["LlamaForCausalLM", "llama", str(vocab_size), "<|endoftext|>"]


def test_heldout_loss_matches_provenance(target):
    files = stdlib_files()
    if corpus_hash(files) != PROVENANCE["corpus"]["corpus_sha256"]:
        pytest.skip("this interpreter's standard library differs from the training corpus")
    model, tokenizer = target
    _, heldout = split_files(files, PROVENANCE["corpus"]["heldout_fraction"])
    assert [f.module for f in heldout] == PROVENANCE["corpus"]["heldout_modules"]
    windows = token_windows(heldout, tokenizer, PROVENANCE["training"]["seq_len"])
    windows = windows[: PROVENANCE["eval"]["heldout_windows"]]
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in windows.split(8):
            total += model(input_ids=batch, labels=batch).loss.item() * batch[:, 1:].numel()
            count += batch[:, 1:].numel()
    assert total / count == pytest.approx(PROVENANCE["eval"]["heldout_loss"], abs=2e-3)


def parsable_lines(continuation: str) -> int:
    """How many leading complete lines of ``continuation`` parse as Python (blocks may be open)."""
    lines = continuation.split("\n")[:-1]  # drop the unfinished last line
    for k in range(len(lines), 0, -1):
        body = textwrap.dedent("\n".join(lines[:k]))
        indent = len(lines[k - 1]) - len(lines[k - 1].lstrip()) + 4
        for candidate in (body, body + "\n" + " " * indent + "pass"):
            try:
                ast.parse(textwrap.dedent(candidate))
                return k
            except SyntaxError:
                continue
    return 0


def code_like_continuations(model, tokenizer, prompts) -> int:
    hits = 0
    for prompt in prompts:
        ids = tokenizer(prompt.text, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=48, do_sample=False)
        hits += parsable_lines(tokenizer.decode(out[0, ids.shape[1] :])) >= 3
    return hits


def test_greedy_continuations_look_like_code(target):
    from data.prompts import load_prompts

    model, tokenizer = target
    prompts = [p for p in load_prompts("stdlib-eval") if p.category == "function_body"][:8]
    assert code_like_continuations(model, tokenizer, prompts) >= 6
    # Negative control: the same architecture with random weights must fail the same check.
    torch.manual_seed(0)
    untrained = type(model)(model.config).eval()
    assert code_like_continuations(untrained, tokenizer, prompts) <= 1
