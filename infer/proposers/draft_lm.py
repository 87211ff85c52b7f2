"""The draft LM's proposer (``models/draft_lm.py``): autoregressive drafting with its own KV cache."""

from __future__ import annotations

import torch

from infer.proposers.base import serves
from infer.tree import DraftTree
from infer.verify import crop
from models.sampling import Sampling
from models.target import cache_arg
from models.window import Window


class DraftLMProposer:
    """A small causal LM drafting ``num_draft`` tokens autoregressively with its own KV cache.

    Greedy sampling drafts the argmax chain; otherwise tokens are sampled from the draft's
    processed distribution q (kept as ``draft_probs`` for lossless verification).

    With an active ``window`` (``models/window.py``) each token attends to the first S and the
    last W positions only, at its true position; the cache keeps the sinks and the last
    W + ``num_draft`` entries (the slack lets a rejected draft roll back without losing a
    window entry), so it stays one size however long the prompt.
    """

    def __init__(
        self, lm, num_draft: int = 4, sampling: Sampling | None = None, generator=None,
        window: Window | None = None,
    ):  # fmt: skip
        from transformers import DynamicCache

        self.lm, self.num_draft, self.sampling = lm, num_draft, sampling or Sampling()
        self.generator = generator or torch.Generator().manual_seed(0)
        self.window = window or Window()
        self.cache = DynamicCache(config=lm.config)
        self.seen: list[int] = []  # tokens fed so far, in position order
        self.kept: list[int] = []  # positions whose KV entries the cache holds, in cache order

    def _logits_after(self, context: list[int]) -> torch.Tensor:
        """Sync the cache to ``context`` (keeping the common prefix) and return the last logits."""
        common = 0
        for a, b in zip(self.seen, context[:-1], strict=False):
            if a != b:
                break
            common += 1
        if self.window.active and common < len(self.seen):
            window_start = max(self.window.sinks, common - self.window.size)
            if window_start < common and window_start not in self.kept:
                common = 0  # rolled back past the kept entries: start again
        kept = sum(1 for q in self.kept if q < common)
        crop(self.cache, kept)
        self.seen, self.kept = context[:common], self.kept[:kept]
        return self._feed(context[common:])

    @torch.no_grad()
    def _feed(self, tokens: list[int]) -> torch.Tensor:
        device = self.lm.device
        ids = torch.tensor([tokens], device=device)
        start = len(self.seen)
        new = list(range(start, start + len(tokens)))
        extra = {}
        if self.window.active:
            keys = torch.tensor(self.kept + new, device=device)[None, :]
            queries = torch.tensor(new, device=device)[:, None]
            sees = (keys <= queries) & self.window.visible(keys, queries + 1)
            extra = {"attention_mask": sees[None, None], "position_ids": queries.T}
        out = self.lm(
            input_ids=ids,
            **cache_arg(self.lm, self.cache),
            use_cache=True,
            logits_to_keep=1,
            **extra,
        )
        self.seen, self.kept = self.seen + tokens, self.kept + new
        if self.window.active:
            self._trim()
        return out.logits[0, -1].float()

    def _trim(self) -> None:
        """Keep the sinks and the last W + num_draft entries."""
        window = self.window
        keep = window.sinks + window.size + self.num_draft
        if len(self.kept) <= keep:
            return
        tail = window.size + self.num_draft
        index = [*range(window.sinks), *range(len(self.kept) - tail, len(self.kept))]
        self.kept = [self.kept[i] for i in index]
        for layer in self.cache.layers:
            select = torch.tensor(index, device=layer.keys.device)
            layer.keys = layer.keys.index_select(-2, select)
            layer.values = layer.values.index_select(-2, select)

    def _draft(self, context: list[int], width: int):
        logits = self._logits_after(context)
        chain, probs, alternatives = [], [], []
        for depth in range(self.num_draft):
            if self.sampling.greedy or width > 1:
                ranked = logits.topk(width).indices.tolist()
                token, others = ranked[0], ranked[1:]
            else:
                q = self.sampling.probs(logits)
                token, others = int(torch.multinomial(q, 1, generator=self.generator)), []
                probs.append(q)
            chain.append(token)
            alternatives.append(others)
            if depth + 1 < self.num_draft:
                logits = self._feed([token])
        return chain, probs, alternatives

    def candidates(self, context: list[int], width: int) -> list[list[int]]:
        chain, _, alternatives = self._draft(context, width)
        return [chain] + [chain[:d] + [alt] for d, alts in enumerate(alternatives) for alt in alts]

    def propose(self, context: list[int]) -> DraftTree:
        chain, probs, _ = self._draft(context, 1)
        return DraftTree.chain(chain, torch.stack(probs) if probs else None)


@serves("draft_lm")
def draft_lm_proposer(drafter, num_draft: int, sampling: Sampling, generator=None):
    """The draft LM's proposer from its drafter (the causal LM and its attention window)."""
    return DraftLMProposer(drafter.lm, num_draft, sampling, generator, Window.of(drafter.config))
