"""EAGLE-3's proposer (``models/eagle3.py``): a chain drafted step by step from the fused target
features, each step fed its own previous output."""

from __future__ import annotations

import torch

from infer.proposers.base import serves
from infer.tree import DraftTree
from models.sampling import Sampling


@serves("eagle3")
class Eagle3Proposer:
    """The loop hands over the committed tokens' taps. With t the last committed position (the
    root is token t + 1), the drafter's cache holds step 0 of positions 0 .. t, each fed its next
    token (position t: the root), extended each cycle by the newly committed positions; the
    chain's own keys live for one cycle. Greedy drafting takes each step's argmax over the draft
    vocabulary; otherwise a token is drawn from the processed draft distribution q (over the
    target's vocabulary, 0 outside the draft vocabulary) and q is kept for lossless
    verification."""

    def __init__(self, drafter, num_draft: int, sampling: Sampling | None = None, generator=None):
        self.drafter, self.num_draft = drafter, num_draft
        self.sampling = sampling or Sampling()
        self.generator = generator or torch.Generator().manual_seed(0)
        self.target_layers = drafter.target_layers()
        self.begin(None)

    def begin(self, target) -> None:
        if target is not None:
            self.drafter.attach_target(target)
        self.features, self.cache, self.cached, self.root_out = [], None, 0, None

    def observe(self, features: torch.Tensor) -> None:
        self.features.append(features)

    @torch.no_grad()
    def propose(self, context: list[int]) -> DraftTree:
        feats = torch.cat(self.features) if self.features else None
        if feats is None or not feats.shape[0]:  # a one-token prompt: no features yet
            return DraftTree.empty()
        self.features = [feats]
        t = feats.shape[0] - 1  # the last committed position; context[t + 1] is the root
        if t >= self.cached:
            ids = torch.tensor(context[self.cached + 1 : t + 2])
            self.cache, self.root_out = self.drafter.extend(
                self.cache, ids, feats[self.cached : t + 1], self.cached
            )
            self.cached = t + 1
        probs = []

        def choose(j: int, logits: torch.Tensor) -> int:
            if self.sampling.greedy:
                return int(self.drafter.draft_ids[int(logits.argmax())])
            q = self.sampling.probs(self.drafter.target_logits(logits))
            probs.append(q)
            return int(torch.multinomial(q, 1, generator=self.generator))

        tokens, _ = self.drafter.draft(self.cache, self.root_out, t, self.num_draft, choose)
        return DraftTree.chain(tokens, torch.stack(probs) if probs else None)
