"""Drafters that really draft, for tests of the speculative loop.

A random drafter gets nothing accepted, so a "lossless" test run with one proves only that
rejecting everything is lossless. Here every family is fitted in seconds to a small target's
own continuations (the real training forward and objective, a few dozen Adam steps), so the
loop accepts drafts, walks into tree branches and takes bonus tokens after full acceptance.

The target is a random 2-layer Llama over ``VOCAB`` tokens with its LM head scaled up (its
next-token laws are peaked, as a trained model's are, instead of nearly uniform): small
enough that the exact law of its first four sampled tokens is enumerated in one batched
forward per depth (``exact_law``).
"""

from __future__ import annotations

import torch

from infer.decode import decode
from models.drafter import Batch, build_drafter
from models.sampling import Sampling
from recipes import load_config
from train.batches import teacher_signals

VOCAB = 8
HEAD_SCALE = 12.0  # the random LM head x 12: top-1 probabilities 0.26-0.66 (10th-90th pct.)
MASK_ID = VOCAB - 1  # block drafters' mask token (a real token id: the vocabulary is full)

# the smallest settings of each family that still have every part (branches, TTT steps, ...)
FAMILY_SETTINGS: dict[str, list[str]] = {
    "draft_lm": ["recipe=draft_lm", "drafter.num_layers=1", "drafter.init=random", "drafter.loss=ce"],
    "dflash": ["recipe=dflash", "drafter.num_layers=1", "drafter.block_size=5",
               "drafter.num_anchors=8", f"drafter.mask_token_id={MASK_ID}", "drafter.loss=ce"],
    "d2sd": ["recipe=d2sd", "drafter.num_layers=1", "drafter.block_size=5",
             "drafter.vp_block_size=5", "drafter.num_anchors=8", "drafter.vp_prefix_min=0",
             f"drafter.mask_token_id={MASK_ID}", "drafter.loss=ce", "drafter.num_branches=2"],
    "deer": ["recipe=deer", "drafter.num_layers=1", "drafter.context_layers=1",
             "drafter.block_size=5", "drafter.num_anchors=8", f"drafter.mask_token_id={MASK_ID}",
             "drafter.loss=ce", "drafter.stage2_step=0"],
    "medusa": ["recipe=medusa", "drafter.num_heads=4", "drafter.loss=ce"],
    "hydra": ["recipe=hydra", "drafter.num_heads=4", "drafter.loss=ce", "drafter.tree_nodes=20"],
    "hydra++": ["recipe=hydra", "drafter.variant=hydra++", "drafter.num_heads=4",
                "drafter.tree_nodes=20"],
    "hidden_transfer": ["recipe=hidden_transfer", "drafter.num_heads=3", "drafter.loss=ce"],
    "falcon": ["recipe=falcon", "drafter.num_layers=1", "drafter.csgd_steps=20"],
    "eagle3": ["recipe=eagle3", "drafter.ttt_steps=4", "drafter.num_draft=4",
               f"drafter.draft_vocab={VOCAB}", "drafter.loss=ce"],
}  # fmt: skip
# long-context variants: attend to the first 2 and the last 8 positions only (models/window.py)
WINDOW = ["drafter.attention_window=8", "drafter.attention_sinks=2"]
for _family in ("draft_lm", "dflash", "d2sd"):
    FAMILY_SETTINGS[f"{_family}+window"] = [*FAMILY_SETTINGS[_family], *WINDOW]


def small_target():
    """The random small-vocabulary target (seeded), in eval mode."""
    from tests.conftest import tiny_llama

    torch.manual_seed(0)
    model = tiny_llama(VOCAB, max_position_embeddings=128, bos_token_id=None,
                       eos_token_id=None, pad_token_id=None)  # fmt: skip
    with torch.no_grad():
        model.lm_head.weight.mul_(HEAD_SCALE)
    return model.eval()


def random_prompts(n: int, length: int, seed: int) -> list[list[int]]:
    """``n`` distinct prompts of ``length`` random token ids."""
    generator, prompts = torch.Generator().manual_seed(seed), set()
    while len(prompts) < n:
        prompts.add(tuple(torch.randint(0, VOCAB, (length,), generator=generator).tolist()))
    return [list(p) for p in sorted(prompts)]


def continuations(target, prompts, new_tokens: int, sampling: Sampling, seed: int = 0) -> Batch:
    """The target's own continuations of ``prompts`` (equal lengths) as a training batch: the
    loss mask covers the continuation (position t is scored for token t + 1)."""
    generator = torch.Generator().manual_seed(seed)
    rows = [p + decode(target, p, new_tokens, None, sampling, generator=generator).tokens
            for p in prompts]  # fmt: skip
    ids = torch.tensor(rows)
    mask = torch.zeros_like(ids)
    mask[:, len(prompts[0]) - 1 : -1] = 1
    return Batch(ids, torch.ones_like(ids), mask)


def fit(family: str, target, tokenizer, batches: list[Batch], steps: int, lr: float = 1e-2):
    """A ``family`` drafter fitted to ``batches`` for ``steps`` Adam steps per training stage
    (the families' own forward and objective, as in ``train/drafter.py``), in eval mode."""
    cfg = load_config(FAMILY_SETTINGS[family])
    torch.manual_seed(0)
    drafter = build_drafter(cfg.drafter, target, tokenizer, "small-vocab", cfg.drafter.type)
    drafter.fit_data(torch.bincount(torch.cat([b.input_ids.flatten() for b in batches]),
                                    minlength=VOCAB).float())  # fmt: skip
    for stage in drafter.stages():
        overfit(stage.module, target, batches, steps, lr)
    return drafter.eval()


def overfit(
    module, target, batches: list[Batch], steps: int, lr: float, optimiser=torch.optim.Adam
):
    """``steps`` optimiser steps of ``module`` (a Drafter, or one training stage of it) on
    ``batches`` in turn, through its own ``prepare_batch``, forward and objective; leaves it in
    eval mode."""
    module.train()
    optimiser = optimiser(module.parameters(), lr=lr)
    for step in range(steps):
        batch = module.prepare_batch(batches[step % len(batches)])
        teacher = teacher_signals(target, batch, module)
        loss = module.objective(module(batch, teacher), batch, teacher).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    module.eval()


def exact_law(target, prompt: list[int], depth: int, sampling: Sampling) -> dict[tuple, float]:
    """The exact law of the first ``depth`` tokens that plain sampling draws after ``prompt``
    (every continuation enumerated: one batched target forward per depth)."""
    laws = {(): 1.0}
    for _ in range(depth):
        heads = list(laws)
        ids = torch.tensor([prompt + list(h) for h in heads])
        with torch.no_grad():
            probs = sampling.probs(target(input_ids=ids).logits[:, -1].float())
        laws = {(*h, x): laws[h] * float(probs[i, x])
                for i, h in enumerate(heads) for x in range(VOCAB) if probs[i, x] > 0}  # fmt: skip
    return laws
