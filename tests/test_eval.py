"""``python -m infer.eval``: options, the report on a tiny drafter, refusals; and token-identical
greedy decoding on 100 bundled prompts with the embedded target (slow)."""

from __future__ import annotations

import json

import pytest
import torch

from infer.contenders import spread
from infer.decode import decode
from infer.eval import main
from infer.proposers import StaticTree
from infer.proposers.draft_lm import DraftLMProposer
from infer.proposers.prompt_lookup import PromptLookup
from models.draft_lm import DraftLM
from models.drafter import TargetInfo
from models.target import load_target
from recipes import ConfigError, load_config, load_options
from recipes.schema import EvalConfig
from tests.test_train_drafter import PROMPTS


@pytest.fixture(scope="module")
def tiny_drafter(tmp_path_factory, tiny_target_dir, tiny):
    """A 1-layer truncated copy of the tiny target, saved like a trained drafter."""
    target, tokenizer = tiny
    cfg = load_config(["recipe=draft_lm", "drafter.num_layers=1"]).drafter
    info = TargetInfo.of(target, tokenizer, str(tiny_target_dir))
    folder = tmp_path_factory.mktemp("drafter") / "drafter"
    DraftLM.from_recipe(cfg, target, info).save_pretrained(folder)
    (folder / "training.json").write_text(json.dumps({"recipe": "draft_lm"}))
    prompts = folder.parent / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return folder, prompts


def test_options_are_checked():
    """infer.eval options go through the recipes' typed machinery (not a parser of their own)."""
    assert load_options(EvalConfig, ["limit=3", "compare=true", "temperature=0.5"]).compare
    with pytest.raises(ConfigError, match=r"unknown config key 'limt'. Did you mean 'limit'\?"):
        load_options(EvalConfig, ["limt=3"])
    with pytest.raises(ConfigError, match="bad value for 'limit'"):
        load_options(EvalConfig, ["limit=abc"])
    with pytest.raises(ConfigError, match=r"proposer.*expected one of \[chain, tree\]"):
        load_options(EvalConfig, ["proposer=beam"])
    with pytest.raises(ConfigError, match=r"top_p=1.5: out of range, valid values are \(0, 1\]"):
        load_options(EvalConfig, ["top_p=1.5"])


def test_spread_takes_prompts_round_robin_over_categories():
    class P:
        def __init__(self, category):
            self.category = category

    prompts = [P("a")] * 4 + [P("b")] * 4 + [P("c")] * 1
    assert [p.category for p in spread(prompts, 5)] == ["a", "b", "c", "a", "b"]


def test_eval_reports_and_updates_the_model_card(tiny_drafter, capsys):
    folder, prompts = tiny_drafter
    argv = [str(folder), f"prompts={prompts}", "limit=4", "max_new_tokens=8", "compare=true",
            f"out={folder.parent / 'eval'}"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((folder.parent / "eval" / "eval.json").read_text())
    overall = result["overall"]
    assert overall["lossless"] == {
        "identical": 4,
        "checked": 4,
        "mismatches_on_near_ties": 0,
        "parting_gaps": [],
    }
    assert 1.0 <= overall["tau"] <= 5.0  # at most num_draft + 1 tokens per target forward
    assert sum(overall["accepted_length_histogram"].values()) > 0
    assert len(overall["acceptance_per_position"]) == 4
    assert result["settings"]["num_draft"] == 4  # the drafter's default, not the option's 0
    assert sorted(result["peers"]) == [
        "HF assisted generation (same draft model)", "HF generate", "HF prompt lookup"
    ]  # fmt: skip
    for peer in result["peers"].values():  # greedy peers produce our tokens too
        assert peer["identical"] == peer["checked"] == 4
    assert (folder.parent / "eval" / "acceptance.png").stat().st_size > 1000
    card = (folder / "README.md").read_text()
    assert "not measured yet" not in card and f"| `tau` | {overall['tau']:.4f} |" in card
    assert "| overall | 4 |" in capsys.readouterr().out


def test_eval_refuses_a_drafter_for_another_target(tiny_drafter, tiny, tmp_path, capsys):
    from tests.conftest import tiny_llama

    folder, prompts = tiny_drafter
    other = tmp_path / "other"
    tiny_llama(64).save_pretrained(other)  # another vocabulary, same tokenizer files
    tiny[1].save_pretrained(other)
    assert main([str(folder), f"target={other}", f"prompts={prompts}"]) == 2
    err = capsys.readouterr().err
    assert "vocab_size 300" in err and "vocab_size 64" in err


def test_sampling_settings_are_refused(tiny_drafter, capsys):
    folder, _ = tiny_drafter
    assert main([str(folder), "top_p=0"]) == 2
    assert "top_p=0.0: out of range, valid values are (0, 1]" in capsys.readouterr().err


@pytest.mark.slow
def test_token_identical_to_plain_greedy_on_100_bundled_prompts():
    """The embedded target, 100 held-out prompts: prompt lookup and a draft LM, as chains and
    as trees, all give exactly plain greedy decoding's tokens."""
    from data.prompts import load_prompts, render_prompt

    target, tokenizer = load_target("stdlib-llama", "float32", "cpu")
    cfg = load_config(["recipe=draft_lm"]).drafter
    drafter = DraftLM.from_recipe(cfg, target, TargetInfo.of(target, tokenizer, "stdlib-llama"))
    proposers = {
        "prompt lookup": lambda: PromptLookup(),
        "prompt lookup tree": lambda: StaticTree(PromptLookup(), 3),
        "draft LM": lambda: DraftLMProposer(drafter.lm, 4),
        "draft LM tree": lambda: StaticTree(DraftLMProposer(drafter.lm, 4), 2),
    }
    prompts = spread(load_prompts("stdlib-eval"), 100)
    eos, accepted = tokenizer.eos_token_id, {name: 0 for name in proposers}
    with torch.no_grad():
        for p in prompts:
            ids = tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"]
            plain = decode(target, ids, 16, eos).tokens
            for name, make in proposers.items():
                spec = decode(target, ids, 16, eos, proposer=make())
                assert spec.tokens == plain, (name, p.id)
                accepted[name] += sum(spec.accepted)
    assert all(count > 0 for count in accepted.values()), accepted  # drafts were really used


@pytest.mark.slow
def test_bfloat16_mismatches_sit_only_on_near_ties():
    """In bf16 the verify forward (several tokens) and plain decoding (one) round differently, so
    outputs may differ, but only where the target's top-2 logits nearly tie."""
    from infer.eval import evaluate

    options = load_options(EvalConfig, ["dtype=bfloat16", "limit=24", "max_new_tokens=48"])
    lossless = evaluate("prompt-lookup", options)["overall"]["lossless"]
    assert lossless["checked"] == 24
    assert lossless["identical"] + lossless["mismatches_on_near_ties"] == 24, lossless


def test_speedup_compares_time_per_token():
    """Under sampling the plain and speculative runs of a prompt emit different numbers of
    tokens; the speedup compares seconds per token, so a speculative run that stopped at an
    early EOS is not counted as faster."""
    from infer.decode import DecodeResult
    from infer.report import PromptRecord, report

    plain = DecodeResult(list(range(100)), [0] * 100, prefill_s=0.1, total_s=1.1)  # 10 ms/token
    spec = DecodeResult(list(range(10)), [1] * 5, prefill_s=0.1, total_s=0.3)  # 20 ms/token
    overall = report([PromptRecord("x", plain, spec, None)], 4)["overall"]
    assert overall["speedup_excluding_prefill"] == pytest.approx(0.5)
    assert overall["speedup"] == pytest.approx((1.1 / 100) / (0.3 / 10))


def test_every_family_decodes_in_bfloat16(tiny_target_dir, tiny, tmp_path):
    """Each recipe's drafter (untrained) and its proposer run with a bfloat16 target (the dtype
    in which a CPU with AVX512-BF16 verifies several tokens almost as fast as one): outputs as
    long as plain decoding's, mismatches only on near-ties.

    The tiny target's own logits are nearly flat (almost every top-2 gap is under the near-tie
    allowance, so no mismatch could fail the test); a copy with its LM head scaled x40 has
    gaps like a trained model's, and the test first checks that few of them are near-ties."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from infer.contenders import Entry
    from infer.eval import evaluate_many
    from infer.report import NEAR_TIE
    from models.registry import load_families
    from tests.test_train_drafter import prompt_file

    sharp = tmp_path / "sharp-target"
    model = AutoModelForCausalLM.from_pretrained(tiny_target_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(sharp)
    AutoTokenizer.from_pretrained(tiny_target_dir).save_pretrained(sharp)
    target, tokenizer = load_target(str(sharp), "float32", "cpu")
    gaps = []
    for p in PROMPTS[:2]:
        ids = tokenizer(p["prompt"], add_special_tokens=False)["input_ids"]
        ids = ids + decode(target, ids, 12, None).tokens
        with torch.no_grad():
            top = target(input_ids=torch.tensor([ids])).logits[0, -13:].topk(2).values
        gaps += (top[:, 0] - top[:, 1]).tolist()
    near = sum(g < NEAR_TIE for g in gaps) / len(gaps)
    assert near < 0.2, near  # a mismatch off a near-tie would show
    info = TargetInfo.of(target, tokenizer, str(sharp))
    families = load_families()
    recipes = sorted(
        f.stem
        for f in (Path(__file__).resolve().parents[1] / "recipes" / "recipe").glob("*.yaml")
        if f.stem != "stdlib_target"
    )
    entries = []
    for recipe in recipes:
        cfg = load_config([f"recipe={recipe}", f"target={sharp}",
                           "drafter.mask_token_id=3", "drafter.num_layers=1",
                           "drafter.context_layers=1"])  # fmt: skip
        drafter = families[cfg.drafter.type].from_recipe(cfg.drafter, target, info, tokenizer)
        entries.append(Entry(str(drafter.save_pretrained(tmp_path / recipe)), recipe))
    options = load_options(EvalConfig, ["dtype=bfloat16", "limit=2", "max_new_tokens=12",
                                        f"target={sharp}", f"prompts={prompt_file(tmp_path)}",
                                        "card=false"])  # fmt: skip
    run = evaluate_many(entries, options)
    assert [r["settings"]["label"] for r in run["drafters"]] == recipes
    for result in run["drafters"]:
        lossless, label = result["overall"]["lossless"], result["settings"]["label"]
        assert lossless["identical"] + lossless["mismatches_on_near_ties"] == 2, (label, lossless)


def test_lossless_summary_keeps_the_gap_each_mismatch_parted_on():
    from infer.decode import DecodeResult
    from infer.report import PromptRecord, lossless_text, report

    run = DecodeResult([1, 2, 3], [1], prefill_s=0.1, total_s=0.2)
    records = [PromptRecord("x", run, run, True), PromptRecord("x", run, run, False, 0.125),
               PromptRecord("x", run, run, False, 0.25)]  # fmt: skip
    lossless = report(records, 4)["overall"]["lossless"]
    assert lossless == {"identical": 1, "checked": 3, "mismatches_on_near_ties": 1,
                        "parting_gaps": [0.125, 0.25]}  # fmt: skip
    assert lossless_text(lossless) == "1/3 (1 on near-ties; widest gap 0.25)"
    assert lossless_text({**lossless, "identical": 3, "parting_gaps": [],
                          "mismatches_on_near_ties": 0}) == "3/3"  # fmt: skip


def test_logit_drift_compares_the_same_positions(tiny):
    """The drift benchmark's one-token and chunked paths score the same positions: in float32
    they agree to rounding, so no position flips."""
    import torch

    from benchmarks.logit_drift import chunked_path, drift, plain_path

    target, _ = tiny
    tokens, single = plain_path(target, [5, 6, 7, 8], 11)
    chunked = chunked_path(target, [5, 6, 7, 8], tokens)
    assert single.shape == chunked.shape == (11, target.config.vocab_size)
    assert torch.allclose(single, chunked, atol=1e-4)
    assert single.argmax(-1).tolist() == tokens
    d = drift(target, [[5, 6, 7, 8], [9, 10, 11]], 11)
    assert d["positions"] == 22 and d["flips"] == 0 and d["max"] < 1e-4


def test_repeats_report_the_median_rotation_and_its_range(tiny_drafter, capsys):
    """repeats=3: three rotations over the prompts, each decoded plainly and speculatively
    again; the speedup is the median of the three rotations' speedups, shown with the range."""
    import statistics

    folder, prompts = tiny_drafter
    argv = [str(folder), f"prompts={prompts}", "limit=3", "max_new_tokens=6", "repeats=3",
            f"out={folder.parent / 'eval-repeats'}", "card=false"]  # fmt: skip
    assert main(argv) == 0
    overall = json.loads((folder.parent / "eval-repeats" / "eval.json").read_text())["overall"]
    speeds = overall["speedup_repeats"]
    assert len(speeds) == 3 and overall["speedup"] == statistics.median(speeds)
    assert overall["speedup_min"] == min(speeds) and overall["speedup_max"] == max(speeds)
    assert overall["lossless"]["checked"] == 9  # every rotation's runs are checked
    assert overall["prompts"] == 3
    out = capsys.readouterr().out
    assert f"{overall['speedup']:.2f}x ({min(speeds):.2f}–{max(speeds):.2f})" in out
