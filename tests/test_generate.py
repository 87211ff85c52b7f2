"""Batched regeneration equals Hugging Face greedy generate, prompt by prompt."""

from __future__ import annotations

import copy

import pytest
import torch

from data.generate import BufferLayer, Sampling, generate, left_pad, next_tokens, preallocated_cache
from models.target import returned_cache


@pytest.fixture(scope="module")
def tiny(tiny_target_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_target_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_target_dir)


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_batched_greedy_equals_hf_generate(tiny):
    model, tokenizer = tiny
    texts = ["def add(a, b):\n", "class Point:\n    def", "for i in range(10):\n    print(", "x"]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    sampling = Sampling(max_new_tokens=24)
    ours = generate(model, prompts, sampling, tokenizer.eos_token_id, tokenizer.pad_token_id)
    for prompt, new in zip(prompts, ours, strict=True):
        ids = torch.tensor([prompt])
        ref = model.generate(ids, max_new_tokens=24, do_sample=False, attention_mask=None)
        assert new == ref[0, len(prompt) :].tolist()


def test_stops_at_eos(tiny):
    model, tokenizer = tiny
    prompt = tokenizer("def add(a, b):\n")["input_ids"]
    free = generate(model, [prompt], Sampling(max_new_tokens=12), -1, tokenizer.pad_token_id)[0]
    eos = free[3]  # pretend the fourth generated token is EOS
    stopped = generate(model, [prompt, prompt], Sampling(max_new_tokens=12), eos, 0)
    first = free.index(eos)
    assert stopped == [free[: first + 1]] * 2


def test_rows_finishing_at_different_steps(tiny, monkeypatch):
    """Rows that reach EOS leave the batch (the cache keeps the others' rows); every row still
    equals its prompt generated alone."""
    model, tokenizer = tiny
    kept = []
    select = BufferLayer.batch_select_indices

    def recording(self, indices):
        kept.append(indices.tolist())
        select(self, indices)

    monkeypatch.setattr(BufferLayer, "batch_select_indices", recording)
    texts = ["def add(a, b):\n", "class Point:\n    def", "for i in range(10):\n", "x", "import os"]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    free = generate(model, prompts, Sampling(max_new_tokens=16), -1, tokenizer.pad_token_id)
    eos = free[1][2]  # ends row 1 at its third token, the others wherever it appears, if at all
    batched = generate(model, prompts, Sampling(max_new_tokens=16), eos, tokenizer.pad_token_id)
    ends = {len(row) for row in batched}
    assert len(ends) > 1 and min(ends) <= 3
    assert kept and all(len(k) < len(prompts) for k in kept)  # the batch shrank
    for prompt, row in zip(prompts, batched, strict=True):
        alone = generate(model, [prompt], Sampling(max_new_tokens=16), eos, tokenizer.pad_token_id)
        assert row == alone[0]


def test_cache_is_allocated_once(tiny):
    """The KV cache writes every step into one buffer per layer and hands out views of its
    filled part (no concatenation)."""
    model, _ = tiny
    cache = preallocated_cache(model, 12)
    assert all(isinstance(layer, BufferLayer) for layer in cache.layers)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)
        buffers = [layer._keys.data_ptr() for layer in cache.layers]
        for _ in range(3):
            model(input_ids=ids[:, :1], cache=cache, use_cache=True)
    assert [layer._keys.data_ptr() for layer in cache.layers] == buffers
    assert cache.get_seq_length() == 7
    keys = cache.layers[0].keys
    assert keys.shape[2] == 7 and keys.data_ptr() == cache.layers[0]._keys.data_ptr()
    with torch.no_grad():
        reference = model(input_ids=torch.cat([ids, ids[:, :1].repeat(1, 3)], 1), use_cache=True)
    torch.testing.assert_close(keys, returned_cache(reference).layers[0].keys)


def test_bfloat16_greedy_equals_hf_generate(tiny):
    model, tokenizer = tiny
    model = copy.deepcopy(model).to(torch.bfloat16)
    for text in ["def add(a, b):\n", "class Point:\n    def"]:
        prompt = tokenizer(text)["input_ids"]
        (ours,) = generate(model, [prompt], Sampling(max_new_tokens=16), tokenizer.eos_token_id, 0)
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)
        assert ours == ref[0, len(prompt) :].tolist()


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    picks = {
        int(next_tokens(logits, Sampling(temperature=1.0, top_p=0.8), generator))
        for _ in range(300)
    }
    assert picks == {0, 1}  # 0.5 + 0.3 reaches 0.8: tokens 2 and 3 are never drawn


@pytest.mark.parametrize(
    "kwargs, message",
    [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_new_tokens": 0}, "max")],
)
def test_bad_sampling_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**kwargs)
