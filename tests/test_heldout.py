"""Held-out metrics: the chain walk counts cycles the way decoding does, acceptance is
conditional, held-out rows are whole modules, and the families' hits are what they draft."""

from __future__ import annotations

import torch

from models.draft_lm import DraftLM
from models.drafter import Batch, TargetInfo
from recipes import load_config
from tests.test_dflash import _batch, _drafter
from train.heldout import heldout_metrics, split_heldout, walk


def _hits(runs: list[int], slots: int) -> torch.Tensor:
    """(1, T, slots) hits whose leading run at position t is runs[t] (a wrong slot after it)."""
    hits = torch.zeros(1, len(runs), slots, dtype=torch.bool)
    for t, run in enumerate(runs):
        hits[0, t, :run] = True
        if run + 1 < slots:
            hits[0, t, run + 1 :] = True  # right again after a miss: must not count
    return hits


def test_the_walk_counts_cycles_not_anchors():
    # response positions 2..9 (8 tokens); from 2 the chain accepts 3, from 6 none, from 7 all
    runs = [0, 0, 3, 0, 0, 0, 0, 4, 0, 0]
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1]])
    sums = walk(_hits(runs, 4), mask)
    # roots: 2 (emits 4: 3 drafts + 1), 6 (emits 1), 7 (3 tokens left: emits 3)
    assert sums["cycles"] == 3 and sums["emitted"] == 8
    # slot 1 reached at every root, accepted at 2 and 7; slot 2 reached at 2 and 7
    assert (sums["reached@1"], sums["accepted@1"]) == (3, 2)
    assert (sums["reached@2"], sums["accepted@2"]) == (2, 2)
    assert (sums["reached@4"], sums["accepted@4"]) == (1, 0)  # slot 4 exists only from root 2


def test_heldout_rows_are_whole_modules():
    ids = [f"function_body/{m}:{i}" for m in ("json", "os", "re", "abc") for i in range(5)]
    kept, held = split_heldout(ids, 7)
    modules = lambda rows: {ids[i].split("/")[1].split(":")[0] for i in rows}  # noqa: E731
    assert len(held) >= 7 and len(held) % 5 == 0 and not modules(kept) & modules(held)
    assert sorted(kept + held) == list(range(len(ids)))
    assert split_heldout(ids, 7) == (kept, held)  # deterministic
    assert split_heldout(ids, 0) == (list(range(len(ids))), [])


def test_block_hits_match_the_drafts_the_decoder_would_make(tiny):
    """Slot k of the chain at t is right exactly when the block drafted from anchor t (its
    argmax) equals the token at t + k; checked against the batched training forward."""
    drafter = _drafter(tiny)
    batch, teacher = _batch(tiny, drafter)
    hits = drafter.heldout_hits(batch, teacher)
    assert hits.shape == (*batch.input_ids.shape, drafter.block_size - 1)
    drafted = drafter(batch, teacher).max(-1).indices  # (b, N, B) at the sampled anchors
    labels, valid = drafter.block_labels(batch)
    for row in range(batch.input_ids.shape[0]):
        for j, anchor in enumerate(batch.anchors[row].tolist()):
            if anchor >= 0:
                expect = (drafted[row, j] == labels[row, j]) & valid[row, j]
                assert torch.equal(hits[row, anchor], expect[1:])
    assert not hits[~batch.loss_mask.bool()].any()  # only response-predicting positions


def test_draft_lm_hits_are_its_teacher_forced_chain(tiny):
    target, tokenizer = tiny
    cfg = load_config(["recipe=draft_lm", "drafter.num_layers=1", "drafter.num_draft=3"])
    torch.manual_seed(0)
    drafter = DraftLM.from_recipe(cfg.drafter, target, TargetInfo.of(target, tokenizer, "t"))
    # make the drafter the target's own 1-layer copy and the data the target's greedy chain
    ids = torch.randint(3, target.config.vocab_size, (1, 6))
    with torch.no_grad():
        for _ in range(10):
            nxt = drafter.lm(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
    mask = torch.zeros_like(ids)
    mask[0, 5:-1] = 1
    batch = Batch(ids, torch.ones_like(ids), mask)
    hits = drafter.heldout_hits(batch, None)
    assert hits[0, 5:-3].all()  # its own greedy continuation: every draft right
    metrics = heldout_metrics(drafter, [(batch, None)])
    assert metrics["heldout_acc@1"] == 1.0 and metrics["heldout_tau"] > 3.0
    wrong = ids.clone()
    wrong[0, 8] = (wrong[0, 8] + 1) % target.config.vocab_size  # the data parts from it once
    broken = drafter.heldout_hits(Batch(wrong, torch.ones_like(ids), mask), None)
    assert not broken[0, 7, 0] and not broken[0, 6, 1] and not broken[0, 5, 2]
