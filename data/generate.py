"""Batched regeneration with the target: left padding, a KV cache, greedy or sampled decoding.

A lean loop over the target's own forward (the target is wrapped, not copied). Under greedy it
matches Hugging Face ``generate`` token for token; it does less per step than ``generate``
(no logits processors or stopping-criteria objects), which is what the distillation throughput
benchmark measures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.sampling import Sampling as TokenSampling


@dataclass(frozen=True)
class Sampling(TokenSampling):
    """Decoding settings: temperature / top-k / top-p (``models.sampling.Sampling``, which also
    turns logits into the sampled distribution) plus a length budget."""

    max_new_tokens: int = 256

    def __post_init__(self):
        super().__post_init__()
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T)`` input ids and attention mask, prompts right-aligned."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def next_tokens(logits: torch.Tensor, sampling: Sampling, generator=None) -> torch.Tensor:
    """Pick one token per row from ``(B, V)`` logits: argmax, or a draw from the processed
    distribution (temperature, top-k, nucleus)."""
    if sampling.greedy:
        return logits.argmax(-1)
    return torch.multinomial(sampling.probs(logits), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    sampling: Sampling,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Continue each prompt until EOS (kept) or ``max_new_tokens``.

    Args:
        model: a Hugging Face causal LM (eval mode).
        prompts: token ids per prompt, no padding.
        sampling: decoding settings.
        eos_id: generation of a row stops after it emits this token.
        pad_id: id used for left padding (masked out, never attended).
        generator: RNG for sampling (CPU generator).

    Returns:
        The new tokens of each row, EOS included when it was produced.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): pads share position 0
    cache = DynamicCache()
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    outputs: list[list[int]] = [[] for _ in prompts]
    step_ids = ids
    for _ in range(sampling.max_new_tokens):
        logits = model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        ).logits[:, -1]
        chosen = next_tokens(logits, sampling, generator).to(device)
        chosen = torch.where(done, torch.full_like(chosen, pad_id), chosen)
        for row in (~done).nonzero().flatten().tolist():
            outputs[row].append(int(chosen[row]))
        done |= chosen == eos_id
        if bool(done.all()):
            break
        step_ids = chosen[:, None]
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=-1)
    return outputs
