"""train/pretrain.py end to end on a tiny corpus; the loop resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch

from recipes import load_config
from tests.conftest import tiny_llama
from train.engine import single_process
from train.loop import cosine_lr, run_loop
from train.pretrain import causal_lm_loss, pretrain

TINY = [
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.intermediate_size=64",
    "model.vocab_size=300",
    "model.save_dtype=float32",
    "corpus.seq_len=32",
    "corpus.heldout_fraction=0.3",
    "corpus.eval_windows=4",
    "train.batch_size=4",
    "train.steps=6",
    "train.warmup_steps=2",
    "train.log_every=2",
    "train.eval_every=2",
    "train.save_every=3",
    "train.device=cpu",
]


def _corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(12):
        body = "\n".join(f"    total = total + {j} * value_{i}" for j in range(30))
        (root / f"mod{i}.py").write_text(f"def f{i}(value_{i}):\n    total = 0\n{body}\n")
    return root


def test_pretrain_exports_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    cfg = load_config(
        ["recipe=stdlib_target", f"corpus.source={_corpus(tmp_path)}", f"output_dir={out}", *TINY]
    )
    export = pretrain(cfg, command="pytest")
    provenance = json.loads((export / "provenance.json").read_text())
    assert provenance["training"]["steps"] == 6
    assert provenance["training"]["tokens_seen"] == 6 * 4 * 31  # predicted positions
    assert provenance["corpus"]["heldout_modules"]  # whole modules held out
    model = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert model.config.num_hidden_layers == 2 and len(tokenizer) == model.config.vocab_size
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]  # it learns


def test_cosine_schedule_shape():
    cfg = load_config(["recipe=stdlib_target", "train.steps=100", "train.warmup_steps=10"]).train
    assert cosine_lr(0, cfg) == cfg.lr / 10
    assert cosine_lr(9, cfg) == cfg.lr
    assert abs(cosine_lr(100, cfg) - cfg.lr * cfg.min_lr_ratio) < 1e-12


class Killed(Exception):
    pass


DATA_X, DATA_Y = {"data": "x"}, {"data": "y"}


def _positions(batch):
    return batch[:, 1:].numel()


def _run(tmp_path, name, kill_at_batch=None):
    torch.manual_seed(0)
    model = tiny_llama(64)
    data = torch.randint(0, 64, (40, 16), generator=torch.Generator().manual_seed(1))

    def batches(start):
        i = start
        while True:
            if i == kill_at_batch:
                raise Killed
            yield data[(4 * i) % 40 : (4 * i) % 40 + 4]
            i += 1

    overrides = ["train.steps=6", "train.warmup_steps=2", "train.save_every=2", "train.log_every=1"]
    cfg = load_config(["recipe=stdlib_target", *overrides]).train
    engine = single_process(model, cfg)
    run_loop(cfg, engine, causal_lm_loss, batches, _positions, tmp_path / name, fingerprint=DATA_X)
    return model, tmp_path / name / "log.jsonl"


def test_resume_equals_uninterrupted(tmp_path):
    straight, straight_log = _run(tmp_path, "straight")
    with pytest.raises(Killed):
        _run(tmp_path, "resumed", kill_at_batch=5)  # dies in step 6, after the step-4 checkpoint
    resumed, resumed_log = _run(tmp_path, "resumed")  # rerun: resumes at step 4
    torch.testing.assert_close(resumed.state_dict(), straight.state_dict())
    straight_losses = [json.loads(x)["loss"] for x in straight_log.read_text().splitlines()]
    resumed_losses = [json.loads(x)["loss"] for x in resumed_log.read_text().splitlines()]
    # steps 1-5 logged before the crash, then steps 5-6 again after resuming from step 4
    assert resumed_losses == straight_losses[:5] + straight_losses[4:]


def test_resume_refuses_a_changed_run(tmp_path):
    _run(tmp_path, "run")
    model, _ = _run(tmp_path, "other")
    cfg = load_config(["recipe=stdlib_target", "train.steps=6"]).train
    with pytest.raises(ValueError, match="changed data"):
        engine = single_process(model, cfg)
        run_loop(
            cfg, engine, causal_lm_loss, None, _positions, tmp_path / "run", fingerprint=DATA_Y
        )
