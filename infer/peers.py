"""Hugging Face peers on the same prompts in the same run: plain ``generate``, assisted generation
with the same draft model, and prompt-lookup decoding (all with HF's default settings)."""

from __future__ import annotations

import statistics
import time

import torch

from models.sampling import Sampling


def _generate(target, ids: list[int], max_new_tokens, eos_id, pad_id, sampling: Sampling, **extra):
    input_ids = torch.tensor([ids], device=target.device)
    kwargs = {"do_sample": False}
    if not sampling.greedy:
        kwargs = {"do_sample": True, "temperature": sampling.temperature,
                  "top_k": sampling.top_k or None, "top_p": sampling.top_p}  # fmt: skip
    start = time.perf_counter()
    out = target.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
        eos_token_id=eos_id, pad_token_id=pad_id, **kwargs, **extra,
    )  # fmt: skip
    if target.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = out[0, len(ids) :].tolist()
    if eos_id is not None and eos_id in tokens:
        tokens = tokens[: tokens.index(eos_id) + 1]
    return tokens, seconds


@torch.no_grad()
def run_peers(
    target, draft_lm, prompts: list[list[int]], ours: list[list[int]], max_new_tokens: int,
    eos_id, pad_id, sampling: Sampling,
) -> dict:  # fmt: skip
    """tokens/s, speedup over HF plain ``generate`` (mean of per-prompt ratios) and, for greedy,
    how many outputs equal ours."""
    peers = {"HF generate": {}}
    if draft_lm is not None:
        peers["HF assisted generation (same draft model)"] = {"assistant_model": draft_lm}
    peers["HF prompt lookup"] = {"prompt_lookup_num_tokens": 10}
    times = {name: [] for name in peers}
    tokens = {name: 0 for name in peers}
    identical = {name: 0 for name in peers}
    for i, ids in enumerate(prompts):
        names = list(peers) if i % 2 == 0 else list(reversed(peers))  # alternate the order
        for name in names:
            torch.manual_seed(i)
            out, seconds = _generate(
                target, ids, max_new_tokens, eos_id, pad_id, sampling, **peers[name]
            )
            times[name].append(seconds)
            tokens[name] += len(out)
            identical[name] += out == ours[i]
    base = times["HF generate"]
    return {
        name: {
            "tokens_per_s": tokens[name] / sum(times[name]),
            "speedup": statistics.fmean(b / t for b, t in zip(base, times[name], strict=True)),
            "identical": identical[name] if sampling.greedy else None,
            "checked": len(prompts),
        }
        for name in peers
    }
