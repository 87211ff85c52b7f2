"""Proposers: anything that turns the tokens so far into a candidate tree.

A drafter family's module in ``models/`` holds its weights, objective and a tensor-level draft
forward; the family's proposer lives here and is found by drafter type (``proposer_for``), so
``models/`` never needs to know how it is served.

``propose(context)`` gets every token so far (prompt + emitted; the last one is the root) and
returns a ``DraftTree``. ``candidates(context, width)`` returns several candidate continuations,
which ``StaticTree`` merges into a prefix tree. Proposers keep their own state (e.g. the draft
LM's KV cache) and resynchronise from ``context`` on every call, so rollback needs no extra call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from infer.tree import DraftTree
from infer.verify import crop
from models.sampling import Sampling


class PromptLookup:
    """Prompt-lookup decoding (training-free): find the latest earlier occurrence of the last
    n tokens (n from ``max_ngram`` down to ``min_ngram``) and propose what followed it."""

    def __init__(self, num_draft: int = 8, max_ngram: int = 3, min_ngram: int = 1):
        self.num_draft, self.max_ngram, self.min_ngram = num_draft, max_ngram, min_ngram

    def candidates(self, context: list[int], width: int) -> list[list[int]]:
        found: list[list[int]] = []
        for n in range(min(self.max_ngram, len(context) - 1), self.min_ngram - 1, -1):
            pattern = context[-n:]
            for start in range(len(context) - n - 1, -1, -1):
                if context[start : start + n] == pattern:
                    follow = context[start + n : start + n + self.num_draft]
                    if follow and follow not in found:
                        found.append(follow)
                        if len(found) == width:
                            return found
            if found:
                return found
        return found

    def propose(self, context: list[int]) -> DraftTree:
        found = self.candidates(context, 1)
        return DraftTree.chain(found[0]) if found else DraftTree.empty()


class DraftLMProposer:
    """A small causal LM drafting ``num_draft`` tokens autoregressively with its own KV cache.

    Greedy sampling drafts the argmax chain; otherwise tokens are sampled from the draft's
    processed distribution q (kept as ``draft_probs`` for lossless verification).
    """

    def __init__(self, lm, num_draft: int = 4, sampling: Sampling | None = None, generator=None):
        from transformers import DynamicCache

        self.lm, self.num_draft, self.sampling = lm, num_draft, sampling or Sampling()
        self.generator = generator or torch.Generator().manual_seed(0)
        self.cache = DynamicCache(config=lm.config)
        self.seen: list[int] = []  # tokens whose KV entries are in self.cache

    def _logits_after(self, context: list[int]) -> torch.Tensor:
        """Sync the cache to ``context`` (keeping the common prefix) and return the last logits."""
        common = 0
        for a, b in zip(self.seen, context[:-1], strict=False):
            if a != b:
                break
            common += 1
        crop(self.cache, common)
        self.seen = context[:common]
        return self._feed(context[common:])

    @torch.no_grad()
    def _feed(self, tokens: list[int]) -> torch.Tensor:
        ids = torch.tensor([tokens], device=self.lm.device)
        out = self.lm(input_ids=ids, past_key_values=self.cache, use_cache=True)
        self.seen = self.seen + tokens
        return out.logits[0, -1].float()

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


class StaticTree:
    """Several candidates per position from any proposer with ``candidates``, verified as one
    prefix tree (e.g. the draft LM's greedy chain plus its top-``width`` alternatives at every
    depth, or several prompt-lookup matches). Candidates are deterministic, so sampling verifies
    them by token matching."""

    def __init__(self, proposer, width: int = 2):
        if width < 1:
            raise ValueError(f"tree width {width}: must be >= 1")
        self.proposer, self.width = proposer, width

    def propose(self, context: list[int]) -> DraftTree:
        return DraftTree.trie(self.proposer.candidates(context, self.width))


# drafter type -> (drafter, num_draft, sampling, generator) -> proposer
FAMILY_PROPOSERS: dict[str, Callable] = {
    "draft_lm": lambda drafter, num_draft, sampling, generator: DraftLMProposer(
        drafter.lm, num_draft, sampling, generator
    ),
}


def proposer_for(drafter, num_draft: int, sampling: Sampling, generator=None):
    """The proposer serving a trained drafter (``num_draft`` 0: the drafter's own default)."""
    build = FAMILY_PROPOSERS.get(drafter.drafter_type)
    if build is None:
        raise ValueError(
            f"drafter type '{drafter.drafter_type}' has no proposer in infer/ yet "
            f"(served types: {', '.join(sorted(FAMILY_PROPOSERS))})"
        )
    return build(drafter, num_draft or drafter.config["num_draft"], sampling, generator)
