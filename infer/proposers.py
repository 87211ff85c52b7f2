"""Proposers: anything that turns the tokens so far into a candidate tree.

A drafter family's module in ``models/`` holds its weights, objective and a tensor-level draft
forward; the family's proposer lives here and is found by drafter type (``proposer_for``), so
``models/`` never needs to know how it is served.

``propose(context)`` gets every token so far (prompt + emitted; the last one is the root) and
returns a ``DraftTree``. Proposers conditioned on the target's hidden states also declare
``target_layers`` and take ``begin(target)`` / ``observe(features)`` from the loop
(``infer/decode.py``). ``candidates(context, width)`` returns several candidate continuations,
which ``StaticTree`` merges into a prefix tree. Proposers keep their own state (e.g. the draft
LM's KV cache) and resynchronise from ``context`` on every call, so rollback needs no extra call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from infer.tree import DraftTree
from infer.verify import crop
from models.dflash import BlockContext
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


class BlockProposer:
    """A block drafter (DFlash, DEER): one drafter forward per cycle drafts the B - 1 masked
    slots of ``[root, MASK x (B - 1)]``, verified as a chain of ``num_draft`` of them.

    Greedy sampling takes each slot's argmax; otherwise each slot is drawn from the drafter's
    processed distribution q (slots are drawn independently given the context, so q is each
    token's exact proposal distribution) and q is kept as ``draft_probs``, which keeps
    verification lossless by rejection sampling.

    The context it conditions on is the drafter's ``BlockContext`` (per-layer K/V of context
    positions only, never of a block). For DFlash it is fed with the target features of the
    committed tokens that the loop hands over (``observe``); for a tokens-only drafter
    (``target_layers`` empty) with the committed tokens themselves, taken from ``context``.
    """

    def __init__(self, drafter, num_draft: int, sampling: Sampling | None = None, generator=None):
        self.drafter, self.sampling = drafter, sampling or Sampling()
        self.num_draft = min(num_draft, drafter.block_size - 1)
        self.generator = generator or torch.Generator().manual_seed(0)
        self.target_layers = drafter.target_layers()
        self.state, self.pending = BlockContext(), []

    def begin(self, target) -> None:
        """A new sequence on ``target``: attach its frozen modules, forget the old context."""
        self.drafter.attach_target(target)
        self.state, self.pending = BlockContext(), []

    def observe(self, features: torch.Tensor) -> None:
        """(n, k*H) target features of the next n committed positions."""
        self.pending.append(features)

    def _slot_logits(self, context: list[int]) -> torch.Tensor:
        start = len(context) - 1  # the root's position
        if self.target_layers:
            new = torch.cat(self.pending) if self.pending else self._no_features()
            self.pending = []
        else:  # tokens-only: feed the committed tokens not yet in the context
            seen = self.state.extra.get("tokens", [])
            if context[: len(seen)] != seen:  # another sequence: start over
                self.state = BlockContext()
            self.state.extra["tokens"] = context[:start]
            new = torch.tensor(context[self.state.length : start], dtype=torch.long)
        return self.drafter.draft_block(context[-1], start, new, self.state)[: self.num_draft]

    def _no_features(self) -> torch.Tensor:
        width = self.drafter.fc.in_features
        return torch.zeros(0, width, device=self.drafter.fc.weight.device)

    def candidates(self, context: list[int], width: int) -> list[list[int]]:
        ranked = self._slot_logits(context).topk(width, dim=-1).indices.tolist()  # (n, width)
        chain = [slot[0] for slot in ranked]
        return [chain] + [chain[:d] + [alt] for d, slot in enumerate(ranked) for alt in slot[1:]]

    def propose(self, context: list[int]) -> DraftTree:
        logits = self._slot_logits(context)  # (num_draft, V)
        if self.sampling.greedy:
            return DraftTree.chain(logits.argmax(-1).tolist())
        draft_probs = self.sampling.probs(logits)
        tokens = torch.multinomial(draft_probs, 1, generator=self.generator)[:, 0]
        return DraftTree.chain(tokens.tolist(), draft_probs)


class StaticTree:
    """Several candidates per position from any proposer with ``candidates``, verified as one
    prefix tree (e.g. the draft LM's greedy chain plus its top-``width`` alternatives at every
    depth, or several prompt-lookup matches). Candidates are deterministic, so sampling verifies
    them by token matching."""

    def __init__(self, proposer, width: int = 2):
        if width < 1:
            raise ValueError(f"tree width {width}: must be >= 1")
        self.proposer, self.width = proposer, width
        self.target_layers = getattr(proposer, "target_layers", None)  # feature proposers

    def begin(self, target) -> None:
        self.proposer.begin(target)

    def observe(self, features: torch.Tensor) -> None:
        self.proposer.observe(features)

    def propose(self, context: list[int]) -> DraftTree:
        return DraftTree.trie(self.proposer.candidates(context, self.width))


# drafter type -> (drafter, num_draft, sampling, generator) -> proposer
FAMILY_PROPOSERS: dict[str, Callable] = {
    "draft_lm": lambda drafter, num_draft, sampling, generator: DraftLMProposer(
        drafter.lm, num_draft, sampling, generator
    ),
    "dflash": BlockProposer,
    "deer": BlockProposer,
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
