"""Batched regeneration equals Hugging Face greedy generate, prompt by prompt."""

from __future__ import annotations

import pytest
import torch

from data.generate import Sampling, generate, left_pad, next_tokens


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
