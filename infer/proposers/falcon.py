"""Falcon's proposer (``models/falcon.py``): semi-autoregressive passes of k tokens."""

from __future__ import annotations

import torch

from infer.proposers.base import serves
from infer.tree import DraftTree
from models.sampling import Sampling


@serves("falcon", settings=("falcon_width",))
class FalconProposer:
    """Falcon (``models/falcon.py``): semi-autoregressive passes of k tokens each.

    The loop hands over the committed tokens' final hidden states. With t the last committed
    position (the root is token t + 1), the first pass runs the block of the last k committed
    positions (inputs: their next tokens and true features) over the draft cache of the earlier
    ones, giving tokens t + 2 .. t + k + 1; every further pass runs the k positions just drafted
    (drafted tokens and predicted features), so ``passes`` passes draft passes * k tokens on
    the main path. The draft cache holds committed positions only (every position before the
    current block, exact for a one-layer drafter) and grows each cycle (a windowed drafter's
    keeps the sinks and the last W, and each pass sees those before its own block); the drafted
    blocks' entries live for one cycle.

    The tree: the main path plus, at the first slot of every pass, the next ``tree_width - 1``
    ranked tokens, each followed by the rest of that pass's tokens (a pass drafts its k tokens
    jointly, so they do not depend on the first one's choice). Candidates are deterministic, so
    sampling verifies them by token matching (lossless).
    """

    def __init__(
        self, drafter, num_draft: int, sampling: Sampling | None = None, generator=None,
        falcon_width: int = 0,
    ):  # fmt: skip
        self.drafter, self.k = drafter, drafter.k
        self.passes = max(1, -(-num_draft // drafter.k))  # ceil: passes of k tokens
        self.width = falcon_width or drafter.config["tree_width"]
        self.target_layers = drafter.target_layers()
        self.begin(None)

    def begin(self, target) -> None:
        if target is not None:
            self.drafter.attach_target(target)
        self.features, self.cache, self.cached = [], None, 0
        self.kept: list[int] = []  # positions in the draft cache (a window keeps sinks + last W)

    def observe(self, features: torch.Tensor) -> None:
        self.features.append(features)

    def _kv_cat(self, a, b):
        if a is None:
            return b
        return [
            (torch.cat([k0, k1], 2), torch.cat([v0, v1], 2))
            for (k0, v0), (k1, v1) in zip(a, b, strict=True)
        ]

    @torch.no_grad()
    def propose(self, context: list[int]) -> DraftTree:
        drafter = self.drafter
        feats = torch.cat(self.features) if self.features else None
        if feats is None or not feats.shape[0]:  # a one-token prompt: no features yet
            return DraftTree.empty()
        self.features = [feats]
        device = drafter.norm.weight.device
        feats = feats.to(device)
        t = feats.shape[0] - 1  # the last committed position; context[t + 1] is the root
        start = max(0, t - self.k + 1)  # the current block: start .. t
        ids = torch.tensor(context, device=device)
        if start > self.cached:  # committed positions before the block join the draft cache
            span = torch.arange(self.cached, start, device=device)[None]
            new = drafter.context_kv(ids[span + 1], feats[span], span)
            self.cache, self.cached = self._kv_cat(self.cache, new), start
            self.kept += span[0].tolist()
            window = drafter.window  # blocks only move forward: older entries are never seen
            if window.active and len(self.kept) > window.sinks + window.size:
                self.kept = self.kept[: window.sinks] + self.kept[-window.size :]
                self.cache = window.trim(self.cache)
        span = torch.arange(start, t + 1, device=device)[None]
        past, main, alternatives = self.cache, [], []
        past_positions = torch.tensor(self.kept, dtype=torch.long, device=device)
        next_ids, block_feats = ids[span + 1], feats[span]
        for _ in range(self.passes):
            mask = drafter.pass_mask(past_positions, span[0])
            predicted, logits, own = drafter.draft_block(next_ids, block_feats, span, past, mask)
            past_positions = torch.cat([past_positions, span[0]])
            ranked = logits[0].topk(self.width, -1).indices  # (n, width)
            alternatives.append((len(main), ranked[0, 1:].tolist()))
            main += ranked[:, 0].tolist()
            past = self._kv_cat(past, own) if past is not None else own
            span = span[:, -1:] + 1 + torch.arange(self.k, device=device)[None]
            next_ids = ranked[-self.k :, 0][None]
            block_feats = predicted[:, -self.k :]
            if next_ids.shape[1] < self.k:  # a first block shorter than k (a short prompt)
                span = span[:, : next_ids.shape[1]]
        end = {at: at + self.k for at, _ in alternatives}
        sequences = [main] + [
            main[:at] + [alt] + main[at + 1 : end[at]] for at, alts in alternatives for alt in alts
        ]
        return DraftTree.trie(sequences)
