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

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from infer.costs import CostModel, cut
from infer.tree import DraftTree, best_first, prefix
from infer.verify import crop
from models.dflash import BlockContext
from models.sampling import Sampling
from models.target import cache_arg
from models.window import Window


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

    With an active ``window`` (``models/window.py``) each token attends to the first S and the
    last W positions only, at its true position; the cache keeps the sinks and the last
    W + ``num_draft`` entries (the slack lets a rejected draft roll back without losing a
    window entry), so it stays one size however long the prompt.
    """

    def __init__(
        self, lm, num_draft: int = 4, sampling: Sampling | None = None, generator=None,
        window: Window | None = None,
    ):  # fmt: skip
        from transformers import DynamicCache

        self.lm, self.num_draft, self.sampling = lm, num_draft, sampling or Sampling()
        self.generator = generator or torch.Generator().manual_seed(0)
        self.window = window or Window()
        self.cache = DynamicCache(config=lm.config)
        self.seen: list[int] = []  # tokens fed so far, in position order
        self.kept: list[int] = []  # positions whose KV entries the cache holds, in cache order

    def _logits_after(self, context: list[int]) -> torch.Tensor:
        """Sync the cache to ``context`` (keeping the common prefix) and return the last logits."""
        common = 0
        for a, b in zip(self.seen, context[:-1], strict=False):
            if a != b:
                break
            common += 1
        if self.window.active and common < len(self.seen):
            window_start = max(self.window.sinks, common - self.window.size)
            if window_start < common and window_start not in self.kept:
                common = 0  # rolled back past the kept entries: start again
        kept = sum(1 for q in self.kept if q < common)
        crop(self.cache, kept)
        self.seen, self.kept = context[:common], self.kept[:kept]
        return self._feed(context[common:])

    @torch.no_grad()
    def _feed(self, tokens: list[int]) -> torch.Tensor:
        device = self.lm.device
        ids = torch.tensor([tokens], device=device)
        start = len(self.seen)
        new = list(range(start, start + len(tokens)))
        extra = {}
        if self.window.active:
            keys = torch.tensor(self.kept + new, device=device)[None, :]
            queries = torch.tensor(new, device=device)[:, None]
            sees = (keys <= queries) & self.window.visible(keys, queries + 1)
            extra = {"attention_mask": sees[None, None], "position_ids": queries.T}
        out = self.lm(
            input_ids=ids,
            **cache_arg(self.lm, self.cache),
            use_cache=True,
            logits_to_keep=1,
            **extra,
        )
        self.seen, self.kept = self.seen + tokens, self.kept + new
        if self.window.active:
            self._trim()
        return out.logits[0, -1].float()

    def _trim(self) -> None:
        """Keep the sinks and the last W + num_draft entries."""
        window = self.window
        keep = window.sinks + window.size + self.num_draft
        if len(self.kept) <= keep:
            return
        tail = window.size + self.num_draft
        index = [*range(window.sinks), *range(len(self.kept) - tail, len(self.kept))]
        self.kept = [self.kept[i] for i in index]
        for layer in self.cache.layers:
            select = torch.tensor(index, device=layer.keys.device)
            layer.keys = layer.keys.index_select(-2, select)
            layer.values = layer.values.index_select(-2, select)

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
        drafter.lm, num_draft, sampling, generator, Window.of(drafter.config)
    ),
    "dflash": BlockProposer,
    "deer": BlockProposer,
    "d2sd": D2SDProposer,
    "medusa": HeadProposer,
    "hydra": HeadProposer,
    "hidden_transfer": TransferProposer,
    "falcon": FalconProposer,
}
# settings only some families take (infer.eval flags): family -> names
FAMILY_SETTINGS = {
    "dflash": ("tree_budget", "cost_cut"),
    "deer": ("tree_budget", "cost_cut"),
    "d2sd": ("branches", "branch_drafter", "confidence", "acceptance", "branch_depth", "anchor"),
    "medusa": ("tree_nodes",),
    "hydra": ("tree_nodes",),
    "hidden_transfer": ("tree_nodes",),
    "falcon": ("falcon_width",),
}
NEEDS_COSTS = ("cost_cut",)  # settings that take the device's cost curve (``costs=``)


def proposer_for(
    drafter, num_draft: int, sampling: Sampling, generator=None, costs=None, **settings
):  # fmt: skip
    """The proposer serving a trained drafter (``num_draft`` 0: the drafter's own default);
    ``settings`` are family options (``FAMILY_SETTINGS``), refused for other families;
    ``costs`` the device's ``CostModel`` for the settings that need it."""
    build = FAMILY_PROPOSERS.get(drafter.drafter_type)
    if build is None:
        raise ValueError(
            f"drafter type '{drafter.drafter_type}' has no proposer in infer/ yet "
            f"(served types: {', '.join(sorted(FAMILY_PROPOSERS))})"
        )
    takes = FAMILY_SETTINGS.get(drafter.drafter_type, ())
    wrong = sorted(set(settings) - set(takes))
    if wrong:
        owners = sorted(f for f, names in FAMILY_SETTINGS.items() if set(wrong) & set(names))
        raise ValueError(
            f"{', '.join(wrong)}: option(s) of {', '.join(owners) or 'no'} drafters, not of "
            f"drafter type '{drafter.drafter_type}'"
        )
    if costs is not None and any(settings.get(name) for name in NEEDS_COSTS):
        settings["costs"] = costs
    return build(drafter, num_draft or drafter.config["num_draft"], sampling, generator, **settings)
