"""Speculative sampling through the real loop keeps the target's law, four tokens deep.

Each family's real proposer (``infer/proposers``) drafts with a drafter fitted to the small
target (``tests/fitted.py``), ``infer.decode.decode`` verifies and accepts, and the first four
generated tokens of many runs are compared with the exact law of plain sampling (enumerated):
at T = 1, and at T = 0.7 with top-k and top-p. Drafts are accepted in most cycles, so the
draft-probability bookkeeping, the residual after a rejection and the bonus token after full
acceptance all decide what comes out.

Each setting has a negative control that injects a realistic bookkeeping bug and must fail:
- ``wrong_q``: the proposer records for each node the distribution of the node below it (an
  off-by-one in the q it keeps), so acceptance ratios use the wrong q;
- ``bonus_from_p``: after a rejection the bonus token is drawn from the target's p instead of
  the residual max(p - q, 0) (for matched, deterministic candidates: a fresh draw from p
  instead of the draw that matched no child).

The test statistic is Pearson's chi-square of the joint law of the four tokens (outcomes with
fewer than 5 expected draws pooled) and of each position's marginal, Bonferroni-corrected.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

import infer.decode as loop
from infer.decode import decode
from infer.proposers import proposer_for
from infer.tree import DraftTree
from models.sampling import Sampling
from tests.fitted import continuations, exact_law, fit, random_prompts, small_target

DEPTH = 4  # generated tokens whose joint law is checked
T1 = Sampling(1.0)
NUCLEUS = Sampling(0.7, top_k=4, top_p=0.9)


@pytest.fixture(scope="module")
def small(tiny):
    """(target, tokenizer, prompt, training batches): the small target, one test prompt and 32
    sampled continuations of it and one of each of 31 other prompts. The drafters are fitted
    for 40 steps with hard CE on these samples (``tests/fitted.py``): good enough that 1.3-2.5 of
    4 drafts are accepted per cycle (measured), rough enough that their q is not the target's p."""
    _, tokenizer = tiny
    target = small_target()
    prompt = random_prompts(1, 10, seed=7)[0]
    others = random_prompts(31, 10, seed=8)
    batches = [continuations(target, [prompt] * 32, 8, T1, seed=1),
               continuations(target, others, 8, T1, seed=2)]  # fmt: skip
    return target, tokenizer, prompt, batches


def chi_square_p(counts: Counter, law: dict[tuple, float], n: int) -> float:
    """Bonferroni-corrected p-value of the draws ``counts`` under ``law`` (joint + marginals)."""

    def pearson(observed: dict, expected: dict) -> tuple[float, int]:
        keys, pooled_o, pooled_e, stat = [], 0.0, 0.0, 0.0
        for key, p in expected.items():
            if p * n >= 5:
                keys.append(key)
                stat += (observed.get(key, 0) - p * n) ** 2 / (p * n)
            else:
                pooled_o, pooled_e = pooled_o + observed.get(key, 0), pooled_e + p * n
        pooled_o += sum(v for k, v in observed.items() if k not in expected)  # impossible draws
        if pooled_e > 0:
            stat += (pooled_o - pooled_e) ** 2 / pooled_e
        elif pooled_o:
            return math.inf, 1
        df = len(keys) - (0 if pooled_e > 0 else 1)
        return stat, max(df, 1)

    tests = [pearson(counts, law)]
    for position in range(DEPTH):
        marginal, drawn = Counter(), Counter()
        for seq, p in law.items():
            marginal[seq[position]] += p
        for seq, c in counts.items():
            drawn[seq[position]] += c
        tests.append(pearson(drawn, marginal))
    p_values = [
        0.0 if math.isinf(stat) else float(torch.special.gammaincc(torch.tensor(df / 2),
                                                                    torch.tensor(stat / 2)))
        for stat, df in tests
    ]  # fmt: skip
    return min(1.0, len(tests) * min(p_values))


class WrongQ:
    """Negative control: the proposer's tree records, for each node, the q of the node below
    it (the last node keeps its own)."""

    def __init__(self, proposer):
        self.proposer = proposer
        self.target_layers = getattr(proposer, "target_layers", None)

    def __getattr__(self, name):
        return getattr(self.proposer, name)

    def propose(self, context):
        tree = self.proposer.propose(context)
        if tree.draft_probs is None or len(tree) < 2:
            return tree
        shifted = torch.cat([tree.draft_probs[1:], tree.draft_probs[-1:]])
        return DraftTree(tree.tokens, tree.parents, shifted)


def accept_with_bonus_from_p(tree, target_logits, sampling, generator):
    """Negative control: ``infer.accept.accept_sampling`` with the bonus after a rejection drawn
    from the target's p instead of the residual (matching: a fresh draw instead of the one that
    matched no child)."""
    tokens = tree.tokens.tolist()
    path, node = [], -1
    while True:
        p = sampling.probs(target_logits[node + 1])
        residual, accepted = p, None
        children = tree.children(node)
        if children and tree.draft_probs is not None:
            for child in children:
                q = tree.draft_probs[child].float()
                x = tokens[child]
                if torch.rand((), generator=generator) < residual[x] / q[x].clamp(min=1e-20):
                    accepted = child
                    break
                left = (residual - q).clamp(min=0)
                if left.sum() <= 0:
                    break
                residual = left / left.sum()
        elif children:
            x = int(torch.multinomial(p, 1, generator=generator))
            accepted = next((c for c in children if tokens[c] == x), None)
        if accepted is None:
            return path, int(torch.multinomial(p, 1, generator=generator))  # the bug: p
        path.append(accepted)
        node = accepted


def draws(target, prompt, proposer, sampling: Sampling, n: int, seed: int):
    """The first DEPTH tokens of ``n`` speculative runs, and the accepted drafts per cycle."""
    generator, counts, accepted = torch.Generator().manual_seed(seed), Counter(), []
    for _ in range(n):
        result = decode(target, prompt, DEPTH, None, sampling, proposer, generator)
        counts[tuple(result.tokens)] += 1
        accepted += result.accepted
    return counts, sum(accepted) / len(accepted)


_FITTED: dict = {}


def fitted(small, family: str):
    if family not in _FITTED:
        target, tokenizer, _, batches = small
        _FITTED[family] = fit(family, target, tokenizer, batches, steps=40)
    return _FITTED[family]


def p_value(small, family: str, settings: dict, sampling: Sampling, bug: str | None, n: int):
    """The p-value of ``n`` speculative runs under the exact law, and accepted drafts/cycle."""
    target, _, prompt, _ = small
    proposer = proposer_for(fitted(small, family), 4, sampling,
                            torch.Generator().manual_seed(3), **settings)  # fmt: skip
    if bug == "wrong_q":
        proposer = WrongQ(proposer)
    counts, per_cycle = draws(target, prompt, proposer, sampling, n, seed=4)
    return chi_square_p(counts, exact_law(target, prompt, DEPTH, sampling), n), per_cycle


N = 1000  # runs per setting: ~5-15 s each on the 2-core CPU
ALPHA = 1e-3  # the correct loop must score above it, every negative control below it
FAMILIES = [  # (family, proposer settings, negative controls that apply)
    ("draft_lm", {}, ("wrong_q", "bonus_from_p")),
    ("dflash", {}, ("wrong_q", "bonus_from_p")),
    ("d2sd", {"confidence": "softmax"}, ("wrong_q", "bonus_from_p")),
    ("d2sd", {"confidence": "head"}, ("wrong_q", "bonus_from_p")),
    ("medusa", {}, ("bonus_from_p",)),  # deterministic candidates: matched, no q
    ("eagle3", {}, ("wrong_q", "bonus_from_p")),
]
CASES = [
    pytest.param(family, settings, sampling, bugs, id=f"{label}-{name}",
                 marks=() if (label, name) == ("draft_lm", "T0.7-topk-topp") else pytest.mark.slow)
    for (family, settings, bugs), label in zip(
        FAMILIES, ["draft_lm", "dflash", "d2sd-softmax", "d2sd-head", "medusa", "eagle3"],
        strict=True,
    )
    for sampling, name in ((T1, "T1"), (NUCLEUS, "T0.7-topk-topp"))
]  # fmt: skip


@pytest.mark.parametrize(("family", "settings", "sampling", "bugs"), CASES)
def test_the_loop_samples_the_target_law_and_each_bug_is_caught(
    small, family, settings, sampling, bugs, monkeypatch
):
    p, per_cycle = p_value(small, family, settings, sampling, None, N)
    assert per_cycle >= 1.0, per_cycle  # drafts accepted: the bookkeeping decides the output
    assert p > ALPHA, p
    for bug in bugs:
        with monkeypatch.context() as patch:
            if bug == "bonus_from_p":
                patch.setattr(loop, "accept_sampling", accept_with_bonus_from_p)
            caught, _ = p_value(small, family, settings, sampling, bug, N)
        assert caught < ALPHA, (bug, caught)
