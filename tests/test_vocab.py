"""Reduced draft vocabulary (``models/vocab.py``, ``infer.eval ... draft_vocab=N``)."""

import json
from pathlib import Path

import pytest
import torch

from infer.contenders import Entry
from infer.eval import evaluate_many
from models.drafter import TargetInfo
from models.registry import load_families
from models.vocab import (
    SubsetLinear,
    frequent_ids,
    read_counts,
    response_token_counts,
    restrict_vocab,
    write_counts,
)
from recipes import load_config, load_options
from recipes.schema import EvalConfig
from tests.test_train_drafter import prompt_file

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "recipe"


def test_counts_are_the_response_tokens_only():
    rows = {"input_ids": [[1, 2, 3, 3], [3, 4]], "loss_mask": [[0, 0, 1, 1], [0, 1]]}
    counts = response_token_counts(rows, 6)
    assert counts.tolist() == [0, 0, 0, 2, 1, 0]


def test_frequent_ids_rank_by_count_then_id():
    counts = torch.tensor([5, 0, 7, 5, 1])
    assert frequent_ids(counts, 3).tolist() == [0, 2, 3]  # 7, then the tie 5/5 in id order
    assert frequent_ids(counts, 5).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"draft_vocab=6: must be 1..5"):
        frequent_ids(counts, 6)


def test_subset_projection_keeps_the_subset_logits_and_masks_the_rest():
    torch.manual_seed(0)
    full = torch.nn.Linear(8, 10, bias=False)
    ids = torch.tensor([1, 4, 7])
    x = torch.randn(2, 3, 8)
    out = SubsetLinear(full, ids)(x)
    assert out.shape == (2, 3, 10)
    torch.testing.assert_close(out[..., ids], full(x)[..., ids])
    others = [i for i in range(10) if i not in ids.tolist()]
    assert torch.isinf(out[..., others]).all() and (out[..., others] < 0).all()


def _drafter(recipe, tiny_target_dir, tiny):
    """``recipe``'s drafter (untrained, one layer) for the tiny target."""
    target, tokenizer = tiny
    info = TargetInfo.of(target, tokenizer, str(tiny_target_dir))
    cfg = load_config([f"recipe={recipe}", f"target={tiny_target_dir}",
                       "drafter.mask_token_id=3", "drafter.num_layers=1",
                       "drafter.context_layers=1"])  # fmt: skip
    return load_families()[cfg.drafter.type].from_recipe(cfg.drafter, target, info, tokenizer)


def test_families_with_their_own_vocabulary_projection_are_restricted(tiny_target_dir, tiny):
    """draft_lm, deer, medusa, hydra and eagle3 score drafts with heads of their own, which are
    restricted;
    the families that draft through the target's LM head are refused, naming those it fits."""
    ids = torch.arange(0, 40)
    restricted = {}
    for recipe in sorted(f.stem for f in RECIPES.glob("*.yaml") if f.stem != "stdlib_target"):
        try:
            restricted[recipe] = restrict_vocab(_drafter(recipe, tiny_target_dir, tiny), ids)
        except ValueError as error:
            assert "draft_lm, deer, medusa, hydra and eagle3" in str(error)
    assert restricted == {"deer": 1, "draft_lm": 1, "eagle3": 1, "hydra": 4, "medusa": 4}


def test_reduced_vocabulary_decodes_losslessly(tmp_path, tiny_target_dir, tiny):
    """With a reduced vocabulary the draft LM and Medusa still decode token-identically to plain
    decoding (greedy), and sampling runs; the whole vocabulary as the "subset" drafts exactly
    what the unrestricted drafter drafts."""
    target, tokenizer = tiny
    prompts = prompt_file(tmp_path)
    entries = []
    for recipe in ("draft_lm", "medusa"):
        drafter = _drafter(recipe, tiny_target_dir, tiny)
        folder = drafter.save_pretrained(tmp_path / recipe)
        (folder / "training.json").write_text(json.dumps({"recipe": recipe}))
        counts = torch.arange(target.config.vocab_size).flip(0)  # low ids most frequent
        write_counts(folder, counts)
        assert torch.equal(read_counts(folder), counts)
        entries += [Entry(str(folder), recipe),
                    Entry(str(folder), f"{recipe} 40", ["draft_vocab=40"]),
                    Entry(str(folder), f"{recipe} all",
                          [f"draft_vocab={target.config.vocab_size}"])]  # fmt: skip
    for temperature in (0.0, 1.0):
        options = load_options(EvalConfig, [f"prompts={prompts}", "limit=2", "max_new_tokens=10",
                                            f"temperature={temperature}", "card=false",
                                            "tuned=false"])  # fmt: skip
        if temperature:  # sampling from a distribution that is zero outside the subset
            entries = [e for e in entries if e.label.endswith(" 40")]
        run = {r["settings"]["label"]: r for r in evaluate_many(entries, options)["drafters"]}
        for recipe in ("draft_lm", "medusa"):
            assert "draft_vocab=40" in run[f"{recipe} 40"]["settings"]["drafting"]
            if temperature == 0.0:
                for label in (recipe, f"{recipe} 40", f"{recipe} all"):
                    lossless = run[label]["overall"]["lossless"]
                    assert lossless["identical"] == lossless["checked"] == 2, label
                full, same = run[recipe]["overall"], run[f"{recipe} all"]["overall"]
                assert full["tau"] == same["tau"], recipe


def test_draft_vocab_needs_the_counts(tmp_path, tiny_target_dir, tiny):
    drafter = _drafter("draft_lm", tiny_target_dir, tiny)
    folder = drafter.save_pretrained(tmp_path / "no_counts")
    options = load_options(EvalConfig, [f"prompts={prompt_file(tmp_path)}", "limit=1",
                                        "max_new_tokens=4", "card=false"])  # fmt: skip
    with pytest.raises(FileNotFoundError, match="python -m models.vocab DATASET"):
        evaluate_many([Entry(str(folder), "x", ["draft_vocab=10"])], options)
    with pytest.raises(ValueError, match="draft_vocab: an option of trained drafters"):
        evaluate_many([Entry("prompt-lookup")], options, explicit={"draft_vocab"})


def test_tuner_replays_reduced_vocabularies_and_eval_uses_its_choice(
    tmp_path, tiny_target_dir, tiny, monkeypatch
):
    """With the token counts in the folder, every grid candidate is also replayed with each
    reduced vocabulary; a tuned ``draft_vocab`` is applied by infer.eval like any setting."""
    import infer.tune
    from infer.eval import main
    from infer.tune import grid
    from models.drafter import TUNED_NAME

    monkeypatch.setattr(infer.tune, "VOCAB_SIZES", (40,))  # the tiny vocabulary has 300 tokens
    drafter = _drafter("draft_lm", tiny_target_dir, tiny)
    folder = drafter.save_pretrained(tmp_path / "draft_lm")
    (folder / "training.json").write_text(json.dumps({"recipe": "draft_lm"}))
    write_counts(folder, torch.arange(tiny[0].config.vocab_size).flip(0))
    prompts = prompt_file(tmp_path)
    argv = [str(folder), f"prompts={prompts}", "limit=2", "max_new_tokens=8", "tune=true",
            "tune_prompts=2", f"out={tmp_path / 'eval'}", "card=false"]  # fmt: skip
    assert main(argv) == 0
    record = json.loads((folder / TUNED_NAME).read_text())
    base = grid(drafter)
    tried = [c["settings"] for c in record["candidates"]]
    assert tried == base + [{**c, "draft_vocab": 40} for c in base]

    record["settings"] = {"num_draft": 2, "draft_vocab": 40}
    (folder / TUNED_NAME).write_text(json.dumps(record))
    assert main(argv[:4] + [f"out={tmp_path / 'eval2'}", "card=false"]) == 0
    result = json.loads((tmp_path / "eval2" / "eval.json").read_text())
    assert result["settings"]["drafting"] == "num_draft=2 draft_vocab=40 (tuned)"
    assert result["overall"]["lossless"]["identical"] == 2
