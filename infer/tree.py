"""Candidate trees: what every proposer returns and the target verifies in one forward.

The tree hangs below a **root**: the last emitted token, which is not yet in the target's KV
cache. Node ``i`` has token ``tokens[i]`` and parent ``parents[i]`` (-1 = the root; otherwise an
earlier node, so nodes are in topological order). A chain is a tree with one child per node.
"""

from __future__ import annotations

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
