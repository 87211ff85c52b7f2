"""D²SD's proposer (``models/d2sd.py``): drafter 1's block plus re-anchored branches at the likeliest rejection points."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from infer.proposers.base import serves
from infer.tree import DraftTree
from models.dflash import BlockContext
from models.sampling import Sampling


@serves(
    "d2sd",
    settings=("branches", "branch_drafter", "confidence", "acceptance", "branch_depth", "anchor"),
)
class D2SDProposer:
    """D²SD (``models/d2sd.py``): drafter 1 drafts a block with per-slot confidences c; the
    rejection posterior r(i) = prod_{k <= i} c_k * (1 - c_{i+1}) (the chance that slots 1..i are
    accepted and slot i + 1 is not) ranks the branch points; the top K become branches that keep
    drafter 1's first i tokens and re-draft the rest, all in one batched VP-drafter forward. The
    main draft and the branches form one prefix tree: the shared prefixes appear once, so it
    has n + sum_i (B2 - 1 - i) nodes, never (K + 1) * B2 (with ``num_draft`` below B - 1,
    branches stop at that depth too).

    A branch exists for the case "slot i + 1 rejected", so its first token (the alternative)
    excludes drafter 1's token there (a rejected token cannot be accepted by the branch either;
    this also keeps every branch's subtree disjoint from the main chain's), and its tail is
    drafted *given the alternative*: the VP drafter sees it as the last token of the branch's
    visible prefix (``anchor``), so no tail continues the token its branch rules out.

    Settings (each one ``infer.eval`` flag; the paper's ablations):
    - ``branches``: K (-1: the drafter's ``num_branches``; 0: drafter 1 alone);
    - ``branch_drafter``: ``vp`` (the VP drafter) or ``naive`` (the alternatives re-sampled from
      drafter 1's own slots, the tail drafter 1's later slots);
    - ``anchor``: where a VP branch's alternative comes from: ``drafter1`` (drafter 1's
      distribution at the slot, drafter 1's token removed; one VP forward for all tails),
      ``vp`` (a first VP forward without it, a second for the tails), or ``none`` (one VP forward
      without it, alternative and tail from it: the tail was drafted around the VP drafter's own
      choice at the slot, which may be the excluded token);
    - ``confidence``: ``head`` (the trained, calibrated head, its output for the acceptance
      rule in use), ``softmax`` (the paper's: the draft distribution's probability of the
      drafted token), or ``auto`` (what training measured ranks rejections better on held-out
      cycle roots, the drafter's ``confidence``; the head when it has none);
    - ``acceptance``: ``rejection`` (at T > 0 every node is drawn from a distribution it carries,
      verified by recursive rejection sampling) or ``matching`` (argmax drafts, the target's
      sample matched against the children: the paper's sample-matching).

    At T = 0 it records, per cycle, both confidences and which of drafter 1's tokens the target
    would accept (``calibration``), for the report's calibration figures.
    """

    def __init__(
        self, drafter, num_draft: int, sampling: Sampling | None = None, generator=None,
        branches: int = -1, branch_drafter: str = "vp", confidence: str = "auto",
        acceptance: str = "rejection", branch_depth: int = 0, anchor: str = "drafter1",
    ):  # fmt: skip
        for name, value, valid in (
            ("branch_drafter", branch_drafter, ("vp", "naive")),
            ("confidence", confidence, ("auto", "head", "softmax")),
            ("acceptance", acceptance, ("rejection", "matching")),
            ("anchor", anchor, ("drafter1", "vp", "none")),
        ):
            if value not in valid:
                raise ValueError(f"{name}={value}: valid choices are {', '.join(valid)}")
        self.drafter, self.sampling = drafter, sampling or Sampling()
        self.first, self.vp = drafter.first, drafter.vp
        self.num_draft = min(num_draft, self.first.block_size - 1)
        # tree depth: the VP block's when drafter 1 drafts its whole block, else num_draft
        full = self.num_draft == self.first.block_size - 1
        self.depth = max(self.vp.block_size - 1, self.num_draft) if full else self.num_draft
        if branch_depth:  # B2 - 1 chosen smaller than the VP block allows
            self.depth = max(self.num_draft, min(self.depth, branch_depth))
        self.branches = drafter.config["num_branches"] if branches < 0 else branches
        if confidence == "auto":
            confidence = drafter.config.get("confidence", "head")
        self.branch_drafter, self.confidence, self.acceptance, self.anchor = (
            branch_drafter, confidence, acceptance, anchor,
        )  # fmt: skip
        # the head's output for the rule verification uses (T = 0: greedy hits)
        self.rule = "greedy" if self.sampling.greedy else "sampled"
        self.generator = generator or torch.Generator().manual_seed(0)
        self.target_layers = drafter.target_layers()
        self.calibration: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.begin(None)

    def begin(self, target) -> None:
        if target is not None:
            self.drafter.attach_target(target)
        self.states, self.pending, self.last = (BlockContext(), BlockContext()), [], None

    def observe(self, features: torch.Tensor) -> None:
        self.pending.append(features)

    @property
    def sampled(self) -> bool:
        """Whether drafts are drawn from the draft distributions (kept for verification)."""
        return not self.sampling.greedy and self.acceptance == "rejection"

    def _pick(self, logits: torch.Tensor, exclude: int | None = None):
        """One token from (V,) logits: argmax, or a draw from the processed distribution;
        ``exclude`` is removed first. Returns (token, its distribution or None), or None when
        nothing is left."""
        if not self.sampled:
            if exclude is not None:
                logits = logits.clone()
                logits[exclude] = float("-inf")
            return int(logits.argmax()), None
        q = self.sampling.probs(logits)
        if exclude is not None:
            q = q.clone()
            q[exclude] = 0.0
            if q.sum() <= 0:
                return None
            q = q / q.sum()
        return int(torch.multinomial(q, 1, generator=self.generator)), q

    def branch_points(self, c: torch.Tensor, n: int) -> list[int]:
        """The top-K rejection points i (branch keeps slots 1..i), sorted. i = n (all accepted)
        is a candidate when the VP block reaches past drafter 1's draft. A VP branch shows the
        VP drafter i tokens (+ the alternative when re-anchored): within the prefix lengths it
        was trained on."""
        if self.branch_drafter == "vp":
            low, high = self.vp.config["prefix_min"], self.vp.config["prefix_max"]

            # a branch at i < n shows the VP drafter i tokens (``none``, and ``vp``'s first
            # pass), then i + 1 with the alternative for its tail (``drafter1``, ``vp``): no
            # tail when the alternative is at the tree's last depth; i = n shows n tokens
            def fits(i: int) -> bool:
                if self.anchor == "none":
                    return low <= i <= high
                tail = i + 1 < self.depth
                first = low <= i <= high if self.anchor == "vp" else True
                return first and (not tail or low <= i + 1 <= high)

            candidates = [i for i in range(n) if fits(i)]
            if self.depth > n and low <= n <= high:
                candidates = [*candidates, n]
        else:
            candidates = range(0, n)
        scores = {}
        for i in candidates:
            kept = float(torch.prod(c[:i])) if i else 1.0
            scores[i] = kept * (1.0 - float(c[i])) if i < n else kept
        ranked = sorted(scores, key=lambda i: -scores[i])
        return sorted(ranked[: self.branches])

    def propose(self, context: list[int]) -> DraftTree:
        start, root = len(context) - 1, context[-1]
        new = torch.cat(self.pending) if self.pending else self._no_features()
        self.pending = []
        logits, z = self.first.draft_with_confidence(root, start, new, self.states[0])
        n = self.num_draft
        logits, z = logits[:n], z[:n]
        picks = [self._pick(row) for row in logits]
        main = [token for token, _ in picks]
        soft = (
            F.softmax(logits.float(), -1) if self.sampling.greedy else self.sampling.probs(logits)
        )
        soft = soft.gather(-1, torch.tensor(main, device=soft.device)[:, None])[:, 0].cpu()
        head = self.first.confidence.confidence(z, self.rule).cpu()
        self.last = (main, head, soft)
        points = self.branch_points(head if self.confidence == "head" else soft, n)
        tokens, parents, probs = list(main), list(range(-1, n - 1)), [q for _, q in picks]
        for i, branch in self._branches(root, start, new, logits, main, points):
            parent = i - 1
            for token, q in branch:
                tokens.append(token)
                parents.append(parent)
                probs.append(q)
                parent = len(tokens) - 1
        draft_probs = torch.stack(probs) if self.sampled and probs else None
        return DraftTree(
            torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long),
            draft_probs,
        )  # fmt: skip

    def _branches(self, root, start, new, logits, main, points):
        """(i, [(token, q), ...]) per branch point i: the alternative at slot i + 1 (drafter
        1's token excluded; none for i = n) and the tail after it, up to the tree's depth."""
        n = len(main)
        if self.branch_drafter == "naive" or not self.branches:
            if self.branch_drafter == "vp":  # keep the VP drafter's context in step
                self.vp.feed(start, new, self.states[1])
            for i in points:
                first = self._pick(logits[i], main[i])
                if first is not None:
                    yield i, [first, *(self._pick(row) for row in logits[i + 1 : self.depth])]
            return
        if not points:
            self.vp.feed(start, new, self.states[1])
            return
        alternatives: dict[int, tuple | None] = {}
        if self.anchor == "drafter1":
            alternatives = {i: self._pick(logits[i], main[i]) for i in points if i < n}
        elif self.anchor == "vp":  # a first VP pass over the kept prefixes picks them
            first = self.vp.draft_branches(root, [main[:i] for i in points], start, new,
                                           self.states[1])  # fmt: skip
            new = self._no_features()  # the context is fed
            alternatives = {i: self._pick(first[j, i], main[i])
                            for j, i in enumerate(points) if i < n}  # fmt: skip
        specs = []  # (i, visible prefix, the branch's nodes so far)
        for i in points:
            if self.anchor != "none" and i < n:
                if alternatives[i] is None:
                    continue
                specs.append((i, [*main[:i], alternatives[i][0]], [alternatives[i]]))
            else:
                specs.append((i, main[:i], []))
        tails = [spec for spec in specs if len(spec[1]) < self.depth]
        if tails:
            redrafted = self.vp.draft_branches(root, [p for _, p, _ in tails], start, new,
                                               self.states[1])  # fmt: skip
            rows = {i: redrafted[j] for j, (i, _, _) in enumerate(tails)}
        else:
            self.vp.feed(start, new, self.states[1])
            rows = {}
        for i, shown, nodes in specs:
            if i in rows:
                slot_rows = rows[i][len(shown) : self.depth]  # row s - 1 drafts slot s
                if not nodes and i < n:  # ``none``: the alternative from the same forward
                    first = self._pick(slot_rows[0], main[i])
                    if first is None:
                        continue
                    nodes, slot_rows = [first], slot_rows[1:]
                nodes = [*nodes, *(self._pick(row) for row in slot_rows)]
            if nodes:
                yield i, nodes

    def verified(self, tree: DraftTree, target_logits: torch.Tensor, path: list[int]) -> None:
        """At T = 0: record which of drafter 1's tokens the target's argmax agrees with (row 0
        predicts slot 1, row k the slot after main node k - 1), with both confidences."""
        if self.last is None or not self.sampling.greedy:
            return
        main, head, soft = self.last
        n = len(main)
        hits = target_logits[:n].argmax(-1).cpu() == torch.tensor(main)
        self.calibration.append((head, soft, hits.float()))
        self.last = None

    def _no_features(self) -> torch.Tensor:
        width = self.first.fc.in_features
        return torch.zeros(0, width, device=self.first.fc.weight.device)
