"""Block drafters' proposer (``models/dflash.py``, ``models/deer.py``): one forward drafts a block; chains or best-first trees."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from infer.costs import CostModel, cut
from infer.proposers.base import serves
from infer.tree import DraftTree, best_first, prefix
from models.dflash import BlockContext
from models.sampling import Sampling


@serves("dflash", settings=("tree_budget", "cost_cut"))
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

    ``tree_budget`` > 0 verifies a best-first tree of the slots' most probable paths instead of
    the chain (DDTree, ``infer/tree.best_first``); ``cost_cut`` then cuts it every cycle where
    expected tokens per second peak on the device's cost curve ``costs`` (CaDDTree).
    """

    def __init__(
        self, drafter, num_draft: int, sampling: Sampling | None = None, generator=None,
        tree_budget: int = 0, cost_cut: bool = False, costs: CostModel | None = None,
    ):  # fmt: skip
        self.drafter, self.sampling = drafter, sampling or Sampling()
        self.num_draft = min(num_draft, drafter.block_size - 1)
        self.generator = generator or torch.Generator().manual_seed(0)
        self.target_layers = drafter.target_layers()
        self.state, self.pending = BlockContext(), []
        if cost_cut and not tree_budget:
            raise ValueError("cost_cut=true cuts a best-first tree: set tree_budget too")
        if cost_cut and costs is None:
            raise ValueError(
                "cost_cut=true needs this device's cost curve: run infer.eval CKPT tune=true"
            )
        self.tree_budget, self.costs = tree_budget, costs if cost_cut else None
        self.draft_s = 0.0  # running mean of the draft time per cycle (for the cost cut)

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
        if self.tree_budget:
            return self._best_first(context)
        logits = self._slot_logits(context)  # (num_draft, V)
        if self.sampling.greedy:
            return DraftTree.chain(logits.argmax(-1).tolist())
        draft_probs = self.sampling.probs(logits)
        tokens = torch.multinomial(draft_probs, 1, generator=self.generator)[:, 0]
        return DraftTree.chain(tokens.tolist(), draft_probs)

    def _best_first(self, context: list[int]) -> DraftTree:
        """DDTree: the ``tree_budget`` most probable paths through the slots' distributions
        (deterministic candidates, so sampling verifies them by token matching); with the cost
        cut (CaDDTree), only the first nodes that pay for their verification time."""
        started = time.perf_counter()
        logprobs = F.log_softmax(self._slot_logits(context).float(), -1)
        tree, probs = best_first(logprobs, self.tree_budget)
        if self.costs is None:
            return tree
        self.draft_s = 0.9 * self.draft_s + 0.1 * (time.perf_counter() - started)
        return prefix(tree, cut(probs, self.costs, self.draft_s))
