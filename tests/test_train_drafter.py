"""The drafter training engine end to end on a tiny target: overfitting, exact resume (after a
crash and after SIGTERM), every refusal, the saved drafter's round trip, LoRA, and secrets."""

from __future__ import annotations

import json
import os
import re
import signal

import pytest
import torch
from safetensors.torch import load_file

import train.drafter as entry
from data.distill import build_dataset
from models.drafter import Batch, TargetInfo, Teacher, load_drafter
from models.vocab import read_counts
from recipes import load_config
from tests.conftest import build_tiny_dataset
from tests.hub_standin import SENTINEL
from train.engine import single_process
from train.loop import run_loop

PROMPTS = [
    {"id": f"p{i}", "category": "code", "prompt": text}
    for i, text in enumerate(
        ["def add(a, b):\n", "class Point:\n", "for i in range(10):\n", "import os\n",
         "def f(x):\n    return", "x = 1\n", "while True:\n", "if x:\n", "print(", "return ",
         "def g():\n", "import sys\n"]
    )
]  # fmt: skip


def prompt_file(folder) -> str:
    """PROMPTS as a prompt file, e.g. for infer.eval on the tiny target (the bundled eval
    prompts exceed its 256 positions)."""
    path = folder / "eval_prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return str(path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_target_dir, tiny):
    root = tmp_path_factory.mktemp("drafter_data")
    overrides = ["distill.max_new_tokens=12", "distill.shard_size=6"]
    return build_tiny_dataset(root, tiny_target_dir, tiny, PROMPTS, *overrides)


def _argv(tiny_target_dir, data_dir, out, *extra):
    return [
        "recipe=draft_lm", f"target={tiny_target_dir}", f"distill.out={data_dir}",
        f"output_dir={out}", "train.device=cpu", "train.steps=6", "train.batch_size=4",
        "train.warmup_steps=2", "train.save_every=2", "train.log_every=1",
        "drafter.num_layers=1", *extra,
    ]  # fmt: skip


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def _weights(out):
    return load_file(out / "drafter" / "model.safetensors")


def _fail_on_call(monkeypatch, n, action):
    """Make the n-th teacher call (1-based) run ``action`` (raise, or send SIGTERM)."""
    real, calls = entry.teacher_signals, {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            action()
        return real(*args, **kwargs)

    monkeypatch.setattr(entry, "teacher_signals", wrapped)


class Crash(Exception):
    pass


def _crash():
    raise Crash


def _refused(capsys, pattern: str, argv: list[str]) -> None:
    """The entry point refuses ``argv`` with one ``error:`` line matching ``pattern``, exit 2."""
    capsys.readouterr()
    assert entry.main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(f"^error: .*{pattern}", err, re.M) and "Traceback" not in err, err


def test_overfits_one_batch(tiny, data_dir):
    target, tokenizer = tiny
    cfg = load_config(
        ["recipe=draft_lm", "drafter.init=random", "drafter.loss=ce", "train.steps=60",
         "train.lr=1e-2", "train.warmup_steps=0", "train.log_every=60", "train.save_every=1000"]
    )  # fmt: skip
    from models.draft_lm import DraftLM
    from train.batches import MicroBatches, load_rows, teacher_signals

    info = TargetInfo.of(target, tokenizer, "tiny")
    torch.manual_seed(0)
    drafter = DraftLM.from_recipe(cfg.drafter, target, info)
    rows, _ = load_rows(data_dir)
    batch = next(MicroBatches(rows, 4, 0, 0, 1, 0, 512, [])(0))
    first = drafter.objective(drafter(batch, Teacher()), batch, Teacher()).loss.item()

    def loss_fn(model, b):
        teacher = teacher_signals(target, b, drafter)
        return drafter.objective(model(b, teacher), b, teacher)

    engine = single_process(drafter, cfg.train)
    result = run_loop(
        cfg.train, engine, loss_fn, lambda start: iter(lambda: batch, None),
        lambda b: int(b.loss_mask.sum()), data_dir.parent / "overfit",
    )  # fmt: skip
    assert first > 3.0  # random init: about log(vocab)
    assert result.train_loss < 0.2 * first
    assert result.metrics["top1"] > 0.9  # memorised: agrees with the target's tokens


def test_resume_after_crash_equals_uninterrupted(tmp_path, tiny_target_dir, data_dir, monkeypatch):
    straight = tmp_path / "straight"
    assert entry.main(_argv(tiny_target_dir, data_dir, straight)) == 0
    resumed = tmp_path / "resumed"
    _fail_on_call(monkeypatch, 5, _crash)  # dies in step 5, after the step-4 checkpoint
    with pytest.raises(Crash):
        entry.main(_argv(tiny_target_dir, data_dir, resumed))
    assert not (resumed / "drafter").exists()
    monkeypatch.undo()
    assert entry.main(_argv(tiny_target_dir, data_dir, resumed)) == 0
    torch.testing.assert_close(_weights(resumed), _weights(straight))
    # steps 1-4 logged before the crash, then 5-6 after resuming from step 4
    assert _losses(resumed) == pytest.approx(_losses(straight), rel=1e-6)
    summary = (resumed / "drafter" / "training.json").read_text()
    assert entry.main(_argv(tiny_target_dir, data_dir, resumed)) == 0  # finished: nothing to do
    rerun = json.loads((resumed / "drafter" / "training.json").read_text())["metrics"]
    assert rerun["train_loss"] == json.loads(summary)["metrics"]["train_loss"]


def test_progress_eta_and_closing_summary(tmp_path, tiny_target_dir, data_dir, monkeypatch, capsys):
    """The training bar knows its total (so tqdm shows an ETA) and the command ends with what it
    wrote where, and what to run next."""
    import train.loop
    from tests.test_distill import RecordingBar

    monkeypatch.setattr(train.loop, "tqdm", RecordingBar)
    RecordingBar.made = []
    out = tmp_path / "run"
    assert entry.main(_argv(tiny_target_dir, data_dir, out, "train.steps=3")) == 0
    (bar,) = RecordingBar.made
    assert bar.total == 3 and bar.updates == [1, 1, 1]
    stdout = capsys.readouterr().out
    summary = stdout[stdout.index("trained draft_lm in") :]
    for label, path in [("drafter", out / "drafter"), ("log", out / "log.jsonl"),
                        ("checkpoints", out / "checkpoints"), ("dataset", data_dir)]:  # fmt: skip
        assert re.search(rf"^  {label} +{re.escape(str(path))}$", summary, re.M), summary
    assert f"next: python -m infer.eval {out / 'drafter'}" in summary


def test_training_ends_with_tuning_and_one_final_evaluation(tmp_path, tiny_target_dir, data_dir):
    """final_eval.tune: the drafting settings are tuned to this machine (tuned.json), then the
    tuned and the untuned drafter are evaluated in one run and the model card shows both;
    final_eval.repeats: each speedup is the median of the rotations, with their range."""
    out = tmp_path / "run"
    extra = ["train.steps=2", "final_eval.limit=2", "final_eval.max_new_tokens=6",
             "final_eval.tune=true", f"final_eval.prompts={prompt_file(tmp_path)}",
             "final_eval.repeats=3"]  # fmt: skip
    assert entry.main(_argv(tiny_target_dir, data_dir, out, *extra)) == 0
    rows = json.loads((out / "drafter" / "final_eval.json").read_text())
    assert [r["run"] for r in rows] == ["drafter", "drafter, untuned"]
    assert rows[0]["drafting"].endswith("(tuned)") and "tuned" not in rows[1]["drafting"]
    assert all(r["lossless"] == "6/6" for r in rows)  # 2 prompts in each of 3 rotations
    for r in rows:
        low, high = r["speedup_range"]
        assert low <= r["speedup"] <= high and low < high  # three timed rotations differ
    tuned = json.loads((out / "drafter" / "tuned.json").read_text())
    assert tuned["measured"]["n_prompts"] == 2
    assert "## Tuned drafting settings" in (out / "drafter" / "README.md").read_text()


def test_sigterm_saves_at_step_boundary_then_resumes(
    tmp_path, tiny_target_dir, data_dir, monkeypatch, capsys
):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert entry.main(_argv(tiny_target_dir, data_dir, straight)) == 0
    _fail_on_call(monkeypatch, 3, lambda: os.kill(os.getpid(), signal.SIGTERM))
    assert entry.main(_argv(tiny_target_dir, data_dir, stopped)) == 0  # a clean exit
    assert "SIGTERM: saved step 3" in capsys.readouterr().out
    assert (stopped / "checkpoints" / "step-3").is_dir()
    assert not (stopped / "drafter").exists()
    monkeypatch.undo()
    assert entry.main(_argv(tiny_target_dir, data_dir, stopped)) == 0
    torch.testing.assert_close(_weights(stopped), _weights(straight))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ("drafter.loss=ce", "drafter.loss"),
        ("train.lr=3e-3", "train.lr"),
        ("seed=1", "seed"),
    ],
)
def test_resume_refuses_a_changed_recipe(
    tmp_path, tiny_target_dir, data_dir, change, field, capsys
):
    out = tmp_path / "run"
    assert entry.main(_argv(tiny_target_dir, data_dir, out, "train.steps=2")) == 0
    _refused(
        capsys,
        rf"cannot resume .*changed {field}",
        _argv(tiny_target_dir, data_dir, out, "train.steps=2", change),
    )


def test_resume_takes_settings_the_checkpoint_predates(tmp_path, capsys):
    from train.loop import _refuse_changed

    before = {"train.lr": 1e-3}
    _refuse_changed(tmp_path, before, {"train.lr": 1e-3, "drafter.new": "x"})
    assert "predates the settings drafter.new: resuming with drafter.new='x'" in (
        capsys.readouterr().out
    )
    with pytest.raises(ValueError, match="changed train.lr"):
        _refuse_changed(tmp_path, before, {"train.lr": 2e-3, "drafter.new": "x"})
    with pytest.raises(ValueError, match="changed drafter.gone"):  # a setting that went away
        _refuse_changed(tmp_path, {**before, "drafter.gone": 1}, before)


def test_resume_refuses_another_dataset_or_target(
    tmp_path, tiny_target_dir, data_dir, tiny, capsys
):
    out = tmp_path / "run"
    assert entry.main(_argv(tiny_target_dir, data_dir, out, "train.steps=2")) == 0
    other_data = tmp_path / "other_data"
    cfg = load_config(
        ["recipe=draft_lm", f"target={tiny_target_dir}", f"distill.out={other_data}",
         f"prompts.source={data_dir.parent / 'prompts.jsonl'}", "distill.max_new_tokens=6"]
    )  # fmt: skip
    build_dataset(cfg, *tiny)
    argv = _argv(tiny_target_dir, other_data, out, "train.steps=2")
    _refused(capsys, "changed dataset.manifest_sha256", argv)
    # another target: a copy of the tiny target with other weights, same architecture
    model, tokenizer = tiny
    other_target = tmp_path / "other_target"
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
        model.save_pretrained(other_target)
        model.model.norm.weight.sub_(1.0)
    tokenizer.save_pretrained(other_target)
    argv = _argv(other_target, tmp_path / "data3", out, "train.steps=2")
    argv += [f"prompts.source={data_dir.parent / 'prompts.jsonl'}", "distill.max_new_tokens=6"]
    _refused(capsys, r"changed .*target.weights_sha256", argv)


def test_saved_drafter_round_trips_and_refuses_other_targets(
    tmp_path, tiny_target_dir, data_dir, tiny
):
    out = tmp_path / "run"
    assert entry.main(_argv(tiny_target_dir, data_dir, out, "train.steps=2")) == 0
    folder = out / "drafter"
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "config.json", "model.safetensors", "training.json",
        "vocab_counts.safetensors",
    ]  # fmt: skip
    meta = json.loads((folder / "config.json").read_text())
    assert meta["drafter_type"] == "draft_lm" and meta["target"]["id"] == str(tiny_target_dir)
    model, tokenizer = tiny
    info = TargetInfo.of(model, tokenizer, str(tiny_target_dir))
    assert meta["target"]["tokenizer_sha256"] == info.tokenizer_sha256
    drafter = load_drafter(folder, info)
    ids = torch.tensor([[5, 6, 7, 8]])
    batch = Batch(ids, torch.ones_like(ids), torch.ones_like(ids))
    reloaded = load_drafter(str(folder), info)
    torch.testing.assert_close(drafter(batch, Teacher()), reloaded(batch, Teacher()))
    torch.testing.assert_close(
        drafter.state_dict(), {k: v for k, v in load_file(folder / "model.safetensors").items()}
    )
    training = json.loads((folder / "training.json").read_text())
    assert training["metrics"]["steps"] == 2 and training["data"]["rows"] == len(PROMPTS)
    counts = read_counts(folder)  # for draft_vocab=N: the response tokens it trained on
    assert counts.shape == (info.vocab_size,)
    # the training rows' responses only: the held-out rows' tokens are not counted
    assert int(counts.sum()) == training["data"]["train_response_tokens"]
    assert 0 < training["data"]["train_response_tokens"] < training["data"]["response_tokens"]
    wider = TargetInfo(**{**meta["target"], "id": "wide", "hidden_size": 64})
    with pytest.raises(ValueError, match="hidden_size 32.*wide with hidden_size 64"):
        load_drafter(folder, wider)
    other_tok = TargetInfo(**{**meta["target"], "id": "other", "tokenizer_sha256": "abc"})
    with pytest.raises(ValueError, match="tokenizer_sha256"):
        load_drafter(folder, other_tok)


def test_lora_trains_adapters_and_saves_merged(tmp_path, tiny_target_dir, data_dir, tiny):
    out = tmp_path / "lora"
    argv = _argv(tiny_target_dir, data_dir, out, "train.steps=3", "drafter.lora_rank=4")
    assert entry.main(argv) == 0
    model, tokenizer = tiny
    drafter = load_drafter(out / "drafter", TargetInfo.of(model, tokenizer, "t"))
    assert not any("lora" in k for k in drafter.state_dict())  # merged into plain weights
    initial = {k: v for k, v in model.state_dict().items() if k.startswith("model.layers.0")}
    trained = {
        k[3:]: v for k, v in drafter.state_dict().items() if k.startswith("lm.model.layers.0")
    }
    changed = [k for k in initial if not torch.equal(initial[k], trained[k])]
    assert any("q_proj" in k for k in changed)  # adapters on linear layers moved the weights
    assert not any("norm" in k for k in changed)  # non-adapted weights stayed frozen


def test_lora_needs_pretrained_weights(tmp_path, tiny_target_dir, data_dir, capsys):
    argv = _argv(
        tiny_target_dir, data_dir, tmp_path / "x", "drafter.lora_rank=4", "drafter.init=random"
    )
    _refused(capsys, "lora_rank needs pretrained weights", argv)


SENTINEL_HF = "hf_SENTINELsecretTOKEN0123456789abcdef"
SENTINEL_WANDB = "0123456789abcdef0123456789abcdef01234567"


def test_secrets_refused_on_the_command_line(tmp_path, tiny_target_dir, data_dir, capsys):
    argv = _argv(tiny_target_dir, data_dir, tmp_path / "x", f"hub.repo_id={SENTINEL_HF}")
    assert entry.main(argv) == 2
    err = capsys.readouterr().err
    assert "looks like a secret" in err and SENTINEL_HF not in err


def test_push_from_training_and_secrets_never_reach_outputs(
    tmp_path, tiny_target_dir, data_dir, hub, monkeypatch, capfd
):
    """``hub.repo_id`` pushes the drafter (to the local Hub stand-in); the tokens in the
    environment reach no log, config, checkpoint, wandb file, drafter file or pushed file."""
    monkeypatch.setenv("WANDB_API_KEY", SENTINEL_WANDB)
    out = tmp_path / "run"
    argv = _argv(
        tiny_target_dir, data_dir, out, "train.steps=2", "wandb.mode=offline",
        "hub.repo_id=someone/tiny-draft-lm",
    )  # fmt: skip
    assert entry.main(argv) == 0
    captured = capfd.readouterr()
    pushed = hub.files("someone/tiny-draft-lm")
    assert sorted(pushed) == [
        "README.md", "config.json", "model.safetensors", "training.json",
        "vocab_counts.safetensors",  # what draft_vocab=N reads
    ]  # fmt: skip
    assert pushed["model.safetensors"] == (out / "drafter" / "model.safetensors").read_bytes()
    assert "heldout_tau" in pushed["README.md"].decode()  # the card carries the metrics
    assert hub.repo("someone/tiny-draft-lm")["private"] is True
    assert any(SENTINEL in h for h in hub.auth_headers)  # the token was used, from the env
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any("wandb" in str(p) for p in files)  # the offline wandb run was written
    for secret in (SENTINEL, SENTINEL_WANDB):
        assert secret not in captured.out + captured.err
        leaked = [p for p in files if secret.encode() in p.read_bytes()]
        assert not leaked, leaked
        assert not [name for name, data in pushed.items() if secret.encode() in data]


def test_wandb_online_falls_back_to_offline_without_network(tmp_path, monkeypatch, capsys):
    import train.tracking as tracking
    from recipes.schema import WandbConfig, WandbMode

    monkeypatch.setattr(tracking, "_reachable", lambda *a, **k: False)
    log, finish = tracking.start_wandb(
        WandbConfig(project="t", mode=WandbMode.online), "run", {"seed": 0}, tmp_path
    )
    log({"step": 1, "loss": 1.0})
    finish()
    assert "logging offline" in capsys.readouterr().out
    assert list((tmp_path / "wandb").glob("offline-run-*"))
