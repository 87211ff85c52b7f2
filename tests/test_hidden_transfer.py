"""Hidden Transfer: the drafts equal a manual run of the target's upper layers on the pseudo
states, training and inference agree, only the transfer module is trained and saved, decoding
is lossless, and the tuner's replay of it is exact."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DynamicCache

import train.drafter as entry
from infer.costs import CostModel
from infer.decode import decode
from infer.eval import main as eval_main
from infer.proposers import proposer_for
from infer.proposers.hidden_transfer import TransferProposer
from infer.tune import grid, replay
from infer.verify import TargetFeatures
from models.drafter import TUNED_NAME, Batch, TargetInfo, load_drafter
from models.hidden_transfer import HiddenTransfer
from models.sampling import Sampling
from models.target import cache_arg
from recipes import load_config
from tests.test_dflash import _argv, data_dir  # noqa: F401  (module fixture)
from tests.test_train_drafter import PROMPTS, _weights, prompt_file
from train.batches import teacher_signals

K = 3


def _transfer(tiny, *overrides) -> HiddenTransfer:
    target, tokenizer = tiny
    cfg = load_config(["recipe=hidden_transfer", f"drafter.num_heads={K}",
                       "drafter.tree_nodes=12", *overrides])  # fmt: skip
    drafter = HiddenTransfer.from_recipe(cfg.drafter, target, TargetInfo.of(target, tokenizer, "t"))
    generator = torch.Generator().manual_seed(0)
    for p in drafter.parameters():  # leave the zero init: pseudo states that differ from h_t
        p.data.add_(0.3 * torch.randn(p.shape, generator=generator))
    return drafter.eval()


def _prefill(target, ids: list[int], layer: int):
    """The target's cache over ``ids`` and its layer-``layer`` states (T, H)."""
    cache = DynamicCache(config=target.config)
    taps = TargetFeatures(target, [layer])
    with taps, torch.no_grad():
        target(input_ids=torch.tensor([ids]), **cache_arg(target, cache), use_cache=True)
    return cache, taps.take()


def test_drafts_equal_the_targets_upper_layers_run_on_the_pseudo_states(tiny):
    """A manual run: the whole target over the context plus k placeholder tokens, with decoder
    layer L - 1's output at those k rows replaced by the pseudo states; its logits there are the
    drafts."""
    target, tokenizer = tiny
    drafter = _transfer(tiny)
    layer = drafter.config["transfer_layer"]
    ids = tokenizer("def add(a, b):\n    return", add_special_tokens=False)["input_ids"]
    context, root = ids[:-1], ids[-1]
    cache, hidden = _prefill(target, context, layer)
    upper = [(lay.keys, lay.values) for lay in cache.layers[layer:]]
    drafts = drafter.draft_logits(hidden[-1], root, upper)  # (k, V)
    assert drafts.shape == (K, target.config.vocab_size)

    with torch.no_grad():
        root_emb = target.get_input_embeddings()(torch.tensor([root]))
        pseudo = drafter.pseudo_states(hidden[-1][None], root_emb)[0]  # (k, H)

    def swap(module, args, output):
        states = output[0] if isinstance(output, tuple) else output
        states = states.clone()
        states[0, -K:] = pseudo
        return (states, *output[1:]) if isinstance(output, tuple) else states

    handle = target.get_decoder().layers[layer - 1].register_forward_hook(swap)
    try:
        with torch.no_grad():
            full = target(input_ids=torch.tensor([context + [0] * K])).logits[0, -K:]
    finally:
        handle.remove()
    torch.testing.assert_close(drafts, full.float(), atol=1e-4, rtol=1e-4)


def test_training_forward_equals_the_draft_at_the_same_position(tiny):
    target, _ = tiny
    drafter = _transfer(tiny)
    layer = drafter.config["transfer_layer"]
    ids = torch.randint(3, target.config.vocab_size, (2, 18),
                        generator=torch.Generator().manual_seed(1))  # fmt: skip
    batch = Batch(ids, torch.ones_like(ids), torch.ones_like(ids))
    teacher = teacher_signals(target, batch, drafter)
    with torch.no_grad():
        out = drafter(batch, teacher)
    assert out.logits.shape[:2] == (K, len(out.rows))
    for row, t in ((0, 4), (1, 9), (1, 13)):
        flat = (out.rows == row * 18 + t).nonzero().flatten()
        assert len(flat) == 1
        cache, hidden = _prefill(target, ids[row, : t + 1].tolist(), layer)
        upper = [(lay.keys, lay.values) for lay in cache.layers[layer:]]
        draft = drafter.draft_logits(hidden[-1], int(ids[row, t + 1]), upper)
        torch.testing.assert_close(out.logits[:, flat[0]], draft, atol=1e-4, rtol=1e-4)


def test_bad_transfer_layer_is_refused(tiny):
    with pytest.raises(ValueError, match="transfer_layer=2: valid hidden-state indices are 1..1"):
        _transfer(tiny, "drafter.transfer_layer=2")


def test_replay_accepts_what_the_loop_accepts(tiny):
    target, tokenizer = tiny
    drafter = _transfer(tiny)
    layer = drafter.config["transfer_layer"]
    costs = CostModel([0, 64], [0.01, 0.02])
    for text in [p["prompt"] for p in PROMPTS[:3]]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        greedy = decode(target, ids, 16, None).tokens
        cache, features = _prefill(target, ids + greedy, layer)
        real = decode(target, ids, 16, None, proposer=TransferProposer(drafter, K))
        simulated = replay(target, drafter, {}, [(ids, greedy, features, cache)], costs)
        assert simulated.accepted[:-1] == real.accepted[:-1]
        assert simulated.tau == pytest.approx(real.tau)


def test_tiny_run_trains_saves_the_transfer_module_only_and_decodes(
    tmp_path,
    tiny,
    tiny_target_dir,
    data_dir,  # noqa: F811
):
    out = tmp_path / "ht"
    argv = _argv("hidden_transfer", tiny_target_dir, data_dir, out, "train.steps=3",
                 "drafter.num_heads=2")  # fmt: skip
    assert entry.main(argv) == 0
    names = set(_weights(out))
    assert names and all(n.startswith("transfer.") for n in names), names
    target, tokenizer = tiny
    before = {k: v.clone() for k, v in target.state_dict().items()}
    drafter = load_drafter(out / "drafter", TargetInfo.of(target, tokenizer, "t"), target)
    prompt = tokenizer("import os\n", add_special_tokens=False)["input_ids"]
    plain = decode(target, prompt, 12, tokenizer.eos_token_id)
    spec = decode(target, prompt, 12, tokenizer.eos_token_id,
                  proposer=proposer_for(drafter, 0, Sampling()))  # fmt: skip
    assert spec.tokens == plain.tokens
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())
    # tuned through infer.eval (the replay reads the target's cache), then evaluated losslessly
    run = [str(out / "drafter"), f"target={tiny_target_dir}", f"prompts={prompt_file(tmp_path)}",
           "limit=2", "max_new_tokens=8", "tune=true", "tune_prompts=2", f"out={tmp_path / 'e'}"]  # fmt: skip
    assert eval_main(run) == 0
    record = json.loads((out / "drafter" / TUNED_NAME).read_text())
    assert len(record["candidates"]) == len(grid(drafter)) == 8  # tree sizes, like the heads
    result = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert result["overall"]["lossless"]["identical"] == 2
