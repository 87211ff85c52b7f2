"""Draft heads (Medusa, Hydra, Hydra++): label alignment, distinct heads, train/inference
agreement, Hydra++'s prefix layer on committed tokens only, the static tree, and tiny runs
through ``train/drafter.py`` (lossless decoding with drafts accepted and sampling through the
loop: ``test_lossless.py``, ``test_sampling_loop.py``)."""

from __future__ import annotations

import pytest
import torch

import train.drafter as entry
from infer.decode import decode
from infer.proposers import proposer_for
from infer.proposers.heads import HeadProposer, rank_tree
from models.drafter import Batch, TargetInfo, load_drafter
from models.heads import Hydra, Medusa
from models.sampling import Sampling
from recipes import load_config, load_options
from tests.test_dflash import _argv, data_dir  # noqa: F401  (module fixture)
from tests.test_train_drafter import _weights, prompt_file
from train.batches import teacher_signals
from train.heldout import heldout_metrics


def _heads(tiny, family, *overrides):
    target, tokenizer = tiny
    recipe = "medusa" if family is Medusa else "hydra"
    cfg = load_config([f"recipe={recipe}", "drafter.num_heads=3", "drafter.tree_nodes=12",
                       *overrides])  # fmt: skip
    torch.manual_seed(0)
    drafter = family.from_recipe(cfg.drafter, target, TargetInfo.of(target, tokenizer, "t"))
    for p in drafter.parameters():  # leave the zero init: heads that differ from the target's
        p.data.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return drafter.eval()


FAMILIES = [(Medusa, ()), (Hydra, ()), (Hydra, ("drafter.variant=hydra++",))]
IDS = ["medusa", "hydra", "hydra++"]


def test_head_i_is_labelled_with_the_token_two_plus_i_ahead(tiny):
    drafter = _heads(tiny, Medusa)
    ids = torch.arange(10, 20)[None]
    loss_mask = torch.zeros_like(ids)
    loss_mask[0, 3:9] = 1  # tokens 4..9 are response tokens
    batch = Batch(ids, torch.ones_like(ids), loss_mask)
    for i in range(3):
        labels, valid = drafter.head_labels(batch, i)
        t = 2  # position 2 predicts, through head i, token 4 + i
        assert int(labels[0, t]) == 14 + i
        # valid where token t + 2 + i exists and is a response token
        expect = [4 <= t + 2 + i <= 9 for t in range(10)]
        assert valid[0].tolist() == expect


@pytest.mark.parametrize(("family", "extra"), FAMILIES, ids=IDS)
def test_proposals_equal_the_teacher_forced_heads(tiny, family, extra):
    """The proposer's depth-(i + 1) best candidate on the main path equals the training
    forward's head-i argmax at the same position: a one-token shift on either side fails."""
    target, _ = tiny
    drafter = _heads(tiny, family, *extra)
    ids = torch.randint(
        3, target.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(3)
    )
    batch = Batch(ids, torch.ones_like(ids), torch.ones_like(ids))
    teacher = teacher_signals(target, batch, drafter)
    with torch.no_grad():
        output = drafter(batch, teacher)  # logits (K, P, V) at the flat rows
    logits = torch.zeros(3, 1, 20, output.logits.shape[-1])
    logits[:, 0, output.rows] = output.logits
    hidden = teacher.hidden_states[drafter.config["final_layer"]][0]
    for t in (5, 11):
        proposer = HeadProposer(drafter, 3)
        proposer.begin(target)
        proposer.observe(hidden[: t + 1])  # committed: tokens 0..t; the root is token t + 1
        if family is Hydra:  # teacher-forced heads saw the true tokens; follow the same path
            path = [int(ids[0, t + 1])]
            for i in range(3):
                base = proposer.last[None]
                emb = drafter.embed(torch.tensor([path]))
                assert int(drafter.head(i, base, emb).argmax()) == int(logits[i, 0, t].argmax())
                path.append(int(ids[0, t + 2 + i]))
        else:
            tree = proposer.propose(ids[0, : t + 2].tolist())
            chain, node = [], -1  # the rank-0 path: each node's first child
            for _ in range(3):
                node = tree.children(node)[0]
                chain.append(int(tree.tokens[node]))
            assert chain == [int(logits[i, 0, t].argmax()) for i in range(3)]


@pytest.mark.parametrize(("family", "extra"), FAMILIES, ids=IDS)
def test_heldout_hits_are_the_rank0_path_from_the_root(tiny, family, extra):
    """At root p (hidden state of p - 1), slot k is head k's argmax there against token
    p + 1 + k; only response tokens count, and the held-out walk gives a τ."""
    target, _ = tiny
    drafter = _heads(tiny, family, *extra)
    ids = torch.randint(
        3, target.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(5)
    )
    mask = torch.zeros_like(ids)
    mask[:, 6:15] = 1  # tokens 7..15 are the response
    batch = Batch(ids, torch.ones_like(ids), mask)
    teacher = teacher_signals(target, batch, drafter)
    # make some drafts right: the data follows head 0's own choice at a few roots
    with torch.no_grad():
        out = drafter(batch, teacher)
    seq = ids.shape[1]
    argmax = torch.full((3, 2 * seq), -1)
    argmax[:, out.rows] = out.logits.argmax(-1)
    argmax = argmax.view(3, 2, seq)
    hits = drafter.heldout_hits(batch, teacher)
    assert hits.shape == (2, seq, 3)
    for row in range(2):
        for p in range(1, seq):
            for k in range(3):
                token = p + 1 + k
                expect = (
                    token < seq
                    and bool(mask[row, token - 1])
                    and bool(argmax[k, row, p - 1] == ids[row, token])
                )
                assert bool(hits[row, p, k]) == expect, (row, p, k)
    right = ids.clone()
    right[0, 8] = argmax[0, 0, 6]  # head 0 at hidden 6 proposes token 8 (root 7)
    teacher = teacher_signals(target, Batch(right, torch.ones_like(ids), mask), drafter)
    assert drafter.heldout_hits(Batch(right, torch.ones_like(ids), mask), teacher)[0, 7, 0]
    # the walk's τ, recomputed by hand from the hits: each cycle at root t emits its leading
    # run of right slots plus the target's token, and the next root is where it stopped
    for probe in (batch, Batch(right, torch.ones_like(ids), mask)):
        teacher = teacher_signals(target, probe, drafter)
        probe_hits = drafter.heldout_hits(probe, teacher)
        emitted = cycles = 0
        for row in range(2):
            positions = mask[row].nonzero().flatten().tolist()
            t, end = positions[0], positions[-1] + 1
            while t < end:
                run = 0
                while run < 3 and probe_hits[row, t, run]:
                    run += 1
                emitted, cycles, t = emitted + min(run + 1, end - t), cycles + 1, t + run + 1
        metrics = heldout_metrics(drafter, [(probe, teacher)])
        assert metrics["heldout_tau"] == pytest.approx(emitted / cycles), (emitted, cycles)
        assert "heldout_acc@1" in metrics
    assert emitted > cycles  # the probe with head 0 right at root 7 accepts a draft


def test_medusa_heads_are_distinct_modules(tiny):
    drafter = _heads(tiny, Medusa)
    assert len({id(b) for b in drafter.blocks}) == 3
    pointers = {p.data_ptr() for b in drafter.blocks for p in b.parameters()}
    assert len(pointers) == sum(1 for b in drafter.blocks for _ in b.parameters())
    heads = {h.weight.data_ptr() for h in drafter.lm_heads}
    assert len(heads) == 3  # copies of the target's head, not the head itself
    assert drafter.lm_heads[0].weight.data_ptr() != tiny[0].lm_head.weight.data_ptr()


def test_hydra_plus_plus_prefix_sees_committed_tokens_only(tiny):
    target, tokenizer = tiny
    drafter = _heads(tiny, Hydra, "drafter.variant=hydra++")
    prompt = tokenizer("def add(a, b):\n", add_special_tokens=False)["input_ids"]
    for max_new in range(20, 40):  # a run whose last cycle was not cut at max_new_tokens
        proposer = proposer_for(drafter, 0, Sampling())
        out = decode(target, prompt, max_new, None, proposer=proposer)
        if sum(a + 1 for a in out.accepted) == len(out.tokens):
            break
    committed = len(prompt) + len(out.tokens) - 1  # all but the last bonus token (next root)
    assert proposer.length == committed
    assert proposer.prefix_kv[0][0].shape[2] == committed
    # its state equals the teacher-forced prefix layer over the same committed tokens
    ids = torch.tensor([prompt + out.tokens[:-1]])
    with torch.no_grad():
        hidden = target(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        full = drafter.context(hidden)
    torch.testing.assert_close(proposer.last, full[0, -1], atol=1e-5, rtol=1e-5)


def test_rank_tree_is_prefix_closed_and_sized():
    paths = rank_tree(4, 60)
    assert len(paths) == 60 and len(set(paths)) == 60
    assert all(p[:-1] in paths for p in paths if len(p) > 1)
    assert max(len(p) for p in paths) <= 4 and paths[0] == (0,)


@pytest.mark.parametrize(
    ("recipe", "extra"),
    [("medusa", ()), ("hydra", ()), ("hydra", ("drafter.variant=hydra++",))],
    ids=IDS,
)
def test_tiny_runs_train_save_and_decode(tmp_path, tiny, tiny_target_dir, data_dir, recipe, extra):  # noqa: F811
    out = tmp_path / recipe
    argv = _argv(recipe, tiny_target_dir, data_dir, out, "train.steps=3", "drafter.num_heads=2",
                 *extra)  # fmt: skip
    assert entry.main(argv) == 0
    names = set(_weights(out))
    assert not any("embed" in n for n in names)  # hydra re-attaches the target's embedding
    target, tokenizer = tiny
    drafter = load_drafter(out / "drafter", TargetInfo.of(target, tokenizer, "t"), target)
    prompt = tokenizer("import os\n", add_special_tokens=False)["input_ids"]
    plain = decode(target, prompt, 12, tokenizer.eos_token_id)
    spec = decode(target, prompt, 12, tokenizer.eos_token_id,
                  proposer=proposer_for(drafter, 0, Sampling()))  # fmt: skip
    assert spec.tokens == plain.tokens
    from infer.eval import evaluate
    from recipes.schema import EvalConfig

    prompts = prompt_file(tmp_path)  # the bundled prompts exceed the tiny target
    flags = [
        "limit=2",
        "max_new_tokens=8",
        "card=false",
        f"target={tiny_target_dir}",
        f"prompts={prompts}",
    ]
    options = load_options(EvalConfig, flags)
    assert evaluate(str(out / "drafter"), options)["overall"]["lossless"]["identical"] == 2


def test_bad_head_settings_are_refused(tiny):
    with pytest.raises(ValueError, match="hydra\\+\\+ trains against the target's distribution"):
        _heads(tiny, Hydra, "drafter.variant=hydra++", "drafter.loss=ce")
    with pytest.raises(ValueError, match="variant=nope: valid choices are hydra, hydra\\+\\+"):
        _heads(tiny, Hydra, "drafter.variant=nope")
    with pytest.raises(ValueError, match="loss=tvdpp is not supported"):
        _heads(tiny, Medusa, "drafter.loss=tvdpp")
