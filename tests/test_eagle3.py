"""EAGLE-3 (``models/eagle3.py``): the traps the public trainers fell into.

- the training-time test's step j equals the inference draft's step j at every position (fp32);
- the label convention (step j at t predicts x_{t+2+j}, scored where loss_mask[t+1+j]) is pinned,
  and a one-token shift is caught;
- a drafter that learned a sequence gets its drafts accepted, and decoding stays token-identical;
- a tiny run through ``train/drafter.py`` and ``infer.eval``, resumed exactly.
"""

from __future__ import annotations

import pytest
import torch

import train.drafter as entry
from infer.decode import decode
from infer.proposers import proposer_for
from models.drafter import Batch, TargetInfo, load_drafter
from models.eagle3 import Eagle3, default_taps
from models.sampling import Sampling
from recipes import load_config
from tests.test_train_drafter import PROMPTS, Crash, _crash, _fail_on_call, _losses, _weights
from train.batches import teacher_signals


def _drafter(tiny, *overrides) -> Eagle3:
    target, tokenizer = tiny
    cfg = load_config(["recipe=eagle3", "drafter.ttt_steps=3", "drafter.num_draft=3", *overrides])
    info = TargetInfo.of(target, tokenizer, "tiny")
    torch.manual_seed(0)
    drafter = Eagle3.from_recipe(cfg.drafter, target, info, tokenizer)
    with torch.no_grad():  # random, not the zero-ish init: every path must matter
        for p in drafter.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return drafter.eval()


def _batch(tiny, drafter, seq: int = 20) -> tuple[Batch, object]:
    target, _ = tiny
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, target.config.vocab_size, (2, seq), generator=generator)
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, 4 : seq - 1] = 1
    batch = Batch(ids, torch.ones_like(ids), loss_mask)
    return batch, teacher_signals(target, batch, drafter)


def test_taps_follow_eagle3(tiny):
    assert default_taps(32) == [1, 15, 28]  # hidden_states[2], [16], [29] of a 32-layer target
    assert default_taps(2) == [0, 0, 0]  # clamped on the tiny target, never the last layer
    with pytest.raises(ValueError, match="three 0-based decoder layer ids"):
        _drafter(tiny, "drafter.target_layers=[0,1,2]")


def test_training_time_test_equals_the_inference_draft_at_every_step(tiny):
    drafter = _drafter(tiny)
    batch, teacher = _batch(tiny, drafter)
    logits = drafter(batch, teacher)  # (J, b, T, V)
    steps = logits.shape[0]
    feats = torch.cat([teacher.hidden_states[i] for i in drafter.target_layers()], -1)
    ids = batch.input_ids
    for row in range(2):
        for t in (0, 5, 11):
            cache, root_out = drafter.extend(None, ids[row, 1 : t + 2], feats[row, : t + 1], 0)
            forced = ids[row, t + 2 : t + 2 + steps].tolist()  # the true tokens, as in training
            _, drafted = drafter.draft(cache, root_out, t, steps, lambda j, _, f=forced: f[j])
            torch.testing.assert_close(drafted, logits[:, row, t], rtol=0, atol=1e-5)
    # the cache built in two pieces (two decoding cycles) is the same cache
    cache, _ = drafter.extend(None, ids[0, 1:5], feats[0, :4], 0)
    cache, root_out = drafter.extend(cache, ids[0, 5:10], feats[0, 4:9], 4)
    _, drafted = drafter.draft(cache, root_out, 8, 1, lambda j, _: 0)
    torch.testing.assert_close(drafted[0], logits[0, 0, 8], rtol=0, atol=1e-5)


def test_label_convention_is_pinned_and_a_one_token_shift_is_caught(tiny):
    drafter = _drafter(tiny)
    batch, teacher = _batch(tiny, drafter)
    ids, mask = batch.input_ids, batch.loss_mask
    seq = ids.shape[1]
    for j in range(3):
        labels, valid = drafter.step_targets(batch, j)
        assert torch.equal(labels[:, : seq - 2 - j], ids[:, 2 + j :])
        assert torch.equal(valid[:, : seq - 2 - j], mask[:, 1 + j : seq - 1].bool())
        assert not valid[:, seq - 2 - j :].any()  # nothing scored past the end

    def peaked(shift: int) -> torch.Tensor:
        out = torch.zeros(3, *ids.shape, drafter.target.vocab_size)
        for j in range(3):
            out[j, :, : seq - 2 - j + shift].scatter_(
                -1, ids[:, 2 + j - shift :, None], 50.0
            )  # fmt: skip
        return out

    right = drafter.objective(peaked(0), batch, teacher)
    assert right.loss < 1e-3 and right.metrics["acc@1"] == right.n_positions
    shifted = drafter.objective(peaked(1), batch, teacher)  # labels one token early
    assert shifted.loss > 10 and shifted.metrics["acc@1"] < 0.2 * shifted.n_positions


def test_a_drafter_that_learned_a_sequence_is_accepted_and_lossless(tiny):
    """Overfit a few seconds on the target's own greedy continuation, then decode it: drafts
    are accepted (several per cycle) and the tokens are plain decoding's."""
    target, tokenizer = tiny
    drafter = _drafter(tiny)
    prompt = tokenizer("def add(a, b):\n", add_special_tokens=False)["input_ids"]
    plain = decode(target, prompt, 24, None)
    ids = torch.tensor([prompt + plain.tokens])
    mask = torch.zeros_like(ids)
    mask[0, len(prompt) - 1 : -1] = 1
    batch = Batch(ids, torch.ones_like(ids), mask)
    teacher = teacher_signals(target, batch, drafter)
    drafter.train()
    optimiser = torch.optim.Adam(drafter.parameters(), lr=3e-3)
    for _ in range(150):
        loss = drafter.objective(drafter(batch, teacher), batch, teacher).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    drafter.eval()
    spec = decode(target, prompt, 24, None, proposer=proposer_for(drafter, 3, Sampling()))
    assert spec.tokens == plain.tokens
    assert sum(spec.accepted) >= len(spec.accepted), spec.accepted  # about 1+ draft per cycle
    assert spec.tau > 1.5
    # EAGLE-2's dynamic tree over the same drafter: lossless, at least the chain's acceptance
    tree = proposer_for(drafter, 4, Sampling(), tree_budget=12, tree_topk=3)
    grown = decode(target, prompt, 24, None, proposer=tree)
    assert grown.tokens == plain.tokens and grown.tau >= spec.tau - 0.2, (grown.tau, spec.tau)
    sampled = decode(target, prompt, 24, None, Sampling(temperature=1.0), proposer=tree,
                     generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert len(sampled.tokens) == 24  # (the random target's T = 1 samples rarely match a draft)


def test_the_dynamic_tree_keeps_the_best_nodes_and_their_ancestors(tiny):
    target, tokenizer = tiny
    drafter = _drafter(tiny)
    proposer = proposer_for(drafter, 4, Sampling(), tree_budget=10, tree_topk=3)
    prompt = tokenizer("def add(a, b):\n", add_special_tokens=False)["input_ids"]
    proposer.begin(target)
    batch = Batch(torch.tensor([prompt[:-1]]), torch.ones(1, len(prompt) - 1),
                  torch.zeros(1, len(prompt) - 1))  # fmt: skip
    teacher = teacher_signals(target, batch, drafter)
    proposer.observe(torch.cat([teacher.hidden_states[i][0] for i in drafter.target_layers()], -1))
    tree = proposer.propose(prompt)
    assert len(tree.tokens) == 10 and tree.draft_probs is None
    parents = tree.parents.tolist()
    depth = [0] * len(parents)
    for i, p in enumerate(parents):
        depth[i] = 1 if p < 0 else depth[p] + 1
    assert max(depth) >= 2 and sum(d == 1 for d in depth) <= 3  # top-3 children of the root
    # every root child is one of the 3 best tokens of step 0
    cache, root = proposer.cache, proposer.root_out
    step0 = drafter.lm_head(drafter.norm(root))[0, -1]
    best = set(drafter.draft_ids[step0.topk(3).indices].tolist())
    assert {int(tree.tokens[i]) for i, d in enumerate(depth) if d == 1} <= best
    assert cache[0].shape[2] == len(prompt) - 1


def test_sampled_drafts_record_their_distribution(tiny):
    target, tokenizer = tiny
    drafter = _drafter(tiny, "drafter.draft_vocab=40")
    counts = torch.arange(target.config.vocab_size)  # the 40 highest ids are "most frequent"
    drafter.fit_data(counts)
    assert drafter.draft_ids.tolist() == list(range(target.config.vocab_size - 40,
                                                     target.config.vocab_size))  # fmt: skip
    proposer = proposer_for(drafter, 4, Sampling(temperature=1.0), torch.Generator().manual_seed(0))
    prompt = tokenizer("import os\n", add_special_tokens=False)["input_ids"]
    proposer.begin(target)
    features = teacher_signals(
        target, Batch(torch.tensor([prompt[:-1]]), torch.ones(1, len(prompt) - 1),
                      torch.zeros(1, len(prompt) - 1)), drafter,
    )  # fmt: skip
    proposer.observe(torch.cat([features.hidden_states[i][0] for i in drafter.target_layers()], -1))
    tree = proposer.propose(prompt)
    q = tree.draft_probs
    assert q.shape == (4, target.config.vocab_size)
    torch.testing.assert_close(q.sum(-1), torch.ones(4))
    outside = torch.ones(target.config.vocab_size, dtype=torch.bool)
    outside[drafter.draft_ids] = False
    assert q[:, outside].sum() == 0 and (q[torch.arange(4), tree.tokens] > 0).all()


def _argv(tiny_target_dir, out, *extra):
    return [
        "recipe=eagle3", f"target={tiny_target_dir}", f"output_dir={out}", "train.device=cpu",
        "prompts.source=stdlib-eval", "prompts.limit=24", "distill.max_new_tokens=12",
        "distill.max_drop_rate=0.5", "train.steps=6", "train.batch_size=4",
        "train.warmup_steps=2", "train.save_every=2", "train.log_every=1",
        "drafter.ttt_steps=3", "drafter.num_draft=3", "drafter.heldout_rows=4",
        "final_eval.limit=0", *extra,
    ]  # fmt: skip


def test_tiny_run_resumes_exactly_and_evaluates(tmp_path, tiny, tiny_target_dir, monkeypatch):
    from infer.eval import main as eval_main

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    data = f"distill.out={tmp_path / 'data'}"
    assert entry.main(_argv(tiny_target_dir, straight, data, "drafter.draft_vocab=64")) == 0
    _fail_on_call(monkeypatch, 3, _crash)
    with pytest.raises(Crash):
        entry.main(_argv(tiny_target_dir, resumed, data, "drafter.draft_vocab=64"))
    monkeypatch.undo()
    assert entry.main(_argv(tiny_target_dir, resumed, data, "drafter.draft_vocab=64")) == 0
    torch.testing.assert_close(_weights(resumed), _weights(straight))
    assert _losses(resumed) == pytest.approx(_losses(straight), rel=1e-6)
    weights = _weights(straight)
    assert weights["lm_head.weight"].shape[0] == 64 and weights["draft_ids"].shape == (64,)
    assert not any("embed" in name for name in weights)  # the target's embedding: not saved
    target, tokenizer = tiny
    drafter = load_drafter(straight / "drafter", TargetInfo.of(target, tokenizer, "x"), target)
    assert drafter.draft_ids.tolist() == weights["draft_ids"].tolist()
    prompt = tokenizer("class Point:\n", add_special_tokens=False)["input_ids"]
    plain = decode(target, prompt, 16, tokenizer.eos_token_id)
    spec = decode(target, prompt, 16, tokenizer.eos_token_id,
                  proposer=proposer_for(drafter, 3, Sampling()))  # fmt: skip
    assert spec.tokens == plain.tokens
    out, prompts = tmp_path / "eval", tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "import os\\n"}\n{"prompt": "def add(a, b):\\n"}\n')
    assert eval_main([str(straight / "drafter"), "limit=2", "max_new_tokens=8", f"out={out}",
                      f"prompts={prompts}", "card=false"]) == 0  # fmt: skip
    assert (out / "eval.json").is_file()
    assert PROMPTS  # the shared prompt fixtures stay importable
