"""Drafting settings tuned to the device, best-first trees, and several drafters in one run.

- the cost model's choice follows the cost curve: flat verification cost -> the widest tree,
  steep cost -> a short chain; the per-cycle cut (CaDDTree) likewise;
- the best-first tree (DDTree) holds exactly the highest-probability paths within its budget;
- the T = 0 replay the tuner uses accepts exactly what real verification accepts;
- tuned settings round-trip through the drafter folder, are used by default and yield to
  options that are set;
- a multi-drafter evaluation keeps every drafter lossless against one plain baseline.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from infer.contenders import Entry, entry_options
from infer.costs import CostModel, Replay, best, cut
from infer.decode import decode
from infer.eval import evaluate_many, main
from infer.proposers.dflash import BlockProposer
from infer.proposers.draft_lm import DraftLMProposer
from infer.proposers.prompt_lookup import PromptLookup
from infer.tree import best_first, prefix
from infer.tune import _accepted, grid, replay
from infer.verify import TargetFeatures
from models.dflash import DFlash
from models.drafter import TUNED_NAME, TargetInfo
from models.sampling import Sampling
from recipes import load_config, load_options
from recipes.schema import EvalConfig
from tests.test_eval import tiny_drafter  # noqa: F401  (fixture)
from tests.test_train_drafter import PROMPTS, prompt_file

FLAT = CostModel([0, 1, 64], [0.010, 0.010, 0.010])
STEEP = CostModel([0, 1, 64], [0.010, 0.020, 0.650])  # every node costs a decode step


def _replay(name: str, tau: float, nodes: int, cycles: int = 100) -> Replay:
    return Replay(
        {"name": name}, round(tau * cycles), [nodes] * cycles, [0] * cycles, 0.002 * cycles
    )


def test_the_choice_follows_the_cost_curve():
    candidates = [
        _replay("chain 1", 1.6, 1), _replay("chain 4", 2.0, 4), _replay("tree 64", 3.0, 64)
    ]  # fmt: skip
    assert best(candidates, FLAT).settings["name"] == "tree 64"
    assert best(candidates, STEEP).settings["name"] == "chain 1"
    # the prediction itself: tokens * plain time per token / (draft + verify + other)
    r = candidates[0]
    assert r.predicted_speedup(FLAT) == pytest.approx(160 * 0.010 / (0.2 + 100 * 0.010))


def test_cost_curve_fits_a_line_through_trees_and_keeps_the_one_token_step():
    costs = CostModel([8, 0, 16, 4], [0.013, 0.008, 0.015, 0.012])  # unsorted on purpose
    assert costs.sizes == [0, 4, 8, 16]
    assert costs.verify(0) == pytest.approx(0.008)  # measured, not the line's intercept
    # least squares through (4, 12), (8, 13), (16, 15) ms: slope 0.25 ms/node, intercept 11
    assert costs.verify(4) == pytest.approx(0.012)
    assert costs.verify(64) == pytest.approx(0.011 + 64 * 0.00025)
    noisy = CostModel([0, 1, 2], [0.01, 0.014, 0.012])  # a dip: the slope is clamped at 0
    assert noisy.verify(2) == pytest.approx(0.013) and noisy.verify(50) == pytest.approx(0.013)
    assert CostModel.from_json(costs.to_json()).verify(12) == pytest.approx(costs.verify(12))
    assert CostModel([0], [0.01]).verify(5) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="one verification time per tree size"):
        CostModel([0, 1], [0.1])


def test_cost_cut_keeps_the_nodes_that_pay():
    probs = [0.9, 0.6, 0.3, 0.05, 0.01]
    assert cut(probs, FLAT, 0.001) == len(probs)  # free verification: keep everything
    assert cut(probs, STEEP, 0.001) == 0  # each node costs a full step: keep nothing
    # a node pays while p * T_n >= E_n * marginal cost: here 0.9 and 0.6 do, 0.3 does not
    mid = CostModel([0, 1, 10], [0.010, 0.011, 0.020])  # 1 ms per node
    expected = [1 + sum(probs[:n]) for n in range(6)]
    rates = [e / (0.010 + 0.001 * n) for n, e in enumerate(expected)]
    assert cut(probs, mid, 0.0) == max(range(6), key=rates.__getitem__)


def test_best_first_tree_holds_the_most_probable_paths():
    torch.manual_seed(0)
    logprobs = torch.log_softmax(torch.randn(3, 5) * 2, -1)  # 3 slots, 5 tokens
    every = {}  # every path of depth 1..3 and its probability
    for depth in range(1, 4):
        for path in itertools.product(range(5), repeat=depth):
            every[path] = math.exp(sum(float(logprobs[d, t]) for d, t in enumerate(path)))
    for budget in (1, 4, 9, 20):
        tree, probs = best_first(logprobs, budget)
        assert len(tree) == budget
        paths = []
        for i, parent in enumerate(tree.parents.tolist()):
            assert parent < i
            paths.append(
                (*paths[parent], int(tree.tokens[i])) if parent >= 0 else (int(tree.tokens[i]),)
            )
        assert probs == sorted(probs, reverse=True)
        for path, p in zip(paths, probs, strict=True):
            assert p == pytest.approx(every[path])
        top = sorted(every.values(), reverse=True)[:budget]
        assert sorted(probs, reverse=True) == pytest.approx(top)
        assert len(prefix(tree, 2)) == min(2, budget)


def _dflash(tiny):
    target, tokenizer = tiny
    cfg = load_config(["recipe=dflash", "drafter.num_layers=1", "drafter.block_size=4",
                       "drafter.num_anchors=6"])  # fmt: skip
    torch.manual_seed(0)
    info = TargetInfo.of(target, tokenizer, "tiny")
    return DFlash.from_recipe(cfg.drafter, target, info, tokenizer).eval()


def test_replay_accepts_what_verification_accepts(tiny, tiny_drafter):  # noqa: F811
    """The tuner's T = 0 replay (matching against the greedy continuation, features from one
    forward) gives the same accepted length every cycle as the real speculative loop."""
    from models.drafter import load_drafter

    target, tokenizer = tiny
    info = TargetInfo.of(target, tokenizer, "tiny")
    draft_lm = load_drafter(tiny_drafter[0], info)
    dflash = _dflash(tiny)
    costs = CostModel([0, 64], [0.01, 0.02])
    cases = [
        (None, {"num_draft": 4}, lambda: PromptLookup(4)),
        (draft_lm, {"num_draft": 3}, lambda: DraftLMProposer(draft_lm.lm, 3)),
        (dflash, {}, lambda: BlockProposer(dflash, 3)),
        (dflash, {"tree_budget": 6}, lambda: BlockProposer(dflash, 3, tree_budget=6)),
    ]
    total = 0
    for p in PROMPTS[:3]:
        ids = tokenizer(p["prompt"], add_special_tokens=False)["input_ids"]
        greedy = decode(target, ids, 16, None).tokens
        for drafter, settings, make in cases:
            layers = list(getattr(make(), "target_layers", None) or [])
            features = None
            if layers:
                taps = TargetFeatures(target, layers)
                with taps, torch.no_grad():
                    target(input_ids=torch.tensor([ids + greedy]))
                features = taps.take()
            real = decode(target, ids, 16, None, proposer=make())
            assert real.tokens == greedy
            simulated = replay(target, drafter, settings, [(ids, greedy, features, None)], costs)
            # the same cycles; in the last one the replay cannot see past the greedy tokens,
            # which the real loop truncates its accepted tokens to
            assert simulated.accepted[:-1] == real.accepted[:-1], (settings, p["prompt"])
            assert simulated.accepted[-1] <= real.accepted[-1]
            assert simulated.tau == pytest.approx(real.tau)
            total += sum(real.accepted)
    assert total > 0  # drafts were really accepted somewhere


def test_accepted_follows_the_matching_branch():
    from infer.tree import DraftTree

    tree = DraftTree.trie([[5, 6, 7], [5, 8], [9]])
    assert _accepted(tree, [5, 8, 1]) == 2
    assert _accepted(tree, [5, 6, 7, 2]) == 3
    assert _accepted(tree, [4]) == 0


def test_grid_covers_the_family_settings(tiny):
    dflash = _dflash(tiny)
    settings = grid(dflash)
    assert {} in settings  # the defaults are always a candidate
    assert {"num_draft": 3, "tree_budget": 64, "cost_cut": True} in settings
    assert {"num_draft": 1} in settings
    assert all(s.get("num_draft", 3) <= 3 for s in settings)
    assert {"num_draft": 16} in grid(None)  # prompt lookup


def test_tuned_settings_round_trip_and_yield_to_set_options(tiny_drafter, tmp_path, capsys):  # noqa: F811
    folder, _ = tiny_drafter
    prompts = prompt_file(tmp_path)
    argv = [str(folder), f"prompts={prompts}", "limit=2", "max_new_tokens=8", "tune=true",
            "tune_prompts=2", f"out={tmp_path / 'eval'}"]  # fmt: skip
    assert main(argv) == 0
    record = json.loads((folder / TUNED_NAME).read_text())
    assert record["settings"] in grid_of(folder)
    assert record["costs"]["sizes"][0] == 0 and len(record["candidates"]) == len(grid_of(folder))
    assert record["measured"]["n_prompts"] == 2  # the evaluation that followed used them
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["settings"]["drafting"].endswith("(tuned)")
    assert "tuned_on" in result["settings"]
    card = (folder / "README.md").read_text()
    assert "## Tuned drafting settings" in card and record["device"] in card
    out = capsys.readouterr().out
    assert "predicted speedup" in out and "measured" in out

    # used by default, overridden by an option that is set, ignored with tuned=false
    record["settings"] = {"num_draft": 2}
    (folder / TUNED_NAME).write_text(json.dumps(record))
    options = load_options(EvalConfig, [])
    assert entry_options(options, Entry(str(folder)), set(), record).num_draft == 2
    assert entry_options(options, Entry(str(folder)), {"num_draft"}, record).num_draft == 0
    assert (
        entry_options(options, Entry(str(folder), "", ["num_draft=3"]), set(), record).num_draft
        == 3
    )
    untuned = Entry(str(folder), "", ["tuned=false"])
    assert entry_options(options, untuned, set(), record).num_draft == 0
    with pytest.raises(ValueError, match="limit: not a per-drafter option"):
        entry_options(options, Entry(str(folder), "", ["limit=3"]), set(), record)
    (folder / TUNED_NAME).unlink()


def grid_of(folder):
    from models.drafter import load_drafter

    return grid(load_drafter(folder))


def test_several_drafters_in_one_run_stay_lossless(tiny_drafter, tmp_path, capsys):  # noqa: F811
    folder, _ = tiny_drafter
    prompts = prompt_file(tmp_path)
    options = load_options(EvalConfig, [f"prompts={prompts}", "limit=4", "max_new_tokens=10"])
    entries = [Entry(str(folder)), Entry(str(folder), "as a tree", ["proposer=tree"]),
               Entry("prompt-lookup")]  # fmt: skip
    run = evaluate_many(entries, options)
    assert [r["settings"]["label"] for r in run["drafters"]] == [
        str(folder), "as a tree", "prompt-lookup"
    ]  # fmt: skip
    for result in run["drafters"]:
        assert result["overall"]["lossless"]["identical"] == 4, result["settings"]["label"]
        # one plain baseline shared by all
        assert (
            result["overall"]["plain_tokens_per_s"]
            == run["drafters"][0]["overall"]["plain_tokens_per_s"]
        )
    with pytest.raises(ValueError, match="both labelled"):
        evaluate_many([Entry("prompt-lookup"), Entry("prompt-lookup")], options)

    # the command line: several checkpoints, one comparison, each folder's card gets its row
    argv = [str(folder), "prompt-lookup", f"prompts={prompts}", "limit=2", "max_new_tokens=8",
            "compare=true", f"out={tmp_path / 'cmp'}"]  # fmt: skip
    assert main(argv) == 0
    report = (tmp_path / "cmp" / "eval.md").read_text()
    assert "Spec-Bench" in report and "mean time ratio" in report and "HF generate" in report
    assert (tmp_path / "cmp" / "speedup_tau.png").stat().st_size > 1000
    comparison = json.loads((folder / "comparison.json").read_text())
    assert [r["this drafter"] for r in comparison["rows"]] == [True, False]
    assert "Compared with other drafters in one run" in (folder / "README.md").read_text()
    assert "fastest:" in capsys.readouterr().out


def test_checkpoints_come_before_options_and_family_options_need_their_family(capsys):
    assert main(["limit=2", "prompt-lookup"]) == 2
    assert "checkpoints come before the options" in capsys.readouterr().err
    assert main(["prompt-lookup", "branches=2"]) == 2
    err = capsys.readouterr().err
    assert "branches: an option of d2sd drafters, and this run has none" in err
    assert "prompt_lookup" in err


def test_specbench_speedup_differs_from_the_mean_ratio_on_a_long_tail():
    """Spec-Bench divides mean tokens/s; the mean of per-prompt ratios weighs every prompt the
    same, so a slow prompt (a long one) with a large ratio pulls it up."""
    from infer.decode import DecodeResult
    from infer.report import PromptRecord, report

    records = []
    for plain_s, spec_s in ((1.0, 0.5), (0.1, 0.1)):  # 10 tokens each: 10 and 100 tok/s plain
        plain = DecodeResult(list(range(10)), [0] * 10, total_s=plain_s)
        spec = DecodeResult(list(range(10)), [1] * 5, total_s=spec_s)
        records.append(PromptRecord("x", plain, spec, True))
    overall = report(records, 4)["overall"]
    assert overall["speedup_ratio_mean"] == pytest.approx((2 + 1) / 2)
    assert overall["speedup"] == pytest.approx(((20 + 100) / 2) / ((10 + 100) / 2))


def test_tree_budget_is_lossless_greedy_and_sampled(tiny):
    target, tokenizer = tiny
    dflash = _dflash(tiny)
    prompt = tokenizer("def add(a, b):\n", add_special_tokens=False)["input_ids"]
    plain = decode(target, prompt, 20, None)
    costs = CostModel([0, 8], [0.01, 0.012])
    for proposer in (BlockProposer(dflash, 3, tree_budget=8),
                     BlockProposer(dflash, 3, tree_budget=8, cost_cut=True, costs=costs)):  # fmt: skip
        assert decode(target, prompt, 20, None, proposer=proposer).tokens == plain.tokens
    sampled = decode(target, prompt, 12, None, Sampling(1.0),
                     BlockProposer(dflash, 3, Sampling(1.0), tree_budget=8))  # fmt: skip
    assert len(sampled.tokens) == 12
    with pytest.raises(ValueError, match="needs this device's cost curve"):
        BlockProposer(dflash, 3, tree_budget=8, cost_cut=True)


def test_cost_curves_are_keyed_by_the_target_dtype():
    """A curve tuned with a float32 target is not reused for a bfloat16 one (its kernels, so
    its costs, differ), and float32 targets keep the device name they always had."""
    from types import SimpleNamespace

    from infer.contenders import Contender, costs_for
    from infer.costs import device_name

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2)).eval()  # fmt: skip
    plain = device_name(model)
    assert "float32" not in plain and "bfloat16" not in plain
    saved = CostModel([0, 1], [123.0, 456.0], device=plain).to_json()
    contender = Contender("x", "prompt-lookup", None, None, {"costs": saved})
    assert costs_for(contender, model).verify_s == [123.0, 456.0]  # same device and dtype
    model.to(torch.bfloat16)
    assert device_name(model) == f"{plain}, bfloat16"
    measured = costs_for(contender, model)  # measured afresh
    assert measured.device == device_name(model) and measured.verify_s[0] < 1.0
    assert device_name(SimpleNamespace(device=torch.device("cpu"), dtype=torch.bfloat16)) == (
        device_name(model)
    )
