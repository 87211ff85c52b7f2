"""Constant-size drafter attention for long prompts (LongSpec, after StreamingLLM's attention
sinks; LongGen, "A Little Goes a Long Way", trains the same sink + window pattern).

A drafter with ``attention_window=W`` and ``attention_sinks=S`` (W > 0) reads, for a query whose
window ends before position r (a block anchored at r; a draft-LM token at r - 1), only

    the first S context positions (the sinks)  and  the last W positions before r,

so its KV cache holds S + W entries whatever the prompt's length, and its cost per cycle stops
growing with the context. Training uses the same visibility in its masks, so the drafter never
learns to rely on what inference drops.

Position indices (LongSpec's anchor-offset indices): inference uses the true positions, which on
a long prompt lie far beyond any position of the short training texts. With RoPE, attention
depends on relative distance; inside the window that distance is at most W whatever the context
length, but the sinks sit at 0 .. S - 1, as far from the query as the prompt is long. So training
keeps the sinks at 0 .. S - 1 and shifts every other position of a sequence by one random offset
drawn from 0 .. max_positions - length: the drafter sees sink distances of every size the target
allows, and inference needs no remapping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Window:
    size: int = 0  # W: the last W context positions (0: the whole context, no window)
    sinks: int = 0  # S: the first S positions, always visible

    @classmethod
    def of(cls, config: dict) -> Window:
        """From a drafter config (``attention_window``, ``attention_sinks``; absent: none)."""
        return cls(config.get("attention_window", 0), config.get("attention_sinks", 0))

    @property
    def active(self) -> bool:
        return self.size > 0

    def visible(self, keys: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        """bool, broadcast: context position ``keys`` is visible to a query whose window ends
        before ``end`` (callers also apply causality, ``keys < end``)."""
        if not self.active:
            return torch.ones_like(keys < end)
        return (keys < self.sinks) | (keys >= end - self.size)

    def trim(self, kv: list, slack: int = 0) -> list:
        """Per layer (k, v) of contiguous positions 0 .. n - 1 (or already trimmed) -> the first
        S and last W + ``slack`` entries along dim -2."""
        if not self.active or not kv:
            return kv
        keep = self.sinks + self.size + slack
        if kv[0][0].shape[-2] <= keep:
            return kv
        tail = self.size + slack
        return [
            (torch.cat([k[..., : self.sinks, :], k[..., -tail:, :]], -2),
             torch.cat([v[..., : self.sinks, :], v[..., -tail:, :]], -2))
            for k, v in kv
        ]  # fmt: skip

    def offsets(self, rows: int, length: int, max_positions: int, device=None) -> torch.Tensor:
        """(rows,) random anchor offsets for training sequences of ``length`` positions, from
        torch's global generator (0 when no window, or when the target allows no more)."""
        high = max(0, max_positions - length) if self.active else 0
        return torch.randint(0, high + 1, (rows,), device=device)

    def shift(self, positions: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Anchor-offset indices: ``positions`` (b, ...) + ``offset`` (b,), sinks unshifted."""
        if not self.active:
            return positions
        shifted = positions + offset.view(-1, *([1] * (positions.dim() - 1)))
        return torch.where(positions < self.sinks, positions, shifted)
