"""The one speculative loop (and plain decoding, the same loop with an empty tree).

Per cycle:
1. the proposer turns the tokens so far into a candidate tree (timed as *draft*, as is its
   ``observe`` of the committed features);
2. the target verifies root + tree in one forward (*verify*);
3. acceptance picks the accepted path and a bonus token; the KV cache keeps exactly the root
   and that path (*other*);
4. the accepted tokens and the bonus are emitted, cut at EOS and at ``max_new_tokens``.
τ = emitted tokens / target forwards after the prefill.

A proposer that drafts from the target's hidden states says which through ``target_layers``
(HF indices): it is given the target once (``begin(target)``), and the prefill and every
verification forward also return those layers' features (only those), of which the committed
tokens' rows (the prompt before the root; then each cycle's root and accepted path) are handed
to it with ``observe(features)`` in position order. The bonus token's features do not exist yet:
it is the next cycle's root.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from infer.accept import accept_greedy, accept_sampling
from infer.tree import DraftTree
from infer.verify import TargetFeatures, keep_accepted, verify_tree
from models.sampling import Sampling
from models.target import cache_arg


@dataclass
class DecodeResult:
    tokens: list[int]  # new tokens (EOS included when generated)
    accepted: list[int] = field(default_factory=list)  # accepted draft tokens per cycle
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    total_s: float = 0.0  # prefill included

    @property
    def cycles(self) -> int:
        return len(self.accepted)

    @property
    def tau(self) -> float:
        return len(self.tokens) / max(1, self.cycles)


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def check_prompt(target, prompt: list[int], max_new_tokens: int) -> None:
    limit = getattr(target.config, "max_position_embeddings", None)
    if not prompt:
        raise ValueError("empty prompt: decoding needs at least one token")
    if limit and len(prompt) + max_new_tokens > limit:
        raise ValueError(
            f"prompt of {len(prompt)} tokens + max_new_tokens={max_new_tokens} exceeds the "
            f"target's limit of {limit} positions"
        )


@torch.no_grad()
def decode(
    target,
    prompt: list[int],
    max_new_tokens: int,
    eos_id: int | None,
    sampling: Sampling | None = None,
    proposer=None,
    generator: torch.Generator | None = None,
    attention: str = "dense",
) -> DecodeResult:
    """Generate up to ``max_new_tokens`` after ``prompt`` (batch 1); ``proposer=None`` decodes
    plainly, one token per target forward. ``attention``: ``dense`` mask or ``kernel``
    (``infer/verify.py``)."""
    from transformers import DynamicCache

    check_prompt(target, prompt, max_new_tokens)
    sampling = sampling or Sampling()
    generator = generator or torch.Generator().manual_seed(0)
    device = target.device
    start = _clock(device)
    cache = DynamicCache(config=target.config)
    layers = list(getattr(proposer, "target_layers", None) or [])
    features = TargetFeatures(target, layers)
    if layers:
        proposer.begin(target)
    if hasattr(proposer, "attach_cache"):  # drafters that read the target's KV cache
        proposer.attach_cache(cache)
    with features:
        if len(prompt) > 1:
            target(  # the cache (and taps) only: one row of logits, not the prompt's
                input_ids=torch.tensor([prompt[:-1]], device=device),
                **cache_arg(target, cache),
                logits_to_keep=1,
            )
            if layers:
                proposer.observe(features.take())
    result = DecodeResult([])
    result.prefill_s = _clock(device) - start
    prefix_len, root, context = len(prompt) - 1, prompt[-1], list(prompt)
    while len(result.tokens) < max_new_tokens:
        t0 = _clock(device)
        tree = proposer.propose(context) if proposer is not None else DraftTree.empty()
        t1 = _clock(device)
        with features:
            logits = verify_tree(target, cache, prefix_len, root, tree, attention)
        t2 = _clock(device)
        result.draft_s += t1 - t0
        result.verify_s += t2 - t1
        if sampling.greedy:
            path, bonus = accept_greedy(tree, logits)
        else:
            path, bonus = accept_sampling(tree, logits, sampling, generator)
        keep_accepted(cache, prefix_len, path)
        if hasattr(proposer, "verified"):  # proposers that learn from the verdict (statistics)
            proposer.verified(tree, logits, path)
        if layers:  # the root's and the accepted nodes' rows: committed, in position order
            t3 = _clock(device)
            proposer.observe(features.take()[[0, *(1 + i for i in path)]])
            result.draft_s += _clock(device) - t3  # the drafter's own work (e.g. Hydra++'s layer)
        new = [int(tree.tokens[i]) for i in path] + [bonus]
        result.accepted.append(len(path))
        prefix_len, root = prefix_len + 1 + len(path), bonus
        if eos_id is not None and eos_id in new:
            new = new[: new.index(eos_id) + 1]
        new = new[: max_new_tokens - len(result.tokens)]
        result.tokens += new
        context += new
        if eos_id is not None and new[-1] == eos_id:
            break
    result.total_s = _clock(device) - start
    return result
