"""Draft heads' proposer (``models/heads.py``: Medusa, Hydra): a static tree of rank paths."""

from __future__ import annotations

import torch

from infer.proposers.base import serves
from infer.tree import DraftTree
from models.sampling import Sampling


def rank_tree(depth: int, nodes: int, first: float = 0.6, ratio: float = 0.4) -> list[tuple]:
    """A static candidate tree as rank paths (Medusa's ``medusa_choices``): the ``nodes`` paths
    (r_1, .., r_d), d <= ``depth``, of highest prior acceptance prod_d first * ratio^r_d, grown
    best-first so that every path's parent is in the tree; ordered by length, then score."""
    import heapq

    chosen, frontier = [], [(-first, (0,))]
    while frontier and len(chosen) < nodes:
        neg, path = heapq.heappop(frontier)
        chosen.append((neg, path))
        heapq.heappush(frontier, (neg * ratio, (*path[:-1], path[-1] + 1)))  # next sibling
        if len(path) < depth:
            heapq.heappush(frontier, (neg * first, (*path, 0)))  # first child
    return [p for _, p in sorted(chosen, key=lambda c: (len(c[1]), c[0]))]


@serves("medusa", "hydra", settings=("tree_nodes",))
class HeadProposer:
    """Medusa / Hydra heads on the target's final hidden state, verified as a static tree of
    rank paths (``rank_tree``; ``drafter.tree_nodes`` nodes).

    The loop hands over the committed tokens' final hidden states; the last one, h_t, belongs
    to the token before the root (the root is token t + 1), so head i proposes depth i + 1.
    Medusa's heads read h_t only, so one forward gives every depth's top candidates. Hydra's
    head d also reads the embeddings of the root and of the path above the node, so the tree is
    grown depth by depth, one batched head call per depth. Hydra++ first runs the committed
    hidden states through its prefix layer (its own KV cache holds committed positions only).

    Candidates are chosen deterministically (top ranks), so sampling verifies them by token
    matching, which is lossless for any candidate set.
    """

    def __init__(
        self, drafter, num_draft: int, sampling: Sampling | None = None, generator=None,
        tree_nodes: int = 0,
    ):  # fmt: skip
        self.drafter = drafter
        depth = min(num_draft, drafter.config["num_heads"])
        self.paths = rank_tree(depth, tree_nodes or drafter.config["tree_nodes"])
        self.target_layers = drafter.target_layers()
        self.begin(None)

    def begin(self, target) -> None:
        if target is not None:
            self.drafter.attach_target(target)
        self.last, self.prefix_kv, self.length = None, None, 0
        self.kept: list[int] = []  # positions held in hydra++'s prefix cache

    @torch.no_grad()
    def observe(self, features: torch.Tensor) -> None:
        """(n, H) final hidden states of the next n committed positions."""
        if not features.shape[0]:
            return
        hidden = features.to(self.drafter.lm_heads[0].weight)[None]
        if getattr(self.drafter, "prefix", None) is not None:  # hydra++
            new = torch.arange(self.length, self.length + hidden.shape[1], device=hidden.device)
            keys = torch.cat([torch.tensor(self.kept, dtype=torch.long, device=new.device), new])
            hidden, own = self.drafter.prefix_states(
                hidden, new[None], self.prefix_kv, self.drafter.window_mask(keys, new)
            )
            past = self.prefix_kv
            self.prefix_kv = (
                [own]
                if past is None
                else [(torch.cat([past[0][0], own[0]], 2), torch.cat([past[0][1], own[1]], 2))]
            )
            # committed positions only (never rolled back): a window keeps sinks + the last W
            window = self.drafter.window
            self.kept += new.tolist()
            if window.active and len(self.kept) > window.sinks + window.size:
                self.kept = self.kept[: window.sinks] + self.kept[-window.size :]
                self.prefix_kv = window.trim(self.prefix_kv)
        self.length += features.shape[0]
        self.last = hidden[0, -1]

    @torch.no_grad()
    def propose(self, context: list[int]) -> DraftTree:
        if self.last is None:  # a one-token prompt: no hidden state yet
            return DraftTree.empty()
        width = 1 + max(r for path in self.paths for r in path)
        if self.drafter.drafter_type == "medusa":
            ranked = self.drafter.head_logits(self.last).topk(width, -1).indices.tolist()
            return DraftTree.trie([[ranked[d][r] for d, r in enumerate(p)] for p in self.paths])
        return self._grow_hydra(context[-1], width)

    def _grow_hydra(self, root: int, width: int) -> DraftTree:
        tokens: dict[tuple, int] = {}  # rank path -> token
        depth = max(len(p) for p in self.paths)
        device = self.last.device
        for d in range(depth):
            parents = sorted({p[:d] for p in self.paths if len(p) == d + 1})
            ids = torch.tensor(
                [[root, *(tokens[parent[: j + 1]] for j in range(d))] for parent in parents],
                device=device,
            )  # (n, d + 1): root and the path above
            base = self.last.expand(len(parents), -1)
            ranked = self.drafter.head(d, base, self.drafter.embed(ids)).topk(width, -1).indices
            row = {parent: i for i, parent in enumerate(parents)}
            for p in self.paths:
                if len(p) == d + 1:
                    tokens[p] = int(ranked[row[p[:d]], p[d]])
        return DraftTree.trie([[tokens[p[: j + 1]] for j in range(len(p))] for p in self.paths])
