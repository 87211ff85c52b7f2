"""Hidden Transfer's proposer (``models/hidden_transfer.py``): pseudo states through the target's upper layers."""

from __future__ import annotations

import torch

from infer.proposers.base import serves
from infer.proposers.heads import HeadProposer
from infer.tree import DraftTree


@serves("hidden_transfer", settings=("tree_nodes",))
class TransferProposer(HeadProposer):
    """Hidden Transfer (``models/hidden_transfer.py``): k pseudo states at target layer L run
    through the target's upper layers, reading the target's own KV cache (``attach_cache``; its
    first ``len(context) - 1`` entries: the committed positions), and give k ranked candidate
    lists verified as the heads' static tree. The loop hands over the committed tokens'
    layer-L states; the last one is h_t, and the root is token t + 1."""

    def begin(self, target) -> None:
        super().begin(target)
        self.cache = None

    def attach_cache(self, cache) -> None:
        """The target's KV cache (a ``DynamicCache``), read, never written."""
        self.cache = cache

    @torch.no_grad()
    def observe(self, features: torch.Tensor) -> None:
        if features.shape[0]:
            self.length += features.shape[0]
            self.last = features[-1]

    @torch.no_grad()
    def propose(self, context: list[int]) -> DraftTree:
        if self.last is None:
            return DraftTree.empty()
        if self.cache is None:
            raise RuntimeError("hidden_transfer drafts from the target's KV cache: attach_cache")
        n = len(context) - 1  # committed positions 0 .. n - 1; the root is at n
        upper = self.cache.layers[self.drafter.config["transfer_layer"] :]
        past = [(layer.keys[..., :n, :], layer.values[..., :n, :]) for layer in upper]
        width = 1 + max(r for path in self.paths for r in path)
        ranked = self.drafter.draft_logits(self.last, context[-1], past)
        ranked = ranked.topk(width, -1).indices.tolist()
        return DraftTree.trie([[ranked[d][r] for d, r in enumerate(p)] for p in self.paths])
