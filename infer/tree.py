"""Candidate trees: what every proposer returns and the target verifies in one forward.

The tree hangs below a **root**: the last emitted token, which is not yet in the target's KV
cache. Node ``i`` has token ``tokens[i]`` and parent ``parents[i]`` (-1 = the root; otherwise an
earlier node, so nodes are in topological order). A chain is a tree with one child per node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DraftTree:
    """Attributes:
    tokens: (N,) candidate token ids.
    parents: (N,) parent index per node, -1 for children of the root.
    draft_probs: (N, V) the distribution each node was *sampled* from, or None when the
        candidates were chosen deterministically (then sampling verification matches tokens
        against the target's own sample). Siblings drawn i.i.d. share the same row.
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    draft_probs: torch.Tensor | None = None

    def __post_init__(self):
        if self.tokens.shape != self.parents.shape or self.tokens.dim() != 1:
            raise ValueError("tokens and parents must both have shape (N,)")
        for i, parent in enumerate(self.parents.tolist()):
            if not -1 <= parent < i:
                raise ValueError(f"node {i} has parent {parent}: parents must come earlier")

    @classmethod
    def chain(cls, tokens: list[int], draft_probs: torch.Tensor | None = None) -> DraftTree:
        return cls(
            torch.tensor(tokens, dtype=torch.long),
            torch.arange(len(tokens), dtype=torch.long) - 1,
            draft_probs,
        )

    @classmethod
    def empty(cls) -> DraftTree:
        return cls.chain([])

    @classmethod
    def trie(cls, sequences: list[list[int]]) -> DraftTree:
        """Merge candidate continuations into a prefix tree (shared prefixes become one path)."""
        tokens, parents, index = [], [], {}
        for seq in sequences:
            parent = -1
            for tok in seq:
                key = (parent, tok)
                if key not in index:
                    index[key] = len(tokens)
                    tokens.append(tok)
                    parents.append(parent)
                parent = index[key]
        return cls(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))

    def __len__(self) -> int:
        return self.tokens.numel()

    def is_chain(self) -> bool:
        """Whether every node's parent is the node before it (plain causal attention fits)."""
        return bool((self.parents == torch.arange(-1, len(self) - 1)).all())

    def depths(self) -> list[int]:
        """Depth of every node (children of the root have depth 1)."""
        depth: list[int] = []
        for parent in self.parents.tolist():
            depth.append(1 if parent < 0 else depth[parent] + 1)
        return depth

    def children(self, node: int) -> list[int]:
        """Children of ``node`` (-1 = the root), in order."""
        return [i for i, p in enumerate(self.parents.tolist()) if p == node]

    def ancestor_mask(self) -> torch.Tensor:
        """(N + 1, N + 1) bool: row r attends to column c iff c is r or an ancestor of r.

        Index 0 is the root, index ``i + 1`` is node ``i``."""
        n = len(self)
        mask = torch.eye(n + 1, dtype=torch.bool)
        mask[:, 0] = True
        for i, parent in enumerate(self.parents.tolist()):
            mask[i + 1] |= mask[parent + 1]
        return mask


def best_first(logprobs: torch.Tensor, budget: int) -> tuple[DraftTree, list[float]]:
    """The ``budget`` most probable paths of a block drafter's slots as one tree (DDTree).

    ``logprobs`` (D, V) holds each slot's log-probabilities; the slots are drafted
    independently given the context, so a path's probability is the product of its tokens'
    probabilities at their depths. Nodes are grown best-first from a frontier holding, for
    every node in the tree, its best child not yet taken and its next-ranked sibling: a child
    or a sibling is never more probable than the node it comes from, so the nodes come out in
    non-increasing path probability, every prefix of that order is itself a tree (a node's
    parent comes first), and the tree holds the highest-probability paths within the budget.
    Returns the tree (nodes in that order) and each node's path probability."""
    import heapq

    depth = logprobs.shape[0]
    if budget <= 0 or depth == 0:
        return DraftTree.empty(), []
    width = min(budget, logprobs.shape[1])
    values, ranked = logprobs.float().topk(width, dim=-1)
    values, ranked = values.cpu().tolist(), ranked.cpu().tolist()
    tokens, parents, scores = [], [], []
    # (-path logprob, depth index, rank, parent node, parent's path logprob)
    frontier = [(-values[0][0], 0, 0, -1, 0.0)]
    while frontier and len(tokens) < budget:
        neg, d, r, parent, base = heapq.heappop(frontier)
        node = len(tokens)
        tokens.append(ranked[d][r])
        parents.append(parent)
        scores.append(-neg)
        if r + 1 < width:  # the next-ranked sibling under the same parent
            heapq.heappush(frontier, (-(base + values[d][r + 1]), d, r + 1, parent, base))
        if d + 1 < depth:  # the best child
            heapq.heappush(frontier, (-(-neg + values[d + 1][0]), d + 1, 0, node, -neg))
    tree = DraftTree(
        torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long)
    )
    return tree, [math.exp(s) for s in scores]


def prefix(tree: DraftTree, n: int) -> DraftTree:
    """The first ``n`` nodes of ``tree`` (a tree again: parents come before their children)."""
    probs = None if tree.draft_probs is None else tree.draft_probs[:n]
    return DraftTree(tree.tokens[:n], tree.parents[:n], probs)
