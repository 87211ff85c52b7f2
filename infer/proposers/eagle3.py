"""EAGLE-3's proposer (``models/eagle3.py``): a chain drafted step by step from the fused target
features, each step fed its own previous output."""

from __future__ import annotations

import torch

from infer.proposers.base import serves
from infer.tree import DraftTree
from models.sampling import Sampling


@serves("eagle3", settings=("tree_budget", "tree_topk"))
class Eagle3Proposer:
    """The loop hands over the committed tokens' taps. With t the last committed position (the
    root is token t + 1), the drafter's cache holds step 0 of positions 0 .. t, each fed its next
    token (position t: the root), extended each cycle by the newly committed positions; the
    chain's own keys live for one cycle. Greedy drafting takes each step's argmax over the draft
    vocabulary; otherwise a token is drawn from the processed draft distribution q (over the
    target's vocabulary, 0 outside the draft vocabulary) and q is kept for lossless
    verification.

    ``tree_budget`` > 0 drafts EAGLE-2's dynamic tree instead: each depth up to ``num_draft``,
    the ``tree_topk`` nodes of the previous depth with the highest cumulative draft
    log-probability are expanded into their ``tree_topk`` best children (one batched step);
    the tree is the ``tree_budget`` nodes of highest cumulative log-probability (a child never
    scores above its parent, so the set holds every chosen node's ancestors). Its candidates are
    deterministic, so sampling verifies them by matching the target's own sample (lossless)."""

    def __init__(
        self, drafter, num_draft: int, sampling: Sampling | None = None, generator=None,
        tree_budget: int = 0, tree_topk: int = 4,
    ):  # fmt: skip
        self.drafter, self.num_draft = drafter, num_draft
        self.budget, self.topk = tree_budget, tree_topk
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
        if self.budget:
            return self._tree(t)
        probs = []

        def choose(j: int, logits: torch.Tensor) -> int:
            if self.sampling.greedy:
                return int(self.drafter.draft_ids[int(logits.argmax())])
            q = self.sampling.probs(self.drafter.target_logits(logits))
            probs.append(q)
            return int(torch.multinomial(q, 1, generator=self.generator))

        tokens, _ = self.drafter.draft(self.cache, self.root_out, t, self.num_draft, choose)
        return DraftTree.chain(tokens, torch.stack(probs) if probs else None)

    def _tree(self, t: int) -> DraftTree:
        drafter, k = self.drafter, self.topk
        ids = drafter.draft_ids
        root_logits = drafter.lm_head(drafter.norm(self.root_out))[0, -1]
        logp, index = torch.log_softmax(root_logits.float(), -1).topk(k)
        # every node: (score, token, parent node or -1); depth-1 nodes first
        nodes = [(float(s), int(ids[i]), -1) for s, i in zip(logp, index, strict=True)]
        frontier = list(range(len(nodes)))
        hidden = self.root_out.expand(len(frontier), -1, -1)
        heads = drafter.midlayer.self_attn
        kv_heads = heads.k_proj.out_features // heads.head_dim
        empty = torch.zeros(len(frontier), kv_heads, 0, heads.head_dim,
                            dtype=drafter.fc.weight.dtype, device=drafter.fc.weight.device)  # fmt: skip
        chain = (empty, empty)
        for depth in range(1, self.num_draft):
            tokens = torch.tensor([nodes[i][1] for i in frontier])
            out, logits, chain = drafter.expand(self.cache, hidden, chain, tokens, t, depth)
            logp, index = torch.log_softmax(logits.float(), -1).topk(k)  # (n, k)
            scores = torch.tensor([nodes[i][0] for i in frontier])[:, None] + logp
            best = scores.flatten().topk(min(k, scores.numel())).indices.tolist()
            children = []
            for flat in sorted(best):
                row, col = divmod(flat, k)
                nodes.append((float(scores[row, col]), int(ids[index[row, col]]), frontier[row]))
                children.append((len(nodes) - 1, row))
            frontier = [node for node, _ in children]
            rows = torch.tensor([row for _, row in children])
            hidden, chain = out[rows], (chain[0][rows], chain[1][rows])
        order = sorted(range(len(nodes)), key=lambda i: (-nodes[i][0], i))[: self.budget]
        keep = sorted(order)  # parents come before children (creation order)
        position = {old: new for new, old in enumerate(keep)}
        tokens = torch.tensor([nodes[i][1] for i in keep], dtype=torch.long)
        parents = torch.tensor([position.get(nodes[i][2], -1) for i in keep], dtype=torch.long)
        return DraftTree(tokens, parents)
