"""Exact resume through ``train/drafter.py`` for the families no other test resumes: Medusa,
Hydra, Hydra++, Hidden Transfer and Falcon (whose CSGD step draws from torch's global generator),
and a single-process run with ``train.grad_accum=2`` that crashes between two micro-batches of
one step. A run that crashes, then resumes, ends with the weights and logs of a run that never
stopped, and it really resumed: it restarted from the last checkpoint, not from step 0."""

from __future__ import annotations

import json

import pytest
import torch

import train.drafter as entry
from tests.test_train_drafter import (  # noqa: F401  (data_dir: a module fixture)
    Crash,
    _crash,
    _fail_on_call,
    _losses,
    _weights,
    data_dir,
)

STEPS, SAVE_EVERY = 6, 2


def _argv(recipe, tiny_target_dir, dataset, out, *extra):
    return [
        f"recipe={recipe}", f"target={tiny_target_dir}", f"distill.out={dataset}",
        f"output_dir={out}", "train.device=cpu", f"train.steps={STEPS}", "train.batch_size=4",
        "train.warmup_steps=2", f"train.save_every={SAVE_EVERY}", "train.log_every=1",
        "final_eval.limit=0", *extra,
    ]  # fmt: skip


def _records(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# (recipe, extra settings, the teacher call that crashes: one call per micro-batch, so call 5
# is step 5 at grad_accum=1 and call 10 is step 5's second micro-batch at grad_accum=2; either
# way the run dies after the step-4 checkpoint)
CASES = {
    "medusa": ("medusa", ("drafter.num_heads=2",), 5),
    "hydra": ("hydra", ("drafter.num_heads=2",), 5),
    "hydra++": ("hydra", ("drafter.num_heads=2", "drafter.variant=hydra++"), 5),
    "hidden_transfer": ("hidden_transfer", ("drafter.num_heads=2",), 5),
    # CSGD over the whole run: every step glances at random positions (torch's generator)
    "falcon": ("falcon", ("drafter.num_layers=1", f"drafter.csgd_steps={STEPS}"), 5),
    # two micro-batches a step: the glancing ratio follows the optimiser step stamped on each
    # micro-batch, so a resumed run must restart at micro-batch 2 * 4, step 4
    "falcon-grad_accum=2": (
        "falcon",
        ("drafter.num_layers=1", f"drafter.csgd_steps={STEPS}", "train.grad_accum=2"),
        10,
    ),
    "draft_lm-grad_accum=2": ("draft_lm", ("drafter.num_layers=1", "train.grad_accum=2"), 10),
}


@pytest.mark.parametrize(("recipe", "extra", "crash_call"), CASES.values(), ids=CASES.keys())
def test_crash_then_resume_equals_uninterrupted(
    tmp_path,
    tiny_target_dir,
    data_dir,  # noqa: F811
    monkeypatch,
    capsys,
    recipe,
    extra,
    crash_call,
):
    """Straight vs crashed-then-resumed: identical weights and per-step losses; the resumed run
    printed that it resumed from step 4 and logged steps 5-6 only (so it cannot pass by
    retraining from scratch)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert entry.main(_argv(recipe, tiny_target_dir, data_dir, straight, *extra)) == 0

    _fail_on_call(monkeypatch, crash_call, _crash)
    with pytest.raises(Crash):
        entry.main(_argv(recipe, tiny_target_dir, data_dir, resumed, *extra))
    monkeypatch.undo()
    assert not (resumed / "drafter").exists()
    crashed_at = 4  # the last checkpoint before the crash in step 5
    assert [r["step"] for r in _records(resumed)] == list(range(1, crashed_at + 1))
    kept = sorted(p.name for p in (resumed / "checkpoints").iterdir())
    assert kept == [f"step-{crashed_at - SAVE_EVERY}", f"step-{crashed_at}"]

    capsys.readouterr()
    assert entry.main(_argv(recipe, tiny_target_dir, data_dir, resumed, *extra)) == 0
    out = capsys.readouterr().out
    assert f"step-{crashed_at} (step {crashed_at} of {STEPS})" in out, out
    assert [r["step"] for r in _records(resumed)] == list(range(1, STEPS + 1))

    torch.testing.assert_close(_weights(resumed), _weights(straight))
    assert _losses(resumed) == pytest.approx(_losses(straight), rel=1e-6)
    if recipe == "falcon":  # CSGD really drew glances, before the crash and in step 5 after it
        glanced = [r["glanced"] for r in _records(straight)]
        assert glanced[crashed_at] > 0 and sum(glanced[:crashed_at]) > 0, glanced
        assert [r["glanced"] for r in _records(resumed)] == pytest.approx(glanced, rel=1e-6)
