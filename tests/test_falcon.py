"""Falcon: label alignment, the block-causal mask, CSGD's glance count, the inference pass equal
to the training forward, and a tiny run through ``train/drafter.py``."""

from __future__ import annotations

import pytest
import torch

import train.drafter as entry
from infer.decode import decode
from infer.proposers import proposer_for
from models.drafter import Batch, TargetInfo, load_drafter
from models.falcon import Falcon, block_causal_mask, glance_ratio
from models.sampling import Sampling
from recipes import load_config
from tests.test_dflash import _argv, data_dir  # noqa: F401  (module fixture)
from tests.test_train_drafter import prompt_file
from train.batches import teacher_signals


def _falcon(tiny, *overrides) -> Falcon:
    target, tokenizer = tiny
    cfg = load_config(["recipe=falcon", *overrides])
    torch.manual_seed(0)
    drafter = Falcon.from_recipe(cfg.drafter, target, TargetInfo.of(target, tokenizer, "t"))
    return drafter.eval()


def test_row_i_reads_t_i_plus_1_and_predicts_f_i_plus_k(tiny):
    drafter = _falcon(tiny)  # k = 2
    ids = torch.arange(10, 20)[None]
    loss_mask = torch.zeros_like(ids)
    loss_mask[0, 4:9] = 1  # tokens 5..9 are response tokens
    batch = Batch(ids, torch.ones_like(ids), loss_mask)
    feats = torch.arange(10.0)[None, :, None].expand(1, 10, 4)
    teacher = type("T", (), {"hidden_states": {drafter.config["final_layer"]: feats}})()
    next_ids, f, answer, labels = drafter.teacher_inputs(batch, teacher)
    assert next_ids[0, 3] == 14 and f[0, 3, 0] == 3  # row 3: token 4, feature 3
    assert answer[0, 3, 0] == 5 and labels[0, 3] == 16  # regresses f_5; its token is t_6
    # scored where the label t_{i+3} exists and is a response token (5..9)
    assert drafter.scored(batch)[0].tolist() == [2 <= i <= 6 for i in range(10)]


def test_block_causal_mask():
    mask = block_causal_mask(5, 2, 0)
    assert mask.int().tolist() == [
        [1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1],
    ]  # fmt: skip
    assert block_causal_mask(3, 2, 1).int().tolist() == [[1, 0, 0], [1, 1, 1], [1, 1, 1]]


def test_csgd_glances_exactly_round_lambda_m_inputs():
    assert glance_ratio(0, 100) == pytest.approx(0.5)
    assert glance_ratio(50, 100) == pytest.approx(0.3)
    assert glance_ratio(100, 100) == pytest.approx(0.1) and glance_ratio(3, 0) == 0.0
    missed = torch.tensor([[1, 1, 1, 0, 1, 0, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0, 0, 0]]).bool()
    eligible = torch.tensor([[1, 0] * 5, [1, 0] * 5]).bool()  # block-first loss positions
    torch.manual_seed(0)
    for ratio, expect in ((0.5, [3, 0]), (0.3, [2, 0]), (0.1, [1, 0])):  # M = 6 and 1
        glanced = Falcon.glance(missed, eligible, ratio)
        assert glanced.sum(-1).tolist() == expect
        assert not (glanced & ~eligible).any()


def test_csgd_forward_glances_and_replaces_inputs(tiny):
    target, _ = tiny
    drafter = _falcon(tiny, "drafter.csgd_steps=10")
    ids = torch.randint(
        3, target.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(1)
    )
    batch = drafter.prepare_batch(Batch(ids, torch.ones_like(ids), torch.ones_like(ids), step=0))
    teacher = teacher_signals(target, batch, drafter)
    torch.manual_seed(5)
    out = drafter(batch, teacher)
    assert out.glanced.any()  # an untrained drafter misses often: lambda = 0.5 of M
    batch.step = 10  # past csgd_steps: lambda 0.1
    assert drafter(batch, teacher).glanced.sum() < out.glanced.sum()
    loss = drafter.objective(out, batch, teacher)
    assert torch.isfinite(loss.loss) and loss.metrics["glanced"] == out.glanced.sum()


def test_inference_pass_equals_the_training_rows(tiny):
    target, _ = tiny
    drafter = _falcon(tiny, "drafter.csgd_steps=0")  # no glancing: the inputs as at inference
    ids = torch.randint(
        3, target.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(2)
    )
    batch = Batch(ids, torch.ones_like(ids), torch.ones_like(ids))
    batch.extra["offset"] = torch.tensor([1])  # blocks [1, 2], [3, 4], ... with k = 2
    teacher = teacher_signals(target, batch, drafter)
    with torch.no_grad():
        trained = drafter(batch, teacher).features[0]
    feats = teacher.hidden_states[drafter.config["final_layer"]][0]
    s = 13  # the block [13, 14]: positions before it are the draft cache
    span = torch.arange(0, s)[None]
    cache = drafter.context_kv(ids[:, 1 : s + 1], feats[None, :s], span)
    block = torch.arange(s, s + 2)[None]
    predicted, logits, _ = drafter.draft_block(
        ids[:, s + 1 : s + 3], feats[None, s : s + 2], block, cache
    )
    torch.testing.assert_close(predicted[0], trained[s : s + 2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        logits[0], drafter.tokens_of(trained[s : s + 2]), atol=1e-4, rtol=1e-4
    )


def test_tiny_falcon_run_trains_and_decodes(tmp_path, tiny, tiny_target_dir, data_dir):  # noqa: F811
    out = tmp_path / "falcon"
    argv = _argv("falcon", tiny_target_dir, data_dir, out, "train.steps=3", "drafter.csgd_steps=3")
    assert entry.main(argv) == 0
    target, tokenizer = tiny
    drafter = load_drafter(out / "drafter", TargetInfo.of(target, tokenizer, "t"), target)
    prompt = tokenizer("import os\n", add_special_tokens=False)["input_ids"]
    plain = decode(target, prompt, 12, tokenizer.eos_token_id)
    spec = decode(target, prompt, 12, tokenizer.eos_token_id,
                  proposer=proposer_for(drafter, 0, Sampling()))  # fmt: skip
    assert spec.tokens == plain.tokens
    from infer.eval import evaluate
    from recipes import load_options
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
    with pytest.raises(ValueError, match="num_layers=2: only 1 is supported"):
        _falcon(tiny, "drafter.num_layers=2")
