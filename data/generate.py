"""Batched regeneration with the target: left padding, a KV cache, greedy or sampled decoding.

A lean loop over the target's own forward (the target is wrapped, not copied). Under greedy it
matches Hugging Face ``generate`` token for token; it does less per step than ``generate``
(no logits processors or stopping-criteria objects), which is what the distillation throughput
benchmark measures. Per step it avoids what grows with the sequence: the KV cache and the
attention mask live in buffers allocated once for prompt width + ``max_new_tokens`` (no
``torch.cat``), the prefill computes logits at the last position only, and rows that reached
EOS leave the batch once a quarter of it has finished.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from models.sampling import Sampling as TokenSampling
from models.target import cache_arg


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
    if sampling.greedy:  # the first maximum, as argmax; several times faster in bf16 on CPU
        return logits.max(-1).indices
    return torch.multinomial(sampling.probs(logits), 1, generator=generator).squeeze(-1)


class BufferLayer(DynamicLayer):
    """One layer's KV cache in a buffer allocated once for ``capacity`` positions.

    Behaves like ``DynamicLayer`` (``keys``/``values`` are the filled part, so mask sizes and
    sequence lengths come out the same), but ``update`` writes the new states into the buffer
    and returns views of its filled part instead of concatenating a new tensor every step.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        batch, heads = key_states.shape[:2]
        shape = (batch, heads, self.capacity)
        self._keys = key_states.new_empty((*shape, key_states.shape[-1]))
        self._values = value_states.new_empty((*shape, value_states.shape[-1]))
        self.length = 0
        self._views()
        self.is_initialized = True

    def _views(self) -> None:
        self.keys = self._keys[:, :, : self.length]
        self.values = self._values[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache holds {self.capacity} positions, {end} needed")
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.capacity

    def reset(self) -> None:
        super().reset()
        self.length = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes the number of positions to remove as a negative int")
        if self.is_initialized:
            self.length = max(0, self.length + tokens_to_remove)
            self._views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._keys = self._keys[indices]  # one copy: finished rows leave the batch
            self._values = self._values[indices]
            self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("BufferLayer does not repeat rows (no beam search)")

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        raise NotImplementedError("BufferLayer does not reorder rows (no beam search)")


def preallocated_cache(model, capacity: int):
    """A cache of ``BufferLayer`` s when every layer of ``model`` caches like a plain
    ``DynamicLayer`` (full attention), else the model's own ``DynamicCache`` (sliding windows,
    linear attention and the like keep their own layer types)."""
    from transformers import Cache, DynamicCache

    cache = DynamicCache(config=model.config)
    if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
        return Cache(layers=[BufferLayer(capacity) for _ in cache.layers])
    return cache


# rows that reached EOS leave the batch (one cache copy) once this share of it has finished
_COMPACT_SHARE = 0.25


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
    device = next(model.parameters()).device
    accepts = inspect.signature(model.forward).parameters
    ids, prompt_mask = left_pad(prompts, pad_id)
    batch, width = ids.shape
    max_new = sampling.max_new_tokens
    cache = preallocated_cache(model, width + max_new)
    mask = torch.ones((batch, width + max_new), dtype=torch.long, device=device)
    mask[:, :width] = prompt_mask
    ids = ids.to(device)
    positions = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)  # (B, T): pads share position 0
    tokens = torch.full((batch, max_new), pad_id, dtype=torch.long, device=device)
    lengths = torch.full((batch,), max_new, dtype=torch.long, device=device)
    rows = torch.arange(batch, device=device)  # the prompt index of each batch row
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    # logits at the last position only; in the prefill given as an index, so the head gets a
    # gathered (contiguous) hidden state: on a strided slice, bf16 matmul on CPU copies the
    # head's weight once per row
    last = {"logits_to_keep": torch.tensor([width - 1], device=device)}
    last = last if "logits_to_keep" in accepts else {}
    step_ids, filled = ids, width
    for step in range(max_new):
        logits = model(
            input_ids=step_ids,
            attention_mask=mask[:, :filled],
            position_ids=positions,
            use_cache=True,
            **cache_arg(model, cache),
            **last,
        ).logits[:, -1]
        last = {"logits_to_keep": 1} if last else {}
        chosen = next_tokens(logits, sampling, generator).to(device)
        chosen = torch.where(done, torch.full_like(chosen, pad_id), chosen)
        tokens[rows, step] = chosen
        ended = (chosen == eos_id) & ~done
        if bool(ended.any()):
            lengths[rows[ended]] = step + 1
            done |= ended
            finished = int(done.sum())
            if finished == done.numel():
                break
            if finished >= _COMPACT_SHARE * done.numel():
                left = (~done).nonzero().flatten()
                cache.batch_select_indices(left)
                rows, chosen, done = rows[left], chosen[left], done[left]
                positions, mask = positions[left], mask[left]
        step_ids = chosen[:, None]
        positions = positions[:, -1:] + 1
        filled += 1
    return [row[:n] for row, n in zip(tokens.tolist(), lengths.tolist(), strict=True)]
